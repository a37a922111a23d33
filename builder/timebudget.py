"""The wallclock limit: how long training may run, and where a build's time went.

`train.max_wallclock_seconds` (the challenge's 600 s) bounds every second until the artifact
exists. Which stages count is `train.time_rule`:
- `strict` (default; the organizers' re-runs): training, Hessian collection, GPTQ with the budget
  fit, compression and writing the file: the `artifact_production_wallclock`.
- `data_access` (the reading the 2026-04-29 record used): the stages that read training data,
  training and Hessian collection.
Training stops at limit - reserve. The reserve is `train.reserve_seconds`, or with
`train.auto_reserve` the larger of that and a measured estimate of the counted post-training
stages (one calibration batch timed and scaled to all of them; GPTQ and compression timed on one
matrix of each shape and scaled to all matrices and, for the rate-distortion allocator, to all
candidate encodings). The estimate is taken off the clock, and only once the clock rather than
the step cap may end training (from the second step on, when the run projects past half its
budget), so step-capped runs never pay for it.

Outside the limit, as in the records: compilation warmup (before the clock), the estimate itself,
and the build-time evaluation, which runs after the artifact is written (evaluation has its own
budget). A build over the limit under its rule is an error unless `--allow-overtime`.
"""

import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from runtime.distributed import Ranks

TIME_RULES = {
    "strict": ("train", "hessians", "gptq", "compress", "serialize"),
    "data_access": ("train", "hessians"),
}
"""The stages each `train.time_rule` counts against max_wallclock_seconds, in pipeline order."""
PRODUCTION = TIME_RULES["strict"]
"""Every stage until the artifact exists: artifact_production_wallclock, whatever the rule."""


class Stopwatch:
    """Seconds per named stage, accumulated over every `with watch(stage):` block."""

    def __init__(self, **seconds):
        self.seconds = dict(seconds)

    @contextmanager
    def __call__(self, stage, exclude=None):
        """Time the block as `stage`, less what the block itself timed as `exclude`."""
        start, inner = time.perf_counter(), self.seconds.get(exclude, 0.0)
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            spent = time.perf_counter() - start - (self.seconds.get(exclude, 0.0) - inner)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent


def counted(seconds, rule):
    """Seconds that count against the limit under `rule`."""
    return sum(seconds.get(stage, 0.0) for stage in TIME_RULES[rule])


def timing_summary(seconds, limit, rule, estimate=None):
    """Flat figures for the summary: `<stage>_seconds` for each stage, `<stage>_estimate_seconds`
    beside each estimated one, `artifact_production_wallclock`, `counted_seconds` (the stages
    `rule` counts), `wallclock_limit_seconds`, `time_rule` and `within_wallclock`."""
    out = {f"{stage}_seconds": round(s, 2) for stage, s in seconds.items()}
    out.update({f"{stage}_estimate_seconds": round(s, 2) for stage, s in (estimate or {}).items()})
    used = counted(seconds, rule)
    out.update(artifact_production_wallclock=round(counted(seconds, "strict"), 2), counted_seconds=round(used, 2),
               wallclock_limit_seconds=limit, time_rule=rule, within_wallclock=used <= limit)
    return out


def overtime(seconds, limit, rule):
    """The refusal for a build over the limit under `rule`, or None when it fits."""
    used = counted(seconds, rule)
    if used <= limit:
        return None
    return (f"the stages train.time_rule={rule} counts took {used:.1f} s, over the {limit:g} s limit by "
            f"{used - limit:.1f} s; the artifact is written (without build-time figures) but breaks the time "
            f"rule: pass --allow-overtime to accept it, or raise train.reserve_seconds")


def stop_rule(steps, iterations):
    """Which rule ended training: the step cap (train.iterations) or the wallclock limit (None:
    not known, e.g. for imported weights)."""
    if steps is None or iterations is None:
        return None
    return "step cap" if steps >= iterations else "wallclock"


def describe(seconds, limit, rule="strict", steps=None, iterations=None):
    """Which rule ended training (given `steps` and `iterations`), where the limited time went
    under the time rule `rule`, and whether it fit."""
    parts = " + ".join(f"{stage} {seconds[stage]:.1f} s" for stage in TIME_RULES[rule] if stage in seconds)
    used = counted(seconds, rule)
    verdict = "within" if used <= limit else f"OVER by {used - limit:.1f} s:"
    line = f"time ({rule}): {parts} = {used:.1f} s, {verdict} the {limit:g} s limit"
    outside = [f"{stage} {seconds[stage]:.1f} s" for stage in PRODUCTION if stage in seconds
               and stage not in TIME_RULES[rule]]
    if outside:
        line += f" ({', '.join(outside)} outside it)"
    rule_hit = stop_rule(steps, iterations)
    if rule_hit is not None:
        where = (f"the step cap, train.iterations={iterations}" if rule_hit == "step cap" else
                 f"the wallclock limit after {steps} of train.iterations={iterations} steps")
        line = f"training ended at {where}; " + line
    return line


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def estimate_post_training(model, layout, preset, device):
    """{'hessians', 'gptq', 'compress'}: estimated seconds of each stage for this model, measured
    on rank 0 while training pauses (its optimizer state stays resident). Writing the file is not
    estimated: it takes milliseconds."""
    from builder.artifact.budget import measured_bytes
    from builder.artifact.pack import StreamCompressor
    from builder.quant.calibration import collect_hessians
    from builder.quant.policy import Quantizer

    qcfg, tcfg = preset.quant, preset.train
    # Under DDP every rank forwards 1/world of each calibration batch: time rank 0's share.
    world = Ranks().world
    one_batch = replace(qcfg, calibration_batches=1, calibration_batch_tokens=qcfg.calibration_batch_tokens // world)
    looping, training = model.looping, model.training
    model.looping = True  # the exported model always loops
    try:
        with torch.no_grad():
            collect = lambda: collect_hessians(model, layout, one_batch, tcfg.seq_len, device, tcfg.seed)  # noqa: E731
            collect()  # the first call pays for kernel selection and allocation
            hessians, batch_seconds = _timed(collect)
    finally:
        model.looping = looping
        model.train(training)
    quantizer = Quantizer(model.state_dict(), hessians, qcfg)
    compressor = StreamCompressor(qcfg.codecs, qcfg.reorder_groups, sample_bytes=qcfg.codec_sample_bytes)
    plan = quantizer.default_plan()
    by_shape = {}
    for name in plan:
        by_shape.setdefault(tuple(quantizer.state[name].shape), []).append(name)
    gptq = compress = picked = 0.0
    for names in by_shape.values():
        name = names[0]
        encoded, encode_seconds = _timed(lambda: quantizer.encode(name, plan[name]))
        _, compress_seconds = _timed(lambda: compressor(encoded.data.tobytes()))
        per_tensor = encode_seconds
        if qcfg.allocation == "rd":  # every candidate is encoded and its bytes measured
            _, measure_seconds = _timed(lambda: measured_bytes(encoded))
            per_tensor = (encode_seconds + measure_seconds) * len(quantizer.candidates(name))
            picked += encode_seconds * len(names)
        gptq += per_tensor * len(names)
        compress += compress_seconds * len(names)
    # The ranks split the tensors (pipeline.encode_shares); with 'rd' rank 0 then encodes the
    # candidates it picks, which were computed on other ranks.
    gptq = gptq / world + picked
    # Streams are compressed in parallel at pack time, so timing them one by one here errs on the
    # safe side. The code members are made before training starts (or copied, retraining).
    return {"hessians": batch_seconds * qcfg.calibration_batches, "gptq": gptq, "compress": compress}
