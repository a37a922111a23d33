"""The artifact's command line: `python artifact.py eval ...` and `python artifact.py info`.

Runs where pgbuild is not installed, so it uses argparse rather than click. `info` must work
without torch, so the modules that need it are imported inside `run_eval`. The loading and
scoring it drives are runtime.api and runtime.evaluate; under torchrun the ranks split the work.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from .config import LORA_ORDERS, MODES, EvalConfig
from .errors import PgError, refuse
from .files import atomic_path
from .progress import Pace, ProgressLine, estimate_line
from .threads import set_threads


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
    parser = ArgumentParser(prog="artifact.py", description="A pgbuild Parameter Golf artifact. `artifact.py train "
                            "--help`: train a new one with its configuration and code (builder/standalone.py).")
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("eval", help="score the validation set in bits per byte")
    ev.add_argument("--data", required=True, help="dataset directory (pgbuild or challenge layout)")
    ev.add_argument("--tokenizer", help="tokenizer .model file (default: found under --data)")
    ev.add_argument("--force-tokenizer", action="store_true",
                    help="accept a tokenizer whose SHA-256 differs from the build's")
    ev.add_argument("--mode", default="ttt", choices=MODES,
                    help="evaluation mode: ttt is score-first TTT, lora document-wise LoRA TTT with phases "
                         "(default: ttt)")
    ev.add_argument("--stride", type=positive_int, help="sliding-window stride (default: the build's)")
    ev.add_argument("--lora-order", choices=LORA_ORDERS,
                    help="lora mode: phases on the stream's first documents (stream) or in the 2026-04-27 "
                         "record's order (record: its number, but not causal; default: the build's)")
    ev.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    ev.add_argument("--max-val-tokens", type=positive_int, help="score only a prefix of the validation stream")
    ev.add_argument("--dump-nll", help="save the per-token NLL (nats, stream order) to this .npy file")
    ev.add_argument("--device", help="torch device (default: cuda if available)")
    ev.add_argument("--threads", type=positive_int,
                    help="CPU threads for torch (default: the cores not busy, from the 1-minute load average)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    commands.add_parser("info", help="print the manifest (no torch needed)")
    return parser.parse_args(argv)


def resolve_device(name):
    """`--device NAME` as a torch device that can hold a tensor here, else a one-line refusal."""
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # a CPU-only torch asserts for cuda
        raise PgError(f"--device {name}: not usable here ({str(e).strip().splitlines()[0]})") from None
    return device


def refuse_unwritable(path):
    """Refuse a --dump-nll file that could not be written now, not after a long evaluation. The
    probe is an anonymous file in the target's folder: nothing is left behind, and a missing
    folder is refused rather than made (the dump's atomic_path would make it)."""
    if os.path.isdir(path):
        raise PgError(f"{path}: is a directory; give a file name such as nll.npy")
    try:
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError as e:
        raise PgError(f"{path}: cannot write the NLL dump ({e.strerror})") from None


def run_eval(args, manifest, read_member):
    import numpy as np
    import torch

    from .api import load_model, load_validation
    from .baselines import baselines
    from .baselines import describe as describe_baselines
    from .distributed import Ranks, init_distributed, leave_distributed
    from .evaluate import evaluate

    if "tensors" not in manifest:
        raise PgError("this file holds no weights: it is the training code of a record; run it (or its `train` "
                      "command) to train an artifact, then evaluate that")
    if args.dump_nll:
        refuse_unwritable(args.dump_nll)
    set_threads(args.threads)
    device = init_distributed() or resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = EvalConfig.from_dict(manifest["eval"])
    if args.stride is not None:
        cfg = dataclasses.replace(cfg, stride=args.stride)
    if args.lora_order is not None:
        cfg = dataclasses.replace(cfg, lora_order=args.lora_order)
    if args.compile:
        cfg = dataclasses.replace(cfg, compile=True)
    tokens, _, tables = load_validation(args.data, manifest, args.tokenizer, args.max_val_tokens, cfg.seq_len,
                                        force=args.force_tokenizer)
    vocab = manifest["model"]["vocab_size"]
    model = load_model(manifest, read_member, device)
    ranks = Ranks()
    share = (len(tokens) - 1) // ranks.world
    progress = ProgressLine(args.mode, share, enabled=ranks.is_main and not args.json)
    # The estimate goes to stderr even with --json: stdout holds the result and nothing else.
    tell = (lambda p: progress.note(estimate_line(args.mode, p, len(tokens) - 1))) if ranks.is_main else None
    pace = Pace(share, trains=args.mode in ("ttt", "lora"), tell=tell,
                sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
    result = evaluate(model, tokens, tables, cfg, args.mode, device,
                      on_score=lambda a, b: (pace(a, b), progress(a, b)), on_train=pace.trained)
    progress.close()
    if ranks.active:
        leave_distributed()
        if not ranks.is_main:
            return 0
    if args.dump_nll:
        with atomic_path(args.dump_nll, "NLL dump") as tmp, open(tmp, "wb") as f:
            np.save(f, result.nll)  # a file object: given a name, np.save would append ".npy" to it
    summary = result.summary()
    if args.mode == "lora":
        summary["lora_order"] = cfg.lora_order
    reference = baselines(tokens, tables, vocab)
    if args.json:
        print(json.dumps({**summary, **reference}))
    else:
        order = f" ({cfg.lora_order} order)" if args.mode == "lora" else ""
        print(f"mode {summary['mode']}{order}  val_loss {summary['val_loss']:.6f}  val_bpb {summary['val_bpb']:.6f}"
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
        return refuse(e)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's own flush stays quiet
        return refuse("standard output was closed before the result could be written")
