"""The wallclock limit: how long training may run, and where a build's time went.

`train.max_wallclock_seconds` (the challenge's 600 s) bounds training *and* the stages that turn
the trained weights into the artifact's bytes: Hessian collection, GPTQ with the budget fit, and
compression of the weight streams. Training stops at limit - reserve; the reserve is
`train.reserve_seconds`, or with `train.auto_reserve` the larger of that and an estimate measured
before the clock starts (one calibration batch timed and scaled to all of them; GPTQ and
compression timed on one matrix of each shape and scaled to all matrices and, for the
rate-distortion allocator, to all candidate encodings).

Outside the limit, as in the records: compilation warmup (before the clock), the estimate
itself, and the build-time evaluation (evaluation has its own budget). A build records every
stage in its summary (`*_seconds`, see `timing_summary`), so a fixed reserve can be set from a
previous run's figures.
"""

import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from runtime.distributed import Ranks

IN_LIMIT = ("train", "hessians", "gptq", "compress")
"""Stages that count against max_wallclock_seconds, in pipeline order."""


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


def timing_summary(seconds, limit):
    """Flat figures for the summary: `<stage>_seconds` for each stage, `wallclock_seconds` (the
    stages inside the limit), `wallclock_limit_seconds` and `within_wallclock`."""
    out = {f"{stage}_seconds": round(s, 2) for stage, s in seconds.items()}
    used = sum(seconds.get(stage, 0.0) for stage in IN_LIMIT)
    out.update(wallclock_seconds=round(used, 2), wallclock_limit_seconds=limit, within_wallclock=used <= limit)
    return out


def stop_rule(steps, iterations):
    """Which rule ended training: the step cap (train.iterations) or the wallclock limit (None:
    not known, e.g. for imported weights)."""
    if steps is None or iterations is None:
        return None
    return "step cap" if steps >= iterations else "wallclock"


def describe(seconds, limit, steps=None, iterations=None):
    """Which rule ended training (given `steps` and `iterations`), where the limited time went,
    and whether it fit; over the limit is a warning (the artifact is still written), said so."""
    parts = " + ".join(f"{stage} {seconds[stage]:.1f} s" for stage in IN_LIMIT if stage in seconds)
    used = sum(seconds.get(stage, 0.0) for stage in IN_LIMIT)
    verdict = "within" if used <= limit else f"OVER by {used - limit:.1f} s:"
    line = f"time: {parts} = {used:.1f} s, {verdict} the {limit:g} s limit"
    if "eval" in seconds:
        line += f" (build-time eval {seconds['eval']:.1f} s, outside it)"
    if used > limit:
        line += "; a warning, not a failure: the artifact is written, but this run breaks the time rule"
    rule = stop_rule(steps, iterations)
    if rule is not None:
        where = (f"the step cap, train.iterations={iterations}" if rule == "step cap" else
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
    """{'hessians', 'gptq', 'compress'}: estimated seconds of each stage for this model."""
    from builder.artifact.budget import measured_bytes
    from builder.artifact.pack import StreamCompressor, runtime_stream
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
    compressor = StreamCompressor(qcfg.codecs, qcfg.reorder_groups)
    plan = quantizer.default_plan()
    by_shape = {}
    for name in plan:
        by_shape.setdefault(tuple(quantizer.state[name].shape), []).append(name)
    gptq = compress = 0.0
    for names in by_shape.values():
        name = names[0]
        encoded, encode_seconds = _timed(lambda: quantizer.encode(name, plan[name]))
        _, compress_seconds = _timed(lambda: compressor(encoded.data.tobytes()))
        per_tensor = encode_seconds
        if qcfg.allocation == "rd":  # every candidate is encoded and its bytes measured
            _, measure_seconds = _timed(lambda: measured_bytes(encoded))
            per_tensor = (encode_seconds + measure_seconds) * len(quantizer.candidates(name))
        gptq += per_tensor * len(names)
        compress += compress_seconds * len(names)
    # Every pack also compresses the runtime sources; a build packs at least twice (fit, then
    # again with the measured figures in the manifest).
    compress += 2 * _timed(runtime_stream)[1]
    return {"hessians": batch_seconds * qcfg.calibration_batches, "gptq": gptq, "compress": compress}
