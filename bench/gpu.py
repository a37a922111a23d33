"""Every GPU measurement in one call, printed as one Markdown table (paste it into BENCHMARKS.md).

    python bench/gpu.py --data .gpu-data/sp8192 [--preset record] [--steps 200] [--set k=v ...]
                        [--eval-tokens 131072] [--json OUT.json] [--time-limit S]

1. Training throughput on real shards with the preset's real Trainer, first with depth recurrence
   off and then on (half the steps each, after warm-up steps that compile each graph): tokens/s,
   ms/step, model FLOPs, MFU against the GPU's dense bf16 peak, peak memory, and the ratio to the
   2026-04-09 record's per-GPU throughput.
2. Evaluation time on the first --eval-tokens validation tokens, sliding window and score-first
   TTT: runtime.evaluate (eager, as `artifact.py eval` runs it; and on GPU also given a compiled
   model) against a re-implementation of the record's loops (compiled logits, 32 windows per
   forward, TTT training on up to 32 full sequences per forward, scoring and training never
   overlapping). On GPU each variant runs once untimed and once timed on the same copy of the
   weights (restored in between), so compiling every batch shape stays out of the figure.
3. Numerical checks: bf16 autocast vs fp32 NLL, flash-attn vs SDPA, compiled vs eager logits and
   training gradients; the Triton fused MLP against the compiled MLP (time and gradients).

Runs on CPU too (`--preset tiny --steps 4 --eval-tokens 2000`), which is how it is tested; there
MFU and the record ratios read n/a and compilation is off unless `--compile on`.
"""

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/gpu.py` without installing the project
    sys.path.insert(0, ROOT)

import runtime.attention as runtime_attention  # noqa: E402
from builder.config import apply_overrides  # noqa: E402
from builder.presets import get_preset  # noqa: E402
from builder.train.optim import schedule_at  # noqa: E402
from builder.train.trainer import Trainer, fused_kernels, setup_context  # noqa: E402
from runtime.data import find_data, load_tokens  # noqa: E402
from runtime.errors import PgError  # noqa: E402
from runtime.evaluate import byte_tables, evaluate, trim_stream  # noqa: E402
from runtime.model import GPT  # noqa: E402
from runtime.precision import autocast  # noqa: E402

# The 2026-04-09 record's train log on 8xH100: ~7.7 M tok/s before depth recurrence, ~6.1 M after.
RECORD_TOKENS_PER_GPU = {False: 7.7e6 / 8, True: 6.1e6 / 8}
TARGET_RATIO = 1.05
# Its eval on 8 GPUs over 40,540,160 val tokens, compilation included: sliding 94-121 s, TTT 318-368 s.
RECORD_EVAL_TOKENS_PER_GPU = {"sliding": (40_540_160 / 8 / 121, 40_540_160 / 8 / 94),
                              "ttt": (40_540_160 / 8 / 368, 40_540_160 / 8 / 318)}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


# ----------------------------------------------------------------------------- FLOP counting

def matmul_params_per_block(m):
    """Weights of one block's linear layers: q, k, v, out projections and the MLP's fc, proj."""
    kv_dim = m.num_kv_heads * m.head_dim
    return 2 * m.model_dim * m.model_dim + 2 * m.model_dim * kv_dim + 2 * m.model_dim * m.mlp_dim


def forward_flops_per_token(m, seq_len, looping):
    """Matmul FLOPs of one forward pass, per token of a full seq_len sequence.

    Linear layers: 2 FLOPs per weight per token, for every virtual layer (a looped block counts
    once per pass). Attention, causal: query t scores t+1 keys, so QK^T and AV each cost
    2 * head_dim FLOPs per (query head, key) pair over T(T+1)/2 pairs per sequence; only the
    unmasked half is counted. Tied head: 2 * model_dim * vocab. Norms, rotary, XSA, the softcap
    and the softmax are left out (they are not matmuls), as are the optional extras' small
    projections (BigramHash, value embeddings, gates: under 0.1% of the total)."""
    layers = len(m.layer_order(looping))
    linear = 2 * matmul_params_per_block(m) * layers
    # Two matmuls x 2 FLOPs x num_heads * head_dim x (T+1)/2 keys per query on average.
    attention = 2 * m.num_heads * m.head_dim * (seq_len + 1) * layers
    return linear + attention + 2 * m.model_dim * m.vocab_size


def train_flops_per_token(m, seq_len, looping):
    """Forward plus backward: the backward pass costs twice the forward."""
    return 3 * forward_flops_per_token(m, seq_len, looping)


def peak_tflops(device_name, override=None):
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


# ----------------------------------------------------------------------------- the report

class Interrupted(BaseException):
    """SIGTERM (the device tool's time limit): print what was measured so far. A BaseException,
    like KeyboardInterrupt, so that `Report.attempt` does not swallow it."""


@dataclass
class Row:
    part: str
    measurement: str
    text: str
    value: object = None
    note: str = ""


class Report:
    def __init__(self, time_limit=None):
        self.rows, self.t0, self.time_limit = [], time.perf_counter(), time_limit
        self.facts = {}

    def add(self, part, measurement, text, value=None, note=""):
        self.rows.append(Row(part, measurement, text, value, note))
        # Progress on stderr, so a run killed before the table still says what it measured.
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {part} | {measurement} | {text} | {note}",
              file=sys.stderr, flush=True)

    def out_of_time(self, part, measurement):
        """True (and a 'skipped' row) once --time-limit seconds have passed."""
        if self.time_limit is None or time.perf_counter() - self.t0 < self.time_limit:
            return False
        self.add(part, measurement, "skipped", note=f"--time-limit {self.time_limit:g} s reached")
        return True

    def attempt(self, part, measurement, fn):
        """fn() unless out of time; a failure (an OOM, a compiler error) becomes a 'failed' row
        rather than the end of the run, so one call on a GPU still returns everything else."""
        if self.out_of_time(part, measurement):
            return None
        try:
            return fn()
        except PgError:
            raise
        except Exception as e:
            traceback.print_exc()
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            self.add(part, measurement, "failed", None, f"{type(e).__name__}: {first_line}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    def markdown(self):
        def cell(s):
            return str(s).replace("|", "\\|")
        lines = ["| part | measurement | value | notes |", "|---|---|---|---|"]
        lines += [f"| {cell(r.part)} | {cell(r.measurement)} | {cell(r.text)} | {cell(r.note)} |" for r in self.rows]
        return "\n".join(lines)


def fmt_rate(x):
    return f"{x / 1e6:.3f} M" if x >= 1e6 else f"{x / 1e3:.1f} k"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_text(device):
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return f"{peak / 2**30:.2f} GiB", peak, "torch.cuda.max_memory_allocated over the timed steps"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return "n/a", rss, f"CPU run; process max RSS so far {rss / 2**20:.0f} MiB"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


# ----------------------------------------------------------------------------- 1. training

def train_step(trainer, step):
    """What builder.train.trainer's loop does per step before warmdown: the optimizer step at full LR,
    then the weight-average (EMA) update."""
    loss = trainer.step(schedule_at(step, 0.0, trainer.cfg))
    trainer.averages.update(trainer.model, step + 1, 0.0)
    return loss


def time_training_phase(trainer, looping, steps, warmup, first_step):
    """Warm up (compiling this phase's graph), then time `steps` optimizer steps."""
    device = trainer.ctx.device
    trainer.model.looping = looping
    step = first_step
    for _ in range(warmup):
        train_step(trainer, step)
        step += 1
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step(trainer, step)
        step += 1
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, float(loss) / trainer.accum, step


def report_training_phase(report, part, trainer, looping, steps, warmup, first_step, peak):
    """Time one phase and add its rows; returns the step count reached."""
    mcfg, cfg, device = trainer.preset.model, trainer.cfg, trainer.ctx.device
    tokens_per_step = trainer.seqs_per_step * cfg.seq_len
    seconds, loss, step = time_training_phase(trainer, looping, steps, warmup, first_step)
    rate = steps * tokens_per_step / seconds
    compiled = "compiled" if trainer.forward is not trainer.model else "eager"
    report.add(part, "tokens/s", fmt_rate(rate), rate,
               f"{steps} steps x {tokens_per_step:,} tokens (grad accum {trainer.accum}), after "
               f"{warmup} warm-up steps; {compiled}")
    report.add(part, "ms/step", f"{1000 * seconds / steps:.1f}", 1000 * seconds / steps,
               f"loss {loss:.4f} at the last step" + ("" if math.isfinite(loss) else " NOT FINITE"))
    flops = train_flops_per_token(mcfg, cfg.seq_len, looping)
    report.add(part, "model FLOPs/token (fwd+bwd)", f"{flops / 1e6:.2f} M", flops,
               "3 x (2 x matmul weights per virtual layer + causal QK^T/AV + tied head)")
    achieved = flops * rate / 1e12
    mfu = achieved / peak if peak else None
    report.add(part, "TFLOP/s, MFU", f"{achieved:.3g}, " + (f"{100 * mfu:.1f}%" if mfu else "n/a"),
               dict(tflops=achieved, mfu=mfu),
               f"of {peak:g} TFLOP/s dense bf16" if peak else "no peak known for this device; pass --peak-tflops")
    text, value, note = memory_text(device)
    report.add(part, "peak memory", text, value, note)
    record = RECORD_TOKENS_PER_GPU[looping]
    if device.type == "cuda":
        ratio = rate / record
        report.add(part, "vs record per GPU", f"{ratio:.3f}x", ratio,
                   f"record {fmt_rate(record)} tok/s per GPU (8xH100 log / 8); target >= {TARGET_RATIO}x: "
                   + ("met" if ratio >= TARGET_RATIO else "NOT met"))
    else:
        report.add(part, "vs record per GPU", "n/a", None, f"CPU run; record {fmt_rate(record)} tok/s per GPU")
    return step


def bench_training(report, preset, layout, ctx, args, peak):
    """Returns the trained model: its averaged weights, recurrence on, as evaluation runs it."""
    mcfg = preset.model
    trainer = Trainer(preset, layout, ctx)
    compiled = trainer.forward is not trainer.model
    warmup = args.warmup_steps if args.warmup_steps is not None else (3 if compiled else 1)
    phases = [False, True] if mcfg.num_loops else [False]
    steps = max(args.steps // len(phases), 1)
    step = 0
    for looping in phases:
        layers = len(mcfg.layer_order(looping))
        part = f"train, {'looped' if looping else 'plain'} ({layers} {'virtual ' if looping else ''}layers)"
        reached = report.attempt(part, "throughput", lambda: report_training_phase(
            report, part, trainer, looping, steps, warmup, step, peak))
        step = reached if reached is not None else step
    trainer.finish()  # plain layers (no fake-quant), the averaged weights, looping on
    return trainer.model


# ----------------------------------------------------------------------------- 2. evaluation

def compile_logits(model):
    """What the record compiles for scoring: the logits forward, static shapes, one graph."""
    return torch.compile(model, dynamic=False, fullgraph=True)


def raise_recompile_limit():
    """GPT.forward gets compiled for training (plain and looped), scoring and TTT training; past
    dynamo's default of 8 graphs per function it would silently fall back to eager and the bench
    would time the wrong thing."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the older one
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))


class RecordScorer:
    """The 2026-04-09 record's scoring loop: windows of seq_len every `stride`, `batch` windows
    per forward through the logits function, float32 cross-entropy over the softcapped logits,
    each window's last `stride` positions (all of window 0's) summed into float64 totals of loss,
    tokens and bytes with per-window lookups, as its eval_val_sliding and eval_val_sliding_ttt do."""

    def __init__(self, tokens, tables, cfg, device):
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.total = len(tokens) - 1
        self.cfg, self.device = cfg, device
        base, has_space, boundary = tables
        self.base = torch.from_numpy(base).to(device)
        self.has_space = torch.from_numpy(has_space).to(device)
        self.boundary = torch.from_numpy(boundary).to(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.token_count = torch.zeros((), dtype=torch.float64, device=device)
        self.byte_count = torch.zeros((), dtype=torch.float64, device=device)
        context = cfg.seq_len - cfg.stride
        self.starts = [ws for ws in range(0, self.total, cfg.stride) if ws + context < self.total]

    def first_scored(self, ws):
        return 0 if ws == 0 else self.cfg.seq_len - self.cfg.stride

    @torch.no_grad()
    def score(self, logits_fn, starts, batch_seqs):
        seq_len, device = self.cfg.seq_len, self.device
        for i in range(0, len(starts), batch_seqs):
            batch = starts[i:i + batch_seqs]
            x = torch.zeros(len(batch), seq_len, dtype=torch.int64, device=device)
            y = torch.zeros(len(batch), seq_len, dtype=torch.int64, device=device)
            lengths = []
            for row, ws in enumerate(batch):
                end = min(ws + seq_len, self.total)
                lengths.append(end - ws)
                chunk = self.tokens[ws:end + 1].to(device)
                x[row, :end - ws], y[row, :end - ws] = chunk[:-1], chunk[1:]
            with autocast(device):
                logits = logits_fn(x)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(len(batch), seq_len)
            for row, ws in enumerate(batch):
                s, n = self.first_scored(ws), lengths[row]
                target, prev = y[row, s:n], x[row, s:n]
                self.loss_sum += nll[row, s:n].double().sum()
                self.token_count += float(n - s)
                nbytes = self.base[target].double() + (self.has_space[target] & ~self.boundary[prev]).double()
                self.byte_count += nbytes.sum()

    def bpb(self):
        return self.loss_sum.item() / math.log(2) / self.byte_count.item()


def record_sliding(model, tokens, tables, cfg, device, logits_fn):
    scorer = RecordScorer(tokens, tables, cfg, device)
    model.eval()
    scorer.score(logits_fn, scorer.starts, cfg.batch_seqs)
    return scorer


def record_ttt(model, tokens, tables, cfg, device, logits_fn):
    """The record's eval_val_sliding_ttt: per 32k chunk, score its windows under no_grad, then
    (except the last chunk) train the eager model on the chunk's full sequences, up to
    ttt_batch_seqs per forward, SGD with momentum on all weights, cosine LR over chunks."""
    scorer = RecordScorer(tokens, tables, cfg, device)
    chunk, seq_len = cfg.ttt_chunk_tokens, cfg.seq_len
    num_chunks = (scorer.total + chunk - 1) // chunk
    by_chunk = [[] for _ in range(num_chunks)]
    for ws in scorer.starts:
        by_chunk[min((ws + scorer.first_scored(ws)) // chunk, num_chunks - 1)].append(ws)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    for ci in range(num_chunks):
        if not by_chunk[ci]:  # the record skips such a chunk entirely, training included
            continue
        model.eval()
        scorer.score(logits_fn, by_chunk[ci], cfg.batch_seqs)
        start, end = ci * chunk, min((ci + 1) * chunk, scorer.total)
        num_seqs = (end - start) // seq_len
        if ci == num_chunks - 1 or cfg.ttt_epochs <= 0 or num_seqs == 0:
            continue
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))
        for _ in range(cfg.ttt_epochs):
            for b in range(0, num_seqs, cfg.ttt_batch_seqs):
                e = min(b + cfg.ttt_batch_seqs, num_seqs)
                local = scorer.tokens[start + b * seq_len:start + e * seq_len + 1].to(device)
                x, y = local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device):
                    loss = model(x, y).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
                optimizer.step()
    model.eval()
    return scorer


def timed_run(make, model, device, warm):
    """Time one evaluation on a copy of `model`. With `warm`, an untimed run goes first and the
    copy's weights are then restored in place: the same module (and the same compiled wrapper)
    is timed, so compiling every batch shape stays out of the figure."""
    work = copy.deepcopy(model)
    go = make(work)
    if warm:
        go()
        work.load_state_dict(model.state_dict())
    sync(device)
    t0 = time.perf_counter()
    bpb = go()
    sync(device)
    return time.perf_counter() - t0, bpb


def eval_variants(tokens, tables, cfg, device, use_compile):
    """(mode, label, note, make) for every timed evaluation, most important first; make(model)
    wraps the model once and returns a zero-argument run that returns bpb."""
    def ours(mode, compiled=False):
        def make(m):
            run_cfg = dataclasses.replace(cfg, compile=compiled)
            return lambda: evaluate(m, tokens, tables, run_cfg, mode, device).val_bpb
        return make

    def record(fn):
        def make(m):
            logits_fn = compile_logits(m) if use_compile else m
            return lambda: fn(m, tokens, tables, cfg, device, logits_fn).bpb()
        return make

    eager_note = "eager model, as artifact.py eval runs it"
    record_note = ("R0409's loops: " + ("compiled logits" if use_compile else "eager (no compile)") +
                   f", {cfg.batch_seqs} windows/forward")
    variants = [
        ("sliding", "runtime.evaluate", eager_note, ours("sliding")),
        ("sliding", "record's way", record_note, record(record_sliding)),
        ("ttt", "runtime.evaluate", eager_note + "; trains one sequence per forward", ours("ttt")),
        ("ttt", "record's way", record_note + f"; trains {cfg.ttt_batch_seqs} seqs/forward, eager",
         record(record_ttt)),
        ("lora", "runtime.evaluate", eager_note + f"; {cfg.lora_batch_docs} documents per batch, "
         f"{cfg.lora_phases} phases over {cfg.lora_phase_docs} documents", ours("lora")),
    ]
    if use_compile:
        compiled_note = "eval.compile=true (torch.compile of the model inside runtime.evaluate)"
        variants += [("sliding", "runtime.evaluate, compiled model", compiled_note, ours("sliding", True)),
                     ("ttt", "runtime.evaluate, compiled model", compiled_note, ours("ttt", True)),
                     ("lora", "runtime.evaluate, compiled model", compiled_note + ", dynamic shapes",
                      ours("lora", True))]
    return variants


def bench_eval(report, model, tokens, tables, cfg, device, use_compile, bytes_note):
    scored = len(tokens) - 1
    for mode, label, note, make in eval_variants(tokens, tables, cfg, device, use_compile):
        what = {"sliding": f"sliding (stride {cfg.stride})",
                "ttt": f"score-first TTT ({cfg.ttt_chunk_tokens}-token chunks, {cfg.ttt_epochs} epochs)",
                "lora": f"LoRA TTT (rank {cfg.lora_rank}, {cfg.lora_chunk_tokens}-token chunks)"}[mode]
        part = f"eval, {what}"
        report.attempt(part, label, lambda: report_eval_variant(
            report, part, label, note, make, mode, model, scored, device, use_compile, bytes_note))


def report_eval_variant(report, part, label, note, make, mode, model, scored, device, use_compile, bytes_note):
    if use_compile:
        torch._dynamo.reset()  # each variant compiles its own graphs, in its untimed run
    seconds, bpb = timed_run(make, model, device, warm=use_compile or device.type == "cuda")
    note = f"{note}; {bytes_note} {bpb:.5f} on {scored:,} tokens"
    if label == "record's way":
        low, high = RECORD_EVAL_TOKENS_PER_GPU[mode]
        note += f"; the record's log: {fmt_rate(low)}-{fmt_rate(high)} tok/s per GPU, compilation included"
    report.add(part, label, f"{seconds:.2f} s, {fmt_rate(scored / seconds)} tok/s",
               dict(seconds=seconds, tokens=scored, tokens_per_second=scored / seconds, bpb=bpb), note)


# ----------------------------------------------------------------------------- 3. checks

def check_batch(tokens, seq_len, rows, device):
    usable = min(rows, (len(tokens) - 1) // seq_len)
    stream = torch.from_numpy(np.asarray(tokens[:usable * seq_len + 1], dtype=np.int64))
    return stream[:-1].view(usable, seq_len).to(device), stream[1:].view(usable, seq_len).to(device)


@torch.no_grad()
def mean_nll(model, x, y, device, bf16):
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        return model(x, y).double().mean(dim=1)


def check_bf16(report, model, x, y, device, where):
    diff = (mean_nll(model, x, y, device, True) - mean_nll(model, x, y, device, False)).abs().max().item()
    report.add("check", "bf16 autocast vs fp32: max |d mean NLL|", f"{diff:.2e} nats", diff,
               f"per-sequence mean NLL, {where}")


def check_flash(report, model, x, y, device, where):
    flash = mean_nll(model, x, y, device, True)
    saved, runtime_attention.flash_attn_func = runtime_attention.flash_attn_func, None  # SDPA fallback
    try:
        sdpa = mean_nll(model, x, y, device, True)
    finally:
        runtime_attention.flash_attn_func = saved
    diff = (flash - sdpa).abs().max().item()
    report.add("check", "flash-attn vs SDPA: max |d mean NLL|", f"{diff:.2e} nats", diff, f"bf16, {where}")


def check_compiled(report, model, x, y, device, where):
    compiled = compile_logits(model)
    with torch.no_grad(), autocast(device):
        eager_logits, compiled_logits = model(x), compiled(x)
    logit_diff = (eager_logits - compiled_logits).abs().max().item()
    nll = [F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none").view_as(y).double().mean(1)
           for z in (eager_logits, compiled_logits)]
    diff = (nll[0] - nll[1]).abs().max().item()
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    report.add("check", "compiled vs eager: max |d logit|, max |d mean NLL|", f"{logit_diff:.2e}, {diff:.2e}",
               diff, f"torch.compile(fullgraph, static shapes), {precision}, {where}")


def check_compiled_gradients(report, model, x, y, device, where):
    """The training graph: the compiled mean loss's gradients against eager's (on a GPU with
    doc_mask, flex_attention's backward against the dense mask's)."""
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    grads = []
    for forward in (model, compiled):
        model.zero_grad(set_to_none=True)
        with autocast(device):
            forward(x, y, mean=True).backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    diff = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    report.add("check", "compiled vs eager training: |d grad| / |grad|", f"{diff:.2e}", diff,
               f"all parameters, {precision}, {where}")


def eager_mlp(x, fc, proj, slope):
    return F.linear(F.leaky_relu(F.linear(x, fc), slope).square(), proj)


def check_fused_mlp(report, preset, device, fused_mlp, tokens=98_304, repeats=20, backend="inductor"):
    """One MLP at the record's per-GPU micro-batch, forward and backward in bf16: train.fused_mlp's
    Triton kernels against the model's MLP compiled with `backend` (inductor: cuBLAS matmuls and
    a fused activation), time and gradients."""
    m = preset.model
    slope = m.leaky_relu_slope if m.mlp_activation == "leaky_relu2" else 0.0
    gen = torch.Generator(device=device).manual_seed(0)

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device=device)).bfloat16()
    x, g = make(tokens, m.model_dim), make(tokens, m.model_dim)
    fc, proj = make(m.mlp_dim, m.model_dim, scale=m.model_dim ** -0.5), make(m.model_dim, m.mlp_dim, scale=0.02)
    results, compiled = {}, torch.compile(eager_mlp, backend=backend, fullgraph=True, dynamic=False)
    for name, fn in (("fused", fused_mlp), ("compiled", compiled)):
        leaves = [t.clone().requires_grad_() for t in (x, fc, proj)]

        def step():
            return torch.autograd.grad(fn(*leaves, slope), leaves, g)
        for _ in range(3):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            grads = step()
        sync(device)
        results[name] = ((time.perf_counter() - start) / repeats * 1e3, torch.cat([t.flatten().float() for t in grads]))
    (fused_ms, fused_grads), (compiled_ms, compiled_grads) = results["fused"], results["compiled"]
    diff = ((fused_grads - compiled_grads).norm() / compiled_grads.norm()).item()
    report.add("check", "fused MLP vs compiled MLP: ms per forward+backward, |d grad| / |grad|",
               f"{fused_ms:.2f} vs {compiled_ms:.2f} ms ({compiled_ms / fused_ms:.2f}x), {diff:.1e}",
               dict(fused_ms=fused_ms, compiled_ms=compiled_ms, grad_diff=diff),
               f"{tokens:,} tokens x {m.model_dim} -> {m.mlp_dim}, bf16; under 1x, train with "
               "--set train.fused_mlp=false")


def bench_checks(report, model, tokens, preset, device, use_compile):
    cfg = preset.eval
    model.eval()
    x, y = check_batch(tokens, cfg.seq_len, 4, device)
    where = f"{x.size(0)} x {x.size(1)} val tokens, recurrence on"
    report.attempt("check", "bf16 vs fp32", lambda: check_bf16(report, model, x, y, device, where))
    if runtime_attention.flash_attn_func is None:
        report.add("check", "flash-attn vs SDPA", "not installed", None, "runtime.attention falls back to SDPA")
    elif device.type != "cuda":
        report.add("check", "flash-attn vs SDPA", "n/a", None, "flash-attn needs CUDA")
    else:
        report.attempt("check", "flash-attn vs SDPA", lambda: check_flash(report, model, x, y, device, where))
    if use_compile:
        report.attempt("check", "compiled vs eager", lambda: check_compiled(report, model, x, y, device, where))
        report.attempt("check", "compiled vs eager training",
                       lambda: check_compiled_gradients(report, model, x, y, device, where))
    else:
        report.add("check", "compiled vs eager", "skipped", None,
                   "compilation off (CPU default; --compile on forces it)")
    fused_mlp = fused_kernels(preset, device)["mlp"]
    if fused_mlp is None:
        report.add("check", "fused MLP vs compiled MLP", "n/a", None, "train.fused_mlp applies on CUDA with Triton")
    else:
        report.attempt("check", "fused MLP vs compiled MLP", lambda: check_fused_mlp(report, preset, device, fused_mlp))


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (pgbuild or challenge layout)")
    p.add_argument("--preset", default="record", help="preset name (default: record)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a preset field, as in pgbuild (repeatable)")
    p.add_argument("--steps", type=int, default=200, help="timed training steps, split evenly between plain and looped")
    p.add_argument("--warmup-steps", type=int,
                   help="untimed steps before each training phase (default 3 when compiled, else 1)")
    p.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens to evaluate (a prefix)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not recognized by name")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile in the eval/check parts (auto: on CUDA only); training follows train.compile")
    p.add_argument("--parts", default="train,eval,checks", help="comma-separated subset of train,eval,checks")
    p.add_argument("--time-limit", type=float, help="skip measurements not started within this many seconds")
    p.add_argument("--json", help="also write the rows and run facts to this JSON file")
    return p.parse_args(argv)


def load_tables(tokenizer_path, vocab):
    """The challenge's byte tables; without sentencepiece, one 'byte' per token (bits per token)."""
    try:
        import sentencepiece as spm
    except ImportError:
        return (np.ones(vocab, np.int64), np.zeros(vocab, bool), np.ones(vocab, bool)), "bits/token (no sentencepiece)"
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    if sp.get_piece_size() != vocab:
        raise PgError(f"{tokenizer_path}: {sp.get_piece_size()} pieces but the preset's vocab is {vocab}; "
                      f"pass --set model.vocab_size={sp.get_piece_size()} or the matching dataset")
    return byte_tables(sp, vocab), "bpb"


def write_json(path, payload):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def run(args, report):
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"train", "eval", "checks"}:
        raise PgError(f"--parts: unknown part(s) {', '.join(sorted(parts - {'train', 'eval', 'checks'}))}")
    preset = apply_overrides(get_preset(args.preset), args.overrides)
    ctx = setup_context(require_cuda=preset.train.require_cuda)
    if ctx.world > 1:
        raise PgError("run bench/gpu.py as one process (it measures one GPU), not under torchrun")
    device, vocab = ctx.device, preset.model.vocab_size
    layout = find_data(args.data, vocab)
    tables, bytes_note = load_tables(layout.tokenizer, vocab)
    tokens = trim_stream(load_tokens(layout, "val", args.eval_tokens + 1), preset.eval.seq_len)
    if int(tokens.max()) >= vocab:
        raise PgError(f"validation shards hold token id {int(tokens.max())} >= vocab {vocab}; "
                      "wrong dataset for this preset")
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    raise_recompile_limit()
    name = device_name(device)
    peak = peak_tflops(name, args.peak_tflops)
    facts = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 torch=torch.__version__, cuda=torch.version.cuda, device=name, peak_bf16_tflops=peak,
                 preset=args.preset, overrides=args.overrides, data=os.path.abspath(args.data),
                 command="python bench/gpu.py " + " ".join(sys.argv[1:]),
                 flash_attn=runtime_attention.flash_attn_func is not None,
                 **{f"fused_{part}": fn is not None for part, fn in fused_kernels(preset, device).items()})
    report.facts = facts
    report.add("run", "date, torch, device", f"{facts['date']}, torch {torch.__version__}, {name}", facts,
               f"preset {args.preset}" + (f" with {' '.join(args.overrides)}" if args.overrides else "") +
               "; training loss, MLP: " + ", ".join("Triton fused" if facts[k] else "eager"
                                                    for k in ("fused_loss", "fused_mlp")))
    model = None
    if "train" in parts:
        model = report.attempt("train", "setup", lambda: bench_training(report, preset, layout, ctx, args, peak))
        weights = "after the training part's steps"
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the optimizer states and training graphs are gone
    if model is None:
        torch.manual_seed(preset.train.seed)
        model = GPT(preset.model)
        model.reset_parameters()
        model.to(device)
        weights = "freshly initialized"
    report.add("run", "weights for eval/checks", weights, None, "speed does not depend on them; bpb does")
    if "checks" in parts:
        bench_checks(report, model, tokens, preset, device, use_compile)
    if "eval" in parts:
        bench_eval(report, model, tokens, tables, preset.eval, device, use_compile, bytes_note)
    return facts


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = Report(args.time_limit)

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        run(args, report)
    except PgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        report.add("run", "interrupted", str(e) or "Ctrl-C", None, "the rows above were measured before it")
        status = 1
    print(report.markdown(), flush=True)
    if args.json:
        write_json(args.json, dict(facts=report.facts, rows=[r.__dict__ for r in report.rows]))
    return status


if __name__ == "__main__":
    sys.exit(main())
