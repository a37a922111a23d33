"""Build token shards from your own documents, the way the challenge built FineWeb's.

Input is JSONL (optionally .xz), one `{"text": ...}` object per line. Following the challenge's
rule, the first `val_docs` documents are validation and the rest are training. A SentencePiece
BPE tokenizer is trained on training documents only (so validation text never shapes the
vocabulary), with the challenge's settings, and every document is stored as [BOS] + its tokens in
shards of the challenge's format (see runtime.data).

The input is streamed three times (validate and count, train the tokenizer, encode) rather than
held in memory: FineWeb-sized inputs are tens of gigabytes. Outputs are built in a hidden staging
folder inside the output directory and renamed into place only once everything succeeded.
"""

import glob
import io
import json
import lzma
import os
import shutil
import tempfile

import numpy as np
import sentencepiece as spm

from builder.data import caseops
from runtime.data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION
from runtime.errors import PgError
from runtime.files import atomic_path

BOS_ID = 1
MAX_VOCAB = 1 << 16  # shard bodies are uint16
MIN_VOCAB = 4 + 256 + 1  # 4 special ids, 256 byte-fallback pieces, at least one real piece
DEFAULT_VAL_DOCS = 50_000
DEFAULT_TOKENIZER_TRAIN_DOCS = 5_000_000  # what the challenge's SP8192 tokenizer used
DEFAULT_SHARD_TOKENS = 10**8  # the official export's shard size
TOKENIZER_NAME = "tokenizer.model"
ENCODE_BATCH_DOCS = 1024
# SentencePiece drops (not truncates) training sentences longer than this many bytes. Its
# default (4192) would silently skip most web documents, since each document is one sentence.
MAX_SENTENCE_BYTES = 1 << 24
SPACE_PIECE = "\u2581"


# ----------------------------------------------------------------------------- output files

def write_shard(path, tokens):
    """Write one shard (256 x int32 header, then uint16 tokens), atomically."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
            raise PgError(f"{path}: token ids must lie in [0, {MAX_VOCAB}) to fit a uint16 shard")
        tokens = tokens.astype(np.uint16)
    if tokens.size >= 2**31:
        raise PgError(f"{path}: {tokens.size} tokens do not fit the int32 header; use smaller shards")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with atomic_path(path, "shard") as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


class _ShardWriter:
    """Packs documents into fixed-size shards per split; a document may span two shards.

    That matches the challenge's export: shards are one token stream cut every `shard_tokens`.
    """

    def __init__(self, folder, shard_tokens):
        self.folder, self.shard_tokens = folder, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)  # untouched pages cost no memory
        self.byte_buf = None
        self.fill, self.split = 0, None
        self.paths = {"val": [], "train": [], "val_bytes": []}
        self.tokens = {"val": 0, "train": 0}

    def add(self, split, ids, byte_counts=None):
        """One document: [BOS] + `ids`; with `byte_counts` (CaseOps validation), each token's
        original bytes go to a sidecar shard cut where the token shard is (BOS counts 0)."""
        if split != self.split:
            self.flush()  # a shard never mixes val and train tokens
            self.split = split
        doc = np.empty(len(ids) + 1, dtype=np.uint16)
        doc[0] = BOS_ID
        doc[1:] = ids
        if byte_counts is not None:
            if self.byte_buf is None:
                self.byte_buf = np.empty(self.shard_tokens, dtype=np.uint16)
            counts = np.zeros(doc.size, dtype=np.uint16)
            counts[1:] = byte_counts
        self.tokens[split] += doc.size
        pos = 0
        while pos < doc.size:
            take = min(self.shard_tokens - self.fill, doc.size - pos)
            self.buf[self.fill:self.fill + take] = doc[pos:pos + take]
            if byte_counts is not None:
                self.byte_buf[self.fill:self.fill + take] = counts[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self):
        if self.fill == 0:
            return
        names = self.paths[self.split]
        path = os.path.join(self.folder, f"fineweb_{self.split}_{len(names):06d}.bin")
        write_shard(path, self.buf[:self.fill])
        if self.split == "val" and self.byte_buf is not None:
            self.paths["val_bytes"].append(os.path.join(self.folder, f"fineweb_val_bytes_{len(names):06d}.bin"))
            write_shard(self.paths["val_bytes"][-1], self.byte_buf[:self.fill])
        names.append(path)
        self.fill = 0


# ----------------------------------------------------------------------------- reading input

def _open_text(path):
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_docs(path):
    """Yield the text of each document in a JSONL(.xz) file, checking every line.

    Blank lines are skipped; anything else that is not an object with a string "text" is an
    error naming the file and line, since silently dropping documents would shift the val split.
    """
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PgError(f'{path}:{lineno}: not valid JSON ({e.msg}); each line must be '
                                  f'one object like {{"text": "..."}}') from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise PgError(f'{path}:{lineno}: no string "text" field; each line must be '
                                  f'one object like {{"text": "..."}}')
                yield text
    except UnicodeDecodeError:
        raise PgError(f"{path}:{lineno + 1}: not UTF-8 text; re-encode the file as UTF-8") from None
    except (lzma.LZMAError, EOFError) as e:
        raise PgError(f"{path}: corrupt or truncated .xz file ({e}); re-create it") from None
    except OSError as e:
        raise PgError(f"{path}: cannot read input ({e.strerror or e})") from None


def _count_docs(path, progress):
    """Validate the whole input up front, so a bad line fails before minutes of tokenizer work."""
    n = 0
    for n, _ in enumerate(iter_docs(path), 1):
        if n % 10_000 == 0:
            progress("scan", n, None)
    progress("scan", n, n)
    if n == 0:
        raise PgError(f'{path}: no documents; expected one {{"text": ...}} object per line')
    return n


# ----------------------------------------------------------------------------- tokenizer

def _training_text(path, skip, limit):
    """The tokenizer's training sentences: train docs only, cleaned as the challenge does."""
    used = 0
    for i, text in enumerate(iter_docs(path)):
        if i < skip:
            continue
        if used >= limit:
            return
        used += 1
        text = text.replace("\x00", " ").strip()
        if text:
            yield text


def train_tokenizer(texts, vocab_size, reserved=()):
    """Train a SentencePiece BPE model with the challenge's settings; return its serialized bytes.
    `reserved` characters (CaseOps' controls) become pieces of their own."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=texts, model_writer=model,
            model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False, character_coverage=0.999,
            pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, hard_vocab_limit=False,
            user_defined_symbols=list(reserved),
            # 0 = keep every sentence: the iterator already applies the doc cap, and
            # SentencePiece's own sampling would otherwise drop docs below it.
            input_sentence_size=0, max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        # SentencePiece reports as "INTERNAL: file.cc(line) [check] message"; keep the message.
        detail = str(e).strip().splitlines()[0].split("] ", 1)[-1]
        raise PgError(f"tokenizer training failed: {detail}") from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    # The evaluator's byte accounting looks up the bare space piece; BPE learns it from any
    # text with spaces, so its absence means the training text is unusable, not a bug here.
    space = sp.piece_to_id(SPACE_PIECE)
    if space == sp.unk_id():
        raise PgError(f"tokenizer has no '{SPACE_PIECE}' piece (the training docs contain no spaces); "
                      f"use ordinary text")
    return proto


# ----------------------------------------------------------------------------- build

def _no_progress(stage, done, total):
    pass


def _check_sizes(vocab_size, val_docs, tokenizer_train_docs, shard_tokens):
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise PgError(f"vocab size {vocab_size} is out of range; use {MIN_VOCAB}..{MAX_VOCAB} "
                      f"(byte fallback needs 260 ids, shards store uint16)")
    if val_docs < 1:
        raise PgError(f"--val-docs must be at least 1 (got {val_docs})")
    if tokenizer_train_docs < 1:
        raise PgError(f"--tokenizer-train-docs must be at least 1 (got {tokenizer_train_docs})")
    if shard_tokens < 1:
        raise PgError(f"--shard-tokens must be at least 1 (got {shard_tokens})")


def _publish(staging, out_dir, files):
    """Move finished files into place, then drop shards an earlier, larger build left behind."""
    final = []
    for path in files:
        dest = os.path.join(out_dir, os.path.basename(path))
        try:
            os.replace(path, dest)
        except OSError as e:
            raise PgError(f"{dest}: cannot put the built file in place ({e.strerror or e})") from None
        final.append(dest)
    for stale in glob.glob(os.path.join(out_dir, "fineweb_*_*.bin")):
        if stale not in final:
            os.unlink(stale)
    return final


def build_dataset(input_path, vocab_size, out_dir, val_docs=DEFAULT_VAL_DOCS, progress=None,
                  tokenizer_train_docs=DEFAULT_TOKENIZER_TRAIN_DOCS, shard_tokens=DEFAULT_SHARD_TOKENS,
                  case_ops=False):
    """Train a tokenizer on `input_path`'s train docs and write val/train shards into `out_dir`.

    With `case_ops`, documents are CaseOps-transformed (builder/data/caseops.py) before the
    tokenizer sees them, its controls are reserved pieces, and every validation shard gets a
    sidecar `fineweb_val_bytes_NNNNNN.bin` of each token's bytes in the original text.

    `progress(stage, done, total)` is called as work advances; stages are "scan" (docs read),
    "tokenizer" (0 or 1 of 1) and "encode" (docs written). Returns a summary dict.
    """
    progress = progress or _no_progress
    input_path, out_dir = os.fspath(input_path), os.fspath(out_dir)
    _check_sizes(vocab_size, val_docs, tokenizer_train_docs, shard_tokens)
    if not os.path.isfile(input_path):
        raise PgError(f"{input_path}: input file does not exist; pass a JSONL(.xz) file of documents")

    n_docs = _count_docs(input_path, progress)
    if n_docs <= val_docs:
        raise PgError(f"{input_path}: {n_docs} docs leave none for training after the first "
                      f"{val_docs} go to validation; lower --val-docs")
    n_train_tok = min(tokenizer_train_docs, n_docs - val_docs)

    progress("tokenizer", 0, 1)
    texts = _training_text(input_path, val_docs, n_train_tok)
    proto = train_tokenizer(map(caseops.encode, texts) if case_ops else texts, vocab_size,
                            caseops.CONTROLS if case_ops else ())
    progress("tokenizer", 1, 1)
    sp = spm.SentencePieceProcessor(model_proto=proto)

    try:
        os.makedirs(out_dir, exist_ok=True)
        staging = tempfile.mkdtemp(dir=out_dir, prefix=".data-build-")
    except OSError as e:
        raise PgError(f"{out_dir}: cannot create output directory ({e.strerror or e})") from None
    try:
        tok_path = os.path.join(staging, TOKENIZER_NAME)
        with atomic_path(tok_path, "tokenizer") as tmp, open(tmp, "wb") as f:
            f.write(proto)
        writer = _encode(input_path, sp, val_docs, n_docs, staging, shard_tokens, progress, case_ops)
        shards = writer.paths["val"] + writer.paths["train"] + writer.paths["val_bytes"]
        final = _publish(staging, out_dir, [tok_path] + shards)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    n_val = len(writer.paths["val"])
    return {
        "input": input_path,
        "out_dir": out_dir,
        "tokenizer": final[0],
        "vocab_size": sp.vocab_size(),
        "docs_val": val_docs,
        "docs_train": n_docs - val_docs,
        "tokenizer_train_docs": n_train_tok,
        "tokens_val": writer.tokens["val"],
        "tokens_train": writer.tokens["train"],
        "shards_val": final[1:1 + n_val],
        "shards_train": final[1 + n_val:len(final) - len(writer.paths["val_bytes"])],
        "text_transform": caseops.NAME if case_ops else None,
    }


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(input_path, sp, val_docs, n_docs, folder, shard_tokens, progress, case_ops=False):
    """Encode every doc (raw text, as the challenge does; stripped and transformed with CaseOps)
    into shards under `folder`."""
    writer = _ShardWriter(folder, shard_tokens)
    done = 0
    progress("encode", 0, n_docs)
    for batch in _batches(iter_docs(input_path), ENCODE_BATCH_DOCS):
        if not case_ops:
            for ids in sp.encode(batch, num_threads=os.cpu_count() or 1):
                writer.add("val" if done < val_docs else "train", ids)
                done += 1
        else:
            # SentencePiece drops leading and trailing whitespace: strip it here, so the bytes
            # counted are those of the text the tokens hold.
            for ids, surfaces in caseops.encode_with_surfaces(sp, [caseops.encode(t.strip()) for t in batch]):
                val = done < val_docs
                writer.add("val" if val else "train", ids, caseops.original_bytes(surfaces) if val else None)
                done += 1
        progress("encode", done, n_docs)
    writer.flush()
    if done != n_docs:
        raise PgError(f"{input_path}: changed while being read ({n_docs} docs, then {done}); retry")
    return writer
