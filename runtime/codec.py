"""Weight streams: byte codecs and the decoding of quantized tensors back to floats.

The manifest lists streams (a compressed member each) and tensors. A tensor's payload is a slice
of a decompressed stream:

- enc "intB" (B = 2..8): int8 codes in [-(2^(B-1)-1), 2^(B-1)-1], row-major, plus one fp16 scale
  per row in a scale stream; the weight is codes * scale. Codes are stored a byte each, since
  bit-packing defeats the entropy coder more than it saves.
- enc "fp16": the values themselves.

Streams of fp16 values are byte-shuffled (all low bytes, then all high bytes), as the records do:
the high bytes of similar numbers repeat, and grouping them lets the entropy coder see it.
"""

import lzma

import numpy as np
import torch

from .errors import PgError

LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def compress(codec, data):
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    if codec == "brotli":
        import brotli
        return brotli.compress(data, quality=11, lgwin=24)
    raise PgError(f"unknown codec {codec!r}")


def decompress(codec, data):
    try:
        if codec == "lzma":
            return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        if codec == "brotli":
            import brotli
            return brotli.decompress(data)
    except ImportError:
        raise PgError("this artifact's weights are brotli-compressed: pip install brotli") from None
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


def decode_tensor(entry, streams):
    """One manifest tensor entry -> float32 torch tensor."""
    shape, enc = entry["shape"], entry["enc"]
    if enc == "fp16":
        values = _slice(streams, entry["data"], "<f2").astype(np.float32)
    elif enc.startswith("int"):
        codes = _slice(streams, entry["data"], np.int8).astype(np.float32).reshape(shape[0], -1)
        scales = _slice(streams, entry["scale"], "<f2").astype(np.float32)
        values = codes * scales[:, None]
    else:
        raise PgError(f"unknown tensor encoding {enc!r}")
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
