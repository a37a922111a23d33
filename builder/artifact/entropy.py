"""Encoder of the "rans" codec (runtime/rans.py decodes it and documents the layout).

The model is static: per context, the stream's own symbol counts, rounded to frequencies that sum
to 2^15 while losing as few bits as possible. The encoder tries 1, 2, 4 and 8 contexts and keeps
the smallest output, so a richer model is used only where it pays for its tables.
"""

import numpy as np

from runtime.rans import LOW, MAX_STEPS, PROB_BITS, context_of

CONTEXT_CHOICES = (1, 2, 4, 8)
STEPS_PER_LANE = 8192
"""Symbols per lane: each lane costs about 2 bytes of final state, and each step one round of
numpy calls in the decoder, so this trades bytes for decode time (16 M symbols: 2,048 lanes)."""


def normalize(counts):
    """Integer frequencies summing to 2^PROB_BITS, >= 1 wherever a count is, that cost the counted
    symbols the fewest bits: start from the rounded proportions, then move single units
    where they gain the most (or lose the least)."""
    counts = np.asarray(counts, np.float64)
    total = 1 << PROB_BITS
    present = counts > 0
    freq = np.where(present, np.maximum(1, np.round(counts * total / counts.sum())), 0).astype(np.int64)
    while freq.sum() != total:
        if freq.sum() < total:  # give a unit where log(f+1) - log(f) gains the most
            gain = np.where(present, counts * np.log2((freq + 1) / np.maximum(freq, 1)), -np.inf)
            freq[np.argmax(gain)] += 1
        else:  # take a unit where it costs the least, never below 1
            loss = np.where(freq > 1, counts * np.log2(np.maximum(freq, 2) / np.maximum(freq - 1, 1)), np.inf)
            freq[np.argmin(loss)] -= 1
    return freq


def lanes_for(n):
    return max(1, -(-n // STEPS_PER_LANE), -(-n // MAX_STEPS))


def lane_order(n, lanes):
    """Index of the symbol each (step, lane) codes, as a (steps, lanes) array with -1 where the
    last step is short: lane k holds a contiguous run, the first n % lanes lanes one longer."""
    steps = -(-n // lanes)
    short = lanes * steps - n  # lanes that have one symbol fewer, at the end
    lengths = np.full(lanes, steps)
    lengths[lanes - short:] -= 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    index = starts[None, :] + np.arange(steps)[:, None]
    return np.where(np.arange(steps)[:, None] < lengths[None, :], index, -1)


def _table_bytes(freq):
    present = freq > 0
    return np.packbits(present, bitorder="little").tobytes() + (freq[present] - 1).astype("<u2").tobytes()


def encode_with(data, contexts):
    """The rans stream of `data` with a fixed number of contexts."""
    symbols = np.frombuffer(data, np.uint8).astype(np.int64)
    n = symbols.size
    if n == 0:
        return bytes(7)
    lanes = lanes_for(n)
    order = lane_order(n, lanes)
    grid = np.where(order >= 0, symbols[np.maximum(order, 0)], 0)
    ctx = np.zeros_like(grid)
    if contexts > 1:
        ctx[1:] = context_of(contexts)[grid[:-1]]
    valid = order >= 0
    counts = np.zeros((contexts, 256), np.int64)
    np.add.at(counts, (ctx[valid], grid[valid]), 1)
    freq = np.zeros_like(counts)
    for c in range(contexts):
        if counts[c].any():
            freq[c] = normalize(counts[c])
        else:  # an unused context still needs a table that decodes; the cheapest is one symbol
            freq[c, 0] = 1 << PROB_BITS
    cum = np.cumsum(freq, 1) - freq
    x = np.full(lanes, LOW, np.int64)
    chunks = []
    for step in range(grid.shape[0] - 1, -1, -1):  # rANS encodes backwards
        k = int(valid[step].sum())
        state, s, c = x[:k], grid[step, :k], ctx[step, :k]
        f, start = freq[c, s], cum[c, s]
        emit = state >= f << (32 - PROB_BITS)  # the state would leave [2^16, 2^32) after coding
        chunks.append((state[emit] & 0xFFFF)[::-1])  # reversed below with everything else
        state = np.where(emit, state >> 16, state)
        x[:k] = ((state // f) << PROB_BITS) + state % f + start
    words = np.concatenate(chunks)[::-1] if chunks else np.zeros(0, np.int64)
    header = n.to_bytes(4, "little") + lanes.to_bytes(2, "little") + bytes([contexts])
    return (header + b"".join(_table_bytes(f) for f in freq) + x.astype("<u4").tobytes()
            + words.astype("<u2").tobytes())


def encode(data):
    """The smallest rans stream of `data` over the context choices."""
    return min((encode_with(data, c) for c in CONTEXT_CHOICES), key=len)
