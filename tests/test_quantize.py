"""builder/quant/primitives.py and policy.py: GPTQ beats rounding under the Hessian metric; SDClip; the recipe
table; pruning candidates."""

import numpy as np
import pytest
import torch

from builder.artifact.budget import measured_bytes
from builder.config import QuantConfig
from builder.quant.policy import Choice, Quantizer
from builder.quant.primitives import encode_matrix, gptq, hessian_error, matrix_group, sdclip_scales
from runtime.errors import PgError


def correlated_problem(rows=48, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(4096, cols, generator=g) @ mix
    return w, x.T @ x / x.size(0)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_gptq_beats_round_to_nearest_on_hessian_error(bits):
    w, h = correlated_problem()
    k = 12.85 if bits == 6 else 4.0 * 2 ** (bits - 4)
    codes, scales = gptq(w, h, bits, k, block=32)
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= qmax
    rtn = torch.clamp(torch.round(w / scales[:, None]), -qmax, qmax) * scales[:, None]
    assert hessian_error(w, codes.float() * scales[:, None], h) < hessian_error(w, rtn, h)


def test_sdclip_scale_is_k_sigma_over_qmax_in_fp16():
    w = torch.randn(8, 256)
    s = sdclip_scales(w, 6, 12.85)
    assert torch.allclose(s, (12.85 * w.std(dim=1) / 31).half().float())


def test_dead_columns_do_not_break_gptq():
    w, h = correlated_problem()
    h[:, 5] = 0
    h[5, :] = 0
    codes, _ = gptq(w, h, 6, 12.85)
    assert (codes[:, 5] == 0).all()


def test_recipe_table_int8_embedding_int6_matrices_fp16_controls():
    state = {"tok_emb.weight": torch.randn(300, 64), "blocks.0.attn.q.weight": torch.randn(64, 64),
             "blocks.0.mlp.fc.weight": torch.randn(256, 64), "blocks.0.attn_scale": torch.ones(64)}
    hessians = {n: torch.eye(64) for n in state if n != "blocks.0.attn_scale"}
    quantizer = Quantizer(state, hessians, QuantConfig(passthrough_max_numel=1000))
    assert {n: c.bits for n, c in quantizer.default_plan().items()} == \
        {"tok_emb.weight": 8, "blocks.0.attn.q.weight": 6, "blocks.0.mlp.fc.weight": 6}
    encoded = {e.name: e for e in quantizer.encode_all(quantizer.default_plan())}
    assert encoded["blocks.0.attn_scale"].enc == "fp16"
    assert (encoded["blocks.0.mlp.fc.weight"].enc == "int6"
            and encoded["blocks.0.mlp.fc.weight"].scales.dtype == np.float16)


def test_fewer_bits_fewer_bytes_more_error():
    w, h = correlated_problem()
    cfg = QuantConfig()
    by_bits = {b: encode_matrix("blocks.0.mlp.fc.weight", w, h, b, 12.85, cfg) for b in (4, 5, 6, 7)}
    for b in (4, 5, 6):
        assert by_bits[b].estimated_bytes() < by_bits[b + 1].estimated_bytes()
        assert by_bits[b].error > by_bits[b + 1].error


def test_dequantize_uses_the_runtime_decoder_exactly():
    w, h = correlated_problem()
    e = encode_matrix("blocks.0.attn.q.weight", w, h, 6, 12.85, QuantConfig())
    expected = torch.from_numpy(e.data.astype(np.float32) * e.scales.astype(np.float32)[:, None])
    assert torch.equal(e.dequantize(), expected)


def test_matrix_groups():
    assert matrix_group("blocks.3.mlp.proj.weight") == "mlp_proj"
    assert matrix_group("tok_emb.weight") == "tok_emb"
    assert matrix_group("blocks.3.attn_scale") is None


def skewed_problem(rows=64, cols=128, seed=1):
    """Weights with a correlated Hessian whose diagonal spans about e^±3: column energy varies, so
    ranking ±1 codes by s² alone and by s² H_jj disagree."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.randn(rows, 1, generator=g) * 0.5).exp()
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(8 * cols, cols, generator=g) @ mix * (1.5 * torch.randn(cols, generator=g)).exp()
    return w, x.T @ x / x.size(0)


def pruning_quantizer(**quant):
    w, h = skewed_problem()
    name = "blocks.0.mlp.fc.weight"
    return Quantizer({name: w}, {name: h}, QuantConfig(gptq_block=64, passthrough_max_numel=1000, **quant)), name


def independent_costs(encoded, h, col_scale=None):
    """s_i² H_jj / c_j² for every code, written out from the decoder's formula (W = q s / c)."""
    c2 = 1.0 if col_scale is None else col_scale.astype(np.float64)[None, :] ** 2
    return encoded.scales.astype(np.float64)[:, None] ** 2 * torch.diag(h).double().numpy()[None, :] / c2


@pytest.mark.parametrize("transform", [None, "awq"])
def test_pruning_zeros_only_plus_minus_one_codes_cheapest_first(transform):
    quantizer, name = pruning_quantizer()
    h = quantizer.hessians[name]
    full = quantizer.encode(name, Choice(4, transform=transform))
    pruned = quantizer.encode(name, Choice(4, transform=transform, prune=0.3))
    changed = full.data != pruned.data
    assert (np.abs(full.data[changed]) == 1).all() and (pruned.data[changed] == 0).all()
    plus_minus_one = np.abs(full.data) == 1
    assert changed.sum() == round(0.3 * plus_minus_one.sum())
    costs = independent_costs(full, h, full.extras["col_scale"][0] if transform else None)
    # Hessian-weighted order: on this Hessian, ranking by s² alone would break this.
    assert costs[changed].max() <= costs[plus_minus_one & ~changed].min() * (1 + 1e-6)


def test_pruned_candidate_is_smaller_and_errs_more_measured_like_the_others():
    quantizer, name = pruning_quantizer()
    w, h = quantizer.state[name], quantizer.hessians[name]
    full, pruned = quantizer.encode(name, Choice(5)), quantizer.encode(name, Choice(5, prune=0.5))
    assert measured_bytes(pruned) < measured_bytes(full)
    assert pruned.error > full.error
    assert pruned.error == pytest.approx(hessian_error(w, pruned.dequantize(), h), rel=1e-9)
    more = quantizer.encode(name, Choice(5, prune=1.0))
    assert measured_bytes(more) < measured_bytes(pruned) and more.error > pruned.error


def test_prune_fractions_add_pruned_copies_of_every_candidate():
    plain, name = pruning_quantizer(rd_bits=(4, 6), transforms=("awq",))
    with_pruning, _ = pruning_quantizer(rd_bits=(4, 6), transforms=("awq",), prune_fractions=(0.25, 0.5))
    base = plain.candidates(name)
    assert all(c.prune == 0 for c in base)
    assert set(with_pruning.candidates(name)) == set(base + [c._replace(prune=f) for c in base for f in (0.25, 0.5)])


def test_prune_fraction_out_of_range_is_refused():
    with pytest.raises(PgError, match="prune_fractions"):
        pruning_quantizer(prune_fractions=(1.5,))
