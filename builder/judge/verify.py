"""Run an artifact's own evaluation code and check that its scores are legal (`pgbuild verify`).

Unlike `pgbuild audit`, which reads an artifact as data and never runs it, verify EXECUTES the
artifact's code: the runtime sources bundled in its checksum-verified `runtime.xz` member (model,
weight decoding, evaluation) are what score a submission, so they are what must be checked. Run it
only on artifacts you would run yourself with `python artifact.py eval`. The sources are loaded
into a private module namespace, never the builder's `runtime` package, so a tampered or simply
different runtime is exactly what gets verified; the verifier's side (the token stream, the
perturbations, the instrumentation, the reference byte counts) is the builder's own code.

For every eval mode, on a validation prefix, it checks issue #1017's four conditions, each with
numbers as evidence:

- C1 causal: tokens after position t are replaced at random; the scores of tokens <= t and the
  predicted distribution for token t+1 must not move (several t; a baseline replay measures the
  run-to-run noise that the tolerance allows for).
- C2 normalized: every scored distribution spans the full vocabulary and the model's NLL equals
  logsumexp(z) - z[target] of its own logits z, i.e. -log of a distribution that sums to 1.
- C3 score before update: every training forward must be a range the evaluator reported through
  `on_train`, and every position in it must already have been scored.
- C4 single pass: every position is reported scored exactly once, every scoring forward row is
  accounted for by a report, and the returned score is the one that forward produced.

It also checks the byte count the bpb is divided by against the builder's reference tables, and
times one plain (uninstrumented) evaluation per mode: projected to the full validation stream, a
mode that would run past the challenge's ten minutes on this machine gets a warning.

The pieces: bundled.py imports the artifact's runtime, recorder.py instruments its evaluation,
checks.py judges the traces; this module runs every mode and assembles the report (a dict).
"""

import copy
import time

import numpy as np
import torch

from builder.artifact.audit_layout import open_verified
from builder.judge.bundled import BundledRuntime, bundled_sources
from builder.judge.checks import (
    check_bytes,
    check_causal,
    check_normalized,
    check_score_first,
    check_single_pass,
    perturbed_stream,
    replay_noise,
)
from builder.judge.evaltime import overtime_warning, projected_seconds, validation_positions
from builder.judge.recorder import traced_run
from runtime.baselines import baselines
from runtime.errors import PgError
from runtime.progress import Pace

PROBE_TOKENS = 16
"""Vocabulary ids whose log-probabilities fingerprint each scored distribution (evenly spaced)."""


def cut_points(num_positions, count):
    """Positions t to perturb after: spread over the stream (odd multiples of P/2k), nudged by odd
    amounts so they fall inside windows and chunks rather than on their boundaries."""
    spots = (num_positions * (2 * i + 1) // (2 * count) + 1 + 38 * i for i in range(count))
    return sorted({min(num_positions - 2, max(1, t)) for t in spots})


def parse_overrides(eval_dict, assignments):
    """`eval.FIELD=VALUE` strings applied to the manifest's eval settings (typed like the current value)."""
    from builder.config import parse_value

    values = dict(eval_dict)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section != "eval" or name not in values:
            raise PgError(f"--set {assignment!r}: expected eval.FIELD=VALUE with FIELD one of {', '.join(values)}")
        try:
            values[name] = parse_value(text.strip(), values[name])
        except ValueError:
            raise PgError(f"--set {assignment!r}: {text!r} is not a valid {type(values[name]).__name__}") from None
    return values


def default_token_count(cfg, modes):
    """Enough positions for C3 to bite: three TTT chunks (so two updates), at least four sequences."""
    need = 4 * cfg["seq_len"]
    if "ttt" in modes:
        need = max(need, 3 * cfg["ttt_chunk_tokens"])
    return need + 1


def fitting_chunk(positions, seq_len):
    """The TTT chunk for a prefix too short for the artifact's: the largest whole number of seq_len
    sequences that makes at least three chunks (two updates to check), else two; shorter than a
    sequence only when the prefix holds a single one."""
    for chunks in (3, 2):
        if positions // chunks >= seq_len:
            return positions // chunks // seq_len * seq_len
    return -(-positions // 2)


def ttt_chunk(eval_dict, assignments, positions, tokens, note):
    """The artifact's TTT chunk, or one that fits `positions` when the artifact's leaves a single
    chunk (no update to check). A chunk given with --set is the user's and is kept, or refused."""
    chunk = eval_dict["ttt_chunk_tokens"]
    if positions > chunk:
        return chunk
    if any(a.partition("=")[0].strip() == "eval.ttt_chunk_tokens" for a in assignments):
        raise PgError(f"{positions} positions fit in one TTT chunk of {chunk}, so no update would be checked; "
                      f"raise --tokens or lower --set eval.ttt_chunk_tokens")
    fitted = fitting_chunk(positions, eval_dict["seq_len"])
    note(f"ttt: the {positions:,} positions of --tokens {tokens} fit in one chunk of ttt_chunk_tokens {chunk:,}; "
         f"verifying with chunks of {fitted:,} ({-(-positions // fitted)} chunks)")
    return fitted


def load_stream(data, manifest, tokenizer, max_tokens, seq_len):
    """The validation prefix, its tokenizer and the builder's reference byte counts (the
    tokenizer checked against the artifact's recorded SHA-256), read by the builder's runtime,
    not the artifact's."""
    from runtime.api import load_validation

    return load_validation(data, manifest, tokenizer, max_tokens, seq_len)


def timed_run(rt, model, tokens, tables, cfg, mode, device, advance=None):
    """(seconds, (seconds, positions) of the first batch) of one plain evaluation by the artifact's
    code as `python artifact.py eval` runs it: no instrumentation, a fresh copy of the model."""
    pace = Pace(len(tokens) - 1, sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
    on_score = pace if advance is None else lambda a, b: (pace(a, b), advance(a, b))
    rt.call(rt.evaluate.evaluate, copy.deepcopy(model), tokens, tables, cfg, mode, device, on_score=on_score)
    return time.perf_counter() - pace.start, pace.first_batch


def verify_mode(rt, model, tokens, tables, cfg, mode, device, vocab, probes, atol, reference_bytes, progress,
                track=None, full_positions=None):
    probe_ids = np.unique(np.linspace(0, vocab - 1, PROBE_TOKENS).round().astype(np.int64))
    reference = np.asarray(tokens[1:], np.int64)
    cut_list = cut_points(len(tokens) - 1, probes)
    advance = track(f"verify {mode}", (len(tokens) - 1) * (3 + len(cut_list))) if track else None
    run = lambda stream: traced_run(rt, model, stream, tables, cfg, mode, device, probe_ids, reference,  # noqa: E731
                                    advance)
    start = time.perf_counter()
    progress(f"{mode}: baseline and replay")
    base, replay = run(tokens), run(tokens)
    cuts = []
    for i, t in enumerate(cut_list):
        progress(f"{mode}: perturbing the tokens after position {t}")
        cuts.append((t, run(perturbed_stream(tokens, t, vocab, seed=i))))
    checks = {"causal": check_causal(base, cuts, replay_noise(base, replay), atol),
              "normalized": check_normalized(base, vocab),
              "score_first": check_score_first(base, mode),
              "single_pass": check_single_pass(base, atol),
              "bytes": check_bytes(base, reference_bytes)}
    seconds = round(time.perf_counter() - start, 1)
    progress(f"{mode}: timing one plain evaluation")
    eval_seconds, first = timed_run(rt, model, tokens, tables, cfg, mode, device, advance)
    positions = len(tokens) - 1
    return {"val_bpb": base.val_bpb, "seconds": seconds, "passed": all(c.passed for c in checks.values()),
            "checks": {k: c.to_dict() for k, c in checks.items()},
            "eval_seconds": round(eval_seconds, 3), "first_batch_seconds": round(first[0], 3),
            "projected_eval_seconds": round(projected_seconds(eval_seconds, positions, full_positions, first), 1),
            "time_warning": overtime_warning(mode, eval_seconds, positions, full_positions, first)}


def verify_artifact(path, data, tokens=None, modes=None, assignments=(), probes=3, device=None, atol=1e-6,
                    tokenizer=None, progress=lambda _: None, on_mode=lambda mode, result: None, track=None,
                    note=lambda _: None):
    """Run the artifact's own evaluation under instrumentation; returns the report (a dict).
    `note(line)` hears what the user should know even with --json: a TTT chunk fitted to a short
    prefix, an evaluation that would run out of time."""
    from runtime.evaluate import target_bytes

    _, art = open_verified(path)
    manifest = art.manifest
    rt = BundledRuntime(bundled_sources(art), path, art.manifest.get("pgbuild"))
    try:
        modes = list(modes or rt.evaluate.MODES)
        unknown = [m for m in modes if m not in rt.evaluate.MODES]
        if unknown:
            raise PgError(f"the artifact's runtime has no mode(s) {', '.join(unknown)}; "
                          f"it has {', '.join(rt.evaluate.MODES)}")
        if probes < 1:
            raise PgError("--probes must be at least 1")
        notes = []

        def tell(line):
            notes.append(line)
            note(line)

        eval_dict = parse_overrides(manifest["eval"], assignments)
        tokens = tokens or default_token_count(eval_dict, modes)
        stream, _, reference_tables = load_stream(data, manifest, tokenizer, tokens, eval_dict["seq_len"])
        positions = len(stream) - 1
        if positions < 4:
            raise PgError(f"only {positions} positions to score; raise --tokens")
        if "ttt" in modes:
            eval_dict["ttt_chunk_tokens"] = ttt_chunk(eval_dict, assignments, positions, tokens, tell)
        if eval_dict.get("compile"):
            # The instrumentation wraps the model's forward in Python, which torch.compile would
            # trace (and the lora mode's dynamic shapes cannot); compiling changes kernels, not what
            # is scored or trained on.
            eval_dict["compile"] = False
            tell("eval.compile: verified eagerly (an instrumented forward cannot be compiled)")
        cfg = rt.call(rt.config.EvalConfig.from_dict, eval_dict)
        full_positions = validation_positions(data, manifest["model"]["vocab_size"], eval_dict["seq_len"], tokenizer)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vocab = manifest["model"]["vocab_size"]
        model = rt.call(rt.api.load_model, manifest, art.read, device)
        _, _, tables = rt.call(rt.api.load_validation, data, manifest, tokenizer, tokens, eval_dict["seq_len"])
        reference_bytes = int(target_bytes(np.asarray(stream), reference_tables).sum())
        floor = baselines(stream, reference_tables, vocab)
        results = {}
        for mode in modes:  # each verdict is told as soon as it is known: a killed run keeps the earlier ones
            results[mode] = dict(verify_mode(rt, model, stream, tables, cfg, mode, device, vocab, probes, atol,
                                             reference_bytes, progress, track, full_positions), **floor)
            on_mode(mode, results[mode])
            if results[mode]["time_warning"]:
                tell(results[mode]["time_warning"])
    finally:
        rt.close()
        art.zip.close()
    return {"artifact": str(path), "runtime_sha256": manifest["members"]["runtime.xz"],
            "executes_artifact_code": True, "device": str(device), "tokens": int(len(stream)), "positions": positions,
            "validation_positions": full_positions, "eval": eval_dict, "overrides": list(assignments),
            "ttt_chunk_tokens": eval_dict["ttt_chunk_tokens"], "probes": probes, "atol": atol, "notes": notes,
            "modes": results, "passed": all(r["passed"] for r in results.values())}
