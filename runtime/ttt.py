"""Score-first test-time training: the stream is scored chunk by chunk, and after each chunk but
the last the model takes SGD steps on exactly the positions it has just been charged for, so no
score ever depends on a token it has not already paid for.

`train_on_positions` and `cosine_lr` also drive the base-weight phases of LoRA TTT (lora_ttt.py).
"""

import itertools
import math

import torch

from .precision import autocast
from .windows import score_windows


def cosine_lr(peak, step, num_steps):
    """The learning rate of step `step` of `num_steps`: from `peak` down to 0 on a half cosine."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / max(num_steps - 1, 1)))


def equal_length_runs(seqs):
    """Consecutive (a, b) ranges grouped into runs of equal length, each one forward's rows."""
    return [list(run) for _, run in itertools.groupby(seqs, key=lambda s: s[1] - s[0])]


def sum_grads(params, ranks):
    """All-reduce every gradient in one call: each rank ends with the sum over the ranks."""
    if not ranks.active:
        return
    flat = ranks.sum_(torch.cat([p.grad.flatten() for p in params]))
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def train_on_positions(model, optimizer, tokens, start, end, cfg, lr, epochs, ranks, device, on_train=None):
    """`epochs` SGD passes over positions [start, end), already scored.

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
            # Summing per-token-normalized grads across ranks equals one process's batch gradient.
            sum_grads(params, ranks)
            torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            optimizer.step()
    model.eval()


def score_first_ttt(model, tokens, windows, nll, cfg, ranks, device, on_score=None, on_train=None):
    """Chunked score-then-train: chunk c's windows are scored under no_grad, then (except for the
    last chunk) the model trains on exactly chunk c's positions."""
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
            train_on_positions(model, optimizer, tokens, c * chunk, min((c + 1) * chunk, num_positions),
                               cfg, cosine_lr(cfg.ttt_lr, c, num_chunks), cfg.ttt_epochs, ranks, device, on_train)
