"""Scoring a token stream in bits per byte: standard, sliding-window and score-first TTT.

Position t of a stream of N tokens means "predict tokens[t+1] from tokens[:t+1]"; there are N-1
positions and every mode scores each exactly once, with a full softmax over the vocabulary. The
per-position NLLs (nats) come back in stream order, so modes can be compared token by token.

Distributed runs split windows (and TTT training sequences) across ranks; every rank writes its
scores into a zeroed full-length buffer and one all-reduce assembles them, so N processes produce
the same numbers as one.
"""

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import PgError

MODES = ("standard", "sliding", "ttt", "lora")


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


def target_bytes(tokens, tables):
    """Bytes of each scored position of `tokens` (length N-1)."""
    base, has_space, boundary = tables
    prev, target = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
    return base[target] + (has_space[target] & ~boundary[prev])


def trim_stream(tokens, seq_len):
    """The challenge's truncation: a whole number of seq_len sequences plus the final target."""
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable == 0:
        raise PgError(f"validation stream has {len(tokens)} tokens; need at least seq_len+1 = {seq_len + 1}")
    return tokens[:usable + 1]


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


class Ranks:
    """This process's place among torchrun's ranks (one process when not distributed)."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    def share(self, items):
        """A contiguous slice of `items` for this rank."""
        n = len(items)
        return items[n * self.rank // self.world:n * (self.rank + 1) // self.world]

    def sum_(self, tensor):
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


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


def equal_length_runs(seqs):
    """Consecutive (a, b) ranges grouped into runs of equal length, each one forward's rows."""
    return [list(run) for _, run in itertools.groupby(seqs, key=lambda s: s[1] - s[0])]


def train_on_positions(model, optimizer, tokens, start, end, cfg, lr, epochs, ranks, device, on_train=None):
    """Score-first TTT's update: `epochs` SGD passes over positions [start, end), already scored.

    A step takes cfg.ttt_batch_seqs consecutive seq_len sequences, as the record does; each rank
    forwards its share of them as one batch (a shorter last sequence of the range in a forward of
    its own); the loss is the summed NLL over the token count of the whole step, all ranks' rows."""
    seqs = [(a, min(a + cfg.seq_len, end)) for a in range(start, end, cfg.seq_len)]
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a rank with no sequences in a step still joins the all-reduce
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for _ in range(epochs):
        for i in range(0, len(seqs), cfg.ttt_batch_seqs):
            batch = seqs[i:i + cfg.ttt_batch_seqs]
            total_tokens = sum(b - a for a, b in batch)
            optimizer.zero_grad(set_to_none=False)
            for rows in equal_length_runs(ranks.share(batch)):
                for a, b in rows:
                    if on_train is not None:
                        on_train(a, b)
                x = torch.stack([tokens[a:b] for a, b in rows]).to(device)
                y = torch.stack([tokens[a + 1:b + 1] for a, b in rows]).to(device)
                with autocast(device):
                    loss = model(x, y).sum() / total_tokens
                loss.backward()
            if ranks.active:
                # Summing per-token-normalized grads across ranks equals one process's batch gradient.
                flat = ranks.sum_(torch.cat([p.grad.flatten() for p in params]))
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            optimizer.step()
    model.eval()


def score_first_ttt(model, tokens, windows, nll, cfg, ranks, device, on_score=None, on_train=None):
    """Chunked score-then-train: chunk c's windows are scored under no_grad, then (except for the
    last chunk) the model trains on exactly chunk c's positions, so no score ever depends on a
    token it has not already been charged for."""
    num_positions = len(tokens) - 1
    chunk = cfg.ttt_chunk_tokens
    num_chunks = math.ceil(num_positions / chunk)
    by_chunk = [[] for _ in range(num_chunks)]
    for w in windows:
        by_chunk[(w.start + w.first) // chunk].append(w)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    for c in range(num_chunks):
        score_windows(model, tokens, ranks.share(by_chunk[c]), nll, cfg.batch_seqs, device, on_score)
        if c < num_chunks - 1:
            lr = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(num_chunks - 1, 1)))
            train_on_positions(model, optimizer, tokens, c * chunk, min((c + 1) * chunk, num_positions),
                               cfg, lr, cfg.ttt_epochs, ranks, device, on_train)


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
    if cfg.compile and mode != "lora":
        # As the record compiles: static shapes, and an error at a graph break rather than a
        # silent fall-back. Same parameters; compiled by the first real forward.
        model = torch.compile(model, dynamic=False, fullgraph=True)
    if mode == "ttt":
        score_first_ttt(model, stream, windows, nll, cfg, ranks, device, on_score, on_train)
    elif mode == "lora":
        from .lora_ttt import lora_ttt  # it builds on this module's helpers
        lora_ttt(model, stream, nll, cfg, ranks, device, on_score, on_train)
    else:
        score_windows(model, stream, ranks.share(windows), nll, cfg.batch_seqs, device, on_score)
    ranks.sum_(nll)
    total_bytes = int(target_bytes(np.asarray(tokens), tables).sum())
    return EvalResult(mode, nll.cpu().numpy(), total_bytes, time.perf_counter() - t0)
