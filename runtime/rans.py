"""Decoder of the "rans" codec: a static-model rANS coder for streams of byte symbols.

The weight streams hold int8 codes whose symbols are close to independent, so a coder that spends
exactly the model's -log2 p per symbol beats the LZ codecs, which pay for matches that rarely
exist. builder/artifact/entropy.py is the encoder; this module is the only part that ships.

Layout (little-endian): u32 symbol count N, u16 lanes K, u8 contexts C, then C frequency tables,
K u32 final lane states, and the u16 renormalization words. A table is a 256-bit presence bitmap
and, for each present symbol in byte order, its frequency minus one as u16; the frequencies of a
table sum to 2^15 (with 2^16 the state would keep too few bits above the table's precision and
lose more to rounding than the finer table gains). Each lane codes a contiguous run of the stream
(the first N % K lanes one symbol more than the rest); lanes run in lockstep so numpy decodes K
symbols per step, and at each step the lanes that renormalize take the next words in lane order.
A symbol's table is chosen by the magnitude of the previous symbol of its run (`context_of`); a
run's first symbol uses table 0.

A lane's state lives in [2^16, 2^32): decoding one symbol leaves it at least 2, so one 16-bit word
always restores it. Decoding must end with every lane back at 2^16 and every word consumed; any
other ending, a table that does not sum to 2^15 or a word stream that runs dry means the data are
corrupt.
"""

import numpy as np

from .errors import PgError

PROB_BITS = 15
LOW = 1 << 16
MAX_SYMBOLS = 1 << 28
MAX_STEPS = 1 << 16
"""The encoder uses enough lanes to stay within this many steps, which bounds the decoder's loop."""
MAX_CONTEXTS = 8


def context_of(contexts):
    """Byte symbol -> the table of the symbol after it: the signed code's magnitude, capped."""
    return np.minimum(np.abs(np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int64)), contexts - 1)


def _fail(why):
    raise PgError(f"a rans stream is corrupt: {why}")


def _tables(data, pos, contexts):
    """(frequencies (C, 256), position after the tables)."""
    freq = np.zeros((contexts, 256), np.int64)
    for c in range(contexts):
        if pos + 32 > len(data):
            _fail("its frequency tables are truncated")
        present = np.unpackbits(np.frombuffer(data, np.uint8, 32, pos), bitorder="little").astype(bool)
        count = int(present.sum())
        pos += 32
        if pos + 2 * count > len(data):
            _fail("its frequency tables are truncated")
        freq[c, present] = np.frombuffer(data, "<u2", count, pos).astype(np.int64) + 1
        pos += 2 * count
        if freq[c].sum() != 1 << PROB_BITS:
            _fail("a frequency table does not sum to 2^15")
    return freq, pos


def decode(data):
    """The bytes a rans stream encodes; PgError if it is malformed."""
    data = bytes(data)
    if len(data) < 7:
        _fail("its header is truncated")
    n, lanes, contexts = int.from_bytes(data[:4], "little"), int.from_bytes(data[4:6], "little"), data[6]
    if n == 0:
        return b""
    if not (n <= MAX_SYMBOLS and 1 <= lanes and 1 <= contexts <= MAX_CONTEXTS and -(-n // lanes) <= MAX_STEPS):
        _fail(f"its header ({n} symbols, {lanes} lanes, {contexts} contexts) is out of range")
    freq, pos = _tables(data, 7, contexts)
    if pos + 4 * lanes > len(data) or (len(data) - pos) % 2:
        _fail("its lane states or words are truncated")
    x = np.frombuffer(data, "<u4", lanes, pos).astype(np.int64)
    words = np.frombuffer(data, "<u2", offset=pos + 4 * lanes).astype(np.int64)
    if x.min() < LOW:
        _fail("a lane state is out of range")
    cum = (np.cumsum(freq, 1) - freq).ravel()
    lut = np.concatenate([np.repeat(np.arange(256, dtype=np.int64), f) for f in freq])
    freq = freq.ravel()
    ctx, context = np.zeros(lanes, np.int64), context_of(contexts)
    steps = -(-n // lanes)
    full = n - (steps - 1) * lanes  # lanes with a symbol at the last step
    out = np.empty((steps, lanes), np.uint8)
    mask, read = (1 << PROB_BITS) - 1, 0
    for step in range(steps):
        k = lanes if step < steps - 1 else full
        state, c = x[:k], ctx[:k]
        slot = state & mask
        s = lut[(c << PROB_BITS) + slot]
        i = (c << 8) + s
        state = freq[i] * (state >> PROB_BITS) + slot - cum[i]
        low = state < LOW
        need = int(np.count_nonzero(low))
        if read + need > len(words):
            _fail("its words ran out before its symbols did")
        state[low] = (state[low] << 16) | words[read:read + need]
        read += need
        x[:k] = state
        out[step, :k] = s
        if contexts > 1:
            ctx[:k] = context[s]
    if read != len(words) or (x != LOW).any():
        _fail("it does not end where its encoder started")
    return out[:, :full].T.tobytes() + out[:-1, full:].T.tobytes()
