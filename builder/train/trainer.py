"""The training loop: one process or torchrun/DDP, wallclock-scheduled, averaged weights at the end.

Training reads only `fineweb_train_*` shards. The schedules (LR warmdown, Muon momentum and
weight-decay taper, the depth-recurrence switch, late QAT, SWA) run on the fraction of the time
budget used, or of the step cap, whichever is further along, as the records do, so a run ends on
time whatever the hardware. The budget is the wallclock limit minus the reserve for the stages
after training (builder/timebudget.py). Under DDP rank 0's clock decides for every rank, so all
ranks follow one schedule and stop at the same step.

A run can be resumed: `Trainer.state_dict()` holds the weights, the optimizer states (Muon's
momentum gathered from the ranks that own it), the weight averages, the data order, the step, the
elapsed seconds and the switches; `train(..., resume=state)` continues exactly where it stopped.
"""

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from builder.data.loader import ShuffledSequences
from builder.timebudget import TIME_RULES, estimate_post_training
from builder.train.averaging import Averages
from builder.train.compiling import compile_training
from builder.train.optim import Muon, apply_schedule, build_optimizers, schedule_at
from builder.train.qat import LateQAT
from runtime.distributed import Ranks, init_distributed
from runtime.errors import PgError
from runtime.model import GPT
from runtime.precision import autocast

try:  # Triton's kernels: loaded wherever Triton is installed, used on CUDA (fused_kernels)
    from builder.train.fused_loss import softcapped_cross_entropy
    from builder.train.fused_mlp import fused_mlp
except ImportError:
    softcapped_cross_entropy = fused_mlp = None


class Context(Ranks):
    """Where this process runs: its device, and (from Ranks) its rank among `world`."""

    def __init__(self, device):
        super().__init__()
        self.device = device


def setup_context(require_cuda=False):
    """This process's Context, after joining torchrun's process group when launched by it."""
    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        raise PgError("this preset needs a CUDA GPU and none is available; use --preset tiny on CPU")
    return Context(init_distributed() or torch.device("cuda" if cuda else "cpu"))


def micro_batches(cfg, world):
    """(micro-batches per optimizer step on each rank, tokens per micro-batch), checking that the
    batch splits evenly. A rank's share smaller than micro_batch_tokens is one micro-batch."""
    per_rank, rem = divmod(cfg.batch_tokens, world)
    micro = min(cfg.micro_batch_tokens, per_rank)
    if rem or not micro or per_rank % micro or micro % cfg.seq_len:
        raise PgError(f"batch of {cfg.batch_tokens} tokens does not split into {world} rank(s) x micro-batches of "
                      f"{micro} tokens x sequences of {cfg.seq_len}; adjust train.batch_tokens")
    return per_rank // micro, micro


def from_rank0(value, ctx):
    """Rank 0's float, on every rank (the clock that decides the schedule for all of them)."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=0)
    return float(t.item())


def to_cpu(obj):
    """A copy of a nest of dicts/lists/tensors with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


@dataclass
class TrainResult:
    model: GPT
    """The trained model holding the final (averaged) weights, on the training device."""
    steps: int
    seconds: float
    """Training seconds on the clock, over all sessions of a resumed run."""
    log: list = field(default_factory=list)
    """One dict per logged step: step, loss, lr_mul, looping, qat, seconds, tokens_per_second."""
    shards: list = field(default_factory=list)
    weights: str = "last"
    """Where the final weights came from: 'swa (N snapshots)', 'ema' or 'last'."""
    reserve_seconds: float = 0.0
    """Seconds of the wallclock limit kept back for the stages after training."""
    setup_seconds: float = 0.0
    """Off-the-clock seconds: compilation warmup and the reserve estimate."""
    estimate: dict | None = None
    """The measured estimate of each post-training stage's seconds, when one was taken."""
    compilations: int = 0
    """Graphs torch.compile built for the training forward in this session, the first compile
    and every recompile: 2 with depth recurrence (plain and looped), 1 without; 0 when eager."""


def fused_kernels(preset, device):
    """The Triton kernels training takes, as GPT.use_fused_kernels' arguments: those of
    train.fused_loss and train.fused_mlp where they apply (see their docs), else None."""
    m, t = preset.model, preset.train
    triton_gpu = device.type == "cuda" and fused_mlp is not None and not m.record_precision
    loss = triton_gpu and t.fused_loss and m.logit_softcap > 0
    mlp = triton_gpu and t.fused_mlp and m.mlp_activation in ("relu2", "leaky_relu2") and t.qat_threshold == 0
    return {"loss": softcapped_cross_entropy if loss else None, "mlp": fused_mlp if mlp else None}


class Trainer:
    """One model, its optimizers, weight averages and batches: `step` runs one optimizer step,
    `train` the whole loop against the step cap and the wallclock budget."""

    def __init__(self, preset, layout, ctx):
        self.created_at = time.perf_counter()  # setup (model, compile wrappers) is off the clock
        cfg = self.cfg = preset.train
        self.layout = layout
        self.preset, self.ctx = preset, ctx
        self.accum, micro_tokens = micro_batches(cfg, ctx.world)
        torch.manual_seed(cfg.seed)
        self.model = GPT(preset.model)
        self.model.reset_parameters()
        self.model.to(ctx.device)
        # Before compiling, so that the compiled graph holds the fake-quant path and its gate.
        self.qat = LateQAT(self.model, preset.quant, cfg.qat_scale) if cfg.qat_threshold > 0 else None
        cuda = ctx.device.type == "cuda"
        self.model.use_fused_kernels(**fused_kernels(preset, ctx.device))
        self.forward, self.graphs = self.model, None
        if cfg.compile and (cuda or cfg.compile_cpu):
            self.forward, self.graphs = compile_training(self.model, cfg.compile_backend)
        if ctx.world > 1:
            self.forward = DistributedDataParallel(self.forward, device_ids=[ctx.device] if cuda else None)
        self.optimizers = build_optimizers(self.model, cfg)
        self.averages = Averages(self.model, cfg)
        self.loader = ShuffledSequences(layout.shards("train"), cfg.seq_len, cfg.seed)
        self.seqs_per_step = self.accum * micro_tokens // cfg.seq_len  # this rank's share
        self.autocast = autocast(ctx.device)
        self.steps, self.elapsed, self.log, self.estimate = 0, 0.0, [], None
        self.reserve = self.setup_seconds = 0.0  # decided when `train` starts
        self.model.looping = preset.model.num_loops > 0 and cfg.enable_looping_at <= 0

    def step(self, sched, batch=None):
        """Forward/backward over this rank's share of a global batch, clip, update with the
        schedule's values; returns the summed micro-batch losses. `batch`: (inputs, targets) of
        this rank's share to use instead of the loader's next (the reference tests feed both
        trainers the same sequences)."""
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        if batch is None:
            batch = self.loader.next_batch(self.seqs_per_step, self.ctx.rank, self.ctx.world)
        inputs, targets = batch
        for micro, (x, y) in enumerate(zip(inputs.chunk(self.accum), targets.chunk(self.accum))):
            # DDP all-reduces gradients only on the last micro-batch of the step.
            last = not isinstance(self.forward, DistributedDataParallel) or micro == self.accum - 1
            with (contextlib.nullcontext() if last else self.forward.no_sync()), self.autocast:
                loss = self.forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True), mean=True)
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        apply_schedule(self.optimizers, sched)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_sum

    def switches(self, sched, frac):
        """Turn on what the schedule calls for before the next step; returns what changed."""
        changes = []
        mcfg = self.preset.model
        if mcfg.num_loops and not self.model.looping and frac >= self.cfg.enable_looping_at:
            self.model.looping = True
            changes.append(f"depth recurrence on ({len(mcfg.layer_order(True))} virtual layers)")
        if self.qat is not None and not self.qat.active and sched.lr_mul < self.cfg.qat_threshold:
            self.qat.enable()
            changes.append(f"late QAT on ({len(self.qat.layers)} matrices, lr_mul {sched.lr_mul:.3f})")
        return changes

    def prime_compilation(self):
        """Compile both the plain and the looped graph before the clock starts, then roll back
        weights, optimizer state and data order so the warmup steps leave no trace."""
        saved_model = copy.deepcopy(self.model.state_dict())
        saved_opts = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        saved_loader = copy.deepcopy(self.loader.state_dict())
        looping = self.model.looping
        sched = schedule_at(0, 0.0, self.cfg)
        for loop in (False, True) if self.preset.model.num_loops else (False,):
            self.model.looping = loop
            for _ in range(self.cfg.compile_warmup_steps):
                self.step(sched)
        self.model.looping = looping
        self.model.load_state_dict(saved_model)
        for opt, state in zip(self.optimizers, saved_opts):
            opt.load_state_dict(state)
        self.loader.load_state_dict(saved_loader)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()

    def final_weights(self):
        return self.averages.final_weights(self.model)[0]

    def result(self):
        return TrainResult(self.model, self.steps, self.elapsed, self.log,
                           [os.path.basename(p) for p in self.loader.paths], self.averages.source(),
                           self.reserve, self.setup_seconds, self.estimate,
                           0 if self.graphs is None else self.graphs.graphs)

    def state_dict(self):
        """Everything a resumed run needs, on the CPU. Collective under DDP: call on every rank."""
        for opt in self.optimizers:
            if isinstance(opt, Muon):
                opt.gather_state()
        return to_cpu({
            "steps": self.steps, "elapsed": self.elapsed, "looping": self.model.looping,
            "qat": self.qat is not None and self.qat.active, "estimate": self.estimate, "log": self.log,
            "model": self.model.state_dict(), "optimizers": [opt.state_dict() for opt in self.optimizers],
            "averages": self.averages.state_dict(), "loader": self.loader.state_dict()})

    def load_state_dict(self, state):
        try:
            self.model.load_state_dict(state["model"])
            for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as e:
            raise PgError(f"the saved training state does not fit this model ({str(e).splitlines()[0]})") from None
        self.averages.load_state_dict(state["averages"])
        self.loader.load_state_dict(state["loader"])
        self.steps, self.elapsed = int(state["steps"]), float(state["elapsed"])
        self.log, self.estimate = list(state["log"]), state["estimate"]
        self.model.looping = bool(state["looping"])
        if self.qat is not None:
            self.qat.enable(bool(state["qat"]))

    def finish(self):
        """Plain layers and the model's own code, the final averaged weights loaded, looping on
        (as evaluated)."""
        if self.qat is not None:
            self.qat.remove()
        self.model.use_fused_kernels()
        self.averages.load_final_into(self.model)
        self.model.looping = True

    def clock_may_bind(self, budget):
        """Whether the wallclock, not the step cap, may end this run: the pace so far projects
        the cap past half the budget. Asked once, at the second step of a session: a run
        projected under half its budget stays under the whole even if its steps later slow
        down twofold (depth recurrence switching on). (Every rank sees rank 0's clock.)"""
        return self.elapsed / self.steps * self.cfg.iterations > budget / 2

    def measured_reserve(self, report):
        """The larger of train.reserve_seconds and the measured estimate of the post-training
        stages the time rule counts (taken on rank 0, shared with every rank)."""
        cfg, ctx = self.cfg, self.ctx
        if self.estimate is None:
            estimate = estimate_post_training(self.model, self.layout, self.preset, ctx.device) if ctx.is_main else None
            if ctx.world > 1:
                shared = [estimate]
                dist.broadcast_object_list(shared, src=0)
                estimate = shared[0]
            self.estimate = {k: round(v, 2) for k, v in estimate.items()}
            report("reserve estimate: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.estimate.items()))
        counted = sum(s for stage, s in self.estimate.items() if stage in TIME_RULES[cfg.time_rule])
        return max(cfg.reserve_seconds, counted)

    def train(self, report=print, save=None, on_log=None):
        """Steps until train.iterations or the wallclock budget (the limit less the reserve) runs
        out, whichever comes first; returns the result with the final (averaged) weights loaded.

        `save(trainer)`: called on every rank every `train.checkpoint_every` steps and once at the
        end, before the final weights replace the trained ones. `on_log(entries)`: called with the
        whole log after each new entry."""
        cfg, ctx = self.cfg, self.ctx
        if self.graphs is not None and cfg.compile_warmup_steps:
            self.prime_compilation()
        estimate_due = cfg.auto_reserve
        if estimate_due and self.estimate is not None:  # resumed: measured before
            self.reserve, estimate_due = self.measured_reserve(report), False
        else:
            self.reserve = cfg.reserve_seconds
        self.setup_seconds = time.perf_counter() - self.created_at

        budget = max(cfg.max_wallclock_seconds - self.reserve, 1e-9)
        frac = max(self.steps / cfg.iterations, self.elapsed / budget)
        # The log (train_log.jsonl, loss.png) gets at least ~50 points however short the run; the
        # console still prints every train.log_every steps.
        log_every = min(cfg.log_every, max(1, cfg.iterations // 50))
        session_start, elapsed_before = time.perf_counter(), self.elapsed
        while self.steps < cfg.iterations and frac < 1.0:
            sched = schedule_at(self.steps, frac, cfg)
            for change in self.switches(sched, frac):
                report(f"step {self.steps}: {change}")
            loss_sum = self.step(sched)
            self.steps += 1
            self.elapsed = elapsed_before + from_rank0(time.perf_counter() - session_start, ctx)
            if estimate_due and self.steps >= 2:
                estimate_due = False
                if self.clock_may_bind(budget):
                    paused = time.perf_counter()
                    self.reserve = self.measured_reserve(report)
                    budget = max(cfg.max_wallclock_seconds - self.reserve, 1e-9)
                    self.setup_seconds += time.perf_counter() - paused
                    session_start += time.perf_counter() - paused  # the estimate is off the clock
            frac = max(self.steps / cfg.iterations, self.elapsed / budget)
            if self.averages.update(self.model, self.steps, frac):
                report(f"step {self.steps}: SWA started (a snapshot every {cfg.swa_every} steps)")
            done = self.steps >= cfg.iterations or frac >= 1.0
            if self.steps % log_every == 0 or self.steps == 1 or done:
                entry = self.log_entry(loss_sum, sched)
                self.log.append(entry)
                if self.steps % cfg.log_every == 0 or self.steps == 1 or done:
                    report(f"step {entry['step']} loss {entry['loss']:.4f} lr_mul {sched.lr_mul:.3f} "
                           f"{entry['tokens_per_second']:,} tok/s {entry['seconds']:.1f}s")
                if on_log is not None:
                    on_log(self.log)
            if save is not None and cfg.checkpoint_every and self.steps % cfg.checkpoint_every == 0 and not done:
                paused = time.perf_counter()
                save(self)
                session_start += time.perf_counter() - paused  # checkpoints are off the clock
        if save is not None:
            save(self)
        result = self.result()
        self.finish()
        if self.graphs is not None:
            # As the record does: drop the training graphs, so evaluation's graphs get dynamo's whole
            # recompile limit (with fullgraph=True, going past it is an error, not a slow fallback).
            torch._dynamo.reset()
        report(f"final weights: {result.weights}")
        return result

    def log_entry(self, loss_sum, sched):
        return dict(step=self.steps, loss=round(float(loss_sum) / self.accum, 5), lr_mul=round(sched.lr_mul, 4),
                    looping=self.model.looping, qat=self.qat is not None and self.qat.active,
                    seconds=round(self.elapsed, 2),
                    tokens_per_second=round(self.steps * self.cfg.batch_tokens / max(self.elapsed, 1e-9)))



def train(preset, layout, ctx, report=print, resume=None, save=None, on_log=None):
    """Train `preset.model` on `layout`'s training shards (see `Trainer.train`); `resume` is a
    `Trainer.state_dict()` to continue from."""
    trainer = Trainer(preset, layout, ctx)
    if resume is not None:
        trainer.load_state_dict(resume)
        report(f"resuming at step {trainer.steps} ({trainer.elapsed:.1f} s on the clock)")
    return trainer.train(report, save, on_log)
