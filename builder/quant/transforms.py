"""Weight encodings beyond plain GPTQ: a change of basis before quantizing, a low-rank correction
after it, and int8 forms for the small tensors that are otherwise stored as fp16.

Each function returns an `Encoded` that the runtime's decoder (runtime/codec.py) turns back into
exactly the weight the builder measured: a transform's parameters are rounded to their stored
precision before they are used, and `.error` is the Hessian-weighted error of the decoded weight
in the original basis, so encodings with and without a transform compare directly.
"""

import dataclasses

import numpy as np
import torch

from builder.quant.primitives import Encoded, encode_matrix, hessian_error
from runtime.codec import hadamard

MAX_ROTATION_BLOCK = 512
"""Largest Hadamard block: bigger blocks mix more columns but cost more in the decoder."""


def _with_transform(encoded, w, h, extras=None, meta=None):
    """`encoded` (quantized in some basis) with the fields that map it back to the original
    basis, its error re-measured there on the decoded weight."""
    out = dataclasses.replace(encoded, extras={**encoded.extras, **(extras or {})},
                              meta={**encoded.meta, **(meta or {})})
    out.error = hessian_error(w, out.dequantize(), h)
    return out


def rotation_block(cols):
    """The largest power of two dividing `cols`, at most MAX_ROTATION_BLOCK."""
    return min(cols & -cols, MAX_ROTATION_BLOCK)


def encode_hadamard(name, w, h, bits, k, qcfg):
    """GPTQ in a rotated basis: W Q, with H rotated to Q^T H Q, for Q the block-diagonal
    orthonormal Hadamard matrix the decoder applies (runtime.codec.hadamard; Q = Q^T, Q Q = I).

    Rotating the input dimension spreads an outlier column over its block, so the row's SDClip
    range no longer has to cut it off; the decoder multiplies by Q again to un-rotate."""
    block = rotation_block(w.shape[1])
    w_rot = torch.from_numpy(hadamard(w.double().numpy(), block)).float()
    h_rot = torch.from_numpy(hadamard(hadamard(h.double().numpy(), block).T, block)).float()  # (H Q)^T Q
    return _with_transform(encode_matrix(name, w_rot, h_rot, bits, k, qcfg), w, h, meta={"rotate": block})


def awq_column_scales(h, alpha):
    """fp16 per-column scales proportional to diag(H)^alpha, geometric mean 1."""
    d = torch.diag(h).double()
    d = d.clamp_min(max(float(d.max()), 1e-30) * 1e-8)  # dead columns would get a zero scale
    s = d ** alpha
    s = s / s.log().mean().exp()
    return s.clamp(1e-4, 1e4).half()


def encode_awq(name, w, h, bits, k, qcfg, alpha=0.125):
    """GPTQ on W diag(s) with H' = diag(1/s) H diag(1/s), s from `awq_column_scales`.

    Columns whose inputs carry more energy are scaled up, so they take a larger share of each
    row's quantization grid; the decoder divides the columns by the same fp16 s. In AWQ's terms
    (s = mean|x|^a, diag H = E[x^2]) alpha is a/2; on a trained tiny model 0.125 did best and 0.5
    (s = rms(x)) over-scaled every matrix."""
    s16 = awq_column_scales(h, alpha)
    s = s16.float()
    inner = encode_matrix(name, w * s[None, :], h / s[:, None] / s[None, :], bits, k, qcfg)
    return _with_transform(inner, w, h, extras={"col_scale": (s16.numpy(), "scales.fp16")})


def _quantize_groups(x, group, qmin, qmax, half):
    """Codes of x (rows x cols) with one scale per row and `group` columns, max|g| / half rounded
    to fp16 (subnormals allowed); returns (int8 codes, fp16 scales (rows, groups))."""
    rows, cols = x.shape
    groups = -(-cols // group)
    padded = torch.nn.functional.pad(x, (0, groups * group - cols)).view(rows, groups, group)
    scales = (padded.abs().amax(dim=2) / half).half().clamp_min(2 ** -24)
    codes = torch.clamp(torch.round(padded / scales.float()[:, :, None]), qmin, qmax)
    return codes.view(rows, -1)[:, :cols].to(torch.int8), scales


def add_lqer(encoded, w, h, rank=4, group=64, damp=0.01):
    """`encoded` plus a quantized rank-`rank` correction A @ B of its error E = W - W_hat
    (PR #1797's format): A as int2 codes in {-2..1} with one fp32 scale max|A|/1.5, B as int4 codes
    in {-8..7} with an fp16 scale max|g|/7.5 per `group` columns; the decoder adds (qA sA)(qB sB).

    The record takes A = U_r S_r, B = V_r^T from the SVD of E. Here the SVD is of E L (H = L L^T,
    damped), whose best rank-r part is the best under the Hessian metric; A = U_r S_r^(1/2) keeps
    its columns on one scale for the single int2 scale; and B is refitted to E by least squares
    after A is quantized, which is also optimal for the Hessian metric since B is unconstrained.
    Costs (rows + cols) * rank bytes of codes plus 2 * rank * cols / group of scales."""
    if "lqer_a" in encoded.extras:
        raise ValueError(f"{encoded.name} already has an LQER correction")
    rows, cols = w.shape
    rank = min(rank, rows, cols)
    err = (w.float() - encoded.dequantize()).double()
    hd = h.double()
    chol = torch.linalg.cholesky(hd + damp * float(hd.diag().mean().clamp_min(1e-30)) * torch.eye(cols, dtype=hd.dtype))
    u, s, _ = torch.linalg.svd(err @ chol, full_matrices=False)
    a = (u[:, :rank] * s[:rank].sqrt()).float()
    a_scale = float(np.float32(max(float(a.abs().max()), 1e-30) / 1.5))
    a_codes = torch.clamp(torch.round(a / a_scale), -2, 1)
    b = torch.linalg.lstsq(a_codes.double() * a_scale, err).solution
    b_codes, b_scales = _quantize_groups(b.float(), group, -8, 7, 7.5)
    extras = {"lqer_a": (a_codes.to(torch.int8).numpy(), "lqer.int2"), "lqer_b": (b_codes.numpy(), "lqer.int4"),
              "lqer_b_scale": (b_scales.numpy().reshape(-1), "scales.fp16")}
    return _with_transform(encoded, w, h, extras, {"lqer_a_scale": a_scale, "lqer_group": group})


class ControlEncoded(Encoded):
    """An int8 tensor outside the matrix groups: its codes go to the "control.int8" stream."""

    def payloads(self):
        for key, array, stream in super().payloads():
            yield key, array, stream or "control.int8"


def _squared_error(t, encoded):
    return float(((t.float() - encoded.dequantize()) ** 2).sum())


def encode_int8_per_tensor(name, t):
    """int8 codes with one fp32 scale max|t|/127 (PR #1716's control tensors); `.error` is the
    plain squared error, since control tensors have no Hessian."""
    t = t.detach().float()
    scale = float(np.float32(max(float(t.abs().max()), 1e-30) / 127))
    codes = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
    encoded = ControlEncoded(name, "int8t", tuple(t.shape), codes.numpy(), meta={"tensor_scale": scale})
    encoded.error = _squared_error(t, encoded)
    return encoded


def encode_int8_rows(name, t):
    """int8 codes with an fp16 scale per row, absmax/127 rounded up so no value is clipped
    (PR #1716's small matrices); `.error` is the plain squared error."""
    t = t.detach().float()
    amax = t.abs().amax(dim=1)
    # fp16 subnormals are allowed: gates of ~1e-3 have row scales below fp16's smallest normal
    scales = (amax / 127).half().clamp_min(2 ** -24)
    scales = torch.where(scales.float() * 127 < amax, torch.nextafter(scales, torch.tensor(torch.inf).half()), scales)
    codes = torch.clamp(torch.round(t / scales.float()[:, None]), -127, 127).to(torch.int8)
    encoded = ControlEncoded(name, "int8", tuple(t.shape), codes.numpy(), scales.numpy())
    encoded.error = _squared_error(t, encoded)
    return encoded
