"""Muon (with MuonEq-R) for the block matrices, AdamW for the rest, and the wallclock schedule."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime.distributed import Ranks

NEWTON_SCHULZ = {
    "classic": [(3.4445, -4.775, 2.0315)] * 5,
    "polar_express": [
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ],
}


def newton_schulz(g, schedule, steps):
    """Approximately orthogonalize `g` (the U V^T of its SVD) with quintic Newton-Schulz steps of
    the coefficient set named `schedule`.

    In bf16 on every device, as the records run it: the iteration only needs a rough U V^T. Each
    set computes in its record's own operation order (classic: r0409 normalizes, then transposes
    a tall matrix and forms (c A) A; polar_express: r0427 transposes first and forms c (A A)),
    because bf16 rounds each order differently and five steps amplify it: so CPU runs stay step
    for step equal to the records' code."""
    coefficients, as_r0427 = NEWTON_SCHULZ[schedule], schedule == "polar_express"
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall and as_r0427:
        x = x.T
    x = x / (x.norm() + 1e-7)
    if tall and not as_r0427:
        x = x.T
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.T
        quartic = c * (gram @ gram) if as_r0427 else c * gram @ gram
        x = a * x + (b * gram + quartic) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, MuonEq-R row normalization, Newton-Schulz, decoupled weight decay.

    Under torch.distributed each rank orthogonalizes only the matrices it owns (index mod world
    size) and one all-reduce of a flat buffer hands every rank every update, so the Newton-Schulz
    work is split rather than repeated. Gradients must already be averaged across ranks.
    """

    def __init__(self, params, lr, momentum, weight_decay, coefficients="classic", ns_steps=5):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.coefficients = coefficients
        self.ns_steps = ns_steps

    @torch.no_grad()
    def step(self):
        ranks = Ranks()
        distributed, rank, world = ranks.active, ranks.rank, ranks.world
        for group in self.param_groups:
            params, mu = group["params"], group["momentum"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(mu).add_(p.grad)
                    update = p.grad.add(buf, alpha=mu)
                    update = update / update.norm(dim=1, keepdim=True).clamp_min(1e-7)
                    update = newton_schulz(update, self.coefficients, self.ns_steps)
                    update = update * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                    flat[offset:offset + p.numel()] = update.flatten().float()
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset:offset + p.numel()].view_as(p), alpha=-group["lr"])
                offset += p.numel()

    @torch.no_grad()
    def gather_state(self):
        """Give every rank every momentum buffer (each lives on the rank that owns its matrix),
        so that rank 0's state_dict() is the whole optimizer state, as a checkpoint needs."""
        world = Ranks().world
        if world == 1:
            return
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                # A missing buffer is a zero one: momentum starts from zero either way.
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                dist.broadcast(buf, src=i % world)


def is_control(name, p):
    """Scales, gains, mixes, skip weights, lane weights and gate rows (attention/smear `gate_w`, as
    the records route `attn_gate_w`): small tensors that AdamW handles better than Muon."""
    return p.ndim < 2 or name.startswith("skip_") or name.endswith(("resid_mix", "q_gain", "gate_w", "lane_post"))


def is_embedding(name):
    """Lookup tables (token, BigramHash, value embeddings) and an untied head: AdamW at the
    embedding LR, as the records do; their gradients are sparse rows, which Muon would distort."""
    return name in ("tok_emb.weight", "lm_head.weight") or name.endswith("emb.table.weight")


def build_optimizers(model, cfg):
    """Muon on block matrices; AdamW groups for the embedding/head and the control tensors."""
    matrices, embeds, controls = [], [], []
    for name, p in model.named_parameters():
        if is_embedding(name):
            embeds.append(p)
        elif is_control(name, p):
            controls.append(p)
        else:
            matrices.append(p)
    adam = torch.optim.AdamW(
        [dict(params=embeds, lr=cfg.embed_lr, weight_decay=cfg.embed_weight_decay, base_lr=cfg.embed_lr),
         dict(params=controls, lr=cfg.scalar_lr, weight_decay=cfg.scalar_weight_decay, base_lr=cfg.scalar_lr)],
        betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=True)
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                coefficients=cfg.newton_schulz_coefficients, ns_steps=cfg.newton_schulz_steps)
    muon.param_groups[0].update(base_lr=cfg.matrix_lr, base_weight_decay=cfg.muon_weight_decay)
    return [muon, adam]


def lr_multiplier(frac, warmdown_frac, min_lr):
    """1 until the warmdown starts, then linear to 0 at frac = 1, floored at min_lr."""
    if frac < 1 - warmdown_frac:
        return 1.0
    return max((1 - frac) / warmdown_frac, min_lr)


def muon_momentum(step, cfg):
    ramp = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    # Written as the records interpolate, so the value matches theirs to the last bit.
    return (1 - ramp) * cfg.muon_momentum_warmup_start + ramp * cfg.muon_momentum


def muon_wd_multiplier(frac, cfg):
    """The 2026-04-18 taper of Muon's weight decay: 1 until muon_wd_taper_start, then linear to
    muon_wd_taper_final at frac = 1; always 1 when the taper is off."""
    if not cfg.muon_wd_taper or frac <= cfg.muon_wd_taper_start:
        return 1.0
    progress = min((frac - cfg.muon_wd_taper_start) / (1 - cfg.muon_wd_taper_start), 1.0)
    return 1.0 + progress * (cfg.muon_wd_taper_final - 1.0)


@dataclass(frozen=True)
class Schedule:
    """What the schedules prescribe for one step."""

    lr_mul: float
    """Multiplier of every group's base LR."""
    momentum: float
    """Muon momentum."""
    wd_mul: float
    """Multiplier of Muon's base weight decay."""


def schedule_at(step, frac, cfg):
    """The schedules at `step` (optimizer steps done) and `frac` (share of the budget used)."""
    return Schedule(lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr), muon_momentum(step, cfg),
                    muon_wd_multiplier(frac, cfg))


def apply_schedule(optimizers, sched):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * sched.lr_mul
            if "momentum" in group:
                group["momentum"] = sched.momentum
            if "base_weight_decay" in group:
                group["weight_decay"] = group["base_weight_decay"] * sched.wd_mul
