"""Quantization policy: which encoding each tensor of a state dict gets.

The recipe table (`recipe_bits_and_k`) gives every quantized matrix its starting bit width and
clip k; a `Choice` names one candidate encoding, and `Quantizer` encodes and caches them for the
budget fitter and the rate-distortion allocator. Transforms are looked up in `MATRIX_ENCODERS`,
so a new one is one entry there.
"""

from typing import NamedTuple

from builder.quant.primitives import (
    encode_matrix,
    encode_passthrough,
    matrix_group,
    prune_costs,
    prune_count,
    zero_codes,
)
from builder.quant.transforms import add_lqer, encode_awq, encode_hadamard, encode_int8_per_tensor, encode_int8_rows
from runtime.config import require
from runtime.errors import PgError

MATRIX_ENCODERS = {None: encode_matrix, "hadamard": encode_hadamard, "awq": encode_awq}
"""`Choice.transform` -> encoder (name, weight, Hessian, bits, k, qcfg) -> Encoded; None is plain GPTQ."""


def is_token_embedding_or_head(name):
    """The token embedding and an untied head, which take the recipe's embedding bits and k. Not
    `builder.train.optim.is_embedding`: the BigramHash and value-embedding tables train as
    embeddings but quantize as the other matrices."""
    return name in ("tok_emb.weight", "lm_head.weight")


def recipe_bits_and_k(name, qcfg):
    """The recipe table: int8 (k=20) embedding, int6 matrices with per-group k (attention 12.85,
    MLP 12.85 in the 2026-04-09 record)."""
    if is_token_embedding_or_head(name):
        return qcfg.embed_bits, qcfg.embed_clip_k
    return qcfg.matrix_bits, qcfg.mlp_clip_k if matrix_group(name).startswith("mlp") else qcfg.matrix_clip_k


def is_quantized(name, t, qcfg):
    """Whether the recipe quantizes this tensor; the rest are stored whole (fp16, or int8 with
    quant.control_int8)."""
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
        require(all(0 < f <= 1 for f in qcfg.prune_fractions),
                f"quant.prune_fractions must lie in (0, 1], got {qcfg.prune_fractions}")
        require(0 <= qcfg.prune_to_fit <= 1, f"quant.prune_to_fit must lie in [0, 1], got {qcfg.prune_to_fit}")
        self._cache = {}
        self._loss_per_error = {}

    def loss_per_error(self, name):
        """Loss increase per unit of Hessian-weighted error for this tensor, measured once with a
        coarse probe encoding (so the increase stands well above float noise); 1 without a probe."""
        if self.probe is None:
            return 1.0
        if name not in self._loss_per_error:
            coarse = self.encode(name, Choice(min(self.qcfg.rd_bits)))
            self._loss_per_error[name] = (max(self.probe.delta(name, coarse.dequantize()), 0.0)
                                          / max(coarse.error, 1e-30))
        return self._loss_per_error[name]

    def quantized_names(self):
        return [n for n, t in self.state.items() if is_quantized(n, t, self.qcfg)]

    def share(self, rank, world):
        """Rank `rank`'s part of the quantized tensors when `world` ranks split the work. GPTQ's
        cost grows as rows x columns^2 (a Cholesky sweep over the columns for every row), so the
        tensors are dealt costliest first, each to the rank with the least work so far."""
        cost = lambda name: self.state[name].shape[0] * self.state[name].shape[1] ** 2  # noqa: E731
        loads, mine = [0] * world, []
        for name in sorted(self.quantized_names(), key=lambda n: (-cost(n), n)):
            least = loads.index(min(loads))
            loads[least] += cost(name)
            if least == rank:
                mine.append(name)
        return mine

    def computed(self, names):
        """(encodings, loss scales) this quantizer has computed for `names`: what a rank sends to
        the one that packs, which `absorb`s them."""
        wanted = set(names)
        return ({key: value for key, value in self._cache.items() if key[0] in wanted},
                {name: value for name, value in self._loss_per_error.items() if name in wanted})

    def absorb(self, computed):
        encodings, scales = computed
        self._cache.update(encodings)
        self._loss_per_error.update(scales)

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
        return zero_codes(full, indices[:prune_count(choice.prune, len(indices))], self.state[name],
                          self.hessians[name])

    def _encode_matrix(self, name, choice):
        w, h = self.state[name], self.hessians[name]
        k = recipe_bits_and_k(name, self.qcfg)[1] * choice.k_mult
        if choice.transform not in MATRIX_ENCODERS:
            known = " or ".join(t for t in MATRIX_ENCODERS if t)
            raise PgError(f"unknown quantization transform {choice.transform!r}; use {known}")
        return MATRIX_ENCODERS[choice.transform](name, w, h, choice.bits, k, self.qcfg)

    def _passthrough(self, name):
        t = self.state[name]
        if self.qcfg.gate_int8_rows and name.endswith("attn.gate_w"):
            return encode_int8_rows(name, t)
        if not self.qcfg.control_int8:
            return encode_passthrough(name, t)
        if t.ndim == 2 and min(t.shape) > 1:
            return encode_int8_rows(name, t)
        return encode_int8_per_tensor(name, t)

    def encode_all(self, plan):
        """Every tensor of the state dict, quantized ones as `plan` says; LQER corrections, if
        the recipe asks for them, go to the matrices whose encodings err most."""
        encoded = {name: self.encode(name, plan.get(name)) for name in self.state}
        if self.qcfg.lqer_rank:
            worst = sorted(plan, key=lambda n: encoded[n].error, reverse=True)[:self.qcfg.lqer_top]
            for name in worst:
                key = (name, plan[name], "lqer")
                if key not in self._cache:
                    self._cache[key] = add_lqer(encoded[name], self.state[name], self.hessians[name],
                                                rank=self.qcfg.lqer_rank)
                encoded[name] = self._cache[key]
        return list(encoded.values())
