"""builder/data/caseops.py and `data build --caseops`: the transform is exact on every fixture
document and equal to the 2026-04-27 record's own (../shared/reference/r0427_lossless_caps.py),
and so are the per-piece byte counts of the original text; an artifact built on CaseOps data
scores bits per byte of the original text, from the dataset's byte sidecar."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from conftest import FIXTURE, VAL_DOCS, run_artifact, run_pgbuild
from oracle import REFERENCE

from builder.data import caseops
from builder.data.build import BOS_ID, build_dataset, iter_docs, train_tokenizer
from runtime.artifact import Artifact
from runtime.data import find_data, load_tokens, read_shard
from runtime.errors import PgError
from runtime.evaluate import byte_tables, target_bytes

EDGES = ["The NASA Launch", "McDonald iPhone xYz aB", "A a I", "ÉTÉ Été naïve", "ABC-DEF_ghi9JKL",
         "literal \ue001\ue002\ue003\ue004 controls", "\ue004\ue004", "", "inner  spaces\tkept", "tail capital Z"]
# (Leading and trailing whitespace is not among them: SentencePiece's normalization drops it, so
# `data build --caseops` stores documents stripped, and their bytes are those of the stripped text.)


@pytest.fixture(scope="module")
def reference():
    path = REFERENCE / "r0427_lossless_caps.py"
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference tests need ../shared/reference beside the checkout")
    spec = importlib.util.spec_from_file_location("r0427_lossless_caps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs():
    return list(iter_docs(str(FIXTURE)))


@pytest.fixture(scope="module")
def caseops_tokenizer(docs):
    proto = train_tokenizer((caseops.encode(d) for d in docs[20:]), 1024, caseops.CONTROLS)
    return spm.SentencePieceProcessor(model_proto=proto)


def test_decode_inverts_encode_on_every_fixture_document(docs):
    assert len(docs) > 100
    for text in docs + EDGES:
        assert caseops.decode(caseops.encode(text)) == text


def test_encode_is_the_records_transform(docs, reference):
    for text in docs + EDGES:
        assert caseops.encode(text) == reference.encode_lossless_caps_v2(text), text[:60]


def test_malformed_text_is_refused():
    c = caseops
    for bad in (c.ESC, c.TITLE + " ", c.CAPNEXT + "a", c.ALLCAPS + "ab" + c.CAPNEXT + "c"):
        with pytest.raises(PgError):
            caseops.decode(bad)


def test_controls_are_pieces_and_byte_counts_match_the_record(docs, caseops_tokenizer, reference):
    sp = caseops_tokenizer
    assert all(sp.piece_to_id(c) != sp.unk_id() for c in caseops.CONTROLS)
    texts = [caseops.encode(t) for t in docs[:20] + EDGES]
    for original, (ids, surfaces) in zip(docs[:20] + EDGES, caseops.encode_with_surfaces(sp, texts)):
        assert ids == sp.encode(caseops.encode(original))
        counts = caseops.original_bytes(surfaces)
        assert counts == reference.surface_piece_original_byte_counts(surfaces,
                                                                      text_transform_name="lossless_caps_caseops_v1")
        assert sum(counts) == len(original.encode())


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("caseops_data")
    summary = build_dataset(FIXTURE, 1024, out, val_docs=VAL_DOCS, case_ops=True)
    assert summary["text_transform"] == caseops.NAME
    return out


def test_the_byte_sidecar_counts_the_original_text_of_every_validation_document(caseops_data, docs):
    layout = find_data(str(caseops_data), 1024)
    tokens, counts = load_tokens(layout, "val"), load_tokens(layout, "val_bytes")
    sizes = {split: [read_shard(p).size for p in layout.shards(split)] for split in ("val", "val_bytes")}
    assert sizes["val"] == sizes["val_bytes"]  # cut where the token shards are
    sp = spm.SentencePieceProcessor(model_file=layout.tokenizer)
    starts = list(np.flatnonzero(tokens == BOS_ID)) + [len(tokens)]
    assert len(starts) - 1 == VAL_DOCS and counts[starts[:-1]].sum() == 0  # BOS counts nothing
    originals = [d.strip() for d in docs[:VAL_DOCS]]
    for original, a, z in zip(originals, starts[:-1], starts[1:]):
        # The tokens stand for the transformed text (their surfaces, not sp.decode, which
        # normalizes whitespace); transformed back, it is the document, and the sidecar counts
        # exactly its UTF-8 bytes.
        (ids, surfaces), = caseops.encode_with_surfaces(sp, [caseops.encode(original)])
        assert ids == tokens[a + 1:z].tolist()
        assert caseops.decode("".join(surfaces)) == original
        assert int(counts[a:z].sum()) == len(original.encode())
    assert int(counts.sum()) == sum(len(o.encode()) for o in originals)


R0427_FEATURES = ["model.doc_mask=true", "model.parallel_lanes=2", "model.smear_gate=true", "model.attn_gate=sparse"]


def test_a_caseops_artifact_scores_bits_per_original_byte(caseops_data, clean_env, tmp_path):
    """Shaped as the 2026-04-27 record is (its model features, at tiny sizes), as it would be run."""
    artifact = tmp_path / "caseops.py"
    features = [arg for flag in R0427_FEATURES for arg in ("--set", flag)]
    run_pgbuild("train-and-pack", "--preset", "tiny", "--data", caseops_data, "--out", artifact, "--set",
                "train.iterations=5", *features, "--eval-tokens", 3000, "--eval-modes", "standard,lora")
    manifest = Artifact(str(artifact)).manifest
    assert manifest["byte_sidecar"] is True and manifest["model"]["doc_mask"] is True
    for mode in ("standard", "lora"):
        proc = run_artifact(artifact, "eval", "--data", caseops_data, "--mode", mode, "--max-val-tokens", 3000,
                            "--json", env=clean_env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert round(result["val_bpb"], 5) == manifest["metrics"][f"{mode}_bpb"]  # as measured at build time
    layout = find_data(str(caseops_data), 1024)
    tokens = load_tokens(layout, "val", 3000)[:result["tokens"] + 1]
    assert result["bytes"] == int(load_tokens(layout, "val_bytes")[1:len(tokens)].sum())
    sp = spm.SentencePieceProcessor(model_file=layout.tokenizer)
    assert result["bytes"] < target_bytes(tokens, byte_tables(sp, 1024)).sum()  # the controls weigh nothing
    # Without its sidecar the dataset cannot be scored in original bytes: refused, not miscounted.
    bare = tmp_path / "bare"
    shutil.copytree(caseops_data, bare, ignore=shutil.ignore_patterns("fineweb_val_bytes_*"))
    refused = run_artifact(artifact, "eval", "--data", bare, "--mode", "standard", "--max-val-tokens", 3000,
                           env=clean_env, cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "--caseops" in lines[0]
