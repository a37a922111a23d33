"""The stages behind the commands: train, quantize + fit the budget + pack, measure.

Every rank forwards its share of the GPTQ calibration batches and quantizes its share of the
tensors (`encode_shares`); fitting the budget and packing run on rank 0; the build-time
evaluation of the packed artifact runs on every rank (the evaluator splits the windows), using
the artifact's own bytes and the runtime's own decoder, so the recorded figures are those of the
file that gets written. Every stage is timed, and the summary says where the wallclock limit
went (builder/timebudget.py).
"""

import contextlib
import copy
import io

import numpy as np
import torch.distributed as dist

from builder.artifact.budget import allocate, candidate_rows, fit_budget, measured_bytes
from builder.artifact.pack import StreamCompressor, build_artifact
from builder.quant.calibration import LossProbe, collect_hessians
from builder.quant.policy import Quantizer
from builder.timebudget import Stopwatch, describe, overtime, stop_rule, timing_summary
from runtime.api import byte_counts, load_model
from runtime.artifact import Artifact
from runtime.baselines import baselines
from runtime.config import MODES
from runtime.data import find_data, load_tokens
from runtime.distributed import Ranks
from runtime.errors import PgError
from runtime.evaluate import evaluate, trim_stream
from runtime.files import file_sha256, write_atomic

METRICS_RESERVE_BYTES = 1024
"""Room kept under the budget for the build-time figures, which are written into the manifest
after the weights are fixed."""


def prepare_data(data, preset):
    """The dataset at `data` (runtime/data.py), checked before training rather than after: its
    tokenizer matches the model's vocabulary and there are validation shards to score."""
    import sentencepiece as spm

    layout = find_data(data, preset.model.vocab_size)
    pieces = spm.SentencePieceProcessor(model_file=layout.tokenizer).get_piece_size()
    if pieces != preset.model.vocab_size:
        raise PgError(f"{layout.tokenizer}: tokenizer has {pieces} pieces but model.vocab_size is "
                      f"{preset.model.vocab_size}; pass --set model.vocab_size={pieces}")
    layout.shards("val")
    return layout


def parse_modes(text):
    """`--eval-modes standard,ttt` as a list of modes."""
    modes = [m for m in text.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise PgError(f"--eval-modes: unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    return modes


@contextlib.contextmanager
def no_progress():
    yield None


def encode_shares(quantizer, ctx):
    """Every rank quantizes its share of the tensors (`Quantizer.share`) and rank 0 gathers the
    results; returns, on rank 0, the allocator's rows for the 'rd' allocation (the candidates'
    encodings are too many to send: rank 0 encodes the ones it picks) or {} after absorbing the
    default plan's encodings. A rank's refusal is raised on rank 0."""
    rd = quantizer.qcfg.allocation == "rd"
    mine = quantizer.share(ctx.rank, ctx.world)
    try:
        if rd:
            result = ({name: candidate_rows(quantizer, name) for name in mine}, ({}, quantizer.computed(mine)[1]))
        else:
            plan = quantizer.default_plan()
            for name in mine:
                quantizer.encode(name, plan[name])
            result = ({}, quantizer.computed(mine))
    except PgError as e:
        result = str(e)
    results = [result]
    if ctx.world > 1:
        results = [None] * ctx.world if ctx.is_main else None
        dist.gather_object(result, results, dst=0)
    if not ctx.is_main:
        return None
    table = {}
    for result in results:
        if isinstance(result, str):
            raise PgError(result)
        rows, computed = result
        table.update(rows)
        quantizer.absorb(computed)
    return table


def val_stream(layout, preset, max_tokens):
    return trim_stream(load_tokens(layout, "val", max_tokens), preset.eval.seq_len)


def measure(model, blob, layout, preset, device, tokens, modes, track=None):
    """bpb of the unquantized model and of the packed artifact's weights on validation `tokens`,
    and the baselines on the same tokens (runtime/baselines.py). `track(label, total)` gives an
    on_score hook that shows progress (builder/progress.py)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=layout.tokenizer)
    tables = byte_counts(layout, sp, preset.model.vocab_size, tokens, layout.has_byte_sidecar())
    figures = {"eval_tokens": int(len(tokens) - 1)}
    figures.update({k: round(v, 5) for k, v in baselines(tokens, tables, preset.model.vocab_size).items()})
    world = Ranks().world
    hook = (lambda label: track(label, figures["eval_tokens"] // world)) if track else (lambda label: None)
    model.looping = True
    figures["prequant_bpb"] = round(evaluate(model, tokens, tables, preset.eval, "standard", device,
                                             on_score=hook("prequant standard")).val_bpb, 5)
    artifact = Artifact(io.BytesIO(blob))
    quantized = load_model(artifact.manifest, artifact.read, device)
    for mode in modes:
        # TTT trains the weights it scores with, so every mode starts from a fresh copy.
        result = evaluate(copy.deepcopy(quantized), tokens, tables, preset.eval, mode, device, on_score=hook(mode))
        figures[f"{mode}_bpb"] = round(result.val_bpb, 5)
        figures[f"{mode}_seconds"] = round(result.seconds, 2)
    return figures


def quantize_and_pack(model, preset, layout, out, ctx, prov, eval_tokens, eval_modes, report=print,
                      progress=no_progress, allow_overtime=False, *, code):
    """Hessians -> GPTQ -> budget fit -> artifact at `out` -> measured figures, written into its
    manifest; returns its figures and size. Every rank calls this; rank 0 quantizes and writes.
    `progress()` is a context yielding measure's `track` (builder/progress.py) or None; `code` is
    the code the artifact carries (builder/artifact/code.py).

    The clock (builder/timebudget.py) stops when the artifact is first written; the build-time
    evaluation runs after, off the clock, and the file is then rewritten with the figures in its
    manifest (same weights and code; METRICS_RESERVE_BYTES kept room for them)."""
    qcfg, tcfg = preset.quant, preset.train
    tokens = val_stream(layout, preset, eval_tokens)  # a bad --eval-tokens fails now, not after GPTQ
    info = {"model": preset.model.to_dict(), "eval": preset.eval.to_dict(), "train": tcfg.to_dict(),
            "tokenizer_sha256": file_sha256(layout.tokenizer), "byte_sidecar": layout.has_byte_sidecar(),
            "recipe": {"method": "gptq+sdclip", **qcfg.to_dict()}, "provenance": prov}
    blob = plan = refusal = None
    watch = Stopwatch(train=prov.get("train_seconds", 0.0))
    report("collecting Hessians from training batches")
    with watch("hessians"):  # every rank forwards its share of the calibration batches
        hessians = collect_hessians(model, layout, qcfg, tcfg.seq_len, ctx.device, tcfg.seed, ctx.rank, ctx.world)
    probe = None
    if qcfg.allocation == "rd" and qcfg.probe_tokens:
        probe = LossProbe(model, layout, tcfg.seq_len, qcfg.probe_tokens, ctx.device, tcfg.seed)
    quantizer = Quantizer(model.state_dict(), hessians, qcfg, probe)
    report(f"quantizing (GPTQ + SDClip), the tensors split across {ctx.world} rank(s)")
    with watch("gptq"):
        try:
            table, shared_refusal = encode_shares(quantizer, ctx), None
        except PgError as e:
            table, shared_refusal = None, str(e)
    if ctx.is_main:
        # A refusal on rank 0 (no fit, an unwritable --out, over time) travels with the blob, so
        # every rank raises it together instead of the others waiting in the broadcast.
        try:
            if shared_refusal:
                raise PgError(shared_refusal)
            compressor = StreamCompressor(qcfg.codecs, qcfg.reorder_groups, sample_bytes=qcfg.codec_sample_bytes)

            def pack(plan, metrics=None, stage="compress"):
                """The artifact for `plan`; the fit packs without figures, the final pack ("repack",
                off the clock) with the figures measured on the fitted weights, its streams from the
                compressor's cache."""
                encoded = quantizer.encode_all(plan)
                with watch(stage):
                    return build_artifact(encoded, {**info, "metrics": metrics or {}}, compressor, code)

            report("fitting the budget and packing")
            with watch("gptq", exclude="compress"):
                if qcfg.allocation == "rd":
                    plan, blob = allocate(quantizer, pack, qcfg.budget_bytes, METRICS_RESERVE_BYTES, report, table)
                else:
                    plan, blob = fit_budget(quantizer, pack, qcfg.budget_bytes, METRICS_RESERVE_BYTES, report)
            with watch("serialize"):
                write_atomic(out, blob, "artifact", mode=0o755)
            report(describe(watch.seconds, tcfg.max_wallclock_seconds, tcfg.time_rule, prov.get("steps"),
                            tcfg.iterations))
            if not allow_overtime:
                refusal = overtime(watch.seconds, tcfg.max_wallclock_seconds, tcfg.time_rule)
        except PgError as e:
            refusal = str(e)
    if ctx.world > 1:
        shared = [blob, refusal]
        dist.broadcast_object_list(shared, src=0)
        blob, refusal = shared
    if refusal:
        raise PgError(refusal)
    report("measuring bpb at build time (after the artifact is written: off the clock)")
    with watch("eval"), (progress() if ctx.is_main else no_progress()) as track:
        metrics = measure(model, blob, layout, preset, ctx.device, tokens, eval_modes, track)
    if not ctx.is_main:
        return None
    blob = pack(plan, metrics, stage="repack")
    if len(blob) > qcfg.budget_bytes:
        raise PgError(f"packed artifact is {len(blob):,} bytes, over the {qcfg.budget_bytes:,}-byte budget")
    write_atomic(out, blob, "artifact", mode=0o755)
    return {"path": str(out), "bytes": len(blob), "budget_bytes": qcfg.budget_bytes,
            "headroom": qcfg.budget_bytes - len(blob), "bits": {n: c.bits for n, c in plan.items()},
            "tensors": tensor_report(quantizer, plan), **metrics,
            **timing_summary(watch.seconds, tcfg.max_wallclock_seconds, tcfg.time_rule, prov.get("reserve_estimate")),
            "stopped_by": stop_rule(prov.get("steps"), tcfg.iterations),
            **{k: v for k, v in prov.items() if k != "train_seconds" and not isinstance(v, (list, dict))}}


def tensor_report(quantizer, plan):
    """Per quantized tensor: encoding, measured bytes, bits per parameter, Hessian-weighted error."""
    rows = []
    for e in quantizer.encode_all(plan):
        if e.name not in plan:
            continue
        choice = plan[e.name]
        label = f"int{choice.bits} k×{choice.k_mult:g}" + (f" {choice.transform}" if choice.transform else "") \
            + (" +lqer" if any(key.startswith("lqer") for key in e.extras) else "")
        size = measured_bytes(e)
        rows.append({"name": e.name, "encoding": label, "bytes": size,
                     "bits_per_param": size * 8 / int(np.prod(e.shape)), "error": e.error})
    return rows
