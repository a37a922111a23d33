"""The training loop: one process or torchrun/DDP, wallclock-scheduled, EMA weights at the end.

Training reads only `fineweb_train_*` shards. The LR schedule and the depth-recurrence switch run
on the fraction of the wallclock budget used (or of the step cap, whichever is further along), as
the records do, so a run ends on time whatever the hardware.
"""

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from builder.loader import ShuffledSequences
from builder.optim import build_optimizers, lr_multiplier, muon_momentum
from runtime.errors import PgError
from runtime.model import GPT


@dataclass
class Context:
    """Where this process runs: device, rank and world size."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self):
        return self.rank == 0


def setup_context(require_cuda=False):
    """Join torchrun's process group when launched by it (NCCL on GPU, gloo on CPU)."""
    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        raise PgError("this preset needs a CUDA GPU and none is available; use --preset tiny on CPU")
    if "RANK" not in os.environ:
        return Context(torch.device("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Context(device, rank, world)


def micro_steps(cfg, world):
    """Gradient-accumulation steps per optimizer step, checking that the batch splits evenly."""
    per_rank, rem = divmod(cfg.batch_tokens, world)
    if rem or per_rank % cfg.micro_batch_tokens or cfg.micro_batch_tokens % cfg.seq_len:
        raise PgError(f"batch of {cfg.batch_tokens} tokens does not split into {world} rank(s) x micro-batches of "
                      f"{cfg.micro_batch_tokens} tokens x sequences of {cfg.seq_len}; adjust train.batch_tokens")
    return per_rank // cfg.micro_batch_tokens


@dataclass
class TrainResult:
    model: GPT
    """The trained model holding the EMA weights, on the training device."""
    steps: int
    seconds: float
    log: list = field(default_factory=list)
    """One dict per logged step: step, loss, lr_mul, looping, seconds, tokens_per_second."""
    shards: list = field(default_factory=list)


class EMA:
    """Exponential moving average of all weights, in fp32, without bias correction."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - self.decay)

    def load_into(self, model):
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


class Trainer:
    """One model, its optimizers and its batches: `step` runs one optimizer step."""

    def __init__(self, preset, layout, ctx):
        cfg = self.cfg = preset.train
        self.ctx = ctx
        self.accum = micro_steps(cfg, ctx.world)
        torch.manual_seed(cfg.seed)
        self.model = GPT(preset.model)
        self.model.reset_parameters()
        self.model.to(ctx.device)
        cuda = ctx.device.type == "cuda"
        self.forward = torch.compile(self.model) if cuda and cfg.compile else self.model
        if ctx.world > 1:
            self.forward = DistributedDataParallel(self.forward, device_ids=[ctx.device] if cuda else None)
        self.optimizers = build_optimizers(self.model, cfg)
        self.loader = ShuffledSequences(layout.shards("train"), cfg.seq_len, cfg.seed)
        self.seqs_per_step = self.accum * cfg.micro_batch_tokens // cfg.seq_len  # this rank's share
        self.autocast = (torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False))

    def step(self, lr_mul, momentum):
        """Forward/backward over this rank's share of a global batch, clip, update; returns the
        summed micro-batch losses."""
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        inputs, targets = self.loader.next_batch(self.seqs_per_step, self.ctx.rank, self.ctx.world)
        for micro, (x, y) in enumerate(zip(inputs.chunk(self.accum), targets.chunk(self.accum))):
            # DDP all-reduces gradients only on the last micro-batch of the step.
            last = not isinstance(self.forward, DistributedDataParallel) or micro == self.accum - 1
            with (contextlib.nullcontext() if last else self.forward.no_sync()), self.autocast:
                loss = self.forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True)).mean()
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
                if "momentum" in group:
                    group["momentum"] = momentum
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_sum

    def prime_compilation(self):
        """Compile both the plain and the looped graph before the clock starts, then roll back
        weights and optimizer state so the warmup steps leave no trace."""
        saved_model = copy.deepcopy(self.model.state_dict())
        saved_opts = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        for looping in (False, True):
            self.model.looping = looping
            for _ in range(self.cfg.compile_warmup_steps):
                self.step(1.0, self.cfg.muon_momentum_warmup_start)
        self.model.load_state_dict(saved_model)
        for opt, state in zip(self.optimizers, saved_opts):
            opt.load_state_dict(state)
        torch.cuda.synchronize()


def train(preset, layout, ctx, report=print):
    """Train `preset.model` on `layout`'s training shards; returns the EMA model."""
    cfg, mcfg = preset.train, preset.model
    trainer = Trainer(preset, layout, ctx)
    model = trainer.model
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ctx.device.type == "cuda" and cfg.compile and cfg.compile_warmup_steps:
        trainer.prime_compilation()

    budget = max(cfg.max_wallclock_seconds - cfg.reserve_seconds, 1e-9)
    log, step, frac, t0 = [], 0, 0.0, time.perf_counter()
    model.looping = mcfg.num_loops > 0 and cfg.enable_looping_at <= 0
    while step < cfg.iterations and frac < 1.0:
        lr_mul = lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr)
        loss_sum = trainer.step(lr_mul, muon_momentum(step, cfg))
        if ema is not None:
            ema.update(model)
        step += 1
        elapsed = time.perf_counter() - t0
        frac = max(step / cfg.iterations, elapsed / budget)
        if mcfg.num_loops and not model.looping and frac >= cfg.enable_looping_at:
            model.looping = True
            report(f"step {step}: depth recurrence on ({len(mcfg.layer_order(True))} virtual layers)")
        if step % cfg.log_every == 0 or step == 1 or frac >= 1.0 or step == cfg.iterations:
            entry = dict(step=step, loss=round(float(loss_sum) / trainer.accum, 5), lr_mul=round(lr_mul, 4),
                         looping=model.looping, seconds=round(elapsed, 2),
                         tokens_per_second=round(step * cfg.batch_tokens / elapsed))
            log.append(entry)
            report(f"step {step} loss {entry['loss']:.4f} lr_mul {lr_mul:.3f} "
                   f"{entry['tokens_per_second']:,} tok/s {elapsed:.1f}s")
    if ema is not None:
        ema.load_into(model)
    model.looping = True
    return TrainResult(model, step, time.perf_counter() - t0, log, [os.path.basename(p) for p in trainer.loader.paths])
