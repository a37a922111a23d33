"""bench/lora_batching.py: the token positions a batching schedule's forwards hold."""

from lora_batching import forward_positions

from runtime.config import EvalConfig


def test_forwards_hold_fixed_rows_of_the_chunks_width():
    """Chunks of 2, windows up to 4, 2 rows a forward: documents of 4 and 1 tokens in one batch
    run chunk 0 (width 2) together and chunk 1 (width 4) with the short one's row padding; three
    running documents need two forwards of two rows."""
    cfg = EvalConfig(seq_len=4, stride=4, lora_chunk_tokens=2, lora_group_rows=2, lora_batch_docs=3)
    assert forward_positions([[0, 1]], [4, 1], cfg) == (2 * 2 + 2 * 4, 2 * 2 + 1 * 4)
    assert forward_positions([[0, 1, 2]], [2, 2, 2], cfg) == (4 * 2, 3 * 2)
