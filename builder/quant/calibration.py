"""Calibration: what the quantizer learns by running the model on training batches.

`collect_hessians` gives GPTQ its input statistics; `LossProbe` converts each tensor's
Hessian-weighted error into a loss increase, so the allocator can compare tensors.
"""

import copy

import torch
import torch.distributed as dist

from builder.data.loader import ShuffledSequences
from builder.quant.primitives import matrix_group
from runtime.precision import autocast


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
