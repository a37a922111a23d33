"""Writing the artifact: preamble + zip(bootstrap, manifest, runtime.xz, weight streams).

Weight streams group tensors by role and encoding (all layers' MLP fc codes at int6 form one
stream, say), since similar symbols side by side compress best; each stream is compressed with
every configured codec and the smallest output is kept, and each stream of integer codes is also
tried with its rows in greedy nearest-neighbour order and transposed (builder/artifact/layout.py). The
code members come from builder/artifact/code.py.
"""

import hashlib
import io
import json
import multiprocessing
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from builder.artifact.entropy import encode as rans_encode
from builder.artifact.layout import RowOrders, nn_columns, reorderable
from builder.quant.primitives import matrix_group
from runtime.artifact import BOOTSTRAP, MANIFEST
from runtime.codec import byte_shuffle
from runtime.codec import compress as lz_compress
from runtime.threads import free_cores

FORMAT_VERSION = 1
EXTENSIONS = {"brotli": "br", "lzma": "xz", "rans": "rans"}
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps make packing deterministic

PREAMBLE = b"""#!/usr/bin/env python3
# pgbuild artifact: a Parameter Golf language model (evaluation code + compressed weights) in one file.
# Run `python artifact.py eval --data DIR [--mode standard|sliding|ttt]` or `python artifact.py info`.
# What follows is a zip archive (CPython runs its __main__.py); `pgbuild audit` reports its bytes.
import sys
print("error: artifact damaged: its zip archive is missing; rebuild or re-download it", file=sys.stderr)
sys.exit(2)
# artifact damaged (its zip archive is truncated or corrupt): rebuild or re-download it """
"""Python runs the zip's __main__.py and never this text, unless the archive is gone: then the
`print` line speaks, or, if binary bytes remain, Python's "null bytes" error quotes the last line."""


def data_stream(encoded):
    """Which weight stream a tensor's main payload goes to: codes by group and bit width."""
    if encoded.scales is None:
        return "control.fp16"
    return f"{matrix_group(encoded.name)}.{encoded.enc}"


def build_streams(encoded_tensors):
    """Concatenate payloads into streams; returns (raw streams, manifest tensor entries)."""
    raw, refs = {}, []

    def place(array, stream):
        buf = raw.setdefault(stream, bytearray())
        refs.append([stream, len(buf), array.nbytes])
        buf += array.tobytes()
        return refs[-1]

    entries = [e.manifest_entry(lambda array, stream, e=e: place(array, stream or data_stream(e)))
               for e in encoded_tensors]
    index = {name: i for i, name in enumerate(raw)}
    for ref in refs:  # the manifest refers to streams by index
        ref[0] = index[ref[0]]
    return {k: bytes(v) for k, v in raw.items()}, entries


def compress(codec, raw):
    """One stream compressed with one codec: "rans" is ours (builder/artifact/entropy.py), the rest are
    the standard codecs the runtime also wraps."""
    return rans_encode(raw) if codec == "rans" else lz_compress(codec, raw)


PARALLEL_MIN_BYTES = 1 << 20
"""Below this much raw data a pool costs more than it saves."""
SAMPLE_PIECES = 4
CODEC_MARGIN = 0.01
"""A codec whose sample comes out within this fraction of the best one's is tried on the whole
stream too: the sample decides only where it is clear."""


def _compress_job(job):
    """One worker's job: (codec, data) of one stream under one codec."""
    codec, raw = job
    return codec, compress(codec, raw)


def codec_sample(raw, sample_bytes):
    """`SAMPLE_PIECES` evenly spaced slices of `raw`, `sample_bytes` in all, or None when the
    stream is too small for a sample to save anything (under 4 x sample_bytes)."""
    if not sample_bytes or len(raw) < 4 * sample_bytes:
        return None
    piece = sample_bytes // SAMPLE_PIECES
    step = (len(raw) - piece) // (SAMPLE_PIECES - 1)
    return b"".join(raw[i * step:i * step + piece] for i in range(SAMPLE_PIECES))


def contenders(sizes):
    """The codecs, in their configured order, whose sample size is within CODEC_MARGIN of the
    smallest: {codec: sample bytes} -> [codec]."""
    best = min(sizes.values())
    return [codec for codec, size in sizes.items() if size <= best * (1 + CODEC_MARGIN)]


class StreamCompressor:
    """Compresses each stream with every codec, keeps the smallest, and remembers results so
    that repacking after a small change recompresses only the streams that changed.

    `prefetch` compresses many streams at once in `workers` processes (default: one per core this
    process may use). Packing is rank 0's job while the other ranks wait, so the host's cores are
    free; the bytes are the same as compressing one stream after another.

    A stream of at least 4 x `sample_bytes` is first compressed as a sample (`codec_sample`) with
    every codec, and in full only with the codecs that came out within CODEC_MARGIN of the best
    (`contenders`): most often one, instead of all three on megabytes. 0 tries every codec on
    every whole stream."""

    def __init__(self, codecs, reorder_groups=(), workers=None, parallel_min_bytes=PARALLEL_MIN_BYTES,
                 sample_bytes=0):
        self.codecs = tuple(codecs)
        self.reorder_groups = tuple(reorder_groups)
        self.workers = workers or free_cores()
        self.parallel_min_bytes = parallel_min_bytes
        self.sample_bytes = sample_bytes
        self._cache = {}
        self.row_orders = RowOrders()

    def _codecs_for(self, raws, run):
        """[[codec] to compress each of `raws` with in full], samples compressed through `run`
        (a map over (codec, data) jobs)."""
        samples = [codec_sample(raw, self.sample_bytes) for raw in raws]
        jobs = [(codec, sample) for sample in samples if sample is not None for codec in self.codecs]
        sizes = iter(len(data) for _, data in run(jobs))
        return [list(self.codecs) if sample is None else contenders({c: next(sizes) for c in self.codecs})
                for sample in samples]

    def _keep_smallest(self, key, results):
        self._cache[key] = min(results, key=lambda c: len(c[1]))  # the first codec wins a tie

    def __call__(self, raw):
        key = hashlib.sha256(raw).digest()
        if key not in self._cache:
            codecs = self._codecs_for([raw], lambda jobs: map(_compress_job, jobs))[0]
            self._keep_smallest(key, [_compress_job((codec, raw)) for codec in codecs])
        return self._cache[key]

    def prefetch(self, raws):
        """Compress every stream of `raws` not compressed yet, in parallel."""
        todo = {}
        for raw in raws:
            key = hashlib.sha256(raw).digest()
            if key not in self._cache:
                todo.setdefault(key, raw)
        # fork: the workers need only this module's numpy and stdlib codecs, and start at once
        # (where there is no fork, and for small work, the streams are compressed in turn).
        if self.workers < 2 or sum(len(raw) for raw in todo.values()) < self.parallel_min_bytes \
                or "fork" not in multiprocessing.get_all_start_methods():
            return
        try:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(self.workers, len(todo) * len(self.codecs)), mp_context=context) as pool:
                def run(jobs):
                    # Largest first, so the longest jobs start at once.
                    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1]))
                    done = dict(zip(order, pool.map(_compress_job, [jobs[i] for i in order])))
                    return [done[i] for i in range(len(jobs))]

                raws = list(todo.values())
                codecs = self._codecs_for(raws, run)
                done = iter(run([(codec, raw) for raw, mine in zip(raws, codecs) for codec in mine]))
        except BrokenProcessPool:  # a worker was killed (out of memory, say): compress in turn instead
            return
        for key, mine in zip(todo, codecs):
            self._keep_smallest(key, [next(done) for _ in mine])


def order_bytes(orders):
    return b"".join(o.astype("<u2").tobytes() for o in orders.values())


def layout_candidates(name, raw, entries, compressor):
    """[(raw, {entry index: row order})] for stream `name`: as quantized (first, so it wins a
    tie) and, for the compressor's reorder groups, in greedy row order and transposed."""
    if name.endswith(".fp16"):
        return [(byte_shuffle(raw, 2), {})]
    found = [(raw, {})]
    if name.split(".")[0] in compressor.reorder_groups and any(reorderable(e) for e in entries):
        found.append(nn_columns(raw, entries, compressor.row_orders))
    return found


def stored_size(candidate, compressor):
    """Compressed bytes of a layout candidate, its row orders counted."""
    raw, orders = candidate
    return len(compressor(raw)[1]) + (len(compressor(order_bytes(orders))[1]) if orders else 0)


def build_artifact(encoded_tensors, info, compressor, code):
    """The artifact's bytes. `info` holds the manifest's descriptive fields (model, eval, train,
    tokenizer_sha256, recipe, provenance, metrics); `code` (builder/artifact/code.py) is what it
    carries: this pgbuild's (builder/artifact/sources.py) or, retraining, the running artifact's."""
    raw_streams, tensors = build_streams(encoded_tensors)
    entries = [[t for t in tensors if t["data"][0] == index] for index in range(len(raw_streams))]
    candidates = [layout_candidates(name, raw, mine, compressor)
                  for (name, raw), mine in zip(raw_streams.items(), entries)]
    compressor.prefetch([part for found in candidates for raw, orders in found
                         for part in ([raw, order_bytes(orders)] if orders else [raw])])
    members = dict(code.members)
    streams, row_orders = [], bytearray()
    for name, found, mine in zip(raw_streams, candidates, entries):
        stream = {"name": name, **({"shuffle": 2} if name.endswith(".fp16") else {})}
        # Strictly smaller wins, so a tie keeps the stream as quantized (min keeps the first).
        raw, orders = min(found, key=lambda candidate: stored_size(candidate, compressor))
        for i, order in orders.items():
            mine[i].update(transposed=1, row_order=[len(raw_streams), len(row_orders), order.nbytes])
            row_orders += order.astype("<u2").tobytes()
        codec, data = compressor(raw)
        _add_stream(members, streams, stream, raw, codec, data)
    if row_orders:
        codec, data = compressor(bytes(row_orders))
        _add_stream(members, streams, {"name": "row_order.u16"}, row_orders, codec, data)
    return write_container(dict(format=FORMAT_VERSION, pgbuild=code.version, **info, streams=streams, tensors=tensors),
                           members, code)


def write_container(manifest, members, code):
    """Preamble + zip(bootstrap, manifest, members): the file's bytes, `manifest` completed with
    every member's SHA-256."""
    manifest = dict(manifest, members={name: hashlib.sha256(data).hexdigest() for name, data in members.items()})
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    out = io.BytesIO()
    out.write(PREAMBLE)
    with zipfile.ZipFile(out, "w") as zf:
        def add(name, data, method):
            zf.writestr(zipfile.ZipInfo(name, ZIP_EPOCH), data, compress_type=method, compresslevel=9)
        # Stored, not deflated (~1.5 kB more): CPython inflates it before any of our code runs, so a
        # damaged deflate stream could only ever fail as zlib's traceback; stored, a damaged byte
        # mostly reaches the bootstrap's own CRC check and its one-line refusal.
        add(BOOTSTRAP, code.bootstrap(hashlib.sha256(manifest_bytes).hexdigest()), zipfile.ZIP_STORED)
        add(MANIFEST, manifest_bytes, zipfile.ZIP_DEFLATED)
        for name, data in members.items():
            add(name, data, zipfile.ZIP_STORED)  # already compressed
    return out.getvalue()


def _add_stream(members, streams, stream, raw, codec, data):
    stream.update(member=f"w/{stream['name']}.{EXTENSIONS[codec]}", codec=codec, raw_bytes=len(raw))
    members[stream["member"]] = data
    streams.append(stream)
