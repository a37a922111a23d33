"""Instrumentation of an artifact's evaluation: what each forward and each hook report did.

The evaluator is instrumented through its `on_score(a, b)` / `on_train(a, b)` hooks and by wrapping
the model's forward, whose per-token output (or logits) is captured as it is computed, before any
update can follow. The hooks' contract: `on_score` is told, row by row and before the next forward,
which positions each row of the last forward scored; `on_train` is told each trained row's
position range just before the grad-enabled forward that reads it. A trained row must read only
positions scored by the time the next forward starts: in earlier forwards, or in its own (one
forward can score a chunk and then train on it, as the records' LoRA TTT does). Rows of a
grad-enabled forward that no report names are unreported training rows; rows of a no-grad
forward that no report claims are unclaimed scoring rows (all-zero padding excepted).
"""

import copy
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from runtime.errors import PgError


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
                                     "unmatched_reports", "train_rows", "unreported_train_rows",
                                     "mismatched_train_rows", "train_violations"), 0)
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
        training = torch.is_grad_enabled()
        out = self._forward(*args, **kwargs)
        host = lambda t: None if t is None else t.detach().cpu().numpy().astype(np.int64)  # noqa: E731
        batch = dict(x=host(ids), y=host(targets), training=training, trains={}, next_row=0, logits=None, nll=None)
        if training:
            batch["trains"] = self._claim_training_rows(batch["x"], batch["y"])
        per_token = out.shape == ids.shape if targets is not None else out.dim() == 3
        if not training or per_token:  # a mean loss holds nothing that could be scored
            if targets is None:
                logits = out
            else:  # the same forward (adapters and all) without targets gives the logits behind the NLL
                rest = {k: v for k, v in kwargs.items() if k not in ("ids", "targets")}
                with torch.no_grad():
                    logits = self._forward(ids, None, *args[2:], **rest)
            self._check_shapes(ids, targets, out, logits)
            batch.update(logits=logits.detach(), nll=None if targets is None else out.detach().float().cpu().numpy())
            self.vocab_widths.add(int(logits.shape[-1]))
        self.batch = batch
        return out

    @staticmethod
    def _check_shapes(ids, targets, out, logits):
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise PgError(f"model(x) returned shape {tuple(logits.shape)}, not logits (B, T, vocab) "
                          f"for x of shape {tuple(ids.shape)}")
        if targets is not None and tuple(out.shape) != tuple(ids.shape):
            raise PgError(f"model(x, y) returned shape {tuple(out.shape)}, not per-token NLL {tuple(ids.shape)}")

    def _claim_training_rows(self, x, y):
        """{row: (a, b)}: the rows of a grad-enabled forward that the pending on_train reports
        name, each matched to a row holding exactly positions a..b-1 (padding could hide other
        tokens) and, when given, their true targets."""
        claims = {}
        while self.train_reports:
            a, b = self.train_reports.popleft()
            row = next((r for r in range(len(x)) if r not in claims and x.shape[1] == b - a
                        and np.array_equal(x[r], self.tokens[a:b])
                        and (y is None or np.array_equal(y[r], self.tokens[a + 1:b + 1]))), None)
            if row is None:
                self.counts["mismatched_train_rows"] += 1
                self._example("mismatched_train_rows", [a, b])
            else:
                claims[row] = (a, b)
                self.counts["train_rows"] += 1
        return claims

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
        """Settle the last forward once its reports are in: a trained row must read only
        positions scored by now (before this forward, or by it: its logits were captured before
        any update), every other row must have been scored or be padding."""
        batch, self.batch = self.batch, None
        if batch is None:
            return
        x, y = batch["x"], batch["y"]
        unclaimed = 0
        for r in range(len(x)):
            if r in batch["trains"]:
                a, b = batch["trains"][r]
                unscored = int((self.times_scored[a:b] == 0).sum())
                if unscored:
                    self.counts["train_violations"] += 1
                    self._example("train_violations", {"range": [a, b], "unscored": unscored})
                self.trained[a:b] = True
            elif r < batch["next_row"]:
                continue
            elif is_padding(x[r:r + 1], None if y is None else y[r:r + 1]):
                self.counts["padding_rows"] += 1
            elif batch["training"]:  # a grad-enabled row nobody reported: trained on, unannounced
                self.counts["train_rows"] += 1
                self.counts["unreported_train_rows"] += 1
                self._example("unreported_train_rows", f"row of {x.shape[1]} tokens")
            else:
                unclaimed += 1
        self.counts["scoring_rows"] += len(x) if not batch["training"] else batch["next_row"]
        if unclaimed:
            self.counts["unclaimed_rows"] += unclaimed
            self._example("unclaimed_rows", f"{unclaimed} of {len(x)} rows")

    # --- the evaluator's hooks

    def on_train(self, a, b):
        self.train_reports.append((int(a), int(b)))

    def on_score(self, a, b):
        a, b = int(a), int(b)
        batch = self.batch
        if (batch is None or batch["logits"] is None or batch["next_row"] >= len(batch["x"])
                or not 0 <= a < b <= len(self.times_scored)):
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
