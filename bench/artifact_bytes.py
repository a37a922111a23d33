"""Where an artifact's bytes go, against the records' weight format.

    python bench/artifact_bytes.py artifact.py [--streams]

Prints: file size, container overhead (file minus member payloads), runtime code bytes, the
time the runtime takes to verify every member and decode the weights into its model (what
`python artifact.py eval` does before scoring, one process on the CPU), and the weight payload against (a) the
records' scheme on the same quantized codes — torch.save of the
int8 codes and fp16 scales, byte-shuffled, brotli-11 —, (b) where `lrzip` is on the PATH, the
2026-04-27 record's per-group scheme, run by its own `_serialize_pergroup` (each matrix kind's
codes of every layer in one lrzip -L 9 stream, rows of three kinds similarity-sorted and
transposed; scales and the rest torch.save + brotli), and (c) the order-0 entropy of the symbols.
With --streams, also every integer code stream under brotli-11 / LZMA / rans, as quantized and in
greedy row order transposed (+ its row orders' bytes), and the rans decode time of 16 M symbols
drawn from the artifact's own int6 code distribution.
"""

import io
import os
import sys
import time
import zipfile

import brotli
import numpy as np
import torch

from builder.artifact.layout import RowOrders, nn_columns
from builder.artifact.pack import compress
from runtime.api import load_model
from runtime.artifact import Artifact
from runtime.codec import decode_streams
from runtime.rans import decode as rans_decode

CODECS = ("brotli", "lzma", "rans")


def order0_bytes(symbols):
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * symbols.size / 8)


def byte_shuffle(data, stride=2):
    """The records' transform: b'BSHF' + stride + every stride-th byte, for each phase."""
    return b"BSHF" + bytes([stride]) + b"".join(data[i::stride] for i in range(stride))


def tensor_codes(t, streams):
    """A tensor's int8 codes in row-major order, whatever layout the packer chose."""
    index, offset, nbytes = t["data"]
    rows = t["shape"][0]
    q = np.frombuffer(streams[index], np.int8, nbytes, offset)
    q = q.reshape(-1, rows).T if t.get("transposed") else q.reshape(rows, -1)
    if "row_order" in t:
        i, o, n = t["row_order"]
        q = q[np.argsort(np.frombuffer(streams[i], "<u2", n // 2, o))]
    return np.ascontiguousarray(q).ravel()


def stream_report(manifest, streams):
    """Bytes of every integer code stream per codec and layout, and its order-0 entropy."""
    print(f"\n{'stream':<15} {'symbols':>10} {'order-0':>10} " + " ".join(f"{c:>9}" for c in CODECS)
          + "  | " + " ".join(f"g+T {c:>5}" for c in CODECS) + f" {'orders':>7}")
    int6 = []
    for index, s in enumerate(manifest["streams"]):
        mine = [t for t in manifest["tensors"] if t["data"][0] == index and t["enc"].startswith("int")]
        if not mine or s["name"].endswith((".fp16", ".u16")):
            continue
        entries = [dict(t, data=[0, sum(u["data"][2] for u in mine[:k]), t["data"][2]]) for k, t in enumerate(mine)]
        for e in entries:
            e.pop("transposed", None), e.pop("row_order", None)
        raw = b"".join(tensor_codes(t, streams).tobytes() for t in mine)
        moved, orders = nn_columns(raw, entries, RowOrders())
        order_bytes = min(len(compress(c, b"".join(o.astype("<u2").tobytes() for o in orders.values())))
                          for c in ("brotli", "lzma")) if orders else 0
        plain = [len(compress(c, raw)) for c in CODECS]
        greedy = [len(compress(c, moved)) for c in CODECS]
        symbols = np.frombuffer(raw, np.int8)
        if s["name"].endswith("int6"):
            int6.append(symbols)
        print(f"{s['name']:<15} {len(raw):>10,} {order0_bytes(symbols):>10,.0f} " + " ".join(f"{b:>9,}" for b in plain)
              + "  | " + " ".join(f"{b:>9,}" for b in greedy) + f" {order_bytes:>7,}", flush=True)
    if int6:
        codes = np.concatenate(int6)
        synthetic = np.random.default_rng(0).choice(codes, 16_000_000).tobytes()
        t0 = time.perf_counter()
        encoded = compress("rans", synthetic)
        t1 = time.perf_counter()
        assert rans_decode(encoded) == synthetic
        t2 = time.perf_counter()
        print(f"\nrans, 16,000,000 symbols drawn from the int6 codes: {len(encoded):,} B "
              f"(order-0 {order0_bytes(np.frombuffer(synthetic, np.int8)):,.0f}), encode {t1 - t0:.1f} s, "
              f"decode {t2 - t1:.2f} s")


def r0427_pergroup_bytes(codes, scales, passthrough):
    """(bytes, seconds) of the 2026-04-27 record's per-group lrzip serialization of these codes,
    by its own code, under its tensor names."""
    import shutil
    import tempfile

    from reference import load_reference_module

    from builder.train.importer import _record_name

    if shutil.which("lrzip") is None:
        return None
    ref = load_reference_module("r0427")
    result = {}
    for name, q in codes.items():
        result[_record_name(name) + ".q"] = q
        result[_record_name(name) + ".scale"] = scales[name].half()
    result.update({_record_name(name): t for name, t in passthrough.items()})
    num_layers = 1 + max(int(n.split(".")[1]) for n in codes if n.startswith("blocks."))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        blob = ref._serialize_pergroup(result, {}, num_layers, tmp)
    return len(blob), time.perf_counter() - t0


def decode_seconds(path):
    """Wall seconds to open the artifact, check every member's SHA-256 and build the model with
    its decoded weights, as the runtime does before scoring."""
    t0 = time.perf_counter()
    art = Artifact(path).verify()
    load_model(art.manifest, art.read, torch.device("cpu"))
    return time.perf_counter() - t0


def main(path, streams_too=False):
    seconds = decode_seconds(path)
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
            q = tensor_codes(t, streams)
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
    pergroup = r0427_pergroup_bytes(codes, scales, passthrough)
    if pergroup is not None:
        rows.insert(-1, ("r0427's scheme: per-group lrzip -L 9 + brotli remainder", pergroup[0]))
    for label, value in rows:
        print(f"{label:<56} {value:>12,}")
    print(f"{'pgbuild / records scheme':<56} {weights_packed / records:>12.4f}")
    if pergroup is not None:
        print(f"{'pgbuild / r0427 scheme':<56} {weights_packed / pergroup[0]:>12.4f}")
        print(f"{'r0427 scheme: serialize time':<56} {pergroup[1]:>10.2f} s")
    print(f"{'pgbuild / order-0 entropy':<56} {weights_packed / entropy:>12.4f}")
    print(f"{'runtime: verify members + decode weights into the model':<56} {seconds:>10.2f} s")
    if streams_too:
        stream_report(manifest, streams)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--streams"):
        sys.exit(__doc__)
    main(sys.argv[1], len(sys.argv) == 3)
