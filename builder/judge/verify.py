"""`pgbuild verify`: run an artifact's own evaluation code and check that its scores are legal.

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

The evaluator is instrumented through its `on_score(a, b)` / `on_train(a, b)` hooks and by wrapping
the model's forward: a no-grad forward is a scoring forward (its logits are captured), a forward
with grad enabled is a training forward. The hooks' contract: `on_score` is told, row by row and
before the next forward, which positions each row of the last scoring forward scored; `on_train`
is told each row's position range just before the training forward that reads it.
"""

import copy
import importlib
import importlib.abc
import importlib.util
import inspect
import itertools
import json
import lzma
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from builder.artifact.audit import open_verified
from builder.progress import scoring_progress
from builder.commands.threads import threads_option
from runtime.baselines import baselines, describe as describe_baselines
from runtime.codec import LZMA_FILTERS
from runtime.errors import PgError

CHECKS = ("causal", "normalized", "score_first", "single_pass", "bytes")
CHECK_TITLES = {"causal": "C1 causal", "normalized": "C2 normalized", "score_first": "C3 score before update",
                "single_pass": "C4 single pass", "bytes": "byte accounting"}
PROBE_TOKENS = 16
"""Vocabulary ids whose log-probabilities fingerprint each scored distribution (evenly spaced)."""
NORM_TOL = 1e-4
"""Nats: largest allowed |model NLL - (logsumexp(z) - z[y])| and |sum(softmax) - 1|; float32
rounding is ~1e-6, a rescaled or partial distribution is off by far more."""
NOISE_FACTOR = 4.0
"""C1 tolerates this many times the replay noise (two identical runs), plus --atol."""
REQUIRED_MODULES = ("runtime.errors", "runtime.config", "runtime.evaluate", "runtime.cli")
_namespaces = itertools.count()


# ----------------------------------------------------------------------------- the bundled runtime

class _SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports modules of a private package from source texts held in memory."""

    def __init__(self, sources, origin):
        self.sources, self.origin = sources, origin

    def find_spec(self, name, path=None, target=None):
        if name in self.sources:
            return importlib.util.spec_from_loader(name, self, is_package="." not in name)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(compile(self.sources[module.__name__], f"<{self.origin}:{module.__name__}>", "exec"), module.__dict__)


class BundledRuntime:
    """An artifact's runtime sources imported as a private package (`_pgverify_N`), so the
    builder's own `runtime` is never touched; `close()` drops the modules again."""

    def __init__(self, sources, origin):
        bad = [n for n in sources if n != "runtime" and not n.startswith("runtime.")]
        missing = [n for n in REQUIRED_MODULES if n not in sources]
        if bad or missing:
            raise PgError(f"{origin}: runtime.xz holds {sorted(sources)}; expected the runtime package"
                          + (f" (missing {', '.join(missing)})" if missing else ""))
        self.package = f"_pgverify_{next(_namespaces)}"
        renamed = {self.package + name[len("runtime"):]: text for name, text in sources.items()}
        finder = _SourceFinder(renamed, origin)
        sys.meta_path.insert(0, finder)
        try:
            # Everything is imported now, while the finder is in place: the runtime's function-level
            # relative imports then find their modules in sys.modules.
            self.modules = {name: importlib.import_module(name) for name in sorted(renamed, key=len)}
        except Exception as e:
            self.close()
            raise PgError(f"{origin}: the bundled runtime fails to import ({type(e).__name__}: {e})") from None
        finally:
            sys.meta_path.remove(finder)
        self.errors, self.config, self.evaluate, self.cli = (self.module(n[len("runtime."):]) for n in REQUIRED_MODULES)
        params = inspect.signature(self.evaluate.evaluate).parameters
        if not {"on_score", "on_train"} <= set(params):
            self.close()
            raise PgError(f"{origin}: the bundled evaluate() has no on_score/on_train hooks, so it cannot be verified")

    def module(self, short):
        return self.modules[f"{self.package}.{short}"]

    def call(self, fn, *args, **kwargs):
        """Run a function of the artifact's code; its failures become one-line errors."""
        try:
            return fn(*args, **kwargs)
        except self.errors.PgError as e:
            raise PgError(f"the artifact's runtime: {e}") from None
        except PgError:
            raise
        except Exception as e:
            raise PgError(f"the artifact's evaluation code failed ({type(e).__name__}: {e})") from None

    def close(self):
        for name in [n for n in sys.modules if n == self.package or n.startswith(self.package + ".")]:
            del sys.modules[name]


def bundled_sources(art):
    """{module: source} from the artifact's verified runtime.xz member."""
    try:
        return json.loads(lzma.decompress(art.read("runtime.xz"), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
    except (lzma.LZMAError, ValueError) as e:
        raise PgError(f"{art.path}: runtime.xz does not decode to the runtime sources ({e})") from None


# ----------------------------------------------------------------------------- instrumentation

@dataclass
class Trace:
    """What one instrumented evaluation did, position by position (P = scored positions)."""

    nll: np.ndarray
    """The evaluator's returned NLL per position."""
    bytes: int
    val_bpb: float
    times_scored: np.ndarray
    """How often each position was reported scored."""
    event_nll: np.ndarray
    """The model's NLL in the forward column a report maps to (NaN: never scored)."""
    probe_logp: np.ndarray
    """(P, K+1) fingerprint of the distribution used for each position: log-probabilities of K
    fixed token ids and of the reference next token (the unperturbed stream's)."""
    norm_gap: np.ndarray
    """Model NLL minus (logsumexp(z) - z[y]) at each scored position."""
    mass_err: np.ndarray
    """|sum(softmax(z)) - 1| at each scored position."""
    vocab_widths: set
    counts: dict
    """Forward and report tallies: scoring_rows, padding_rows, unclaimed_rows, extra_reports,
    unmatched_reports, train_rows, unreported_train_rows, mismatched_train_rows, train_violations,
    trained_positions."""
    examples: dict = field(default_factory=dict)
    """A few offending ranges per kind of violation, as evidence."""


def is_padding(x, y):
    """Rows that hold token 0 and nothing else, inputs and targets: an evaluator may pad a forward
    to a fixed shape with them. They carry no stream token, so they need no report; anything else
    in a forward must be reported scored or trained on."""
    return len(x) > 0 and not x.any() and (y is None or not y.any())


class Recorder:
    """Wraps `model.forward` and serves as the evaluator's on_score/on_train hooks."""

    def __init__(self, model, tokens, probe_ids, reference_targets=None):
        self.tokens = np.asarray(tokens, np.int64)
        self.probe_ids = torch.as_tensor(probe_ids)
        # The perturbed runs fingerprint each position by the unperturbed next token's log-prob:
        # a model that peeks at its own target loses most of that probability when it changes.
        self.reference_targets = np.asarray(self.tokens[1:] if reference_targets is None else reference_targets,
                                            np.int64)
        self._forward = model.forward
        model.forward = self.forward  # an instance attribute shadows the class's forward
        P = len(tokens) - 1
        self.times_scored = np.zeros(P, np.int64)
        self.event_nll = np.full(P, np.nan, np.float32)
        self.probe_logp = np.full((P, len(probe_ids) + 1), np.nan, np.float32)
        self.norm_gap = np.full(P, np.nan, np.float64)
        self.mass_err = np.full(P, np.nan, np.float64)
        self.vocab_widths = set()
        self.counts = dict.fromkeys(("scoring_rows", "padding_rows", "unclaimed_rows", "extra_reports",
                                     "unmatched_reports", "train_rows", "unreported_train_rows", "mismatched_train_rows",
                                     "train_violations"), 0)
        self.trained = np.zeros(P, bool)
        self.examples = {}
        self.batch = None
        self.train_reports = deque()

    def _example(self, kind, value):
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(value)

    # --- the model's forward

    def forward(self, *args, **kwargs):
        ids = args[0] if args else kwargs["ids"]
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        self._close_batch()
        if torch.is_grad_enabled():
            self._check_training(ids, targets)
            return self._forward(*args, **kwargs)
        out = self._forward(*args, **kwargs)
        if targets is None:
            logits = out
        else:  # the same forward (adapters and all) without targets gives the logits behind the NLL
            rest = {k: v for k, v in kwargs.items() if k not in ("ids", "targets")}
            logits = self._forward(ids, None, *args[2:], **rest)
        self._open_batch(ids, targets, out if targets is not None else None, logits)
        return out

    def _open_batch(self, ids, targets, nll, logits):
        """Hold a scoring forward until on_score says which of its columns were scored."""
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise PgError(f"model(x) returned shape {tuple(logits.shape)}, not logits (B, T, vocab) "
                          f"for x of shape {tuple(ids.shape)}")
        if nll is not None and tuple(nll.shape) != tuple(ids.shape):
            raise PgError(f"model(x, y) returned shape {tuple(nll.shape)}, not per-token NLL {tuple(ids.shape)}")
        self.vocab_widths.add(int(logits.shape[-1]))
        host = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
        self.batch = dict(x=host(ids).astype(np.int64), y=None if targets is None else host(targets).astype(np.int64),
                          nll=None if nll is None else host(nll.float()), logits=logits.detach(), next_row=0)
        self.counts["scoring_rows"] += len(ids)

    def _capture(self, r, cols, a, b):
        """What row r's scored columns predicted, for positions a..b-1: the model's NLL, the gap
        to the full-vocabulary log-softmax of its logits, the mass error, the fingerprint."""
        batch = self.batch
        logp = torch.log_softmax(batch["logits"][r, cols].float(), -1)
        device = logp.device
        stream_targets = torch.as_tensor(self.tokens[a + 1:b + 1], device=device)
        targets = stream_targets if batch["y"] is None else torch.as_tensor(batch["y"][r, cols], device=device)
        reference = -logp.gather(1, targets[:, None])[:, 0].double().cpu().numpy()
        model_nll = reference if batch["nll"] is None else batch["nll"][r, cols].astype(np.float64)
        self.event_nll[a:b] = model_nll
        self.norm_gap[a:b] = model_nll - reference
        self.mass_err[a:b] = (logp.double().exp().sum(-1) - 1).abs().cpu().numpy()
        ref_next = torch.as_tensor(self.reference_targets[a:b], device=device)
        self.probe_logp[a:b] = torch.cat((logp[:, self.probe_ids.to(device)], logp.gather(1, ref_next[:, None])),
                                         1).cpu().numpy()

    def _close_batch(self):
        if self.batch is not None:
            rest = slice(self.batch["next_row"], None)
            if is_padding(self.batch["x"][rest], None if self.batch["y"] is None else self.batch["y"][rest]):
                self.counts["padding_rows"] += len(self.batch["x"]) - self.batch["next_row"]
                self.batch["next_row"] = len(self.batch["x"])
            unclaimed = len(self.batch["x"]) - self.batch["next_row"]
            if unclaimed:
                self.counts["unclaimed_rows"] += unclaimed
                self._example("unclaimed_rows", f"{unclaimed} of {len(self.batch['x'])} rows")
            self.batch = None

    def _check_training(self, ids, targets):
        x = ids.detach().cpu().numpy().astype(np.int64)
        y = None if targets is None else targets.detach().cpu().numpy().astype(np.int64)
        for r in range(len(x)):
            if is_padding(x[r:r + 1], None if y is None else y[r:r + 1]):
                self.counts["padding_rows"] += 1
                continue
            self.counts["train_rows"] += 1
            if not self.train_reports:
                self.counts["unreported_train_rows"] += 1
                self._example("unreported_train_rows", f"row of {x.shape[1]} tokens")
                continue
            a, b = self.train_reports.popleft()
            # A training row must be exactly the reported range: padding could hide other tokens.
            if (x.shape[1] != b - a or not np.array_equal(x[r], self.tokens[a:b])
                    or (y is not None and not np.array_equal(y[r], self.tokens[a + 1:b + 1]))):
                self.counts["mismatched_train_rows"] += 1
                self._example("mismatched_train_rows", [a, b])
                continue
            unscored = int((self.times_scored[a:b] == 0).sum())
            if unscored:
                self.counts["train_violations"] += 1
                self._example("train_violations", {"range": [a, b], "unscored": unscored})
            self.trained[a:b] = True

    # --- the evaluator's hooks

    def on_train(self, a, b):
        self.train_reports.append((int(a), int(b)))

    def on_score(self, a, b):
        a, b = int(a), int(b)
        batch = self.batch
        if batch is None or batch["next_row"] >= len(batch["x"]) or not 0 <= a < b <= len(self.times_scored):
            self.counts["extra_reports"] += 1
            self._example("extra_reports", [a, b])
            return
        r = batch["next_row"]
        batch["next_row"] += 1
        col = self._locate(batch["x"][r], None if batch["y"] is None else batch["y"][r], a, b)
        if col is None:
            self.counts["unmatched_reports"] += 1
            self._example("unmatched_reports", [a, b])
            return
        self._capture(r, slice(col, col + b - a), a, b)
        self.times_scored[a:b] += 1

    def _locate(self, x, y, a, b):
        """The column of position `a` in row `x`, if the row holds the true stream prefix of
        positions a..b-1 (context included) and, when given, their true targets; else None."""
        T = len(x)
        lo = max(0, b - T)
        if lo > a:
            return None
        for s in lo + np.flatnonzero(self.tokens[lo:a + 1] == x[0]):  # candidate window starts
            if np.array_equal(x[:b - s], self.tokens[s:b]) and (
                    y is None or np.array_equal(y[a - s:b - s], self.tokens[a + 1:b + 1])):
                return int(a - s)
        return None

    def finish(self, result):
        self._close_batch()
        return Trace(nll=np.asarray(result.nll, np.float32), bytes=int(result.bytes), val_bpb=float(result.val_bpb),
                     times_scored=self.times_scored, event_nll=self.event_nll, probe_logp=self.probe_logp,
                     norm_gap=self.norm_gap, mass_err=self.mass_err, vocab_widths=self.vocab_widths,
                     counts={**self.counts, "trained_positions": int(self.trained.sum()),
                             "train_reports_without_forward": len(self.train_reports)},
                     examples=self.examples)


def traced_run(rt, model, tokens, tables, cfg, mode, device, probe_ids, reference_targets=None, advance=None):
    """One evaluation by the artifact's code on a fresh copy of `model`, fully instrumented;
    `advance(a, b)` is also told of each scored range (progress)."""
    model = copy.deepcopy(model)
    recorder = Recorder(model, tokens, probe_ids, reference_targets)
    on_score = recorder.on_score if advance is None else lambda a, b: (recorder.on_score(a, b), advance(a, b))
    result = rt.call(rt.evaluate.evaluate, model, tokens, tables, cfg, mode, device,
                     on_score=on_score, on_train=recorder.on_train)
    return recorder.finish(result)


# ----------------------------------------------------------------------------- the checks

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


# ----------------------------------------------------------------------------- the whole verification

def cut_points(num_positions, count):
    """Positions t to perturb after: spread over the stream (odd multiples of P/2k), nudged by odd
    amounts so they fall inside windows and chunks rather than on their boundaries."""
    spots = (num_positions * (2 * i + 1) // (2 * count) + 1 + 38 * i for i in range(count))
    return sorted({min(num_positions - 2, max(1, t)) for t in spots})


def parse_overrides(eval_dict, assignments):
    """`eval.FIELD=VALUE` strings applied to the manifest's eval settings (typed like the current value)."""
    from builder.config import _parse_value

    values = dict(eval_dict)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section != "eval" or name not in values:
            raise PgError(f"--set {assignment!r}: expected eval.FIELD=VALUE with FIELD one of {', '.join(values)}")
        try:
            values[name] = _parse_value(text.strip(), values[name])
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
    against the artifact's recorded SHA-256)."""
    from runtime.cli import load_tokenizer
    from runtime.data import find_data, load_tokens
    from runtime.evaluate import byte_tables, trim_stream

    vocab = manifest["model"]["vocab_size"]
    layout = find_data(data, vocab, tokenizer)
    sp = load_tokenizer(layout.tokenizer, manifest, force=False)
    tokens = trim_stream(load_tokens(layout, "val", max_tokens), seq_len)
    if int(tokens.max()) >= vocab:
        raise PgError(f"validation shards hold token id {int(tokens.max())} >= vocab {vocab}; wrong dataset")
    return tokens, sp, byte_tables(sp, vocab)


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
        model = rt.call(rt.cli.load_model, manifest, art.read, device)
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


# ----------------------------------------------------------------------------- the command

def render(console, report):
    console.print(f"[bold]{report['artifact']}[/]: its own runtime (runtime.xz {report['runtime_sha256'][:12]}…) "
                  f"executed on {report['device']}, {report['positions']:,} positions"
                  + (f", overrides {' '.join(report['overrides'])}" if report["overrides"] else ""))
    table = Table(title="legality checks (issue #1017)")
    for column in ("mode", "check", "result", "evidence"):
        table.add_column(column, overflow="fold")
    for mode, result in report["modes"].items():
        for i, (key, check) in enumerate(result["checks"].items()):
            mark = "[green]pass[/]" if check["passed"] else "[bold red]FAIL[/]"
            table.add_row(f"{mode} ({result['val_bpb']:.5f} bpb)" if i == 0 else "", CHECK_TITLES[key], mark,
                          check["summary"])
        table.add_section()
    console.print(table)
    console.print(verdict_table(report["modes"]))
    console.print("[bold green]all checks pass[/]" if report["passed"] else "[bold red]verification failed[/]")


def verdict(mode, result):
    """One line per mode, printed as soon as the mode is done: PASS, or FAIL and which checks."""
    failed = [CHECK_TITLES[k] for k, c in result["checks"].items() if not c["passed"]]
    head = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
    return f"verify {mode}: {head}  {result['val_bpb']:.5f} bpb{describe_baselines(result)}  {result['seconds']:.1f} s"


def verdict_table(results):
    table = Table(title="verdicts")
    for column in ("mode", "verdict", "val_bpb", "uniform bpb", "unigram bpb", "seconds"):
        table.add_column(column, justify="left" if column in ("mode", "verdict") else "right")
    for mode, r in results.items():
        table.add_row(mode, "[green]PASS[/]" if r["passed"] else "[bold red]FAIL[/]", f"{r['val_bpb']:.5f}",
                      f"{r['uniform_bpb']:.4f}", f"{r['unigram_bpb']:.4f}", f"{r['seconds']:.1f}")
    return table


@click.command()
@threads_option
@click.argument("artifact", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="dataset directory (pgbuild or challenge layout)")
@click.option("--tokens", type=click.IntRange(min=2), help="validation prefix to score (default: three TTT chunks, "
              "at least four sequences)")
@click.option("--mode", "modes", multiple=True,
              help="eval mode to verify (repeatable; default: every mode the artifact has)")
@click.option("--set", "assignments", multiple=True, metavar="eval.FIELD=VALUE",
              help="override an eval setting of the artifact for the verification, e.g. eval.ttt_chunk_tokens=1024")
@click.option("--probes", default=3, show_default=True, help="cut points t for the causality check")
@click.option("--atol", default=1e-6, show_default=True,
              help="C1/C4 tolerance in nats, on top of the measured replay noise")
@click.option("--tokenizer", type=click.Path(), help="tokenizer .model (default: found under --data)")
@click.option("--device", help="torch device (default: cuda if available)")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def verify(artifact, data, tokens, modes, assignments, probes, atol, tokenizer, device, as_json):
    """Run ARTIFACT's own evaluation code and check the four legality conditions (causal,
    normalized, score before update, single pass) in every eval mode. This EXECUTES the artifact's
    bundled code (unlike `audit`). Exit status 0 only if every check passes."""
    err = Console(stderr=True)
    with scoring_progress(not as_json, err) as track:
        report = verify_artifact(artifact, data, tokens, modes, assignments, probes, device, atol, tokenizer,
                                 progress=(lambda _: None) if as_json else (lambda m: err.print(f"[dim]{m}[/]")),
                                 on_mode=lambda mode, result: err.print(verdict(mode, result), markup=False,
                                                                        highlight=False, soft_wrap=True),
                                 track=track)
    if as_json:
        click.echo(json.dumps(report))
    else:
        render(Console(width=max(Console().width, 140)), report)
    if not report["passed"]:
        sys.exit(1)
