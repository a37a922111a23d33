"""Hessians from training batches, GPTQ with SDClip, and the per-tensor recipe table.

Quantizing a tensor is a pure function (weight, Hessian, bits, k) -> `Encoded`; the recipe decides
which encoding each tensor starts with. `Encoded.error` is the Hessian-weighted squared error
trace((W - Q) H (W - Q)^T), the quantity the budget fitter trades against bytes.
"""

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from builder.loader import ShuffledSequences
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
}


def matrix_group(name):
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

    @property
    def bits(self):
        return int(self.enc[3:]) if self.enc.startswith("int") else 16

    def payload_bytes(self):
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes) \
            + sum(a.nbytes for a, _ in self.extras.values())

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


@torch.no_grad()
def collect_hessians(model, layout, qcfg, seq_len, device, seed):
    """H = mean over calibration tokens of x x^T for the input x of every quantized matrix.

    Calibration batches come from the training shards; the tied embedding's Hessian is taken at
    the head's input (the final norm's output), where it acts as a matrix.
    """
    loader = ShuffledSequences(layout.shards("train"), seq_len, seed=seed + 1)
    hessians, counts, hooks = {}, {}, []

    def hook_for(name):
        def hook(module, inputs, output):
            x = (output if name == "tok_emb.weight" else inputs[0]).detach().float().flatten(0, -2)
            if name not in hessians:
                hessians[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
                counts[name] = 0
            hessians[name].addmm_(x.T, x)
            counts[name] += x.size(0)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and matrix_group(name + ".weight"):
            hooks.append(module.register_forward_hook(hook_for(name + ".weight")))
    if model.lm_head is None:
        hooks.append(model.final_norm.register_forward_hook(hook_for("tok_emb.weight")))
    model.eval()
    seqs = max(qcfg.calibration_batch_tokens // seq_len, 1)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    try:
        for _ in range(qcfg.calibration_batches):
            x, _ = loader.next_batch(seqs)
            with autocast:
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: (h / counts[name]).cpu() for name, h in hessians.items()}


def sdclip_scales(w, bits, k):
    """Per-row scale k * std(row) / qmax, rounded to fp16 as stored."""
    qmax = 2 ** (bits - 1) - 1
    scales = (k * w.std(dim=1) / qmax).clamp_min(1e-8)
    return scales.half().clamp_min(torch.finfo(torch.float16).tiny).float()


def gptq(w, hessian, bits, k, block=128, damp=0.01, act_order=True):
    """GPTQ with SDClip scales fixed up front; returns (codes int8, scales fp16-valued float)."""
    w = w.float().clone()
    h = hessian.float().clone()
    rows, cols = w.shape
    qmax = 2 ** (bits - 1) - 1
    scales = sdclip_scales(w, bits, k)
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
    codes, scales = gptq(w, hessian, bits, k, qcfg.gptq_block, qcfg.gptq_damp, qcfg.act_order)
    encoded = Encoded(name, f"int{bits}", tuple(w.shape), codes.numpy(), scales.half().numpy())
    encoded.error = hessian_error(w, encoded.dequantize(), hessian)
    return encoded


def encode_passthrough(name, t):
    return Encoded(name, "fp16", tuple(t.shape), t.detach().float().half().numpy())


def default_bits(name, qcfg):
    """The recipe table: int8 (k=20) embedding, int6 (k=12.85) matrices, fp16 for the rest."""
    return (qcfg.embed_bits, qcfg.embed_clip_k) if name in ("tok_emb.weight", "lm_head.weight") \
        else (qcfg.matrix_bits, qcfg.matrix_clip_k)


def is_quantized(name, t, qcfg):
    return matrix_group(name) is not None and t.ndim == 2 and t.numel() > qcfg.passthrough_max_numel


class Quantizer:
    """Encodes each tensor of a state dict, caching every (tensor, bits) encoding it computes."""

    def __init__(self, state, hessians, qcfg):
        self.state = {k: v.detach().float().cpu() for k, v in state.items()}
        self.hessians = hessians
        self.qcfg = qcfg
        self._cache = {}

    def quantized_names(self):
        return [n for n, t in self.state.items() if is_quantized(n, t, self.qcfg)]

    def default_plan(self):
        """{tensor name: bits} for quantized tensors, from the recipe table."""
        return {n: default_bits(n, self.qcfg)[0] for n in self.quantized_names()}

    def encode(self, name, bits=None):
        if bits is None:
            return encode_passthrough(name, self.state[name])
        key = (name, bits)
        if key not in self._cache:
            k = default_bits(name, self.qcfg)[1]
            self._cache[key] = encode_matrix(name, self.state[name], self.hessians[name], bits, k, self.qcfg)
        return self._cache[key]

    def encode_all(self, plan):
        return [self.encode(name, plan.get(name)) for name in self.state]
