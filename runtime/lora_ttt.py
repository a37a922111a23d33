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

Two choices differ from the record, both to keep every score provably legal:
- Scoring and training use two forwards, not one: the scoring forward runs under no_grad before
  anything has trained on its tokens, which is exactly what `pgbuild verify` instruments (the
  training forward costs about a third more compute).
- Documents are batched in stream order, not longest first: a phase trains the base weights on
  every document scored so far, and had those included documents that come later in the stream,
  earlier scores would depend on later tokens (C1). Padding stays small either way, since all of
  a batch's rows have the same width except those in their document's last chunk.
- Every forward has the same number of rows (`lora_group_rows`, all-zero rows padding the last
  group). When fewer documents run beside a document, its matrix products change shape and round
  differently; later tokens decide how long later documents run, so with a varying row count they
  moved earlier scores by up to 1e-5 nats, which `pgbuild verify` flags.
"""

import math

import numpy as np
import torch
from torch import nn

from .precision import autocast
from .ttt import cosine_lr, train_on_positions


class LoRA(nn.Module):
    """A low-rank delta per document: row r of a batch gets x @ A[d] @ B[d] * scale, d = rows[r].
    A ~ U(+-1/sqrt(in)), B = 0, so a fresh adapter changes nothing."""

    def __init__(self, in_dim, out_dim, rank, scale, generators):
        """`generators`: one per document, so a document's init never depends on its batch."""
        super().__init__()
        bound = in_dim ** -0.5
        self.a = nn.Parameter(torch.stack([torch.rand(in_dim, rank, generator=g) for g in generators]) * (2 * bound)
                              - bound)
        self.b = nn.Parameter(torch.zeros(len(generators), rank, out_dim))
        self.scale = scale
        self.rows = None

    def forward(self, x):
        a, b = self.a[self.rows].to(x.dtype), self.b[self.rows].to(x.dtype)
        return (x @ a) @ b * self.scale


class DocAdapters(nn.Module):
    """Adapters for every virtual layer's q, k, v, o and MLP and for the head, one set per
    document, in the layout GPT.forward(adapters=...) reads."""

    def __init__(self, model_cfg, virtual_layers, doc_ids, cfg):
        """`doc_ids`: the documents' indices in the stream, which seed their adapters' init."""
        super().__init__()
        generators = [torch.Generator().manual_seed(i) for i in doc_ids]
        d, kv = model_cfg.model_dim, model_cfg.num_kv_heads * model_cfg.head_dim

        def lora(in_dim, out_dim):
            return LoRA(in_dim, out_dim, cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank, generators)

        self.layers = nn.ModuleList(nn.ModuleDict(dict(q=lora(d, d), k=lora(d, kv), v=lora(d, kv), o=lora(d, d),
                                                       mlp=lora(d, d)))
                                    for _ in range(virtual_layers))
        self.head = lora(d, model_cfg.vocab_size)

    def select(self, rows):
        """Which document (index in this batch) each row of the next forward belongs to."""
        for module in self.modules():
            if isinstance(module, LoRA):
                module.rows = rows


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


def select_rows(adapters, docs, num_rows, device):
    """Row r uses document docs[r]'s adapters; padding rows use document 0's, to no effect (they
    are never scored and their loss weight is zero)."""
    adapters.select(torch.tensor(list(docs) + [0] * (num_rows - len(docs)), device=device))


def accumulate_adapter_grads(model, adapters, x, y, rows, device):
    """Add the gradient of each row's mean NLL over its chunk (its last chunk end - chunk start
    columns) to its document's adapters. Summing per-document means keeps the documents'
    gradients apart; padding rows weigh nothing."""
    with autocast(device):
        losses = model(x, y, adapters=adapters)
    mask = torch.zeros_like(losses)
    for j, (start, chunk_start, _) in enumerate(rows):
        mask[j, chunk_start - start:] = 1
    ((losses * mask).sum(1) / mask.sum(1).clamp(min=1)).sum().backward()


def adapt_batch(model, tokens, docs, first_doc, nll, cfg, device, on_score=None, on_train=None):
    """Score `docs` (the stream's documents first_doc, first_doc+1, ...) chunk by chunk, each
    document adapting its own LoRA after each chunk but its last. The documents still running
    go through forwards of exactly `lora_group_rows` rows, in stream order, so a document's row
    count and place in its forward depend on earlier documents only."""
    doc_ids = range(first_doc, first_doc + len(docs))
    adapters = DocAdapters(model.cfg, len(model.cfg.layer_order(model.looping)), doc_ids, cfg).to(device)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=cfg.lora_lr, betas=cfg.lora_betas, eps=cfg.lora_eps,
                                  weight_decay=cfg.lora_weight_decay)
    chunk, lengths = cfg.lora_chunk_tokens, [end - first for first, end in docs]
    num_rows = min(cfg.lora_group_rows, cfg.lora_batch_docs)
    for c in range(math.ceil(max(lengths) / chunk)):
        width = min((c + 1) * chunk, cfg.seq_len)
        active = [i for i, n in enumerate(lengths) if n > c * chunk]
        windows = {i: chunk_window(docs[i], c, chunk, cfg.seq_len) for i in active}
        for group in groups(active, num_rows):
            rows = [windows[i] for i in group]
            x, y = window_batch(tokens, rows, num_rows, width, device)
            select_rows(adapters, group, num_rows, device)
            with torch.no_grad(), autocast(device):
                scores = model(x, y, adapters=adapters)
            for r, (start, chunk_start, end) in enumerate(rows):
                nll[chunk_start:end] = scores[r, chunk_start - start:end - start]
                if on_score is not None:
                    on_score(chunk_start, end)
        # Documents still mid-way (their rows always full width) train on the chunk just scored.
        training = [i for i in active if windows[i][2] < docs[i][1]]
        if not training:
            continue
        optimizer.zero_grad(set_to_none=True)
        for group in groups(training, num_rows):
            rows = [windows[i] for i in group]
            if on_train is not None:
                for start, _, end in rows:
                    on_train(start, end)
            x, y = window_batch(tokens, rows, num_rows, width, device)
            select_rows(adapters, group, num_rows, device)
            accumulate_adapter_grads(model, adapters, x, y, rows, device)
        optimizer.step()


def train_base(model, tokens, end, cfg, ranks, device, on_train=None):
    """One phase: an SGD pass over positions [0, end) (already scored), cosine over chunks."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.lora_phase_lr, momentum=cfg.ttt_momentum)
    chunk = cfg.ttt_chunk_tokens
    num_chunks = math.ceil(end / chunk)
    for c in range(num_chunks):
        train_on_positions(model, optimizer, tokens, c * chunk, min((c + 1) * chunk, end), cfg,
                           cosine_lr(cfg.lora_phase_lr, c, num_chunks), 1, ranks, device, on_train)
    for p in params:
        p.requires_grad_(False)


def lora_ttt(model, tokens, nll, cfg, ranks, device, on_score=None, on_train=None):
    """Write every position's NLL into `nll`. Phase boundaries cut the documents into segments;
    each segment's batches are shared among the ranks, and all ranks meet for the phase after it.
    A batch never straddles a boundary, so every document sees the same base weights, batch and
    adapter init whatever the number of ranks: N processes agree with one."""
    docs = documents(tokens, model.cfg.bos_id)
    ends = phase_ends(cfg, len(docs))
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # adapter steps leave the base weights alone
    model.eval()
    for first, end in zip([0] + ends, ends + [len(docs)]):
        batches = range(first, end, cfg.lora_batch_docs)
        for start in ranks.share(batches):
            stop = min(start + cfg.lora_batch_docs, end)
            adapt_batch(model, tokens, docs[start:stop], start, nll, cfg, device, on_score, on_train)
        if end in ends:
            train_base(model, tokens, docs[end - 1][1], cfg, ranks, device, on_train)
    for p, flag in zip(model.parameters(), trainable):
        p.requires_grad_(flag)
