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

It also checks the byte count the bpb is divided by against the builder's reference tables.

The pieces: bundled.py imports the artifact's runtime, recorder.py instruments its evaluation,
checks.py judges the traces; this module runs every mode and assembles the report (a dict).
"""

import time

import numpy as np
import torch

from builder.artifact.audit import open_verified
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
from builder.judge.recorder import traced_run
from runtime.baselines import baselines
from runtime.errors import PgError

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


def load_stream(data, manifest, tokenizer, max_tokens, seq_len):
    """The validation prefix and the builder's reference byte tables (the tokenizer checked
    against the artifact's recorded SHA-256), read by the builder's runtime, not the artifact's."""
    from runtime.api import load_validation
    from runtime.evaluate import byte_tables

    tokens, sp = load_validation(data, manifest, tokenizer, False, max_tokens, seq_len)
    return tokens, sp, byte_tables(sp, manifest["model"]["vocab_size"])


def verify_mode(rt, model, tokens, tables, cfg, mode, device, vocab, probes, atol, reference_bytes, progress,
                track=None):
    probe_ids = np.unique(np.linspace(0, vocab - 1, PROBE_TOKENS).round().astype(np.int64))
    reference = np.asarray(tokens[1:], np.int64)
    cut_list = cut_points(len(tokens) - 1, probes)
    advance = track(f"verify {mode}", (len(tokens) - 1) * (2 + len(cut_list))) if track else None
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
    return {"val_bpb": base.val_bpb, "seconds": round(time.perf_counter() - start, 1),
            "passed": all(c.passed for c in checks.values()),
            "checks": {k: c.to_dict() for k, c in checks.items()}}


def verify_artifact(path, data, tokens=None, modes=None, assignments=(), probes=3, device=None, atol=1e-6,
                    tokenizer=None, progress=lambda _: None, on_mode=lambda mode, result: None, track=None):
    """Run the artifact's own evaluation under instrumentation; returns the report (a dict)."""
    from runtime.evaluate import target_bytes

    _, art = open_verified(path)
    manifest = art.manifest
    rt = BundledRuntime(bundled_sources(art), path)
    try:
        modes = list(modes or rt.evaluate.MODES)
        unknown = [m for m in modes if m not in rt.evaluate.MODES]
        if unknown:
            raise PgError(f"the artifact's runtime has no mode(s) {', '.join(unknown)}; "
                          f"it has {', '.join(rt.evaluate.MODES)}")
        if probes < 1:
            raise PgError("--probes must be at least 1")
        eval_dict = parse_overrides(manifest["eval"], assignments)
        cfg = rt.call(rt.config.EvalConfig.from_dict, eval_dict)
        tokens = tokens or default_token_count(eval_dict, modes)
        stream, sp, reference_tables = load_stream(data, manifest, tokenizer, tokens, eval_dict["seq_len"])
        positions = len(stream) - 1
        if "ttt" in modes and positions <= eval_dict["ttt_chunk_tokens"]:
            raise PgError(f"{positions} positions fit in one TTT chunk of {eval_dict['ttt_chunk_tokens']}, so no "
                          f"update would be checked; raise --tokens or lower it with --set eval.ttt_chunk_tokens=N")
        if positions < 4:
            raise PgError(f"only {positions} positions to score; raise --tokens")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vocab = manifest["model"]["vocab_size"]
        model = rt.call(rt.api.load_model, manifest, art.read, device)
        tables = rt.call(rt.evaluate.byte_tables, sp, vocab)
        reference_bytes = int(target_bytes(np.asarray(stream), reference_tables).sum())
        floor = baselines(stream, reference_tables, vocab)
        results = {}
        for mode in modes:  # each verdict is told as soon as it is known: a killed run keeps the earlier ones
            results[mode] = dict(verify_mode(rt, model, stream, tables, cfg, mode, device, vocab, probes, atol,
                                             reference_bytes, progress, track), **floor)
            on_mode(mode, results[mode])
    finally:
        rt.close()
        art.zip.close()
    return {"artifact": str(path), "runtime_sha256": manifest["members"]["runtime.xz"],
            "executes_artifact_code": True, "device": str(device), "tokens": int(len(stream)), "positions": positions,
            "eval": eval_dict, "overrides": list(assignments), "probes": probes, "atol": atol,
            "modes": results, "passed": all(r["passed"] for r in results.values())}
