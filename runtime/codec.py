"""Weight streams: byte codecs and the decoding of quantized tensors back to floats.

The manifest lists streams (a compressed member each) and tensors. A tensor's payload is a slice
of a decompressed stream:

- enc "intB" (B = 2..8): int8 codes in [-(2^(B-1)-1), 2^(B-1)-1], row-major, plus one fp16 scale
  per row in a scale stream; the weight is codes * scale. Codes are stored a byte each, since
  bit-packing defeats the entropy coder more than it saves.
- enc "int8t": int8 codes times one fp32 scale, the entry's "tensor_scale" (small control tensors).
- enc "fp16": the values themselves.

Two optional fields say how intB codes are laid out (builder/artifact/layout.py chooses, by bytes):
"transposed" (1) stores them column-major; "row_order" refers to uint16 row indices, stored row i
being the matrix's row order[i]. Both are undone before the row scales apply.

Optional fields transform the decoded matrix, in this order (builder/quant/transforms.py writes them):
"col_scale" (fp16 per column) divides each column, undoing an activation-aware column scaling;
"rotate" (block size) multiplies by the block-diagonal orthonormal Hadamard matrix, which is its
own inverse; "lqer_a"/"lqer_b" add a low-rank correction A @ B, with A int2 codes times the fp32
"lqer_a_scale" and B int4 codes times fp16 "lqer_b_scale" per "lqer_group" columns. Every
step is elementwise or a fixed sequence of additions, so the builder and the runtime get the same
bits. A field this decoder does not know is an error, never ignored.

Streams are compressed with brotli-11, raw LZMA2 or "rans", our static-model rANS coder for byte
symbols (runtime/rans.py), whichever was smallest. Streams of fp16 values are byte-shuffled (all
low bytes, then all high bytes), as the records do: the high bytes of similar numbers repeat, and
grouping them lets the entropy coder see it.
"""

import lzma
import re

import numpy as np
import torch

from . import rans
from .errors import PgError

LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def compress(codec, data):
    """brotli or LZMA; the rans encoder lives in builder/artifact/entropy.py, since only its decoder ships."""
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    if codec == "brotli":
        import brotli
        return brotli.compress(data, quality=11, lgwin=24)
    raise PgError(f"unknown codec {codec!r}")


def decompress(codec, data):
    try:
        if codec == "rans":
            return rans.decode(data)
        if codec == "lzma":
            return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        if codec == "brotli":
            import brotli
            return brotli.decompress(data)
    except ImportError:
        raise PgError("this artifact's weights are brotli-compressed: pip install brotli") from None
    except PgError:
        raise
    except Exception as e:
        raise PgError(f"a {codec} stream failed to decompress ({e}); the artifact is corrupt") from None
    raise PgError(f"unknown codec {codec!r}")


def byte_shuffle(data, width):
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def byte_unshuffle(data, width):
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


def _slice(streams, ref, dtype):
    index, offset, size = ref
    return np.frombuffer(streams[index], dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=offset)


TENSOR_FIELDS = {"name", "shape", "enc", "data", "scale", "tensor_scale", "col_scale", "rotate",
                 "lqer_a", "lqer_b", "lqer_a_scale", "lqer_b_scale", "lqer_group", "transposed", "row_order"}


def hadamard(x, block):
    """x @ Q, for Q the orthonormal Sylvester Hadamard matrix of size `block` repeated along the
    diagonal (block a power of two dividing x's columns); Q is symmetric and Q @ Q = I."""
    rows, h = x.shape[0], 1
    while h < block:  # one butterfly per bit of the column index
        x = x.reshape(rows, -1, 2, h)
        x = np.stack((x[:, :, 0] + x[:, :, 1], x[:, :, 0] - x[:, :, 1]), 2)
        h *= 2
    return x.reshape(rows, -1) * np.float32(block ** -0.5)


def decode_tensor(entry, streams):
    """One manifest tensor entry -> float32 torch tensor."""
    shape, enc = entry["shape"], entry["enc"]
    unknown = set(entry) - TENSOR_FIELDS
    if unknown:
        raise PgError(f"tensor {entry['name']}: unknown fields {sorted(unknown)}; this artifact needs a newer runtime")

    def f32(key, dtype="<f2"):
        return _slice(streams, entry[key], dtype).astype(np.float32)

    if enc == "fp16":
        values = f32("data")
    elif enc == "int8t":
        values = f32("data", np.int8) * np.float32(entry["tensor_scale"])
    elif re.fullmatch("int[2-8]", enc):
        values = f32("data", np.int8)
        values = values.reshape(-1, shape[0]).T if entry.get("transposed") else values.reshape(shape[0], -1)
        if "row_order" in entry:
            order = _slice(streams, entry["row_order"], "<u2").astype(np.int64)
            if not np.array_equal(np.sort(order), np.arange(shape[0])):
                raise PgError(f"tensor {entry['name']}: its row order is not a permutation; the artifact is corrupt")
            values = values[np.argsort(order)]  # stored row i is row order[i]
        values = values * f32("scale")[:, None]
    else:
        raise PgError(f"unknown tensor encoding {enc!r}; this artifact needs a newer runtime")
    if "col_scale" in entry:
        values = values / f32("col_scale")
    if "rotate" in entry:
        values = hadamard(values, entry["rotate"])
    if "lqer_a" in entry:
        a = f32("lqer_a", np.int8).reshape(shape[0], -1) * np.float32(entry["lqer_a_scale"])
        b = f32("lqer_b", np.int8).reshape(a.shape[1], -1)
        b = b * np.repeat(f32("lqer_b_scale").reshape(len(b), -1), entry["lqer_group"], 1)[:, :b.shape[1]]
        for i in range(len(b)):  # outer products in a fixed order: the same sums on every machine
            values = values + a[:, i, None] * b[i]
    return torch.from_numpy(values.reshape(shape).copy())


def decode_streams(manifest, read_member):
    """Every weight stream decompressed and un-shuffled, checked against its recorded size;
    `read_member(name)` returns a member's bytes."""
    streams = []
    for s in manifest["streams"]:
        raw = decompress(s["codec"], read_member(s["member"]))
        if len(raw) != s["raw_bytes"]:
            raise PgError(f"stream {s['name']}: {len(raw)} bytes after decompression, manifest says {s['raw_bytes']}")
        streams.append(byte_unshuffle(raw, s["shuffle"]) if s.get("shuffle") else raw)
    return streams


def decode_state(manifest, read_member):
    """All tensors of a manifest, as a state dict of float32 tensors."""
    streams = decode_streams(manifest, read_member)
    return {t["name"]: decode_tensor(t, streams) for t in manifest["tensors"]}
