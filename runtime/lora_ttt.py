"""Document-independent LoRA test-time training with phased global SGD (the top record's TTT).

A document runs from its BOS token up to the next BOS, which is its last target (text before the
first BOS is a document too). Each document is scored on its own tokens only, in chunks of
`lora_chunk_tokens`: chunk c is scored from the document's last `seq_len` tokens up to the
chunk's end, then, unless it is the document's last chunk, the document's own low-rank adapters
take one AdamW step on that chunk's mean NLL. Documents are adapted `lora_batch_docs` side by
side, each with its own adapters (batched matrices), and every batch starts from fresh ones.

Phases: once the first b_k = lora_phase_docs * k / lora_phases documents are scored (and no
later one), the base weights take one SGD pass over those b_k documents (cumulative, so later
phases revisit earlier text), in `ttt_chunk_tokens` chunks with a cosine learning rate.

Within a segment between phases, documents are batched longest first, as the record batches
them, so a batch's rows run about equally long. Every row's result depends on its own document
alone, so the order decides speed, never a score: the tests compare it bit for bit.

Two choices differ from the record, to keep every score provably legal: phases run on the
stream's first documents, not the first of the longest-first order (a phase trains the base
weights on every document scored so far; had those included documents that come later in the
stream, earlier scores would depend on later tokens: C1), and every batch starts from fresh
adapters, where the record keeps A from one batch to the next (so a document's score would
depend on the documents batched before it, later ones among them). `lora_order="record"` runs
the record's schedule, warm A included, to reproduce its number.

One forward both scores a chunk and trains on it, as the record's does: its NLL is taken (and
reported scored) before the backward and the step, so nothing trained on a token can reach its
score. `pgbuild verify` checks exactly that.

Every forward has the same number of rows (`lora_group_rows`, all-zero rows padding the last
group) and builds the graph for a backward whether or not any of its rows trains: a matrix product
of another shape rounds differently, and which documents run beside a document depends on later
tokens, which moved earlier scores by up to 1e-5 nats when the row count varied.
"""

import math

import numpy as np
import torch
from torch import nn

from .precision import autocast
from .ttt import cosine_lr, sum_grads, train_on_positions


class LoRA(nn.Module):
    """Low-rank deltas in `slots` slots: row r of a batch gets x @ A[s] @ B[s] * scale, s = rows[r].
    A ~ U(+-1/sqrt(in)), B = 0, so a fresh adapter changes nothing."""

    def __init__(self, in_dim, out_dim, rank, scale, slots, rows):
        """`rows`: the slot of each row of the next forward, one tensor shared by every LoRA."""
        super().__init__()
        self.a = nn.Parameter(torch.zeros(slots, in_dim, rank, device=rows.device))
        self.b = nn.Parameter(torch.zeros(slots, rank, out_dim, device=rows.device))
        self.scale = scale
        self.register_buffer("rows", rows, persistent=False)

    def reset(self, generators):
        """Slot i starts afresh from generators[i] (B = 0); slots beyond them keep their A."""
        in_dim, rank = self.a.shape[1:]
        bound = in_dim ** -0.5
        with torch.no_grad():
            for slot, g in enumerate(generators):
                self.a[slot] = torch.rand(in_dim, rank, generator=g) * (2 * bound) - bound
            self.b.zero_()

    def forward(self, x):
        a, b = self.a[self.rows].to(x.dtype), self.b[self.rows].to(x.dtype)
        return (x @ a) @ b * self.scale


class DocAdapters(nn.Module):
    """Adapters for every virtual layer's q, k, v, o and MLP and for the head, a slot per document
    of a batch, in the layout GPT.forward(adapters=...) reads. One set serves batch after batch,
    reset in place, so a compiled forward meets the same module and shapes every time. Built on
    its device: its LoRAs share one `rows` tensor, which `.to()` would copy apart."""

    def __init__(self, model_cfg, virtual_layers, cfg, slots, num_rows, device=None):
        super().__init__()
        d, kv = model_cfg.model_dim, model_cfg.num_kv_heads * model_cfg.head_dim
        rows = torch.zeros(num_rows, dtype=torch.int64, device=device)

        def lora(in_dim, out_dim):
            return LoRA(in_dim, out_dim, cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank, slots, rows)

        self.layers = nn.ModuleList(nn.ModuleDict(dict(q=lora(d, d), k=lora(d, kv), v=lora(d, kv), o=lora(d, d),
                                                       mlp=lora(d, d)))
                                    for _ in range(virtual_layers))
        self.head = lora(d, model_cfg.vocab_size)

    def loras(self):
        return [m for m in self.modules() if isinstance(m, LoRA)]

    def reset(self, doc_ids):
        """Fresh adapters for the documents `doc_ids`, in slots 0, 1, ...: a document's index in
        the stream seeds its A, so its init never depends on its batch."""
        generators = [torch.Generator().manual_seed(i) for i in doc_ids]
        for lora in self.loras():
            lora.reset(generators)
        return self

    def clear_deltas(self):
        """B = 0 everywhere, A kept: the record's reset between batches (TTT_WARM_START_A)."""
        with torch.no_grad():
            for lora in self.loras():
                lora.b.zero_()
        return self

    def select(self, slots):
        """The slot each row of the next forward reads, padding rows slot 0 (they weigh nothing)."""
        rows = self.head.rows
        rows.zero_()
        rows[:len(slots)] = torch.as_tensor(slots, dtype=torch.int64)


def documents(tokens, bos_id):
    """[(first, end)) position ranges, one per document, covering every position in order."""
    num_positions = len(tokens) - 1
    starts = np.flatnonzero(np.asarray(tokens[:-1]) == bos_id).tolist()
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return list(zip(starts, starts[1:] + [num_positions]))


def phase_ends(cfg, num_docs):
    """Scored-document counts at which a phase trains the base weights."""
    if cfg.lora_phases < 1 or cfg.lora_phase_docs < 1:
        return []
    ends = {cfg.lora_phase_docs * k // cfg.lora_phases for k in range(1, cfg.lora_phases + 1)}
    return sorted(e for e in ends if 0 < e <= num_docs)


def chunk_window(doc, c, chunk, seq_len):
    """(window start, chunk start, chunk end) of document `doc`'s chunk c, as stream positions."""
    first, end = doc
    chunk_start, chunk_end = first + c * chunk, min(first + (c + 1) * chunk, end)
    return max(first, chunk_end - seq_len), chunk_start, chunk_end


def groups(items, size):
    """`items` cut into runs of `size`, in order."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def length_batches(docs, first, end, size):
    """Documents first..end-1 (indices into `docs`) longest first (ties in stream order), cut into
    batches of `size`: a batch's documents run about as many chunks as each other, so few rows
    of its forwards pad. Where a document lands depends on later documents' lengths, and that
    reaches none of its scores: those depend on its own tokens, its adapters (seeded by its
    index) and the base weights, through forwards whose shape depends on the chunk alone."""
    order = sorted(range(first, end), key=lambda i: (docs[i][0] - docs[i][1], i))
    return groups(order, size)


def window_batch(tokens, rows, num_rows, width, device):
    """(x, y) for windows [(start, chunk start, end)], right-padded to `width` and, with all-zero
    padding rows, to `num_rows`. Both are fixed by the configuration and the chunk index alone:
    a matrix product of another shape rounds differently, so a shape that depended on how many
    later documents are still running would let later tokens move earlier scores (1e-5 nats)."""
    x = torch.zeros(num_rows, width, dtype=torch.int64)
    y = torch.zeros(num_rows, width, dtype=torch.int64)
    for r, (start, _, end) in enumerate(rows):
        x[r, :end - start] = tokens[start:end]
        y[r, :end - start] = tokens[start + 1:end + 1]
    return x.to(device), y.to(device)


def chunk_step(model, adapters, x, y, rows, training, nll, on_score=None, on_train=None):
    """One forward of a chunk's rows: each row's chunk is scored, then the rows in `training` add
    the gradient of their chunk's mean NLL to their own document's adapters (the optimizer steps
    once every row of the chunk is scored). Summing per-document means keeps the documents'
    gradients apart; other rows weigh nothing."""
    if on_train is not None:
        for (start, _, end), trains in zip(rows, training):
            if trains:
                on_train(start, end)
    with torch.enable_grad(), autocast(x.device):
        losses = model(x, y, adapters=adapters)
    for r, (start, chunk_start, end) in enumerate(rows):
        nll[chunk_start:end] = losses[r, chunk_start - start:end - start].detach()
        if on_score is not None:
            on_score(chunk_start, end)
    if not any(training):
        return
    mask = torch.zeros_like(losses)
    for r, ((start, chunk_start, end), trains) in enumerate(zip(rows, training)):
        if trains:
            mask[r, chunk_start - start:end - start] = 1
    ((losses * mask).sum(1) / mask.sum(1).clamp(min=1)).sum().backward()


def make_adapters(model, cfg, device):
    """One adapter set with a slot per document of a batch, for forwards of lora_group_rows rows."""
    num_rows = min(cfg.lora_group_rows, cfg.lora_batch_docs)
    return DocAdapters(model.cfg, len(model.cfg.layer_order(model.looping)), cfg, cfg.lora_batch_docs, num_rows,
                       device)


def adapt_batch(model, tokens, docs, adapters, nll, cfg, device, on_score=None, on_train=None):
    """Score `docs` chunk by chunk, each document adapting its own LoRA (slot i of `adapters` for
    docs[i]) after each chunk but its last, from a fresh optimizer. The documents still running
    go through forwards of exactly `lora_group_rows` rows; a row's result depends on its own
    tokens and adapters only."""
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=cfg.lora_lr, betas=cfg.lora_betas, eps=cfg.lora_eps,
                                  weight_decay=cfg.lora_weight_decay)
    chunk, lengths = cfg.lora_chunk_tokens, [end - first for first, end in docs]
    num_rows = min(cfg.lora_group_rows, cfg.lora_batch_docs)
    for c in range(math.ceil(max(lengths) / chunk)):
        width = min((c + 1) * chunk, cfg.seq_len)
        active = [i for i, n in enumerate(lengths) if n > c * chunk]
        optimizer.zero_grad(set_to_none=True)
        trained = False
        for group in groups(active, num_rows):
            rows = [chunk_window(docs[i], c, chunk, cfg.seq_len) for i in group]
            training = [end < docs[i][1] for i, (_, _, end) in zip(group, rows)]  # not its last chunk
            x, y = window_batch(tokens, rows, num_rows, width, device)
            adapters.select(group)
            chunk_step(model, adapters, x, y, rows, training, nll, on_score, on_train)
            trained |= any(training)
        if trained:
            optimizer.step()


def stream_schedule(docs, cfg):
    """[(batches, documents the phase after them trains on, or None)]: the segments between
    phase_ends in stream order, each segment's batches longest first; a phase trains on every
    document before its end."""
    ends = phase_ends(cfg, len(docs))
    return [(length_batches(docs, first, end, cfg.lora_batch_docs), list(range(end)) if end in ends else None)
            for first, end in zip([0] + ends, ends + [len(docs)])]


def record_schedule(docs, cfg):
    """The 2026-04-27 record's schedule, as one of its processes runs it: the documents sorted
    by length are cut into batches, taken longest batch first. Once a batch brings the scored
    count to the next boundary (min(lora_phase_docs, documents) * k / lora_phases, at most one a
    batch), a phase trains on that many scored documents, the first by (batch in length order,
    place in its batch). Same return as stream_schedule."""
    lengths = [end - first for first, end in docs]
    batches = groups(sorted(range(len(docs)), key=lengths.__getitem__), cfg.lora_batch_docs)
    queue = sorted(range(len(batches)), key=lambda b: -max(lengths[i] for i in batches[b]))
    limit = min(len(docs), cfg.lora_phase_docs) if cfg.lora_phases > 0 else 0
    bounds = [limit * k // cfg.lora_phases for k in range(1, cfg.lora_phases + 1)] if limit else []
    segments, current, scored = [], [], []
    for b in queue:
        current.append(batches[b])
        if len(segments) < len(bounds):
            scored += [(b, place, i) for place, i in enumerate(batches[b])]
            if len(scored) >= bounds[len(segments)]:
                segments.append((current, [i for *_, i in sorted(scored)[:bounds[len(segments)]]]))
                current = []
    return segments + [(current, None)]


def base_weights_training(model, cfg):
    """The SGD optimizer of a phase, over every base weight (trainable for its duration)."""
    model.requires_grad_(True)
    return torch.optim.SGD(model.parameters(), lr=cfg.lora_phase_lr, momentum=cfg.ttt_momentum)


def train_prefix(model, tokens, docs, phase_docs, cfg, ranks, device, on_train=None):
    """A stream-order phase: one SGD pass over positions [0, end of the phase's last document),
    all scored, in ttt_chunk_tokens chunks with a cosine learning rate."""
    optimizer = base_weights_training(model, cfg)
    end, chunk = docs[phase_docs[-1]][1], cfg.ttt_chunk_tokens
    num_chunks = math.ceil(end / chunk)
    for c in range(num_chunks):
        train_on_positions(model, optimizer, tokens, c * chunk, min((c + 1) * chunk, end), cfg,
                           cosine_lr(cfg.lora_phase_lr, c, num_chunks), 1, ranks, device, on_train)
    model.requires_grad_(False)


def train_packed(model, tokens, docs, phase_docs, cfg, ranks, device, on_train=None):
    """A phase as the record's global SGD runs it: the phase's documents (each with the BOS that
    ends it) concatenated and cut into ttt_chunk_tokens chunks, the last one skipped, the learning
    rate cosine over chunks. A step takes ttt_batch_seqs seq_len windows of a chunk (a chunk's
    ragged end is dropped) as one packed row, documents cut every seq_len tokens, mean NLL, clip,
    SGD with momentum. The ranks split each chunk's windows into contiguous shares and average
    their gradients, as the record's processes do."""
    if on_train is not None:
        for i in phase_docs:
            on_train(*docs[i])
    stream = torch.cat([tokens[first:end + 1] for first, end in (docs[i] for i in phase_docs)]).long()
    optimizer = base_weights_training(model, cfg)
    params = list(model.parameters())
    for p in params:  # a rank with no rows in a step still joins the all-reduce
        p.grad = torch.zeros_like(p)
    chunk, seq_len, step_seqs = cfg.ttt_chunk_tokens, cfg.seq_len, cfg.ttt_batch_seqs
    num_chunks = math.ceil((len(stream) - 1) / chunk)
    model.train()
    for c in range(num_chunks - 1):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lora_phase_lr, c, num_chunks)
        seqs = chunk // seq_len
        mine = range(seqs * ranks.rank // ranks.world, seqs * (ranks.rank + 1) // ranks.world)
        # Every rank takes as many steps as the largest share needs, to meet in each all-reduce.
        for s in range(0, math.ceil(seqs / ranks.world), step_seqs):
            optimizer.zero_grad(set_to_none=False)
            rows = mine[s:s + step_seqs]
            if rows:
                a, b = c * chunk + rows[0] * seq_len, c * chunk + (rows[-1] + 1) * seq_len
                with autocast(device):
                    loss = model(stream[None, a:b].to(device), stream[None, a + 1:b + 1].to(device), mean=True,
                                 max_doc_len=seq_len)
                loss.backward()
            sum_grads(params, ranks)
            for p in params:
                p.grad.div_(ranks.world)
            torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            optimizer.step()
    model.eval()
    model.requires_grad_(False)


SCHEDULES = {"stream": (stream_schedule, train_prefix), "record": (record_schedule, train_packed)}
"""lora_order: (the batches and phases, how a phase trains the base weights)."""


def lora_ttt(model, tokens, nll, cfg, ranks, device, on_score=None, on_train=None):
    """Write every position's NLL into `nll`. Phases cut the batches into segments; each
    segment's batches are shared among the ranks, and all ranks meet for the phase after it. A
    batch never straddles a phase, so in stream order every document sees the same base weights
    and adapter init whatever the number of ranks: N processes agree with one. In the record's
    order each rank warms its own A over the batches it takes, as the record's processes do."""
    docs = documents(tokens, model.cfg.bos_id)
    schedule, train_phase = SCHEDULES[cfg.lora_order]
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # adapter steps leave the base weights alone
    model.eval()
    fresh = make_adapters(model, cfg, device)
    warm = make_adapters(model, cfg, device) if cfg.lora_order == "record" else None
    for batches, phase_docs in schedule(docs, cfg):
        warmed = False
        for batch in batches[ranks.rank::ranks.world]:
            if warm is not None and len(batch) == cfg.lora_batch_docs:
                # The record keeps one set of adapters for its full batches until the next phase,
                # clearing B but keeping A, trained further by each batch (TTT_WARM_START_A=1).
                adapters = warm.clear_deltas() if warmed else warm.reset(batch)
                warmed = True
            else:
                adapters = fresh.reset(batch)
            adapt_batch(model, tokens, [docs[i] for i in batch], adapters, nll, cfg, device, on_score, on_train)
        if phase_docs:
            train_phase(model, tokens, docs, phase_docs, cfg, ranks, device, on_train)
    for p, flag in zip(model.parameters(), trainable):
        p.requires_grad_(flag)
