"""What scoring an artifact takes, for its own command line and for pgbuild: the model with its
decoded weights, and the tokenizer and validation stream it was built for, each checked against
the manifest. The scoring itself is runtime.evaluate.evaluate.
"""

import sentencepiece as spm
import torch

from .codec import decode_state
from .config import ModelConfig
from .data import find_data, load_tokens
from .errors import PgError
from .evaluate import SidecarBytes, byte_tables, trim_stream
from .files import file_sha256
from .model import GPT


def load_model(manifest, read_member, device):
    """The artifact's model with its decoded weights, on `device`, in eval mode."""
    model = GPT(ModelConfig.from_dict(manifest["model"]))
    missing, unexpected = model.load_state_dict(decode_state(manifest, read_member), strict=False)
    if missing or unexpected:
        raise PgError(f"weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model.to(device=device, dtype=torch.float32).apply_precision().eval()


def load_tokenizer(path, manifest, force):
    """The SentencePiece model, refused if it is not the one the artifact was built with."""
    digest = file_sha256(path)
    if digest != manifest["tokenizer_sha256"] and not force:
        raise PgError(f"{path}: tokenizer SHA-256 {digest[:12]}… differs from the build's "
                      f"{manifest['tokenizer_sha256'][:12]}…; pass the right one or --force-tokenizer")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise PgError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    vocab = manifest["model"]["vocab_size"]
    if sp.get_piece_size() != vocab:
        raise PgError(f"{path}: tokenizer has {sp.get_piece_size()} pieces but the model expects {vocab}")
    return sp


def byte_counts(layout, sp, vocab, tokens, sidecar):
    """How the bytes of `tokens` (a validation prefix) are counted: from the dataset's sidecar
    (runtime.evaluate.SidecarBytes) when `sidecar`, else from the tokenizer's pieces."""
    return SidecarBytes(load_tokens(layout, "val_bytes", len(tokens))) if sidecar else byte_tables(sp, vocab)


def load_validation(data, manifest, tokenizer, max_tokens, seq_len, *, force=False):
    """(validation tokens, tokenizer, byte counts) of the dataset directory `data`: its first
    `max_tokens` validation tokens (all when None) trimmed to whole seq_len sequences, the
    tokenizer `tokenizer` or else the one under `data`, checked as load_tokenizer checks it, and
    `byte_counts` as the manifest says (a CaseOps build needs the dataset's byte sidecar)."""
    vocab = manifest["model"]["vocab_size"]
    layout = find_data(data, vocab, tokenizer)
    sp = load_tokenizer(layout.tokenizer, manifest, force)
    tokens = trim_stream(load_tokens(layout, "val", max_tokens), seq_len)
    if int(tokens.max()) >= vocab:
        raise PgError(f"validation shards hold token id {int(tokens.max())} >= vocab {vocab}; "
                      "wrong dataset for this model")
    return tokens, sp, byte_counts(layout, sp, vocab, tokens, manifest.get("byte_sidecar", False))
