"""Quantization primitives: pure functions of tensors, with no model, data or recipe behind them.

Quantizing a matrix is a function (weight, Hessian, bits, k) -> `Encoded`: SDClip row scales fix
the grid, GPTQ rounds onto it. `Encoded.error` is the Hessian-weighted squared error
trace((W - Q) H (W - Q)^T), the quantity the budget fitter trades against bytes; the pruning
helpers price zeroing single codes in the same units.
"""

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from runtime.codec import decode_tensor

MATRIX_GROUPS = {  # stream group of each quantized matrix, by parameter-name pattern
    r"tok_emb\.weight": "tok_emb",
    r"lm_head\.weight": "lm_head",
    r"blocks\.\d+\.attn\.q\.weight": "attn_q",
    r"blocks\.\d+\.attn\.k\.weight": "attn_k",
    r"blocks\.\d+\.attn\.v\.weight": "attn_v",
    r"blocks\.\d+\.attn\.out\.weight": "attn_out",
    r"blocks\.\d+\.mlp\.fc\.weight": "mlp_fc",
    r"blocks\.\d+\.mlp\.proj\.weight": "mlp_proj",
    r"bigram_emb\.table\.weight": "bigram_table",
    r"bigram_emb\.proj\.weight": "bigram_proj",
    r"value_emb\.table\.weight": "ve_table",
    r"value_emb\.proj\.weight": "ve_proj",
}


def matrix_group(name):
    """The stream group of a quantized matrix's parameter name; None for every other tensor."""
    return next((g for pattern, g in MATRIX_GROUPS.items() if re.fullmatch(pattern, name)), None)


@dataclass
class Encoded:
    """One tensor's stored form: int8 codes + fp16 row scales, or fp16 values."""

    name: str
    enc: str
    shape: tuple
    data: np.ndarray
    """int8 codes (rows, cols) for intB, else the fp16 values."""
    scales: np.ndarray = None
    """fp16 scale per row, for intB."""
    error: float = 0.0
    extras: dict = field(default_factory=dict)
    """Further payloads the decoder needs, {manifest key: (array, stream name)}: e.g. per-column
    scales or low-rank factors. Each array is stored in the named stream."""
    meta: dict = field(default_factory=dict)
    """Small JSON fields copied into the tensor's manifest entry (e.g. a rotation block size)."""

    def estimated_bytes(self):
        """Order-0 entropy of the codes plus raw scales: what a good coder should approach."""
        if self.scales is None:
            return self.data.nbytes
        _, counts = np.unique(self.data, return_counts=True)
        p = counts / counts.sum()
        extras = sum(a.nbytes for a, _ in self.extras.values())
        return float(-(p * np.log2(p)).sum() * self.data.size / 8 + self.scales.nbytes + extras)

    def payloads(self):
        """(manifest key, array, stream name) for everything this tensor stores."""
        yield "data", self.data, None
        if self.scales is not None:
            yield "scale", self.scales, "scales.fp16"
        for key, (array, stream) in self.extras.items():
            yield key, array, stream

    def manifest_entry(self, place):
        """This tensor's manifest entry; `place(array, stream)` stores an array and returns its ref."""
        entry = {"name": self.name, "shape": list(self.shape), "enc": self.enc, **self.meta}
        for key, array, stream in self.payloads():
            entry[key] = place(array, stream)
        return entry

    def dequantize(self):
        """The float tensor the runtime will see, decoded by the runtime's own decoder."""
        streams = []

        def place(array, _stream):
            streams.append(array.tobytes())
            return [len(streams) - 1, 0, array.nbytes]

        return decode_tensor(self.manifest_entry(place), streams)


def sdclip_scales(w, bits, k, hessian_diag=None, clip_lambda=0.0):
    """Per-row scale k * std(row) / qmax, rounded to fp16 as stored.

    Hessian-aware SDClip (PR #1412) widens the clip of rows that matter more: by 1 + lambda*(r-1),
    with r the row's mean |W_ij| * d_j / mean(d), d = diag(H), normalized to mean 1."""
    qmax = 2 ** (bits - 1) - 1
    clip = k * w.std(dim=1)
    if clip_lambda and hessian_diag is not None:
        importance = (w.abs() * (hessian_diag / hessian_diag.mean().clamp_min(1e-12))[None, :]).mean(dim=1)
        importance = importance / importance.mean().clamp_min(1e-12)
        clip = clip * (1 + clip_lambda * (importance - 1))
    scales = (clip / qmax).clamp_min(1e-8)
    return scales.half().clamp_min(torch.finfo(torch.float16).tiny).float()


def gptq(w, hessian, bits, k, block=128, damp=0.01, act_order=True, clip_lambda=0.0):
    """GPTQ with SDClip scales fixed up front; returns (codes int8, scales fp16-valued float)."""
    w = w.float().clone()
    h = hessian.float().clone()
    rows, cols = w.shape
    qmax = 2 ** (bits - 1) - 1
    scales = sdclip_scales(w, bits, k, torch.diag(h), clip_lambda)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(cols)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        wb, hb = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(wb)
        for i in range(end - start):
            q = torch.clamp(torch.round(wb[:, i] / scales), -qmax, qmax)
            codes[:, start + i] = q
            err = (wb[:, i] - q * scales) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8), scales


def hessian_error(w, w_hat, hessian):
    e = (w.float() - w_hat.float())
    return float(torch.einsum("ij,jk,ik->", e, hessian.float(), e))


def encode_matrix(name, w, hessian, bits, k, qcfg):
    codes, scales = gptq(w, hessian, bits, k, qcfg.gptq_block, qcfg.gptq_damp, qcfg.act_order,
                         qcfg.hessian_clip_lambda)
    encoded = Encoded(name, f"int{bits}", tuple(w.shape), codes.numpy(), scales.half().numpy())
    encoded.error = hessian_error(w, encoded.dequantize(), hessian)
    return encoded


def code_basis(encoded):
    """The decoder's map from code columns to weight columns, as a (code cols, weight cols) matrix
    B: a row of codes q with row scale s decodes to s q B, plus an LQER correction that does not
    depend on the codes. Decoding the identity code matrix with unit row scales yields B, so every
    transform the runtime knows (column scales, rotations) is covered without restating it."""
    cols = encoded.data.shape[1]
    linear = {k: v for k, v in encoded.extras.items() if not k.startswith("lqer")}
    unit = dataclasses.replace(encoded, shape=(cols, cols), data=np.eye(cols, dtype=np.int8),
                               scales=np.ones(cols, np.float16), extras=linear,
                               meta={k: v for k, v in encoded.meta.items() if not k.startswith("lqer")})
    return unit.dequantize()


def prune_costs(encoded, hessian):
    """For the ±1 codes of an intB encoding: (flat indices, costs), cheapest first. The cost of
    zeroing code (i, j) is s_i² (B H Bᵀ)_jj, the Hessian-weighted error the zeroing adds on its
    own (B from `code_basis`; for untransformed codes that is s_i² H_jj).

    The 03-25 record ranked by s_i² alone, i.e. by how far the weight moves. H_jj is the mean
    squared activation the weight multiplies: the same move on a column whose inputs are large
    changes the output, and the loss, more than on a nearly silent one. Per tensor the costs are
    in the units of `Encoded.error`, so scaled by the tensor's loss calibration they compare
    across tensors."""
    codes = encoded.data.reshape(encoded.data.shape[0], -1)
    rows, cols = np.nonzero(np.abs(codes) == 1)
    basis = code_basis(encoded).double()
    column_cost = (basis @ hessian.double() * basis).sum(dim=1).numpy()
    row_cost = encoded.scales.astype(np.float64) ** 2
    costs = row_cost[rows] * column_cost[cols]
    order = np.argsort(costs, kind="stable")  # stable: equal costs prune in a fixed order
    return rows[order] * codes.shape[1] + cols[order], costs[order]


def prune_count(fraction, candidates):
    """How many of `candidates` ±1 codes a prune fraction zeroes."""
    return int(round(fraction * candidates))


def zero_codes(encoded, flat_indices, w, hessian):
    """`encoded` with the codes at `flat_indices` set to 0, its error re-measured on the decoded
    weight exactly as every other candidate's is."""
    codes = encoded.data.copy()
    codes.reshape(-1)[flat_indices] = 0
    out = dataclasses.replace(encoded, data=codes)
    out.error = hessian_error(w, out.dequantize(), hessian)
    return out


def encode_passthrough(name, t):
    return Encoded(name, "fp16", tuple(t.shape), t.detach().float().half().numpy())
