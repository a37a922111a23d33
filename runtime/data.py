"""Token shards in the challenge's format, and where to find them.

A shard is a 256 x int32 little-endian header (magic 20240520, version 1, token count) followed by
that many little-endian uint16 tokens. Two directory layouts are accepted for `--data DIR`:

- pgbuild's own: DIR/tokenizer.model next to DIR/fineweb_{train,val}_NNNNNN.bin;
- the challenge's: DIR/datasets/fineweb10B_spV/*.bin with DIR/tokenizers/fineweb_V_bpe.model,
  or DIR pointing at datasets/fineweb10B_spV itself (the published CaseOps dataset: the same
  with CASEOPS_SUFFIX on both names).

A CaseOps dataset's validation shards come with sidecars, fineweb_val_bytes_NNNNNN.bin in the same
format, holding each validation token's byte count in the original text (split "val_bytes").
"""

import glob
import os
from dataclasses import dataclass

import numpy as np

from .errors import PgError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def read_shard(path, mmap=False):
    """The tokens of one shard as a uint16 array (memory-mapped if `mmap`), after checking its
    header and size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
            if header.size != HEADER_INTS:
                raise PgError(f"{path}: truncated shard (no complete 1024-byte header)")
            if header[0] != SHARD_MAGIC:
                raise PgError(f"{path}: not a token shard (magic {header[0]}, expected {SHARD_MAGIC})")
            if header[1] != SHARD_VERSION:
                raise PgError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
            count = int(header[2])
            if size != HEADER_BYTES + 2 * count:
                raise PgError(f"{path}: size {size} does not match its header ({count} tokens"
                              f" need {HEADER_BYTES + 2 * count} bytes); the file is truncated or corrupt")
            if mmap and count:  # mmap refuses an empty range
                return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
            return np.frombuffer(f.read(), dtype="<u2").astype(np.uint16)
    except OSError as e:
        raise PgError(f"{path}: cannot read shard ({e.strerror})") from None


@dataclass(frozen=True)
class DataLayout:
    """Where a dataset's shards and tokenizer live."""

    shard_dir: str
    tokenizer: str

    def shards(self, split):
        """The sorted shard paths of `split` ("train", "val", or "val_bytes": the sidecars that
        give each validation token's bytes in the original text, `pgbuild data build --caseops`);
        raises if there are none."""
        paths = sorted(glob.glob(os.path.join(self.shard_dir, f"fineweb_{split}_[0-9]*.bin")))
        if not paths:
            how = "`pgbuild data build --caseops` or `pgbuild data download --caseops`" if split == "val_bytes" else \
                "`pgbuild data build` or `pgbuild data download`"
            raise PgError(f"{self.shard_dir}: no fineweb_{split}_NNNNNN.bin shards; build them with {how}")
        return paths

    def has_byte_sidecar(self):
        return bool(glob.glob(os.path.join(self.shard_dir, "fineweb_val_bytes_[0-9]*.bin")))


CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"
"""What the 2026-04-27 record's published CaseOps dataset adds to the challenge's folder and
tokenizer names (its validation shards come with fineweb_val_bytes_* sidecars)."""


def find_data(data_dir, vocab_size=None, tokenizer=None):
    """Resolve `--data DIR` (either layout; the challenge's also as the CaseOps dataset names it,
    where the plain one is absent) and an optional explicit tokenizer path."""
    if not os.path.isdir(data_dir):
        raise PgError(f"{data_dir}: data directory does not exist")
    shard_dir, guesses = data_dir, [os.path.join(data_dir, "tokenizer.model")]
    if vocab_size is not None:
        for suffix in ("", CASEOPS_SUFFIX):
            challenge = os.path.join(data_dir, "datasets", f"fineweb10B_sp{vocab_size}{suffix}")
            if os.path.isdir(challenge):
                shard_dir = challenge
                break
        suffixes = ("", CASEOPS_SUFFIX) if not shard_dir.endswith(CASEOPS_SUFFIX) else (CASEOPS_SUFFIX,)
        for suffix in suffixes:
            tok_name = f"fineweb_{vocab_size}_bpe{suffix}.model"
            guesses += [os.path.join(data_dir, "tokenizers", tok_name),
                        os.path.join(shard_dir, "..", "..", "tokenizers", tok_name)]
    if tokenizer is None:
        tokenizer = next((g for g in guesses if os.path.isfile(g)), None)
        if tokenizer is None:
            raise PgError(f"{data_dir}: no tokenizer found (looked for {', '.join(guesses)}); pass --tokenizer")
    elif not os.path.isfile(tokenizer):
        raise PgError(f"{tokenizer}: tokenizer file does not exist")
    return DataLayout(os.path.normpath(shard_dir), os.path.normpath(tokenizer))


def load_tokens(layout, split, max_tokens=None):
    """Concatenate a split's shards in order, stopping once `max_tokens` are read. Shards are
    memory-mapped and only the tokens kept are copied, so memory is bounded by `max_tokens`
    whatever the headers claim."""
    parts, total = [], 0
    for path in layout.shards(split):
        shard = read_shard(path, mmap=True)
        keep = shard.size if max_tokens is None else min(shard.size, max_tokens - total)
        parts.append(np.array(shard[:keep], dtype=np.uint16))
        total += keep
        if max_tokens is not None and total >= max_tokens:
            break
    return np.concatenate(parts)
