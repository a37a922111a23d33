"""Causal attention, within documents when asked: FlashAttention where installed (its
variable-length kernel for documents), flex_attention in compiled GPU code with documents, torch's
SDPA otherwise. Every path is a full softmax over the keys a query may see.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:  # FlashAttention 3 on Hopper, else FlashAttention 2, else torch's SDPA.
    from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
except ImportError:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        flash_attn_func = flash_attn_varlen_func = None


def _flash(q):
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


class Documents:
    """Where the documents of a batch of rows start: a row's first token and every bos_id token.
    Attention given one never crosses a start, so no document reads another, whatever the rows
    hold. Built once per forward; each attention backend asks for the form it needs, once."""

    def __init__(self, starts):
        """`starts` (B, T) bool: True where a document starts; column 0 must be True."""
        self.starts = starts
        self._mask = self._block_mask = self._segments = None

    @classmethod
    def of_tokens(cls, ids, bos_id, max_len=0):
        """The documents of token rows; `max_len` > 0 also cuts one every max_len tokens from
        its start (packed rows)."""
        starts = ids == bos_id
        starts[:, 0] = True
        if max_len:
            at = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
            starts = (at - torch.where(starts, at, 0).cummax(1).values) % max_len == 0
        return cls(starts)

    def mask(self):
        """(B, 1, T, T) bool: key s is visible to query t iff s <= t in the same document."""
        if self._mask is None:
            doc = self.starts.cumsum(1)
            T = doc.size(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
            self._mask = (doc[:, :, None] == doc[:, None, :]).logical_and(causal)[:, None]
        return self._mask

    def block_mask(self):
        """mask() as flex_attention's BlockMask: tiles no query of which can see a key are
        skipped, so attention costs what the documents hold, not what the rows hold."""
        if self._block_mask is None:
            doc = self.starts.cumsum(1)

            def same_document_causal(b, h, q, kv):
                return (doc[b, q] == doc[b, kv]) & (kv <= q)
            B, T = doc.shape
            self._block_mask = create_block_mask(same_document_causal, B, None, T, T, device=doc.device)
        return self._block_mask

    def segments(self):
        """(cu_seqlens int32, longest length): the rows flattened into one stream of documents,
        as FlashAttention's variable-length kernel takes them."""
        if self._segments is None:
            flat = self.starts.flatten()
            bounds = torch.cat((flat.nonzero().flatten(), flat.new_full((1,), flat.numel(), dtype=torch.long)))
            self._segments = bounds.int(), int(bounds.diff().max())
        return self._segments


def flex_document_attention(q, k, v, docs):
    """causal_attention within `docs` through flex_attention (forward only on the CPU)."""
    y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=docs.block_mask(),
                       enable_gqa=True)
    return y.transpose(1, 2)


def causal_attention(q, k, v, docs=None):
    """q: (B, T, H, D), k/v: (B, T, Hkv, D) -> (B, T, H, D), causal, full softmax; with `docs`
    (Documents), each query sees only its own document's keys."""
    if docs is None:
        if flash_attn_func is not None and _flash(q):
            out = flash_attn_func(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return y.transpose(1, 2)
    # The variable-length kernel needs the segment boundaries as a host-known length, which a
    # static compiled graph cannot have: compiled GPU code takes flex_attention instead, whose
    # kernel skips the tiles the mask empties. A dynamic graph (the LoRA mode's phases, on packed
    # rows) keeps the dense mask: flex_attention over symbolic lengths is not proven here.
    if torch.compiler.is_compiling():
        if q.is_cuda and isinstance(q.size(1), int):
            return flex_document_attention(q, k, v, docs)
    elif flash_attn_varlen_func is not None and _flash(q):
        cu_seqlens, longest = docs.segments()
        out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens,
                                     longest, longest, causal=True)
        return (out[0] if isinstance(out, tuple) else out).view_as(q)
    # Grouped heads are expanded: SDPA's memory-efficient kernel takes a mask but not enable_gqa.
    group = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=docs.mask())
    return y.transpose(1, 2)
