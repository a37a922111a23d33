"""The legality checks of `pgbuild verify` (issue #1017's C1-C4 and the byte count), each a
verdict with numbers as evidence, computed from the traces of builder/judge/recorder.py."""

import math
from dataclasses import dataclass

import numpy as np

NORM_TOL = 1e-4
"""Nats: largest allowed |model NLL - (logsumexp(z) - z[y])| and |sum(softmax) - 1|; float32
rounding is ~1e-6, a rescaled or partial distribution is off by far more."""
NOISE_FACTOR = 4.0
"""C1 tolerates this many times the replay noise (two identical runs), plus --atol."""


@dataclass(frozen=True)
class Check:
    passed: bool
    summary: str
    """One line of evidence."""
    evidence: dict

    def to_dict(self):
        return {"passed": self.passed, "summary": self.summary, **self.evidence}


def _max_abs(a, b):
    """max |a - b| over entries where both are finite; inf if only one of a pair is finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    fa, fb = np.isfinite(a), np.isfinite(b)
    if (fa != fb).any():
        return math.inf
    both = fa & fb
    return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0


def replay_noise(base, replay):
    """Largest difference between two runs of the same evaluation: nondeterminism to tolerate."""
    return max(_max_abs(base.nll, replay.nll), _max_abs(base.probe_logp, replay.probe_logp))


def perturbed_stream(tokens, t, vocab, seed):
    """`tokens` with every token after index t replaced at random (token t+1 surely changed)."""
    rng = np.random.default_rng(seed)
    out = np.array(tokens, dtype=np.int64)
    out[t + 1:] = rng.integers(0, vocab, size=len(out) - t - 1)
    if out[t + 1] == tokens[t + 1]:
        out[t + 1] = (out[t + 1] + 1) % vocab
    return out.astype(np.asarray(tokens).dtype)


def check_causal(base, probes, noise, atol):
    """`probes`: [(t, trace of the stream perturbed after t)]. Position p predicts token p+1, so the
    scores of tokens <= t are positions < t, and the distribution for token t+1 is position t's."""
    tol = atol + NOISE_FACTOR * noise
    rows, passed = [], True
    for t, trace in probes:
        before = _max_abs(base.nll[:t], trace.nll[:t])
        dist = _max_abs(base.probe_logp[:t + 1], trace.probe_logp[:t + 1])
        after = float(np.mean(np.abs(base.nll[t + 1:].astype(np.float64) - trace.nll[t + 1:])))
        traced = bool(np.isfinite(base.probe_logp[:t + 1]).all())
        ok = before <= tol and dist <= tol and traced
        passed &= ok
        rows.append({"t": t, "max_dnll_before": before, "max_dlogp_through_t": dist, "mean_dnll_after": after,
                     "traced": traced, "passed": ok})
    worst = max(rows, key=lambda r: max(r["max_dnll_before"], r["max_dlogp_through_t"]))
    summary = (f"{len(rows)} cut points t; max |Δnll| before t {worst['max_dnll_before']:.3g}, max |Δlog p| "
               f"through t {worst['max_dlogp_through_t']:.3g} (tol {tol:.3g}); after t mean |Δnll| "
               f"{min(r['mean_dnll_after'] for r in rows):.3g}+")
    return Check(passed, summary, {"tolerance": tol, "replay_noise": noise, "cuts": rows})


def check_normalized(trace, vocab):
    scored = trace.times_scored > 0
    gap = np.abs(trace.norm_gap[scored])
    max_gap = float(gap.max()) if gap.size else math.inf
    max_mass = float(trace.mass_err[scored].max()) if scored.any() else math.inf
    # A model NLL below -log p by g nats claims e^g times the probability: total mass up to e^g.
    implied = float(np.exp(np.max(-trace.norm_gap[scored]))) if scored.any() else math.nan
    widths = sorted(trace.vocab_widths)
    passed = widths == [vocab] and max_gap <= NORM_TOL and max_mass <= NORM_TOL and bool(scored.all())
    summary = (f"logits over {','.join(map(str, widths)) or 'no'} of {vocab} ids; max |NLL − (lse(z) − z_y)| "
               f"{max_gap:.3g} nats; max |Σp − 1| {max_mass:.3g}; implied mass ≤ {implied:.4g} (tol {NORM_TOL:g})")
    return Check(passed, summary, {"vocab": vocab, "logit_widths": widths, "max_nll_gap": max_gap,
                                   "max_mass_error": max_mass, "max_implied_mass": implied, "tolerance": NORM_TOL,
                                   "positions_checked": int(scored.sum()), "positions": int(scored.size)})


def check_score_first(trace, mode):
    c = trace.counts
    bad = c["unreported_train_rows"] + c["mismatched_train_rows"] + c["train_violations"]
    passed = bad == 0
    summary = (f"{c['train_rows']} training rows over {c['trained_positions']} positions; "
               f"{c['train_violations']} read unscored positions; {c['unreported_train_rows']} unreported, "
               f"{c['mismatched_train_rows']} not matching their report")
    if mode in ("ttt", "lora") and c["train_rows"] == 0:
        summary += "; no update observed"
    keys = ("train_rows", "trained_positions", "train_violations", "unreported_train_rows", "mismatched_train_rows",
            "train_reports_without_forward")
    return Check(passed, summary, {**{k: c[k] for k in keys}, "examples": {
        k: v for k, v in trace.examples.items() if k in keys}})


def check_single_pass(trace, atol):
    c = trace.counts
    never, repeated = int((trace.times_scored == 0).sum()), int((trace.times_scored > 1).sum())
    returned = trace.nll.size == trace.times_scored.size
    drift = _max_abs(trace.nll, trace.event_nll) if returned else math.inf
    passed = (returned and never == 0 and repeated == 0 and drift <= atol and c["unclaimed_rows"] == 0
              and c["extra_reports"] == 0 and c["unmatched_reports"] == 0)
    summary = (f"{trace.times_scored.size} positions: {never} never scored, {repeated} scored more than once; "
               f"{c['unclaimed_rows']} of {c['scoring_rows']} scoring rows unreported ({c['padding_rows']} all-zero "
               f"padding), {c['unmatched_reports']} reports not matching the stream; max |returned − forward NLL| "
               f"{drift:.3g}")
    keys = ("scoring_rows", "padding_rows", "unclaimed_rows", "extra_reports", "unmatched_reports")
    return Check(passed, summary, {"positions": int(trace.times_scored.size), "never_scored": never,
                                   "scored_more_than_once": repeated, "max_returned_vs_forward": drift,
                                   **{k: c[k] for k in keys},
                                   "examples": {k: v for k, v in trace.examples.items() if k in keys}})


def check_bytes(trace, reference_bytes):
    passed = trace.bytes == reference_bytes
    return Check(passed, f"evaluator divides by {trace.bytes:,} bytes; reference count {reference_bytes:,}",
                 {"bytes": trace.bytes, "reference_bytes": reference_bytes})
