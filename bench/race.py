"""The GPU race in one call: a record's own script against pgbuild, same data, same clock.

    python bench/race.py --data .gpu-data/sp8192 [--record r0409|r0427] [--preset NAME]
                         [--set section.field=value ...] [--wallclock 45] [--eval-tokens 131072]
                         [--warmup-steps 3] [--reference PATH] [--time-limit 540] [--json OUT.json]

Two processes, one after the other, on one device and one data folder (the challenge's layout,
made here from pgbuild's: train shards and tokenizer linked, the validation shard, and a CaseOps
build's byte sidecar, cut to the --eval-tokens prefix):

1. the reference, ../shared/reference/{record}_train_gpt.py, loaded as a module (bench/reference.py:
   FA3 -> SDPA, its variable-length kernel -> flex_attention, configured by its environment
   variables, derived from the preset) and driven through its own train_model and evaluations;
2. pgbuild's preset through builder.train.trainer.train and runtime.evaluate.

--record r0409 (the 2026-04-09 record, preset `record`) races the sliding window and score-first
TTT; --record r0427 (the 2026-04-27 record, preset `r0427`, on CaseOps data) races the standard
document-masked evaluation and phased LoRA TTT, each side as it ships: the record's documents in
its order (longest first, its phases on that order's first documents), pgbuild's in stream order.
Both train under the same wallclock cap (MAX_WALLCLOCK_SECONDS / train.max_wallclock_seconds,
no GPTQ reserve on either side), compiled, after --warmup-steps untimed steps per graph (plain
and looped), then score the same validation prefix, compilation included in the eval time.
Quantization is left out of both: the race is throughput, the float model's bpb after equal time,
and evaluation time. It prints one table (tokens/s, MFU, peak memory, bpb, eval seconds;
pgbuild / reference ratios against the goals) and with --json writes it with the run's facts.

Without CUDA it runs the shrunk race on the CPU: preset tiny (with r0427's switches for
--record r0427), eager, a few seconds of training, a short prefix (the defaults change
accordingly), which is how it is tested.
"""

import argparse
import datetime
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for path in (ROOT, BENCH):  # run as `python bench/race.py` without installing the project
    if path not in sys.path:
        sys.path.insert(0, path)

from gpu import Interrupted, device_name, peak_tflops, raise_recompile_limit, train_flops_per_token, write_json  # noqa: E402
from reference import load_reference_module, reference_path  # noqa: E402

from builder.config import apply_overrides  # noqa: E402
from builder.data.build import write_shard  # noqa: E402
from builder.presets import get_preset  # noqa: E402
from runtime.api import byte_counts  # noqa: E402
from runtime.data import CASEOPS_SUFFIX, find_data, load_tokens  # noqa: E402
from runtime.errors import PgError  # noqa: E402
from runtime.evaluate import evaluate, trim_stream  # noqa: E402

SIDES = ("reference", "pgbuild")
GOALS = {"tokens_per_second": (">=", 1.05), "bpb": ("<=", 0.99), "eval_seconds": ("<=", 0.7)}
# (GPU, CPU) defaults: the GPU's fit the one-call budget (two runs of compile + train + evals).
# The preset's and the eval prefix's depend on the record (RECORDS).
DEFAULTS = {"wallclock": (45.0, 4.0), "warmup_steps": (3, 0), "time_limit": (540.0, 300.0)}


# ----------------------------------------------------------------------------- shared setup

def race_preset(args, cuda):
    """The preset as raced: the wallclock cap with no reserve, warm-up steps off the clock,
    evaluation compiled on a GPU."""
    race = [f"train.max_wallclock_seconds={args.wallclock}", "train.reserve_seconds=0", "train.auto_reserve=false",
            f"train.compile_warmup_steps={args.warmup_steps}", f"eval.compile={str(cuda).lower()}"]
    shrunk = [] if cuda or args.preset != "tiny" else list(RECORDS[args.record].cpu_switches)
    return apply_overrides(get_preset(args.preset), shrunk + args.overrides + race)


def unsupported(record, features):
    """Raises unless every one of `features` ({name: present}) is absent."""
    if any(features.values()):
        raise PgError(f"the {record} script has no " + ", ".join(k for k, v in features.items() if v) +
                      "; race a preset without them")


def r0409_env(preset, data_dir, warmup_steps):
    """The 2026-04-09 record script's environment variables meaning what `preset` means.
    Features its script does not have must be off."""
    m, t, e = preset.model, preset.train, preset.eval
    extras = {"model.bigram_buckets": m.bigram_buckets, "model.smear_gate": m.smear_gate,
              "model.ve_layers": m.ve_layers,
              "model.attn_gate": m.attn_gate != "none", "model.mlp_activation": m.mlp_activation != "leaky_relu2",
              "model.leaky_relu_slope": m.leaky_relu_slope != 0.5, "train.swa_every": t.swa_every,
              "train.qat_threshold": t.qat_threshold, "train.muon_wd_taper": t.muon_wd_taper,
              "train.newton_schulz_coefficients": t.newton_schulz_coefficients != "classic",
              "train.min_lr": t.min_lr, "model.doc_mask": m.doc_mask, "model.parallel_lanes=2": m.parallel_lanes == 2}
    unsupported("r0409", extras)
    return dict(
        DATA_DIR=data_dir, VOCAB_SIZE=m.vocab_size, NUM_LAYERS=m.num_layers, MODEL_DIM=m.model_dim,
        EMBEDDING_DIM=m.model_dim, NUM_HEADS=m.num_heads, NUM_KV_HEADS=m.num_kv_heads, MLP_MULT=m.mlp_mult,
        ROPE_DIMS=m.rope_dims, ROPE_BASE=m.rope_base, ROPE_TRAIN_SEQ_LEN=t.seq_len, QK_GAIN_INIT=m.qk_gain_init,
        LOGIT_SOFTCAP=m.logit_softcap, TIE_EMBEDDINGS=int(m.tie_embeddings), TIED_EMBED_INIT_STD=m.embed_init_std,
        LN_SCALE=int(m.ln_scale), SKIP_GATES_ENABLED=int(m.skip_gates), NUM_LOOPS=m.num_loops,
        LOOP_START=m.loop_start, LOOP_END=m.loop_end, ENABLE_LOOPING_AT=t.enable_looping_at,
        PARALLEL_RESIDUAL_START=m.parallel_residual_start, XSA_LAST_N=m.xsa_last_n,
        SEED=t.seed, ITERATIONS=t.iterations, MAX_WALLCLOCK_SECONDS=t.max_wallclock_seconds,
        GPTQ_RESERVE_SECONDS=t.reserve_seconds, WARMUP_STEPS=warmup_steps, TRAIN_BATCH_TOKENS=t.batch_tokens,
        TRAIN_SEQ_LEN=t.seq_len, WARMDOWN_FRAC=t.warmdown_frac, TIED_EMBED_LR=t.embed_lr, MATRIX_LR=t.matrix_lr,
        SCALAR_LR=t.scalar_lr, MUON_MOMENTUM=t.muon_momentum, MUON_MOMENTUM_WARMUP_START=t.muon_momentum_warmup_start,
        MUON_MOMENTUM_WARMUP_STEPS=t.muon_momentum_warmup_steps, MUON_BACKEND_STEPS=t.newton_schulz_steps,
        BETA1=t.adam_betas[0], BETA2=t.adam_betas[1], ADAM_EPS=t.adam_eps, GRAD_CLIP_NORM=t.grad_clip,
        ADAM_WD=t.scalar_weight_decay, MUON_WD=t.muon_weight_decay, EMBED_WD=t.embed_weight_decay,
        EMA_DECAY=t.ema_decay, EVAL_SEQ_LEN=e.seq_len, EVAL_STRIDE=e.stride, TTT_LR=e.ttt_lr,
        TTT_EPOCHS=e.ttt_epochs, TTT_MOMENTUM=e.ttt_momentum, TTT_CHUNK_TOKENS=e.ttt_chunk_tokens,
        # Validation inside training is off the clock in the record and absent in pgbuild: none.
        VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=t.iterations)


def r0427_env(preset, data_dir, warmup_steps, tokenizer=""):
    """The 2026-04-27 record script's environment variables meaning what `preset` means, on the
    CaseOps dataset in `data_dir` (its byte sidecar counts the bytes). Its script always masks
    attention at documents, runs Polar-Express Newton-Schulz and, where layers run side by side,
    the two-lane form: the preset must too."""
    m, t, e = preset.model, preset.train, preset.eval
    unsupported("r0427", {
        "model.bigram_buckets": m.bigram_buckets, "model.ve_layers": m.ve_layers,
        "model.attn_gate other than sparse": m.attn_gate not in ("none", "sparse"),
        "model.mlp_activation": m.mlp_activation != "leaky_relu2", "model.leaky_relu_slope": m.leaky_relu_slope != 0.5,
        "model.doc_mask=false": not m.doc_mask,
        "model.parallel_lanes=1 (GPT-J layers)": m.parallel_lanes == 1 and m.parallel_residual_start >= 0,
        "model.rope_yarn_len other than train.seq_len": m.rope_yarn_len not in (0, t.seq_len),
        "train.swa_every": t.swa_every, "train.qat_threshold": t.qat_threshold, "train.muon_wd_taper": t.muon_wd_taper,
        "train.newton_schulz_coefficients other than polar_express": t.newton_schulz_coefficients != "polar_express"})
    return dict(
        DATA_PATH=data_dir, TOKENIZER_PATH=tokenizer, CASEOPS_ENABLED=1, VOCAB_SIZE=m.vocab_size,
        NUM_LAYERS=m.num_layers, MODEL_DIM=m.model_dim, NUM_HEADS=m.num_heads, NUM_KV_HEADS=m.num_kv_heads,
        MLP_MULT=m.mlp_mult, ROPE_DIMS=m.rope_dims, ROPE_BASE=m.rope_base, ROPE_YARN=int(m.rope_yarn_len > 0),
        ROPE_TRAIN_SEQ_LEN=t.seq_len, QK_GAIN_INIT=m.qk_gain_init, LOGIT_SOFTCAP=m.logit_softcap,
        TIE_EMBEDDINGS=int(m.tie_embeddings), TIED_EMBED_INIT_STD=m.embed_init_std, LN_SCALE=int(m.ln_scale),
        SKIP_GATES_ENABLED=int(m.skip_gates), NUM_LOOPS=m.num_loops, LOOP_START=m.loop_start, LOOP_END=m.loop_end,
        ENABLE_LOOPING_AT=t.enable_looping_at,
        PARALLEL_START_LAYER=m.parallel_residual_start if m.parallel_residual_start >= 0 else m.num_layers,
        XSA_LAST_N=m.xsa_last_n, SMEAR_GATE_ENABLED=int(m.smear_gate), GATE_WINDOW=m.gate_window,
        SPARSE_ATTN_GATE_ENABLED=int(m.attn_gate == "sparse"), SPARSE_ATTN_GATE_SCALE=0.5,
        # Triton's fused cross-entropy where Triton can run, as the record trains; else its eager loss.
        FUSED_CE_ENABLED=int(torch.cuda.is_available() and triton_available()),
        SEED=t.seed, ITERATIONS=t.iterations, MAX_WALLCLOCK_SECONDS=t.max_wallclock_seconds,
        GPTQ_RESERVE_SECONDS=t.reserve_seconds, WARMUP_STEPS=warmup_steps, TRAIN_BATCH_TOKENS=t.batch_tokens,
        TRAIN_SEQ_LEN=t.seq_len, WARMDOWN_FRAC=t.warmdown_frac, MIN_LR=t.min_lr, TIED_EMBED_LR=t.embed_lr,
        MATRIX_LR=t.matrix_lr, SCALAR_LR=t.scalar_lr, MUON_MOMENTUM=t.muon_momentum,
        MUON_MOMENTUM_WARMUP_START=t.muon_momentum_warmup_start,
        MUON_MOMENTUM_WARMUP_STEPS=t.muon_momentum_warmup_steps, MUON_BACKEND_STEPS=t.newton_schulz_steps,
        BETA1=t.adam_betas[0], BETA2=t.adam_betas[1], ADAM_EPS=t.adam_eps, GRAD_CLIP_NORM=t.grad_clip,
        ADAM_WD=t.scalar_weight_decay, MUON_WD=t.muon_weight_decay, EMBED_WD=t.embed_weight_decay,
        EMA_DECAY=t.ema_decay, EVAL_SEQ_LEN=e.seq_len, EVAL_STRIDE=e.stride,
        # eval_val's batch per process is VAL_BATCH_TOKENS / 8 (one GPU accumulates 8 micro-steps).
        VAL_BATCH_TOKENS=8 * e.batch_seqs * e.seq_len,
        TTT_EVAL_SEQ_LEN=e.seq_len, TTT_LORA_RANK=e.lora_rank, TTT_LORA_ALPHA=e.lora_alpha, TTT_LORA_LR=e.lora_lr,
        TTT_CHUNK_SIZE=e.lora_chunk_tokens, TTT_BATCH_SIZE=e.lora_batch_docs, TTT_BETA1=e.lora_betas[0],
        TTT_BETA2=e.lora_betas[1], TTT_WEIGHT_DECAY=e.lora_weight_decay, PHASED_TTT_PREFIX_DOCS=e.lora_phase_docs,
        PHASED_TTT_NUM_PHASES=e.lora_phases, GLOBAL_TTT_LR=e.lora_phase_lr, GLOBAL_TTT_MOMENTUM=e.ttt_momentum,
        GLOBAL_TTT_CHUNK_TOKENS=e.ttt_chunk_tokens, GLOBAL_TTT_BATCH_SEQS=e.ttt_batch_seqs,
        GLOBAL_TTT_GRAD_CLIP=e.ttt_grad_clip,
        VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=t.iterations)


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_race_data(data, vocab, eval_tokens, seq_len, root, caseops):
    """`data` (either layout) as the challenge's layout under `root` (with CaseOps, under the
    names the record's published CaseOps dataset uses): train shards and tokenizer linked, one
    validation shard holding the first eval_tokens (whole sequences) plus the final target, and
    with CaseOps the byte sidecar of those tokens, so that both sides score exactly that prefix.
    Returns the number of scored tokens."""
    layout = find_data(data, vocab)
    if caseops and not layout.has_byte_sidecar():
        raise PgError(f"{data}: no byte sidecar; the r0427 race runs on a CaseOps build (pgbuild data build --caseops)")
    if layout.has_byte_sidecar() and not caseops:
        raise PgError(f"{data}: a CaseOps build, whose bytes the r0409 script cannot count; "
                      "race it with --record r0427")
    suffix = CASEOPS_SUFFIX if caseops else ""
    shards = os.path.join(root, "datasets", f"fineweb10B_sp{vocab}{suffix}")
    tokenizers = os.path.join(root, "tokenizers")
    os.makedirs(shards)
    os.makedirs(tokenizers)
    for path in layout.shards("train"):
        os.symlink(os.path.abspath(path), os.path.join(shards, os.path.basename(path)))
    os.symlink(os.path.abspath(layout.tokenizer), os.path.join(tokenizers, f"fineweb_{vocab}_bpe{suffix}.model"))
    tokens = trim_stream(load_tokens(layout, "val", eval_tokens + 1), seq_len)
    if int(tokens.max()) >= vocab:
        raise PgError(f"{data}: validation token id {int(tokens.max())} >= vocab {vocab}; "
                      "wrong dataset for this preset")
    write_shard(os.path.join(shards, "fineweb_val_000000.bin"), tokens)
    if caseops:
        write_shard(os.path.join(shards, "fineweb_val_bytes_000000.bin"), load_tokens(layout, "val_bytes", len(tokens)))
    return len(tokens) - 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """(seconds, fn()) with the device's queue drained on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def collector(side, lines):
    """A log callback: keeps each line for parsing and echoes it on stderr (the device log)."""
    def log(msg, console=True):
        lines.append(str(msg))
        print(f"[{side}] {msg}", file=sys.stderr, flush=True)
    return log


class SideResult(dict):
    """One side's figures, rewritten to its file after each stage, so a side cut short by the
    time limit still reports what it finished."""

    def __init__(self, path, **facts):
        super().__init__(facts)
        self.path = path

    def update_and_save(self, **values):
        self.update(values)
        write_json(self.path, dict(self))


# ----------------------------------------------------------------------------- the reference's side

STOPPED = re.compile(r"stopping_early: wallclock_cap train_time: (\d+)ms step: (\d+)/")
TRAIN_LINE = re.compile(r"^(\d+)/\d+ train_loss: ([\d.naif]+) train_time: [\d.]+m tok/s: (\d+)")
LOOPING_ON = re.compile(r"layer_loop:enabled step:(\d+)")
PARAMS = re.compile(r"model_params:(\d+)")


def parse_reference_log(lines, batch_tokens):
    """Steps, training seconds, the step recurrence started at and the parameter count, from
    the lines train_model logs: its stop message when the clock ended training, else its last
    per-step line (step, tokens/s)."""
    text = "\n".join(lines)
    found = {"params": PARAMS.search(text), "looping": LOOPING_ON.search(text), "stopped": STOPPED.search(text)}
    out = dict(params=int(found["params"].group(1)) if found["params"] else None,
               looping_from_step=int(found["looping"].group(1)) if found["looping"] else None)
    if found["stopped"]:
        out.update(train_seconds=int(found["stopped"].group(1)) / 1000, steps=int(found["stopped"].group(2)))
    else:
        step, _, rate = next(m.groups() for m in map(TRAIN_LINE.match, reversed(lines)) if m)
        out.update(steps=int(step), train_seconds=int(step) * batch_tokens / int(rate))
    return out


def skip_validation(*_args, **_kwargs):
    """Stands in for the record's eval_val during training (off its clock; not raced)."""
    return math.nan, math.nan


def start_reference(args, env, device):
    """The record's module, its log collected, validation inside training skipped, seeded as its
    main() seeds; returns (module, log lines, Hyperparameters, ValidationData, its eval_val)."""
    cpu = device.type != "cuda"
    ref = load_reference_module(args.record, env, cpu=cpu, path=args.reference)
    lines = []
    ref.log = collector("reference", lines)
    eval_val, ref.eval_val = ref.eval_val, skip_validation
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # as its main() sets before training
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    h = ref.Hyperparameters()
    random.seed(h.seed)
    np.random.seed(h.seed)
    torch.manual_seed(h.seed)
    return ref, lines, h, ref.ValidationData(h, device), eval_val


def report_training(result, lines, h, device):
    result.update_and_save(**parse_reference_log(lines, h.train_batch_tokens), peak_memory=peak_memory(device),
                           tokens_per_step=h.train_batch_tokens)


def run_r0409(args, preset, device, result):
    ref, lines, h, val_data, _ = start_reference(args, r0409_env(preset, args.race_data, args.warmup_steps), device)
    model, _ = ref.train_model(h, device, val_data)
    report_training(result, lines, h, device)
    model.looping_active = h.num_loops > 0  # as its train_and_eval evaluates
    batch = preset.eval.batch_seqs
    for mode, fn in (("sliding", ref.eval_val_sliding), ("ttt", ref.eval_val_ttt)):
        torch._dynamo.reset()  # as its train_and_eval does before evaluating: compilation is timed
        seconds, (loss, bpb) = timed(device, lambda: fn(h, device, val_data, model, batch_seqs=batch))
        result.update_and_save(**{mode: dict(seconds=seconds, bpb=bpb, loss=loss,
                                             tokens=val_data.val_tokens.numel() - 1)})


def run_r0427(args, preset, device, result):
    layout = find_data(args.race_data, preset.model.vocab_size)
    env = r0427_env(preset, layout.shard_dir, args.warmup_steps, layout.tokenizer)
    if device.type != "cuda":
        # Its loader also pins a tensor it made (bench/reference.py's torch.empty covers the
        # others); the CPU has nothing to pin for. This process is the race's child: only it sees this.
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    ref, lines, h, val_data, eval_val = start_reference(args, env, device)
    model, _, _ = ref.train_model(h, device, val_data)
    report_training(result, lines, h, device)
    model.looping_active = h.num_loops > 0  # as its train_and_eval evaluates
    if device.type != "cuda":
        model.float()  # its evals autocast on CUDA only: its bf16 weights would meet fp32 adapters
    compile_ = ref.torch.compile  # the identity on the CPU, as the module sees it
    torch._dynamo.reset()
    logits = compile_(model.forward_logits, dynamic=False, fullgraph=True)
    seconds, (loss, bpb) = timed(device, lambda: eval_val(h, device, val_data, model, logits))
    result.update_and_save(standard=dict(seconds=seconds, bpb=bpb, loss=loss, tokens=val_data.val_tokens.numel() - 1))
    torch._dynamo.reset()
    forward_ttt = compile_(model.forward_ttt, dynamic=True)  # as its train_and_eval compiles it
    seconds, (loss, bpb) = timed(device, lambda: ref.eval_val_ttt_phased(h, model, device, val_data, forward_ttt))
    result.update_and_save(lora=dict(seconds=seconds, bpb=bpb, loss=loss, tokens=val_data.val_tokens.numel() - 1))


# ----------------------------------------------------------------------------- pgbuild's side

RECURRENCE_ON = re.compile(r"step (\d+): depth recurrence on")


def run_pgbuild(args, preset, device, result):
    import sentencepiece as spm

    from builder.train.trainer import setup_context, train

    ctx = setup_context(require_cuda=preset.train.require_cuda)
    layout = find_data(args.race_data, preset.model.vocab_size)
    lines = []
    trained = train(preset, layout, ctx, report=collector("pgbuild", lines))
    looping = next((int(m.group(1)) for m in map(RECURRENCE_ON.match, lines) if m), None)
    model = trained.model
    result.update_and_save(steps=trained.steps, train_seconds=trained.seconds, looping_from_step=looping,
                           params=sum(p.numel() for p in model.parameters()), peak_memory=peak_memory(device),
                           tokens_per_step=preset.train.batch_tokens)
    tokens = trim_stream(load_tokens(layout, "val"), preset.eval.seq_len)
    tables = byte_counts(layout, spm.SentencePieceProcessor(model_file=layout.tokenizer), preset.model.vocab_size,
                         tokens, layout.has_byte_sidecar())
    model.eval()
    for mode in RECORDS[args.record].modes:
        torch._dynamo.reset()
        seconds, out = timed(device, lambda: evaluate(model, tokens, tables, preset.eval, mode, device))
        result.update_and_save(**{mode: dict(seconds=seconds, bpb=out.val_bpb, loss=out.val_loss, tokens=out.tokens)})


def run_side(args):
    device = current_device()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    preset = race_preset(args, cuda)
    raise_recompile_limit()  # on both sides: no silent fallback to eager past dynamo's default
    result = SideResult(args.result, side=args.side, device=device_name(device))
    (RECORDS[args.record].run if args.side == "reference" else run_pgbuild)(args, preset, device, result)


# ----------------------------------------------------------------------------- the records

@dataclass(frozen=True)
class Record:
    """A record the race runs against: how a preset becomes its script's environment, how its
    side runs, and what both sides evaluate."""

    modes: tuple
    """pgbuild's eval modes raced, each against the script's own evaluation of the same kind."""
    gpu_preset: str
    """The preset raced on a GPU by default."""
    cpu_switches: tuple
    """Overrides that give the CPU race's preset (tiny) the record's architecture."""
    eval_tokens: tuple
    """(GPU, CPU) default validation prefix."""
    env: callable
    """(preset, data folder, warm-up steps) -> its script's environment variables; raises on a
    preset its script cannot mirror."""
    run: callable
    """(args, preset, device, result) -> runs the reference's side in this process."""
    caseops: bool = False
    """Its script scores CaseOps data (bits per original byte, from the byte sidecar)."""
    whole_batches: bool = False
    """Its standard evaluation drops a last partial batch: the prefix must be whole batches."""


RECORDS = {
    "r0409": Record(modes=("sliding", "ttt"), gpu_preset="record", cpu_switches=(), eval_tokens=(131072, 2048),
                    env=r0409_env, run=run_r0409),
    "r0427": Record(modes=("standard", "lora"), gpu_preset="r0427",
                    cpu_switches=("model.doc_mask=true", "model.parallel_lanes=2", "model.smear_gate=true",
                                  "model.attn_gate=sparse", "train.newton_schulz_coefficients=polar_express"),
                    eval_tokens=(131072, 4096), env=r0427_env, run=run_r0427, caseops=True, whole_batches=True),
}


# ----------------------------------------------------------------------------- the race and its table

def mean_flops_per_token(side, preset):
    """Training FLOPs per token averaged over the run: plain steps before recurrence, looped after."""
    m, seq_len, steps = preset.model, preset.train.seq_len, side["steps"]
    plain = steps if side.get("looping_from_step") is None else min(side["looping_from_step"], steps)
    return (plain * train_flops_per_token(m, seq_len, False)
            + (steps - plain) * train_flops_per_token(m, seq_len, True)) / max(steps, 1)


def derived(side, preset, peak, modes):
    """tokens/s, ms/step, MFU and eval total from a side's raw figures (None where missing)."""
    out = dict(side)
    if side.get("steps"):
        rate = side["steps"] * side["tokens_per_step"] / side["train_seconds"]
        flops = mean_flops_per_token(side, preset)
        out.update(tokens_per_second=rate, ms_per_step=1000 * side["train_seconds"] / side["steps"],
                   flops_per_token=flops, tflops=flops * rate / 1e12, mfu=flops * rate / 1e12 / peak if peak else None)
    if all(mode in side for mode in modes):
        out["eval_seconds"] = sum(side[mode]["seconds"] for mode in modes)
    return out


def mode_labels(record, e):
    """{mode: (short name, what the bpb row says of it)} for the record's two raced modes."""
    return {"r0409": {"sliding": ("sliding", f"sliding (stride {e.stride})"),
                      "ttt": ("TTT", f"score-first TTT ({e.ttt_chunk_tokens}-token chunks, {e.ttt_epochs} epochs)")},
            "r0427": {"standard": ("standard", "standard (document-masked)"),
                      "lora": ("LoRA TTT", f"phased LoRA TTT (rank {e.lora_rank}, {e.lora_phases} phases; "
                                           "the record's document order, pgbuild's stream order)")}}[record]


def row_spec(record, preset, wallclock):
    """(label, key path, format, goal key) of each table row."""
    labels, modes = mode_labels(record, preset.eval), RECORDS[record].modes
    return [
        (f"training steps in {wallclock:g} s", ("steps",), "{:,}".format, None),
        ("train tokens/s", ("tokens_per_second",), lambda x: f"{x / 1e6:.3f} M" if x >= 1e6 else f"{x / 1e3:.1f} k",
         "tokens_per_second"),
        ("ms/step", ("ms_per_step",), "{:.1f}".format, None),
        ("step recurrence began at", ("looping_from_step",), str, None),
        ("MFU (mean over the run)", ("mfu",), lambda x: f"{100 * x:.1f}%" if x is not None else "n/a", None),
        ("peak memory (training)", ("peak_memory",), lambda b: f"{b / 2**30:.2f} GiB", None),
        ("parameters", ("params",), "{:,}".format, None),
    ] + [(f"bpb, {labels[m][1]}", (m, "bpb"), "{:.5f}".format, "bpb") for m in modes] + [
        (f"eval seconds, {labels[m][0]}", (m, "seconds"), "{:.2f}".format, "eval_seconds") for m in modes
    ] + [(f"eval seconds, {' + '.join(labels[m][0] for m in modes)}", ("eval_seconds",), "{:.2f}".format,
          "eval_seconds")]


def lookup(side, keys):
    for key in keys:
        if not isinstance(side, dict) or side.get(key) is None:
            return None
        side = side[key]
    return side


def verdict(ratio, goal):
    if ratio is None or goal is None:
        return ""
    op, target = GOALS[goal]
    met = ratio >= target if op == ">=" else ratio <= target
    return f"{op} {target}: " + ("met" if met else "NOT met")


def build_table(record, sides, preset, wallclock, failures):
    """Markdown rows and their raw values: reference, pgbuild, pgbuild / reference, goal."""
    lines = [f"| measurement | {record} (reference script) | pgbuild | pgbuild / reference | goal |",
             "|---|---|---|---|---|"]
    rows = []
    for label, keys, fmt, goal in row_spec(record, preset, wallclock):
        values = [lookup(sides.get(s), keys) for s in SIDES]
        texts = [fmt(v) if v is not None else ("failed" if s in failures else "n/a") for s, v in zip(SIDES, values)]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ratio = values[1] / values[0] if numeric and values[0] and keys != ("looping_from_step",) else None
        lines.append(f"| {label} | {texts[0]} | {texts[1]} | {f'{ratio:.3f}' if ratio is not None else ''} | "
                     f"{verdict(ratio, goal)} |")
        rows.append(dict(measurement=label, reference=values[0], pgbuild=values[1], ratio=ratio,
                         goal=verdict(ratio, goal) or None))
    return "\n".join(lines), rows


def side_command(args, side, race_data, result):
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--race-data", race_data, "--result", result,
           "--data", args.data, "--record", args.record, "--preset", args.preset, "--wallclock", str(args.wallclock),
           "--warmup-steps", str(args.warmup_steps)]
    if args.reference:
        cmd += ["--reference", args.reference]
    for assignment in args.overrides:
        cmd += ["--set", assignment]
    return cmd


def run_race(args, preset, work, sides, failures, started):
    """Each side in its own process (its own compile caches, memory peak and CUDA context), the
    reference first; a side that fails or runs out of time is reported as such."""
    for i, side in enumerate(SIDES):
        result = os.path.join(work, f"{side}.json")
        budget = (args.time_limit - (time.perf_counter() - started)) / (len(SIDES) - i)
        print(f"[race] {side}: starting ({budget:.0f} s allowed)", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(side_command(args, side, os.path.join(work, "data"), result), timeout=budget,
                                  stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
            sys.stderr.write(proc.stderr)  # its log lines, and a traceback if it failed
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
                failures[side] = f"exit {proc.returncode}: {tail}"
        except subprocess.TimeoutExpired as e:
            sys.stderr.write(e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or "")
            failures[side] = f"stopped after {budget:.0f} s (--time-limit)"
        finally:
            if os.path.exists(result):
                with open(result) as f:
                    sides[side] = derived(json.load(f), preset, peak_tflops(device_name(current_device())),
                                          RECORDS[args.record].modes)
        print(f"[race] {side}: " + failures.get(side, "done"), file=sys.stderr, flush=True)


def current_device():
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def race(args):
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    preset = race_preset(args, cuda)
    record = RECORDS[args.record]
    record.env(preset, "", args.warmup_steps)  # fails now, not in the child, on a preset it cannot mirror
    script = args.reference or reference_path(args.record)
    if not os.path.exists(script):
        raise PgError(f"{script}: the reference script is absent "
                      f"(pass --reference PATH to a copy of {args.record}_train_gpt.py)")
    e = preset.eval
    if record.whole_batches and args.eval_tokens // e.seq_len % e.batch_seqs:
        raise PgError(f"--eval-tokens {args.eval_tokens}: the r0427 script's eval_val scores whole batches only; "
                      f"pass a multiple of eval.batch_seqs x eval.seq_len = {e.batch_seqs * e.seq_len}")
    name = device_name(current_device())
    facts = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 torch=torch.__version__, cuda=torch.version.cuda, device=name, peak_bf16_tflops=peak_tflops(name),
                 record=args.record, preset=args.preset, overrides=args.overrides, wallclock_seconds=args.wallclock,
                 warmup_steps=args.warmup_steps, command="python bench/race.py " + " ".join(sys.argv[1:]))
    sides, failures = {}, {}
    with tempfile.TemporaryDirectory(prefix="race-") as work:
        facts["eval_tokens"] = make_race_data(args.data, preset.model.vocab_size, args.eval_tokens,
                                              preset.eval.seq_len, os.path.join(work, "data"), record.caseops)
        try:
            run_race(args, preset, work, sides, failures, started)
        except (Interrupted, KeyboardInterrupt) as e:
            failures.setdefault("interrupted", str(e) or "Ctrl-C")
    table, rows = build_table(args.record, sides, preset, args.wallclock, failures)
    facts["failures"] = failures
    header = (f"{facts['date']}, torch {facts['torch']}, {name}; preset {args.preset}, wallclock cap "
              f"{args.wallclock:g} s each, {facts['eval_tokens']:,} validation tokens")
    print(header + "\n\n" + table + "".join(f"\n\n{k}: {v}" for k, v in failures.items()), flush=True)
    if args.json:
        write_json(args.json, dict(facts=facts, rows=rows, sides=sides))
    return 1 if failures else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (pgbuild or challenge layout)")
    p.add_argument("--record", choices=RECORDS, default="r0409", help="whose script to race (default: r0409)")
    p.add_argument("--preset", help="pgbuild preset to race (default: the record's on GPU, tiny on CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a preset field; the reference gets the same value where it has one")
    p.add_argument("--wallclock", type=float, help="training seconds for each side (default: 45 on GPU, 4 on CPU)")
    p.add_argument("--eval-tokens", type=int,
                   help="validation prefix scored by both (default: 131072 GPU; CPU 2048 for r0409, 4096 for r0427)")
    p.add_argument("--warmup-steps", type=int, help="untimed compile steps per graph (default: 3 on GPU, 0 on CPU)")
    p.add_argument("--reference", help="path of the record's script (default: ../shared/reference/)")
    p.add_argument("--time-limit", type=float, help="seconds for both sides together (default: 540 GPU, 300 CPU)")
    p.add_argument("--json", help="also write the table, both sides' raw figures and the run's facts here")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # the child processes
    p.add_argument("--race-data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    which = 0 if torch.cuda.is_available() else 1
    record = RECORDS[args.record]
    for name, values in {**DEFAULTS, "preset": (record.gpu_preset, "tiny"), "eval_tokens": record.eval_tokens}.items():
        if getattr(args, name) is None:
            setattr(args, name, values[which])
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    try:
        if args.side:
            run_side(args)
            return 0
        return race(args)
    except PgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
