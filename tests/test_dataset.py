"""`pgbuild data build`: tokenizer settings, shard format, the val split, and clean failures."""

import json
import lzma
import os

import numpy as np
import pytest
import sentencepiece as spm
from click.testing import CliRunner

from builder.commands.data import data
from builder.data import build as dataset
from builder.data.build import build_dataset, write_shard
from runtime.data import SHARD_MAGIC, find_data, load_tokens, read_shard
from runtime.errors import PgError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "demo_corpus.jsonl.xz")
VAL_DOCS = 20
VOCAB = 512


def fixture_texts():
    with lzma.open(FIXTURE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build shared by the read-only tests; small shards so docs straddle shard boundaries."""
    out = tmp_path_factory.mktemp("built")
    summary = build_dataset(FIXTURE, VOCAB, out, val_docs=VAL_DOCS, shard_tokens=100_000)
    sp = spm.SentencePieceProcessor(model_file=summary["tokenizer"])
    return summary, sp, out


def split_docs(tokens):
    """Cut a token stream at BOS; every doc must start with BOS."""
    assert tokens[0] == dataset.BOS_ID
    starts = np.flatnonzero(tokens == dataset.BOS_ID)
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [tokens.size])]


def test_summary_and_files(built):
    summary, sp, out = built
    texts = fixture_texts()
    assert summary["docs_val"] == VAL_DOCS and summary["docs_train"] == len(texts) - VAL_DOCS
    assert summary["tokenizer_train_docs"] == len(texts) - VAL_DOCS
    assert summary["vocab_size"] == sp.vocab_size() <= VOCAB
    assert len(summary["shards_val"]) == 1 and len(summary["shards_train"]) > 2
    names = sorted(os.listdir(out))
    assert names == sorted(["tokenizer.model"] + [os.path.basename(p) for p in
                                                  summary["shards_val"] + summary["shards_train"]])


def test_shard_headers(built):
    summary, _, _ = built
    for split in ("val", "train"):
        total = 0
        for i, path in enumerate(summary[f"shards_{split}"]):
            assert os.path.basename(path) == f"fineweb_{split}_{i:06d}.bin"
            raw = open(path, "rb").read()
            header = np.frombuffer(raw[:1024], dtype="<i4")
            assert header[:3].tolist() == [SHARD_MAGIC, 1, (len(raw) - 1024) // 2]
            assert not header[3:].any()
            if path != summary[f"shards_{split}"][-1]:
                assert header[2] == 100_000  # every shard but the last is full
            total += int(header[2])
        assert total == summary[f"tokens_{split}"]


def test_docs_roundtrip_and_val_is_first_k(built):
    summary, sp, _ = built
    texts = fixture_texts()
    val = split_docs(np.concatenate([read_shard(p) for p in summary["shards_val"]]))
    train = split_docs(np.concatenate([read_shard(p) for p in summary["shards_train"]]))
    assert len(val) == VAL_DOCS and len(train) == len(texts) - VAL_DOCS
    for ids, text in zip(val + train, texts):
        assert sp.decode(ids) == sp.normalize(text).replace("\u2581", " ")


def test_runtime_reader_finds_it(built):
    summary, _, out = built
    layout = find_data(str(out))
    assert layout.tokenizer == os.path.normpath(summary["tokenizer"])
    assert layout.shards("train") == summary["shards_train"]
    assert layout.shards("val") == summary["shards_val"]
    assert load_tokens(layout, "val").size == summary["tokens_val"]


def test_tokenizer_settings(built):
    _, sp, _ = built
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_byte(i) for i in range(4, 4 + 256))  # byte fallback pieces
    assert sp.id_to_piece(4) == "<0x00>"
    assert sp.encode("20240520", out_type=str) == list("20240520")  # split_digits
    assert not sp.encode("Hello", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    # An unseen character still round-trips, through byte pieces.
    assert sp.decode(sp.encode("\u0416")) == "\u0416"
    assert sp.normalize("\uff21") == "A"  # NFKC


def test_tokenizer_never_sees_val_docs(tmp_path):
    # A character that only val docs contain must not become a piece.
    docs = tmp_path / "docs.jsonl"
    val = [json.dumps({"text": "\u0416\u0416\u0416 " * 400})] * 3
    docs.write_text("\n".join(val + [json.dumps({"text": t}) for t in fixture_texts()[:60]]) + "\n")
    summary = build_dataset(docs, VOCAB, tmp_path / "out", val_docs=3)
    sp = spm.SentencePieceProcessor(model_file=summary["tokenizer"])
    assert sp.piece_to_id("\u0416") == sp.unk_id()
    assert sp.encode("\u0416", out_type=str) == ["<0xD0>", "<0x96>"]


def test_text_without_spaces_is_refused(tmp_path):
    # The evaluator needs a bare "\u2581" piece; BPE only learns it from text with spaces.
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": "abcdefghij" * 50 + str(i)}) for i in range(30)))
    with pytest.raises(PgError, match="no '\u2581' piece"):
        build_dataset(docs, 300, tmp_path / "out", val_docs=2)
    assert not (tmp_path / "out").exists()


def test_tokenizer_train_docs_cap_and_rebuild_drops_stale_shards(tmp_path):
    out = tmp_path / "out"
    first = build_dataset(FIXTURE, VOCAB, out, val_docs=VAL_DOCS, shard_tokens=50_000)
    second = build_dataset(FIXTURE, VOCAB, out, val_docs=VAL_DOCS, tokenizer_train_docs=30)
    assert second["tokenizer_train_docs"] == 30
    assert len(first["shards_train"]) > 1 and len(second["shards_train"]) == 1
    assert find_data(str(out)).shards("train") == second["shards_train"]


def test_write_shard_is_atomic(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, [1, 5, 65535])
    assert read_shard(str(path)).tolist() == [1, 5, 65535]
    with pytest.raises(PgError, match="uint16"):
        write_shard(tmp_path / "bad.bin", [1, 65536])
    assert os.listdir(tmp_path) == [path.name]


def test_crash_mid_build_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a user's Ctrl-C halfway through the shards
        return write_shard(path, tokens)

    monkeypatch.setattr(dataset, "write_shard", failing_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_dataset(FIXTURE, VOCAB, out, val_docs=VAL_DOCS, shard_tokens=100_000)
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------- CLI

def run_build(*args):
    return CliRunner().invoke(data, ["build", "--vocab-size", str(VOCAB), *args])


def test_cli_json_and_table(tmp_path):
    result = run_build("--input", FIXTURE, "--out", str(tmp_path / "a"), "--val-docs", "10", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["docs_val"] == 10 and os.path.isfile(summary["tokenizer"])

    result = run_build("--input", FIXTURE, "--out", str(tmp_path / "b"), "--val-docs", "10")
    assert result.exit_code == 0, result.output
    assert "tokens" in result.stdout and "tokenizer: " in result.stdout


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("content, fragments", [
    ('{"text": "a b"}\n{"text": "c d"}\n{"text": oops}\n', ["docs.jsonl:3", "not valid JSON"]),
    ('{"text": "a b"}\n{"body": "c d"}\n', ["docs.jsonl:2", '"text"']),
    ('{"text": "a b"}\n["not", "an", "object"]\n', ["docs.jsonl:2", '"text"']),
    ("", ["docs.jsonl", "no documents"]),
    ('{"text": "a b"}\n{"text": "c d"}\n', ["leave none for training", "--val-docs"]),
])
def test_cli_bad_input(tmp_path, content, fragments):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(content)
    out = tmp_path / "out"
    assert_one_line_error(run_build("--input", str(docs), "--out", str(out), "--val-docs", "2"), *fragments)
    assert not out.exists()


def test_cli_missing_input(tmp_path):
    out = tmp_path / "out"
    result = run_build("--input", str(tmp_path / "nope.jsonl"), "--out", str(out))
    assert_one_line_error(result, "nope.jsonl", "does not exist")
    assert not out.exists()


def test_cli_corrupt_xz(tmp_path):
    bad = tmp_path / "docs.jsonl.xz"
    bad.write_bytes(open(FIXTURE, "rb").read()[:5000])  # truncated download
    assert_one_line_error(run_build("--input", str(bad), "--out", str(tmp_path / "out")), ".xz")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab, fragment", [
    ("70000", "vocab size 70000 is out of range"),
    ("300", "Vocabulary size is smaller than required_chars"),  # SentencePiece's own check
])
def test_cli_bad_vocab(tmp_path, vocab, fragment):
    result = CliRunner().invoke(data, ["build", "--input", FIXTURE, "--out", str(tmp_path / "o"),
                                       "--val-docs", "10", "--vocab-size", vocab])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o").exists()


def test_a_shard_that_cannot_be_put_in_place_is_one_line(tmp_path):
    out = tmp_path / "out"
    (out / "fineweb_val_000000.bin").mkdir(parents=True)  # a folder where the first shard goes
    result = run_build("--input", FIXTURE, "--out", str(out), "--val-docs", "10")
    assert_one_line_error(result, "fineweb_val_000000.bin", "cannot put the built file in place")
