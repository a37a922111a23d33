"""runtime/data.py: shard validation and both directory layouts."""

import os

import numpy as np
import pytest

from runtime.data import HEADER_BYTES, SHARD_MAGIC, find_data, read_shard
from runtime.errors import PgError


def shard_bytes(tokens, magic=SHARD_MAGIC, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    return header.tobytes() + np.asarray(tokens, "<u2").tobytes()


def test_reads_a_valid_shard(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(shard_bytes([1, 5, 6, 7]))
    assert read_shard(path).tolist() == [1, 5, 6, 7]
    assert read_shard(path, mmap=True).tolist() == [1, 5, 6, 7]


@pytest.mark.parametrize("raw,message", [
    (shard_bytes([1, 2], magic=123), "magic"),
    (shard_bytes([1, 2], version=2), "version"),
    (shard_bytes([1, 2, 3], count=5), "does not match"),
    (shard_bytes([1, 2, 3])[:-1], "does not match"),
    (b"\x00" * 100, "truncated"),
])
def test_rejects_bad_shards(tmp_path, raw, message):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(raw)
    with pytest.raises(PgError, match=message):
        read_shard(path)


def test_challenge_layout(tmp_path):
    shards = tmp_path / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"x")
    (shards / "fineweb_val_000000.bin").write_bytes(shard_bytes([1, 2]))
    for root in (tmp_path, shards):
        layout = find_data(str(root), 1024)
        assert layout.tokenizer.endswith("fineweb_1024_bpe.model")
        assert layout.shards("val")[0].endswith("fineweb_val_000000.bin")


def test_the_published_caseops_layout(tmp_path):
    """The 2026-04-27 record's CaseOps dataset: the challenge's layout with its own names."""
    suffix = "_lossless_caps_caseops_v1_reserved"
    shards = tmp_path / "datasets" / f"fineweb10B_sp1024{suffix}"
    shards.mkdir(parents=True)
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / f"fineweb_1024_bpe{suffix}.model").write_bytes(b"x")
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"):
        (shards / name).write_bytes(shard_bytes([1, 2]))
    for root in (tmp_path, shards):
        layout = find_data(str(root), 1024)
        assert layout.tokenizer.endswith(f"fineweb_1024_bpe{suffix}.model") and layout.has_byte_sidecar()
        assert [os.path.basename(p) for p in layout.shards("val")] == ["fineweb_val_000000.bin"]
        assert [os.path.basename(p) for p in layout.shards("val_bytes")] == ["fineweb_val_bytes_000000.bin"]


def test_missing_things_are_named(tmp_path):
    with pytest.raises(PgError, match="does not exist"):
        find_data(str(tmp_path / "nope"))
    with pytest.raises(PgError, match="no tokenizer"):
        find_data(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(PgError, match="fineweb_train"):
        find_data(str(tmp_path)).shards("train")
    assert HEADER_BYTES == 1024


def test_memory_is_bounded_by_the_tokens_kept_not_the_header(tmp_path):
    """A (sparse) shard whose header and size claim 2^31 - 1 tokens: a prefix costs a prefix."""
    from runtime.data import DataLayout, load_tokens

    path = tmp_path / "fineweb_val_000000.bin"
    count = 2**31 - 1
    with open(path, "wb") as f:
        f.write(shard_bytes([7, 8, 9], count=count))
        f.truncate(HEADER_BYTES + 2 * count)
    tokens = load_tokens(DataLayout(str(tmp_path), str(tmp_path / "tokenizer.model")), "val", 5)
    assert tokens.tolist() == [7, 8, 9, 0, 0]


def test_an_empty_shard_reads_as_no_tokens(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(shard_bytes([]))
    assert read_shard(path, mmap=True).size == 0
