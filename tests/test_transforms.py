"""builder/quant/transforms.py: Hadamard rotation, AWQ column scaling, LQER and int8 control tensors,
each decoded exactly by the runtime and each lowering the error it is meant to lower."""

import dataclasses
import io

import numpy as np
import pytest
import torch

from builder.artifact.pack import StreamCompressor, build_artifact, build_streams
from builder.artifact.sources import installed_code
from builder.config import QuantConfig
from builder.quant.primitives import encode_matrix, encode_passthrough, hessian_error
from builder.quant.transforms import (
    add_lqer,
    awq_column_scales,
    encode_awq,
    encode_hadamard,
    encode_int8_per_tensor,
    encode_int8_rows,
    rotation_block,
)
from runtime.artifact import Artifact
from runtime.codec import decode_state, decode_tensor, hadamard
from runtime.errors import PgError

QCFG = QuantConfig(gptq_block=64)
INFO = {"model": {}, "eval": {}, "tokenizer_sha256": "0" * 64, "recipe": {}, "provenance": {}, "metrics": {}}


def problem(rows=96, cols=128, seed=0, outlier_cols=0, skew=0.0):
    """Heavy-tailed row magnitudes, optional outlier input columns, and a correlated Hessian whose
    diagonal spans exp(+-2 * skew) (log-normal activation scales)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.randn(rows, 1, generator=g) * 0.6).exp()
    w[:, torch.randperm(cols, generator=g)[:outlier_cols]] *= 8
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(8 * cols, cols, generator=g) @ mix * (skew * torch.randn(cols, generator=g)).exp()
    return w, x.T @ x / x.size(0)


def hadamard_matrix(cols, block):
    """Block-diagonal orthonormal Sylvester Hadamard, built independently of the decoder."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return torch.block_diag(*[h / block ** 0.5] * (cols // block))


def codes_times_scales(e):
    return e.data.astype(np.float32) * e.scales.astype(np.float32)[:, None]


def stored_bytes(e):
    """Raw bytes of every array the encoding stores, before compression."""
    return sum(array.nbytes for _, array, _ in e.payloads())


def test_decoder_rotation_is_the_orthonormal_sylvester_hadamard():
    q = torch.from_numpy(hadamard(np.eye(24), 8))
    assert rotation_block(24) == 8 and rotation_block(4096) == 512 and rotation_block(96) == 32
    assert torch.allclose(q, hadamard_matrix(24, 8), atol=1e-7)
    assert torch.allclose(q @ q, torch.eye(24, dtype=torch.float64), atol=1e-6)
    x = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
    assert np.allclose(hadamard(x, 512), x @ hadamard_matrix(512, 512).numpy(), atol=1e-5)


def test_hadamard_decodes_to_codes_rotated_back():
    w, h = problem(outlier_cols=4)
    e = encode_hadamard("blocks.0.mlp.fc.weight", w, h, 5, 8.0, QCFG)
    assert e.enc == "int5" and e.meta == {"rotate": 128}
    expected = torch.from_numpy(codes_times_scales(e)).double() @ hadamard_matrix(128, 128)
    assert torch.allclose(e.dequantize().double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert e.error == pytest.approx(hessian_error(w, e.dequantize(), h))


@pytest.mark.parametrize("bits, k", [(3, 4.0), (4, 6.0)])
def test_hadamard_lowers_error_on_outlier_columns_where_the_clip_binds(bits, k):
    # SDClip's scale follows the row's std, which a rotation keeps: the gain comes from the
    # outliers no longer being clipped, so it shows where k * std falls short of them.
    w, h = problem(outlier_cols=4)
    plain = encode_matrix("m", w, h, bits, k, QCFG)
    assert encode_hadamard("m", w, h, bits, k, QCFG).error < 0.85 * plain.error


def test_awq_divides_columns_by_the_stored_fp16_scales():
    w, h = problem(skew=1.0)
    e = encode_awq("blocks.0.attn.q.weight", w, h, 6, 12.85, QCFG, alpha=0.25)
    s, stream = e.extras["col_scale"]
    assert stream == "scales.fp16" and s.dtype == np.float16 and s.shape == (128,)
    assert np.array_equal(s, awq_column_scales(h, 0.25).numpy())
    assert abs(np.log(s.astype(np.float64)).mean()) < 1e-2  # geometric mean 1
    assert np.corrcoef(np.log(s.astype(np.float64)), np.log(torch.diag(h).numpy()))[0, 1] > 0.99
    assert np.array_equal(e.dequantize().numpy(), codes_times_scales(e) / s.astype(np.float32))
    assert e.error == pytest.approx(hessian_error(w, e.dequantize(), h))


def test_awq_lowers_error_when_the_hessian_diagonal_is_skewed():
    w, h = problem(skew=1.0)
    plain = encode_matrix("m", w, h, 4, 6.0, QCFG)
    assert encode_awq("m", w, h, 4, 6.0, QCFG, alpha=0.25).error < 0.8 * plain.error


def test_awq_survives_dead_columns():
    w, h = problem(skew=1.0)
    h[:, 3] = h[3, :] = 0
    e = encode_awq("m", w, h, 6, 12.85, QCFG)
    assert np.isfinite(e.dequantize().numpy()).all() and np.isfinite(e.error)


def lqer_problem():
    w, h = problem(rows=96, cols=160, outlier_cols=2, skew=0.5)
    return w, h, encode_matrix("blocks.0.mlp.fc.weight", w, h, 4, 6.0, QCFG)


def test_lqer_adds_the_dequantized_low_rank_product():
    w, h, base = lqer_problem()
    e = add_lqer(base, w, h, rank=4, group=64)
    qa, qb = e.extras["lqer_a"][0], e.extras["lqer_b"][0]
    sb = e.extras["lqer_b_scale"][0]
    assert qa.shape == (96, 4) and qa.min() >= -2 and qa.max() <= 1
    assert qb.shape == (4, 160) and qb.min() >= -8 and qb.max() <= 7
    assert sb.dtype == np.float16 and sb.shape == (4 * 3,)  # 160 columns: groups of 64, 64, 32
    b = qb.astype(np.float64) * np.repeat(sb.astype(np.float64).reshape(4, 3), 64, axis=1)[:, :160]
    expected = base.dequantize().double() + torch.from_numpy(qa.astype(np.float64) * e.meta["lqer_a_scale"] @ b)
    assert torch.allclose(e.dequantize().double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert e.error == pytest.approx(hessian_error(w, e.dequantize(), h))
    assert base.extras == {} and base.meta == {}  # the input encoding is left alone


def test_lqer_lowers_error_and_its_bytes_are_accounted():
    w, h, base = lqer_problem()
    e = add_lqer(base, w, h, rank=4, group=64)
    assert e.error < 0.9 * base.error
    assert stored_bytes(e) - stored_bytes(base) == 96 * 4 + 4 * 160 + 2 * 4 * 3
    assert e.estimated_bytes() > base.estimated_bytes()
    assert add_lqer(base, w, h, rank=8).error < e.error
    with pytest.raises(ValueError):
        add_lqer(e, w, h)


def test_lqer_corrects_a_rotated_encoding():
    w, h = problem(outlier_cols=4)
    rotated = encode_hadamard("m", w, h, 3, 4.0, QCFG)
    e = add_lqer(rotated, w, h)
    assert e.meta["rotate"] == 128 and e.error < rotated.error


def test_int8_per_tensor_error_is_at_most_half_a_step():
    t = torch.randn(129) * torch.linspace(0.1, 3.0, 129)
    e = encode_int8_per_tensor("blocks.0.attn_scale", t)
    scale = e.meta["tensor_scale"]
    assert e.enc == "int8t" and e.scales is None and e.data.dtype == np.int8 and stored_bytes(e) == 129
    assert scale == float(np.float32(float(t.abs().max()) / 127))
    assert np.abs(e.data).max() == 127
    assert (e.dequantize() - t).abs().max() <= scale / 2 * (1 + 1e-6)
    assert e.error == pytest.approx(float(((e.dequantize() - t) ** 2).sum()))
    zero = encode_int8_per_tensor("z", torch.zeros(3))
    assert torch.equal(zero.dequantize(), torch.zeros(3))


def test_int8_rows_scale_each_row_without_clipping():
    t = torch.randn(6, 50) * torch.tensor([1e-5, 0.1, 1, 3, 10, 0])[:, None]
    e = encode_int8_rows("skip_gates", t)
    assert e.enc == "int8" and e.scales.dtype == np.float16 and stored_bytes(e) == 6 * 50 + 6 * 2
    s = torch.from_numpy(e.scales.astype(np.float32))
    assert (s[:5] * 127 >= t.abs().amax(dim=1)[:5]).all()
    assert ((e.dequantize() - t).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()
    assert np.array_equal(e.dequantize().numpy(), codes_times_scales(e))


def every_encoding():
    w, h = problem(outlier_cols=2, skew=0.5)
    plain = encode_matrix("blocks.0.mlp.fc.weight", w, h, 6, 12.85, QCFG)
    return [plain,
            encode_hadamard("blocks.1.mlp.fc.weight", w, h, 5, 8.0, QCFG),
            encode_awq("blocks.0.attn.q.weight", w, h, 6, 12.85, QCFG),
            add_lqer(encode_hadamard("blocks.1.attn.q.weight", w, h, 4, 6.0, QCFG), w, h),
            add_lqer(dataclasses.replace(plain, name="blocks.2.mlp.fc.weight"), w, h, group=48),
            encode_int8_per_tensor("blocks.0.attn_scale", torch.randn(127)),
            encode_int8_per_tensor("blocks.0.attn.q_gain", torch.rand(5)),
            encode_int8_rows("skip_gates", torch.randn(3, 128)),
            encode_passthrough("blocks.0.mlp_scale", torch.rand(33))]


def test_every_encoding_packs_and_decodes_exactly():
    encoded = every_encoding()
    blob = build_artifact(encoded, INFO, StreamCompressor(("brotli", "lzma")), installed_code())
    artifact = Artifact(io.BytesIO(blob)).verify()
    names = [s["name"] for s in artifact.manifest["streams"]]
    assert {"control.int8", "lqer.int2", "lqer.int4", "scales.fp16", "control.fp16"} <= set(names)
    decoded = decode_state(artifact.manifest, artifact.read)
    for e in encoded:
        assert torch.equal(decoded[e.name], e.dequantize()), e.name


def test_unknown_fields_and_encodings_fail_loudly():
    w, h = problem(rows=8, cols=16)
    e = encode_matrix("blocks.0.attn.q.weight", w, h, 6, 12.85, QCFG)
    raw, entries = build_streams([e])
    streams = list(raw.values())
    assert torch.equal(decode_tensor(entries[0], streams), e.dequantize())
    with pytest.raises(PgError, match="unknown fields.*'sparsity'.*newer runtime"):
        decode_tensor({**entries[0], "sparsity": 0.5}, streams)
    with pytest.raises(PgError, match="unknown tensor encoding 'int6x'"):
        decode_tensor({**entries[0], "enc": "int6x"}, streams)
