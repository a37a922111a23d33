"""runtime/attention.py: every path attends within documents exactly as the dense masked SDPA
path does (FlashAttention's varlen kernel through the reference scripts' stand-in, flex_attention
forward on the CPU)."""

import pytest
import torch

from runtime import attention
from runtime.attention import Documents, causal_attention, flex_document_attention


def test_variable_length_attention_gets_each_documents_segment(monkeypatch):
    """The FlashAttention varlen path (CUDA only) flattens the rows into one stream cut at every row
    start and BOS; here it runs through the reference scripts' stand-in kernel (one causal SDPA
    per segment, bench/reference.py) and must equal the masked SDPA path."""
    from reference import sdpa_flash_attn_varlen_func

    ids = torch.full((2, 20), 5)
    ids[:, ::8] = 1  # BOS at 0, 8 and 16 in each row
    docs = Documents.of_tokens(ids, bos_id=1)
    cu_seqlens, longest = docs.segments()
    assert cu_seqlens.tolist() == [0, 8, 16, 20, 28, 36, 40] and longest == 8
    q, k, v = (torch.randn(2, 20, heads, 16, generator=torch.Generator().manual_seed(heads))
               for heads in (4, 2, 2))
    masked = causal_attention(q, k, v, docs)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", sdpa_flash_attn_varlen_func)
    monkeypatch.setattr(attention, "_flash", lambda q: True)
    assert torch.allclose(causal_attention(q, k, v, docs), masked, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_equals_the_masked_sdpa_path():
    """Compiled GPU code attends within documents through flex_attention and its block mask; on
    rows longer than one 128-token tile, with documents starting inside tiles and across them, it
    must equal the dense masked SDPA path (the CPU runs flex_attention's forward only)."""
    ids = torch.randint(2, 50, (3, 300), generator=torch.Generator().manual_seed(0))
    ids[0, [40, 128, 200]] = 1
    ids[2, 7] = 1  # row 1: one document
    docs = Documents.of_tokens(ids, bos_id=1)
    q, k, v = (torch.randn(3, 300, heads, 16, generator=torch.Generator().manual_seed(heads))
               for heads in (4, 2, 2))
    masked = causal_attention(q, k, v, docs)
    assert torch.allclose(flex_document_attention(q, k, v, docs), masked, atol=1e-5)
    assert docs.block_mask().sparsity() > 0  # tiles above the diagonal and across documents skipped
