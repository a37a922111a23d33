"""Scoring a token stream in bits per byte, in any of the modes: standard and sliding windows
(windows.py), score-first TTT (ttt.py) and LoRA TTT (lora_ttt.py).

Position t of a stream of N tokens means "predict tokens[t+1] from tokens[:t+1]"; there are N-1
positions and every mode scores each exactly once, with a full softmax over the vocabulary. The
per-position NLLs (nats) come back in stream order, so modes can be compared token by token.

Distributed runs split windows (and TTT training sequences) across ranks; every rank writes its
scores into a zeroed full-length buffer and one all-reduce assembles them, so N processes produce
the same numbers as one.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import MODES
from .distributed import Ranks
from .errors import PgError
from .lora_ttt import lora_ttt
from .ttt import score_first_ttt
from .windows import score_windows, sliding_windows


def byte_tables(sp, vocab_size):
    """Per-token byte counts as the challenge scores them.

    A target y after token p costs base[y] bytes, plus one for the space its leading "▁" stands
    for unless p is a boundary (control/unknown token), so the space after BOS is free.
    """
    base = np.zeros(vocab_size, np.int64)
    has_space = np.zeros(vocab_size, bool)
    boundary = np.ones(vocab_size, bool)
    for i in range(min(sp.get_piece_size(), vocab_size)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, has_space, boundary


class SidecarBytes:
    """Each validation token's bytes in the original text, from the dataset's sidecar shards
    (runtime.data: "val_bytes"), aligned with the validation stream from its first token. Where
    the text was transformed before tokenizing (CaseOps), the tokenizer's pieces do not weigh
    what the original text did, and only the sidecar knows."""

    def __init__(self, counts):
        self.counts = np.asarray(counts)

    def of(self, tokens):
        if len(tokens) > len(self.counts):
            raise PgError(f"the byte sidecar covers {len(self.counts):,} validation tokens, not {len(tokens):,}")
        return self.counts[1:len(tokens)].astype(np.int64)


def target_bytes(tokens, tables):
    """Bytes of each scored position of `tokens` (length N-1), from the tokenizer's `byte_tables`
    or from a dataset's `SidecarBytes`."""
    if isinstance(tables, SidecarBytes):
        return tables.of(tokens)
    base, has_space, boundary = tables
    prev, target = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
    return base[target] + (has_space[target] & ~boundary[prev])


def trim_stream(tokens, seq_len):
    """The challenge's truncation: a whole number of seq_len sequences plus the final target."""
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable == 0:
        raise PgError(f"validation stream has {len(tokens)} tokens; need at least seq_len+1 = {seq_len + 1}")
    return tokens[:usable + 1]


@dataclass
class EvalResult:
    mode: str
    nll: np.ndarray
    """Per-position NLL in nats, stream order."""
    bytes: int
    seconds: float

    @property
    def tokens(self):
        return int(self.nll.size)

    @property
    def val_loss(self):
        return float(self.nll.astype(np.float64).sum() / self.nll.size)

    @property
    def val_bpb(self):
        return float(self.nll.astype(np.float64).sum() / math.log(2) / self.bytes)

    def summary(self):
        return {"mode": self.mode, "val_loss": self.val_loss, "val_bpb": self.val_bpb,
                "tokens": self.tokens, "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def evaluate(model, tokens, tables, cfg, mode, device, on_score=None, on_train=None):
    """Score `tokens` (a 1-D uint16/int array, already trimmed) in `mode`.

    TTT mode changes `model`'s weights; pass a copy if the caller still needs the original.
    `on_score(a, b)` / `on_train(a, b)` are told about every scored / trained position range,
    which the legality tests use to prove each token is scored once and before any update.
    """
    if mode not in MODES:
        raise PgError(f"unknown eval mode {mode!r}; choose one of {', '.join(MODES)}")
    t0 = time.perf_counter()
    ranks = Ranks()
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    num_positions = len(stream) - 1
    stride = cfg.seq_len if mode == "standard" else cfg.stride
    windows = sliding_windows(num_positions, cfg.seq_len, stride)
    nll = torch.zeros(num_positions, dtype=torch.float32, device=device)
    if cfg.compile:
        # As the record compiles: an error at a graph break rather than a silent fall-back; static
        # shapes, but for the LoRA windows, which grow chunk by chunk up to seq_len (its TTT
        # forward is dynamic too). Same parameters; compiled by the first real forward.
        model = torch.compile(model, dynamic=mode == "lora", fullgraph=True)
    if mode == "ttt":
        score_first_ttt(model, stream, windows, nll, cfg, ranks, device, on_score, on_train)
    elif mode == "lora":
        lora_ttt(model, stream, nll, cfg, ranks, device, on_score, on_train)
    else:
        score_windows(model, stream, ranks.share(windows), nll, cfg.batch_seqs, device, on_score)
    ranks.sum_(nll)
    total_bytes = int(target_bytes(np.asarray(tokens), tables).sum())
    return EvalResult(mode, nll.cpu().numpy(), total_bytes, time.perf_counter() - t0)
