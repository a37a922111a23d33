"""builder/quantize.py: GPTQ beats rounding under the Hessian metric; SDClip; the recipe table."""

import numpy as np
import pytest
import torch

from builder.config import QuantConfig
from builder.quantize import Quantizer, encode_matrix, gptq, hessian_error, matrix_group, sdclip_scales


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
    assert encoded["blocks.0.mlp.fc.weight"].enc == "int6" and encoded["blocks.0.mlp.fc.weight"].scales.dtype == np.float16


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
