"""builder/pack.py: exact pack -> decode roundtrip, minified runtime, deterministic bytes."""

import ast
import io
import zipfile

import numpy as np
import pytest
import torch

from builder.config import QuantConfig
from builder.pack import PREAMBLE, StreamCompressor, build_artifact, minify, runtime_sources, write_atomic
from builder.quantize import Choice, Quantizer
from runtime.artifact import Artifact
from runtime.codec import decode_state
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
    blob = build_artifact(quantized, INFO, StreamCompressor(("brotli", "lzma")))
    artifact = Artifact(io.BytesIO(blob)).verify()
    decoded = decode_state(artifact.manifest, artifact.read)
    for e in quantized:
        assert torch.equal(decoded[e.name], e.dequantize()), e.name
        if e.scales is not None:
            expected = e.data.astype(np.float32) * e.scales.astype(np.float32)[:, None]
            assert np.array_equal(decoded[e.name].numpy(), expected)


def test_container_layout(quantized):
    blob = build_artifact(quantized, INFO, StreamCompressor(("lzma",)))
    assert blob.startswith(PREAMBLE) and blob.startswith(b"#!/usr/bin/env python3\n")
    names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    assert names[:3] == ["__main__.py", "manifest.json", "runtime.xz"]
    assert {"w/mlp_fc.int6.xz", "w/mlp_fc.int5.xz", "w/scales.fp16.xz", "w/control.fp16.xz"} <= set(names)


def test_packing_is_deterministic(quantized):
    make = lambda: build_artifact(quantized, INFO, StreamCompressor(("brotli", "lzma")))  # noqa: E731
    assert make() == make()


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


def test_write_atomic_refuses_directories(tmp_path):
    with pytest.raises(PgError):
        write_atomic(tmp_path, b"x")
    write_atomic(tmp_path / "a.py", b"data")
    assert (tmp_path / "a.py").read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["a.py"]
