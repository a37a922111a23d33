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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are one `error:` line and exit status 2, like every other refusal
    (argparse's own prints a usage block first)."""

    def error(self, message):
        raise PgError(f"{self.prog}: {message} (see --help)")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv):
    parser = ArgumentParser(prog="artifact.py", description="A pgbuild Parameter Golf artifact.")
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("eval", help="score the validation set in bits per byte")
    ev.add_argument("--data", required=True, help="dataset directory (pgbuild or challenge layout)")
    ev.add_argument("--tokenizer", help="tokenizer .model file (default: found under --data)")
    ev.add_argument("--force-tokenizer", action="store_true", help="accept a tokenizer whose SHA-256 differs from the build's")
    ev.add_argument("--mode", default="ttt", choices=("standard", "sliding", "ttt", "lora"),
                    help="evaluation mode: ttt is score-first TTT, lora document-wise LoRA TTT with phases (default: ttt)")
    ev.add_argument("--stride", type=positive_int, help="sliding-window stride (default: the build's)")
    ev.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; not the lora mode)")
    ev.add_argument("--max-val-tokens", type=positive_int, help="score only a prefix of the validation stream")
    ev.add_argument("--dump-nll", help="save the per-token NLL (nats, stream order) to this .npy file")
    ev.add_argument("--device", help="torch device (default: cuda if available)")
    ev.add_argument("--threads", type=positive_int,
                    help="CPU threads for torch (default: the cores not busy, from the 1-minute load average)")
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
    return model.to(device=device, dtype=torch.float32).apply_precision().eval()


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


def resolve_device(name):
    """`--device NAME` as a torch device that can hold a tensor here, else a one-line refusal."""
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # a CPU-only torch asserts for cuda
        raise PgError(f"--device {name}: not usable here ({str(e).strip().splitlines()[0]})") from None
    return device


def atomic_save_npy(path, array=None):
    """np.save to a temporary name beside `path`, renamed into place; nothing is left behind on
    failure. Without an array, only checks that it could be written (before a long evaluation)."""
    import numpy as np

    if os.path.isdir(path):
        raise PgError(f"{path}: is a directory; give a file name such as nll.npy")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if array is not None:
                np.save(f, array)
        if array is not None:
            os.replace(tmp, path)
    except OSError as e:
        raise PgError(f"{path}: cannot write the NLL dump ({e.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_eval(args, manifest, read_member):
    import dataclasses

    import torch

    from .config import EvalConfig
    from .data import find_data, load_tokens
    from .evaluate import byte_tables, evaluate, trim_stream
    from .baselines import baselines, describe as describe_baselines
    from .progress import ProgressLine
    from .threads import set_threads

    if args.dump_nll:
        atomic_save_npy(args.dump_nll)  # refused now rather than after the evaluation
    set_threads(args.threads)
    device = init_distributed() or resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab = manifest["model"]["vocab_size"]
    layout = find_data(args.data, vocab, args.tokenizer)
    sp = load_tokenizer(layout.tokenizer, manifest, args.force_tokenizer)
    cfg = EvalConfig.from_dict(manifest["eval"])
    if args.stride is not None:
        cfg = dataclasses.replace(cfg, stride=args.stride)
    if args.compile:
        cfg = dataclasses.replace(cfg, compile=True)
    tokens = trim_stream(load_tokens(layout, "val", args.max_val_tokens), cfg.seq_len)
    if int(tokens.max()) >= vocab:
        raise PgError(f"validation shards hold token id {int(tokens.max())} >= vocab {vocab}; wrong dataset for this model")
    model = load_model(manifest, read_member, device)
    tables = byte_tables(sp, vocab)
    distributed = torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    main_rank = not distributed or torch.distributed.get_rank() == 0
    progress = ProgressLine(args.mode, (len(tokens) - 1) // world, enabled=main_rank and not args.json)
    result = evaluate(model, tokens, tables, cfg, args.mode, device, on_score=progress)
    progress.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    if args.dump_nll:
        atomic_save_npy(args.dump_nll, result.nll)
    summary = result.summary()
    reference = baselines(tokens, tables, vocab)
    if args.json:
        print(json.dumps({**summary, **reference}))
    else:
        print(f"mode {summary['mode']}  val_loss {summary['val_loss']:.6f}  val_bpb {summary['val_bpb']:.6f}"
              f"{describe_baselines(reference)}  tokens {summary['tokens']}  bytes {summary['bytes']}  "
              f"seconds {summary['seconds']:.1f}")
    return 0


def main(argv, manifest, read_member):
    try:
        args = parse_args(argv)
        if args.command == "info":
            print(json.dumps({k: v for k, v in manifest.items() if k not in ("tensors", "members")}, indent=1))
            status = 0
        else:
            status = run_eval(args, manifest, read_member)
        sys.stdout.flush()  # a closed pipe shows up here, not as a traceback at interpreter exit
        return status
    except PgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's own flush stays quiet
        print("error: standard output was closed before the result could be written", file=sys.stderr)
        return 2
