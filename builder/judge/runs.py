"""Runs and their comparison for `pgbuild runs compare`: seeds and significance.

A RUN is either a run folder (written by `pgbuild train-and-pack --run-dir DIR`, see
builder/rundir.py: a flat `summary.json` with `<mode>_bpb`, `bytes`, `path`, `seed`, ... and
`train_log.jsonl`) or an artifact.py, whose manifest carries the same build-time figures under
`metrics` and the seed under `provenance`. Older or hand-written summaries may nest the figures
under `metrics` and the seed under `provenance`; both shapes are read.

The challenge's rule for a new record: beat the current best by at least 0.005 nats at p < 0.01.
Scores are in bits per byte, so the rule is applied per byte: a bpb difference d is d * ln 2 nats
per byte, and 0.005 nats is 0.005 / ln 2 = 0.00721 bpb. (Per token it would depend on the
tokenizer's bytes per token; records state their deltas per byte.) The test is Welch's one-sided
t-test on the per-seed values: H0 mean(A) - mean(B) <= margin, against H1 mean(A) - mean(B) >
margin, with A the baseline runs and B the candidate's.
"""

import glob
import json
import math
import os
from dataclasses import dataclass

from builder.judge.stats import mean_std, welch_one_sided
from builder.rundir import LOG, SUMMARY
from runtime.artifact import Artifact
from runtime.config import MODES
from runtime.errors import PgError

MIN_NATS = 0.005
ALPHA = 0.01


# ----------------------------------------------------------------------------- reading runs

@dataclass(frozen=True)
class Run:
    """One training run's figures, from a run folder or an artifact."""

    source: str
    seed: object
    """The training seed (None when the source does not say)."""
    figures: dict
    """Build-time bpb figures by name (prequant_bpb, standard_bpb, sliding_bpb, ttt_bpb, ...)."""
    bytes: int
    """Artifact size: os.path.getsize of the artifact when it can be found, else as recorded."""
    artifact: str
    """Path of the run's artifact file, or None if it cannot be found."""
    summary: dict
    logs: tuple
    """Training logs in the run folder."""
    eval_seconds: dict
    """Build-time evaluation seconds by mode, measured on `eval_tokens` positions."""
    eval_tokens: int
    """Positions the build-time evaluation scored (None when the source does not say)."""

    def value(self, metric):
        if metric not in self.figures:
            have = ", ".join(sorted(self.figures)) or "none"
            raise PgError(f"{self.source}: no {metric} (it has: {have}); pick another --metric")
        return self.figures[metric]

    @property
    def label(self):
        return str(self.seed) if self.seed is not None else os.path.basename(os.path.normpath(self.source))


def _figures(table):
    return {k: float(v) for k, v in table.items()
            if k.endswith("_bpb") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _timings(table):
    """(seconds by mode, positions scored) of a run's build-time evaluation."""
    seconds = {m: float(table[f"{m}_seconds"]) for m in MODES if isinstance(table.get(f"{m}_seconds"), (int, float))}
    tokens = table.get("eval_tokens")
    return seconds, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def _read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise PgError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise PgError(f"{path}: expected one JSON object")
    return value


def _find_artifact(recorded, folder):
    """The run's artifact: its recorded path (absolute, or relative to the folder or the working
    directory), else artifact.py in the folder."""
    candidates = []
    if isinstance(recorded, str) and recorded:
        candidates += [recorded] if os.path.isabs(recorded) else [os.path.join(folder, recorded), recorded]
    candidates.append(os.path.join(folder, "artifact.py"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def run_from_folder(folder):
    path = os.path.join(folder, SUMMARY)
    if not os.path.isfile(path):
        raise PgError(f"{folder}: no {SUMMARY}; run folders are written by `pgbuild train-and-pack --run-dir DIR`")
    summary = _read_json(path)
    figures, table = _figures(summary), summary
    if isinstance(summary.get("metrics"), dict):
        figures = {**_figures(summary["metrics"]), **figures}
        table = {**summary["metrics"], **summary}
    provenance = summary.get("provenance") if isinstance(summary.get("provenance"), dict) else {}
    seed = summary.get("seed", provenance.get("seed"))
    artifact = _find_artifact(summary.get("path"), folder)
    size = os.path.getsize(artifact) if artifact else summary.get("bytes")
    logs = sorted({*glob.glob(os.path.join(folder, LOG)), *glob.glob(os.path.join(folder, "*.log"))})
    return Run(folder, seed, figures, size, artifact, summary, tuple(logs), *_timings(table))


def run_from_artifact(path):
    art = Artifact(path).verify()
    art.zip.close()
    manifest = art.manifest
    provenance, metrics = manifest.get("provenance") or {}, manifest.get("metrics") or {}
    return Run(path, provenance.get("seed"), _figures(metrics), os.path.getsize(path), path, {}, (), *_timings(metrics))


def load_run(path):
    """A run folder (with summary.json) or an artifact.py."""
    if os.path.isdir(path):
        return run_from_folder(path)
    if os.path.isfile(path):
        return run_from_artifact(path)
    raise PgError(f"{path}: no such run folder or artifact")


# ----------------------------------------------------------------------------- comparing

def group_stats(runs, metric):
    values = [r.value(metric) for r in runs]
    mean, std = mean_std(values)
    return {"n": len(values), "mean": mean, "std": std,
            "runs": [{"source": r.source, "seed": r.seed, "value": v} for r, v in zip(runs, values)]}


def compare(baseline, candidate, metric="ttt_bpb", min_nats=MIN_NATS, alpha=ALPHA):
    """Does `candidate` (runs) beat `baseline` (runs) on `metric` by `min_nats` nats per byte at
    p < alpha? Lower bpb is better."""
    a, b = group_stats(baseline, metric), group_stats(candidate, metric)
    margin = min_nats / math.log(2)
    va, vb = [r["value"] for r in a["runs"]], [r["value"] for r in b["runs"]]
    t, df, p = welch_one_sided(va, vb, margin)
    _, _, p_any = welch_one_sided(va, vb, 0.0)
    delta = a["mean"] - b["mean"]
    return {"metric": metric, "baseline": a, "candidate": b, "delta_bpb": delta,
            "delta_nats_per_byte": delta * math.log(2), "min_nats": min_nats, "margin_bpb": margin, "alpha": alpha,
            "t": t, "df": df, "p": p, "p_any_improvement": p_any, "significant": p < alpha,
            "rule": (f"one-sided Welch t-test, H1: mean(A) - mean(B) > {min_nats} nats/byte = {margin:.5f} bpb "
                     f"(Δbpb × ln 2 = nats per byte), significant at p < {alpha}")}
