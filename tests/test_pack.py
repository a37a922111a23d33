"""builder/artifact/pack.py: exact pack -> decode roundtrip, minified runtime, deterministic bytes."""

import ast
import dataclasses
import io
import zipfile

import numpy as np
import pytest
import torch

from builder.artifact.pack import PREAMBLE, StreamCompressor, build_artifact, codec_sample, contenders
from builder.artifact.sources import installed_code, minify, runtime_sources
from builder.config import QuantConfig
from builder.quant.policy import Choice, Quantizer
from runtime.artifact import Artifact
from runtime.codec import decode_state, decode_streams
from runtime.errors import PgError

INFO = {"model": {}, "eval": {}, "tokenizer_sha256": "0" * 64, "recipe": {}, "provenance": {}, "metrics": {}}


@pytest.fixture(scope="module")
def quantized():
    g = torch.Generator().manual_seed(0)
    state = {"tok_emb.weight": torch.randn(512, 64, generator=g) * 0.02,
             "blocks.0.attn.q.weight": torch.randn(64, 64, generator=g),
             "blocks.0.mlp.fc.weight": torch.randn(256, 64, generator=g),
             "blocks.1.mlp.fc.weight": torch.randn(256, 64, generator=g),
             "blocks.0.attn_scale": torch.rand(64, generator=g)}
    quantizer = Quantizer(state, {n: torch.eye(64) for n in state}, QuantConfig(passthrough_max_numel=1000))
    plan = quantizer.default_plan()
    plan["blocks.1.mlp.fc.weight"] = Choice(5)
    return quantizer.encode_all(plan)


def test_pack_then_decode_is_exact(quantized):
    blob = build_artifact(quantized, INFO, StreamCompressor(("brotli", "lzma")), installed_code())
    artifact = Artifact(io.BytesIO(blob)).verify()
    decoded = decode_state(artifact.manifest, artifact.read)
    for e in quantized:
        assert torch.equal(decoded[e.name], e.dequantize()), e.name
        if e.scales is not None:
            expected = e.data.astype(np.float32) * e.scales.astype(np.float32)[:, None]
            assert np.array_equal(decoded[e.name].numpy(), expected)


def test_container_layout(quantized):
    blob = build_artifact(quantized, INFO, StreamCompressor(("lzma",)), installed_code())
    assert blob.startswith(PREAMBLE) and blob.startswith(b"#!/usr/bin/env python3\n")
    names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    assert names[:4] == ["__main__.py", "manifest.json", "runtime.xz", "training.xz"]
    assert {"w/mlp_fc.int6.xz", "w/mlp_fc.int5.xz", "w/scales.fp16.xz", "w/control.fp16.xz"} <= set(names)


def test_packing_is_deterministic(quantized):
    make = lambda: build_artifact(quantized, INFO, StreamCompressor(("brotli", "lzma")), installed_code())  # noqa: E731
    assert make() == make()


def test_parallel_compression_gives_the_same_bytes(quantized):
    def make(workers):
        compressor = StreamCompressor(("brotli", "lzma", "rans"), reorder_groups=("mlp", "attn"), workers=workers,
                                      parallel_min_bytes=0)
        return build_artifact(quantized, INFO, compressor, installed_code()), compressor

    assert make(3)[0] == make(1)[0]
    raws = [bytes(np.random.default_rng(seed).integers(-3, 4, 5000, dtype=np.int8)) for seed in range(3)]
    parallel = StreamCompressor(("brotli", "rans"), workers=2, parallel_min_bytes=0)
    parallel.prefetch(raws + raws[:1])
    assert len(parallel._cache) == 3  # compressed by the workers, once each
    assert [parallel(raw) for raw in raws] == [StreamCompressor(("brotli", "rans"), workers=1)(raw) for raw in raws]


def test_smallest_codec_wins_per_stream():
    compressor = StreamCompressor(("brotli", "lzma"))
    raw = bytes(np.random.default_rng(0).integers(-3, 4, 20000, dtype=np.int8))
    codec, data = compressor(raw)
    from runtime.codec import compress
    assert len(data) == min(len(compress(c, raw)) for c in ("brotli", "lzma"))


def test_minify_strips_docstrings_and_comments_but_keeps_code():
    source = '"""Module doc."""\nimport os  # comment\n\n\ndef f(x):\n    """Doc."""\n    return x + 1\n'
    small = minify(source)
    assert "doc" not in small.lower() and "comment" not in small
    namespace = {}
    exec(compile(small, "<m>", "exec"), namespace)
    assert namespace["f"](1) == 2


def test_runtime_sources_are_minified_and_valid():
    sources = runtime_sources()
    assert {"runtime", "runtime.model", "runtime.evaluate", "runtime.codec", "runtime.cli"} <= set(sources)
    for name, code in sources.items():
        ast.parse(code)
        assert '"""' not in code, name


def test_rans_is_kept_where_smallest(quantized):
    blob = build_artifact(quantized, INFO, StreamCompressor(("brotli", "lzma", "rans")), installed_code())
    artifact = Artifact(io.BytesIO(blob)).verify()
    codecs = {s["name"]: s["codec"] for s in artifact.manifest["streams"]}
    assert codecs["mlp_fc.int6"] == "rans"  # Gaussian codes: no LZ match pays
    decoded = decode_state(artifact.manifest, artifact.read)
    for e in quantized:
        assert torch.equal(decoded[e.name], e.dequantize()), e.name


def test_row_order_and_transposition_decode_exactly(quantized):
    """Near-duplicate rows make the greedy-order, transposed layout win under brotli."""
    emb = next(e for e in quantized if e.name == "tok_emb.weight")
    rows = np.repeat(emb.data[:1], len(emb.data), 0) + np.random.default_rng(0).integers(0, 2, emb.data.shape)
    quantized = [dataclasses.replace(e, data=rows.astype(np.int8)) if e is emb else e for e in quantized]
    plain = build_artifact(quantized, INFO, StreamCompressor(("brotli",)), installed_code())
    assert "row_order" not in _entry(plain, "tok_emb.weight")
    blob = build_artifact(quantized, INFO, StreamCompressor(("brotli",), reorder_groups=("tok_emb",)), installed_code())
    artifact = Artifact(io.BytesIO(blob)).verify()
    entry = _entry(blob, "tok_emb.weight")
    assert entry["transposed"] == 1 and "row_order" in entry
    decoded = decode_state(artifact.manifest, artifact.read)
    for e in quantized:
        assert torch.equal(decoded[e.name], e.dequantize()), e.name


def _entry(blob, name):
    return next(t for t in Artifact(io.BytesIO(blob)).verify().manifest["tensors"] if t["name"] == name)


def test_a_row_order_that_is_no_permutation_is_corrupt(quantized):
    from runtime.codec import decode_tensor
    e = quantized[1]
    streams = [e.data.tobytes(), e.scales.tobytes(), np.zeros(e.data.shape[0], "<u2").tobytes()]
    entry = {"name": e.name, "shape": list(e.shape), "enc": e.enc, "data": [0, 0, e.data.nbytes],
             "scale": [1, 0, e.scales.nbytes], "row_order": [2, 0, 2 * e.data.shape[0]]}
    with pytest.raises(PgError, match="not a permutation"):
        decode_tensor(entry, streams)


def test_the_trained_artifact_evaluates_identically_after_repacking_with_rans(artifact):
    from builder.quant.primitives import Encoded
    art = Artifact(artifact).verify()
    manifest, before = art.manifest, decode_state(art.manifest, art.read)
    streams = decode_streams(manifest, art.read)
    encoded = []
    for t in manifest["tensors"]:
        (i, o, n), shape = t["data"], tuple(t["shape"])
        if t["enc"] == "fp16":
            encoded.append(Encoded(t["name"], "fp16", shape,
                                   np.frombuffer(streams[i], "<f2", n // 2, o).reshape(shape)))
        else:
            codes = np.frombuffer(streams[i], np.int8, n, o)
            codes = codes.reshape(-1, shape[0]).T if t.get("transposed") else codes.reshape(shape[0], -1)
            if "row_order" in t:  # the fixture itself was packed with the greedy layout
                ri, ro, rn = t["row_order"]
                codes = codes[np.argsort(np.frombuffer(streams[ri], "<u2", rn // 2, ro))]
            si, so, sn = t["scale"]
            encoded.append(Encoded(t["name"], t["enc"], shape, np.ascontiguousarray(codes),
                                   np.frombuffer(streams[si], "<f2", sn // 2, so)))
    info = {k: manifest[k] for k in INFO}
    blob = build_artifact(encoded, info, StreamCompressor(("brotli", "lzma", "rans")), installed_code())
    repacked = Artifact(io.BytesIO(blob)).verify()
    assert "rans" in {s["codec"] for s in repacked.manifest["streams"]}
    after = decode_state(repacked.manifest, repacked.read)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_codec_sample_spans_the_stream_and_skips_small_ones():
    raw = bytes(range(256)) * 64  # 16 KiB
    assert codec_sample(raw, 8192) is None and codec_sample(raw, 0) is None
    sample = codec_sample(raw, 1024)
    assert len(sample) == 1024 and sample[:256] == raw[:256] and sample[-256:] == raw[-256:]
    assert contenders({"brotli": 100, "lzma": 100.9, "rans": 120}) == ["brotli", "lzma"]
    assert contenders({"brotli": 130, "lzma": 120, "rans": 100}) == ["rans"]


def test_codec_chosen_from_a_sample_gives_the_exhaustive_bytes_where_clear():
    rng = np.random.default_rng(0)
    codes = np.clip(np.round(rng.laplace(0, 4, 400_000)), -31, 31).astype(np.int8).tobytes()
    scales = rng.normal(0, 1, 100_000).astype(np.float16).tobytes()
    codecs = ("brotli", "lzma", "rans")
    exhaustive = [StreamCompressor(codecs, workers=1)(raw) for raw in (codes, scales)]
    sampled = StreamCompressor(codecs, workers=1, sample_bytes=32_768)
    assert [sampled(raw) for raw in (codes, scales)] == exhaustive
    parallel = StreamCompressor(codecs, workers=2, parallel_min_bytes=0, sample_bytes=32_768)
    parallel.prefetch([codes, scales])
    assert [parallel(raw) for raw in (codes, scales)] == exhaustive
