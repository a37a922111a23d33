"""Hessians from training batches, GPTQ with SDClip, and the per-tensor recipe table.

Quantizing a tensor is a pure function (weight, Hessian, bits, k) -> `Encoded`; the recipe decides
which encoding each tensor starts with. `Encoded.error` is the Hessian-weighted squared error
trace((W - Q) H (W - Q)^T), the quantity the budget fitter trades against bytes.
"""

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from builder.data.loader import ShuffledSequences
from runtime.codec import decode_tensor
from runtime.evaluate import autocast
from runtime.errors import PgError

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
def collect_hessians(model, layout, qcfg, seq_len, device, seed, rank=0, world=1):
    """H = mean over calibration tokens of x x^T for the input x of every quantized matrix.

    Calibration batches come from the training shards; the tied embedding's Hessian is taken at
    the head's input (the final norm's output), where it acts as a matrix. With world > 1 (every
    rank of an initialized process group calls this) each rank forwards its share of every
    batch's sequences and the sums are all-reduced, so every rank gets the Hessians one process
    would compute, up to the order of the float sums, in 1/world of the time.
    """
    loader = ShuffledSequences(layout.shards("train"), seq_len, seed=seed + 1)
    hessians, counts, hooks = {}, {}, []

    def hook_for(name, width):
        # Allocated up front: a rank whose share of a batch is empty still joins the all-reduce.
        hessians[name], counts[name] = torch.zeros(width, width, device=device), 0

        def hook(module, inputs, output):
            x = (output if name == "tok_emb.weight" else inputs[0]).detach().float().flatten(0, -2)
            hessians[name].addmm_(x.T, x)
            counts[name] += x.size(0)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and matrix_group(name + ".weight"):
            hooks.append(module.register_forward_hook(hook_for(name + ".weight", module.in_features)))
    if model.lm_head is None:
        hooks.append(model.final_norm.register_forward_hook(hook_for("tok_emb.weight", model.cfg.model_dim)))
    model.eval()
    seqs = max(qcfg.calibration_batch_tokens // seq_len, 1)
    share = slice(seqs * rank // world, seqs * (rank + 1) // world)
    try:
        for _ in range(qcfg.calibration_batches):
            x, _ = loader.next_batch(seqs)  # every rank draws the whole batch: the same sampler state
            if share.start < share.stop:
                with autocast(device):
                    model(x[share].to(device))
    finally:
        for h in hooks:
            h.remove()
    if world > 1:
        for h in hessians.values():
            dist.all_reduce(h)
        totals = torch.tensor(list(counts.values()), dtype=torch.float64)
        dist.all_reduce(totals)
        counts = dict(zip(counts, totals.tolist()))
    for name, module in model.named_modules():
        # A lookup table without a Hessian (BigramHash, value embeddings, an untied tok_emb) has
        # no input activations: the identity makes GPTQ plain rounding with SDClip scales.
        key = name + ".weight"
        if isinstance(module, torch.nn.Embedding) and matrix_group(key) and key not in hessians:
            hessians[key], counts[key] = torch.eye(module.embedding_dim), 1
    return {name: (h / counts[name]).cpu() for name, h in hessians.items() if counts[name]}


class LossProbe:
    """Training loss on fixed calibration batches with one tensor swapped for a quantized version.

    The Hessian-weighted error of a tensor is a second-order proxy for its effect on the loss,
    but its scale differs from tensor to tensor (the tied embedding's, measured at the head,
    misses its role as the input table entirely). One probe per tensor puts every tensor's error
    in loss units, so the allocator can trade them against each other."""

    def __init__(self, model, layout, seq_len, batch_tokens, device, seed):
        loader = ShuffledSequences(layout.shards("train"), seq_len, seed=seed + 2)
        self.x, self.y = (t.to(device) for t in loader.next_batch(max(batch_tokens // seq_len, 1)))
        self.model = copy.deepcopy(model).float().eval()
        self.params = dict(self.model.named_parameters())
        self.base = self.loss()

    @torch.no_grad()
    def loss(self):
        return float(self.model(self.x, self.y).double().mean())

    @torch.no_grad()
    def delta(self, name, weight):
        """Loss increase with `name` replaced by `weight`."""
        param = self.params[name]
        original = param.detach().clone()
        param.copy_(weight.to(param.device, param.dtype))
        try:
            return self.loss() - self.base
        finally:
            param.copy_(original)


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


def is_embedding(name):
    return name in ("tok_emb.weight", "lm_head.weight")


def recipe_bits_and_k(name, qcfg):
    """The recipe table: int8 (k=20) embedding, int6 matrices with per-group k (attention 12.85,
    MLP 12.85 in the 2026-04-09 record)."""
    if is_embedding(name):
        return qcfg.embed_bits, qcfg.embed_clip_k
    return qcfg.matrix_bits, qcfg.mlp_clip_k if matrix_group(name).startswith("mlp") else qcfg.matrix_clip_k


def is_quantized(name, t, qcfg):
    return matrix_group(name) is not None and t.ndim == 2 and t.numel() > qcfg.passthrough_max_numel


class Choice(NamedTuple):
    """One candidate encoding of a matrix: bit width, multiplier of the recipe's clip k, an
    optional transform ('hadamard', 'awq'), and the fraction of its ±1 codes zeroed after GPTQ,
    cheapest first (`prune_costs`)."""

    bits: int
    k_mult: float = 1.0
    transform: str = None
    prune: float = 0.0


class Quantizer:
    """Encodes each tensor of a state dict; every encoding it computes is cached, so allocators
    can explore candidates freely."""

    def __init__(self, state, hessians, qcfg, probe=None):
        self.state = {k: v.detach().float().cpu() for k, v in state.items()}
        self.hessians = hessians
        self.qcfg = qcfg
        self.probe = probe
        if not all(0 < f <= 1 for f in qcfg.prune_fractions) or not 0 <= qcfg.prune_to_fit <= 1:
            raise PgError("quant.prune_fractions must lie in (0, 1] and quant.prune_to_fit in [0, 1]")
        self._cache = {}
        self._loss_per_error = {}

    def loss_per_error(self, name):
        """Loss increase per unit of Hessian-weighted error for this tensor, measured once with a
        coarse probe encoding (so the increase stands well above float noise); 1 without a probe."""
        if self.probe is None:
            return 1.0
        if name not in self._loss_per_error:
            coarse = self.encode(name, Choice(min(self.qcfg.rd_bits)))
            self._loss_per_error[name] = max(self.probe.delta(name, coarse.dequantize()), 0.0) / max(coarse.error, 1e-30)
        return self._loss_per_error[name]

    def quantized_names(self):
        return [n for n, t in self.state.items() if is_quantized(n, t, self.qcfg)]

    def default_plan(self):
        """{tensor name: Choice} for quantized tensors, from the recipe table."""
        return {n: Choice(recipe_bits_and_k(n, self.qcfg)[0]) for n in self.quantized_names()}

    def candidates(self, name):
        """Every Choice the rate-distortion allocator considers for a tensor."""
        q = self.qcfg
        mults = q.clip_search or (1.0,)
        choices = [Choice(b, m) for b in q.rd_bits for m in mults]
        choices += [Choice(b, 1.0, t) for b in q.rd_bits for t in q.transforms]
        return choices + [c._replace(prune=f) for c in choices for f in q.prune_fractions]

    def encode(self, name, choice=None):
        """The tensor encoded as `choice`; None means the passthrough form."""
        if choice is None:
            return self._passthrough(name)
        key = (name, choice)
        if key not in self._cache:
            self._cache[key] = self._encode_pruned(name, choice) if choice.prune else self._encode_matrix(name, choice)
        return self._cache[key]

    def prune_order(self, name, choice):
        """(flat indices, costs) of the ±1 codes of `choice` without pruning, cheapest first;
        costs in loss units when the quantizer has a probe, like the allocator's errors."""
        key = (name, choice._replace(prune=0.0), "prune_order")
        if key not in self._cache:
            indices, costs = prune_costs(self.encode(name, choice._replace(prune=0.0)), self.hessians[name])
            self._cache[key] = (indices, costs * self.loss_per_error(name))
        return self._cache[key]

    def _encode_pruned(self, name, choice):
        # Pruning after GPTQ, not inside it: see BENCHMARKS.md (selective ±1 pruning) for why.
        indices, _ = self.prune_order(name, choice)
        full = self.encode(name, choice._replace(prune=0.0))
        return zero_codes(full, indices[:prune_count(choice.prune, len(indices))], self.state[name], self.hessians[name])

    def _encode_matrix(self, name, choice):
        w, h = self.state[name], self.hessians[name]
        k = recipe_bits_and_k(name, self.qcfg)[1] * choice.k_mult
        if choice.transform is None:
            return encode_matrix(name, w, h, choice.bits, k, self.qcfg)
        from builder.quant import transforms
        if choice.transform == "hadamard":
            return transforms.encode_hadamard(name, w, h, choice.bits, k, self.qcfg)
        if choice.transform == "awq":
            return transforms.encode_awq(name, w, h, choice.bits, k, self.qcfg)
        raise PgError(f"unknown quantization transform {choice.transform!r}; use hadamard or awq")

    def _passthrough(self, name):
        t = self.state[name]
        if not self.qcfg.control_int8:
            return encode_passthrough(name, t)
        from builder.quant import transforms
        if t.ndim == 2 and min(t.shape) > 1:
            return transforms.encode_int8_rows(name, t)
        return transforms.encode_int8_per_tensor(name, t)

    def encode_all(self, plan):
        """Every tensor of the state dict, quantized ones as `plan` says; LQER corrections, if
        the recipe asks for them, go to the matrices whose encodings err most."""
        encoded = {name: self.encode(name, plan.get(name)) for name in self.state}
        if self.qcfg.lqer_rank:
            from builder.quant import transforms
            worst = sorted(plan, key=lambda n: encoded[n].error, reverse=True)[:self.qcfg.lqer_top]
            for name in worst:
                key = (name, plan[name], "lqer")
                if key not in self._cache:
                    self._cache[key] = transforms.add_lqer(encoded[name], self.state[name], self.hessians[name],
                                                           rank=self.qcfg.lqer_rank)
                encoded[name] = self._cache[key]
        return list(encoded.values())
