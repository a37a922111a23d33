"""Where an artifact's bytes go, against the records' weight format.

    python bench/artifact_bytes.py artifact.py

Prints: file size, container overhead (file minus member payloads), runtime code bytes, and the
weight payload against (a) the records' scheme on the same quantized codes — torch.save of the
int8 codes and fp16 scales, byte-shuffled, brotli-11 — and (b) the order-0 entropy of the symbols.
"""

import io
import os
import sys
import zipfile

import brotli
import numpy as np
import torch

from runtime.artifact import Artifact
from runtime.codec import decode_streams


def order0_bytes(symbols):
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * symbols.size / 8)


def byte_shuffle(data, stride=2):
    """The records' transform: b'BSHF' + stride + every stride-th byte, for each phase."""
    return b"BSHF" + bytes([stride]) + b"".join(data[i::stride] for i in range(stride))


def main(path):
    art = Artifact(path).verify()
    manifest = art.manifest
    size = os.path.getsize(path)
    infos = zipfile.ZipFile(path).infolist()
    payload = sum(i.compress_size for i in infos)
    streams = decode_streams(manifest, art.read)
    weights_packed = sum(len(art.read(s["member"])) for s in manifest["streams"])

    codes, scales, passthrough, entropy = {}, {}, {}, 0.0
    for t in manifest["tensors"]:
        index, offset, nbytes = t["data"]
        if t["enc"] == "fp16":
            values = np.frombuffer(streams[index], "<f2", nbytes // 2, offset)
            passthrough[t["name"]] = torch.from_numpy(values.copy()).view(t["shape"])
            entropy += order0_bytes(values.view(np.uint16))
        else:
            q = np.frombuffer(streams[index], np.int8, nbytes, offset)
            si, so, sn = t["scale"]
            s = np.frombuffer(streams[si], "<f2", sn // 2, so)
            codes[t["name"]] = torch.from_numpy(q.copy()).view(t["shape"])
            scales[t["name"]] = torch.from_numpy(s.copy())
            entropy += order0_bytes(q) + order0_bytes(s.view(np.uint16))
    buf = io.BytesIO()
    torch.save({"w": codes, "m": {"scales": scales, "passthrough": passthrough}}, buf)
    records = len(brotli.compress(byte_shuffle(buf.getvalue()), quality=11))

    rows = [
        ("file bytes", size),
        ("member payload bytes", payload),
        ("container overhead (file - payload)", size - payload),
        ("code bytes (__main__.py + runtime.xz, compressed)",
         sum(i.compress_size for i in infos if i.filename in ("__main__.py", "runtime.xz"))),
        ("manifest bytes (compressed)", next(i.compress_size for i in infos if i.filename == "manifest.json")),
        ("weight stream bytes (pgbuild)", weights_packed),
        ("records' scheme: torch.save + byte-shuffle + brotli-11", records),
        ("order-0 entropy of the same symbols", round(entropy)),
    ]
    for label, value in rows:
        print(f"{label:<56} {value:>12,}")
    print(f"{'pgbuild / records scheme':<56} {weights_packed / records:>12.4f}")
    print(f"{'pgbuild / order-0 entropy':<56} {weights_packed / entropy:>12.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
