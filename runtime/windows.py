"""Windows over a token stream, and scoring them: the standard and sliding-window evaluations.

A window feeds the model a stretch of the stream and scores only the positions it is the first
to reach, so over a set of windows every position is scored once.
"""

from dataclasses import dataclass

import torch

from .errors import PgError
from .precision import autocast


@dataclass(frozen=True)
class Window:
    """Inputs tokens[start:start+length]; scores positions [start+first, start+length)."""

    start: int
    length: int
    first: int


def sliding_windows(num_positions, seq_len, stride):
    """Windows with stride `stride`; each after the first scores only its last `stride` positions,
    so every position is scored once with at least seq_len - stride tokens of context."""
    if not 0 < stride <= seq_len:
        raise PgError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    windows, start = [], 0
    while start == 0 or start + seq_len - stride < num_positions:
        length = min(seq_len, num_positions - start)
        windows.append(Window(start, length, 0 if start == 0 else seq_len - stride))
        start += stride
    return windows


@torch.no_grad()
def score_windows(model, tokens, windows, nll, batch_size, device, on_score=None):
    """Write each window's scored NLLs into `nll` (a device tensor indexed by position)."""
    model.eval()
    seq_len = max((w.length for w in windows), default=0)
    rows = min(batch_size, len(windows))  # the last batch padded too: one shape, one compiled graph
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        # Short tail windows are right-padded; causality keeps the padding from touching real scores.
        x = torch.zeros(rows, seq_len, dtype=torch.int64)
        y = torch.zeros(rows, seq_len, dtype=torch.int64)
        for row, w in enumerate(batch):
            x[row, :w.length] = tokens[w.start:w.start + w.length]
            y[row, :w.length] = tokens[w.start + 1:w.start + w.length + 1]
        with autocast(device):
            out = model(x.to(device), y.to(device))
        for row, w in enumerate(batch):
            nll[w.start + w.first:w.start + w.length] = out[row, w.first:w.length]
            if on_score is not None:
                on_score(w.start + w.first, w.start + w.length)
