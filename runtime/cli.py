"""The artifact's command line: `python artifact.py eval ...` and `python artifact.py info`.

Runs where pgbuild is not installed, so it uses argparse rather than click, and imports torch
only for `eval` (`info` must work without it). Under torchrun the ranks split the evaluation.
"""

import argparse
import hashlib
import json
import os
import sys

from .errors import PgError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="artifact.py", description="A pgbuild Parameter Golf artifact.")
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("eval", help="score the validation set in bits per byte")
    ev.add_argument("--data", required=True, help="dataset directory (pgbuild or challenge layout)")
    ev.add_argument("--tokenizer", help="tokenizer .model file (default: found under --data)")
    ev.add_argument("--force-tokenizer", action="store_true", help="accept a tokenizer whose SHA-256 differs from the build's")
    ev.add_argument("--mode", default="ttt", choices=("standard", "sliding", "ttt", "lora"),
                    help="evaluation mode: ttt is score-first TTT, lora document-wise LoRA TTT with phases (default: ttt)")
    ev.add_argument("--stride", type=int, help="sliding-window stride (default: the build's)")
    ev.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; not the lora mode)")
    ev.add_argument("--max-val-tokens", type=int, help="score only a prefix of the validation stream")
    ev.add_argument("--dump-nll", help="save the per-token NLL (nats, stream order) to this .npy file")
    ev.add_argument("--device", help="torch device (default: cuda if available)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    commands.add_parser("info", help="print the manifest (no torch needed)")
    return parser.parse_args(argv)


def load_model(manifest, read_member, device):
    """The artifact's model with its decoded weights, on `device`, in eval mode."""
    import torch

    from .codec import decode_state
    from .config import ModelConfig
    from .model import GPT

    model = GPT(ModelConfig.from_dict(manifest["model"]))
    missing, unexpected = model.load_state_dict(decode_state(manifest, read_member), strict=False)
    if missing or unexpected:
        raise PgError(f"weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model.to(device=device, dtype=torch.float32).eval()


def load_tokenizer(path, manifest, force):
    """The SentencePiece model, refused if it is not the one the artifact was built with."""
    import sentencepiece as spm

    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
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


def init_distributed():
    """Join torchrun's process group if launched by it; returns the device to use."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        return None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def atomic_save_npy(path, array):
    import numpy as np

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def run_eval(args, manifest, read_member):
    import dataclasses

    import torch

    from .config import EvalConfig
    from .data import find_data, load_tokens
    from .evaluate import byte_tables, evaluate, trim_stream

    device = init_distributed() or torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab = manifest["model"]["vocab_size"]
    layout = find_data(args.data, vocab, args.tokenizer)
    sp = load_tokenizer(layout.tokenizer, manifest, args.force_tokenizer)
    cfg = EvalConfig.from_dict(manifest["eval"])
    if args.stride:
        cfg = dataclasses.replace(cfg, stride=args.stride)
    if args.compile:
        cfg = dataclasses.replace(cfg, compile=True)
    tokens = trim_stream(load_tokens(layout, "val", args.max_val_tokens), cfg.seq_len)
    if int(tokens.max()) >= vocab:
        raise PgError(f"validation shards hold token id {int(tokens.max())} >= vocab {vocab}; wrong dataset for this model")
    model = load_model(manifest, read_member, device)
    result = evaluate(model, tokens, byte_tables(sp, vocab), cfg, args.mode, device)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    if args.dump_nll:
        atomic_save_npy(args.dump_nll, result.nll)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"mode {summary['mode']}  val_loss {summary['val_loss']:.6f}  val_bpb {summary['val_bpb']:.6f}  "
              f"tokens {summary['tokens']}  bytes {summary['bytes']}  seconds {summary['seconds']:.1f}")
    return 0


def main(argv, manifest, read_member):
    args = parse_args(argv)
    try:
        if args.command == "info":
            print(json.dumps({k: v for k, v in manifest.items() if k not in ("tensors", "members")}, indent=1))
            return 0
        return run_eval(args, manifest, read_member)
    except PgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
