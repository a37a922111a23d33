"""`python artifact.py train`: the artifact's own training code, run where pgbuild is not installed.

Every artifact carries this module and what it imports (builder/artifact/code.py) because the
challenge counts the code that trains as well as the code that evaluates. It trains a new model
with the configuration in the artifact's manifest (changed by `--set`), quantizes and packs it
exactly as `pgbuild train-and-pack` does, and writes a new artifact holding the same code. Under
torchrun the ranks split the work. Only argparse here (runtime.cli's parser, which refuses in one
line): the artifact has no click or rich.
"""

import json
import sys

from builder.artifact.code import Code
from builder.config import Preset, apply_overrides
from builder.pipeline import parse_modes, prepare_data, quantize_and_pack
from builder.provenance import of_training
from builder.train.trainer import setup_context, train
from runtime.artifact import Artifact
from runtime.cli import ArgumentParser, positive_int
from runtime.distributed import leave_distributed
from runtime.errors import PgError, refuse
from runtime.files import file_sha256
from runtime.threads import set_threads


def parse_args(argv):
    parser = ArgumentParser(prog="artifact.py train",
                            description="Train a new artifact with this artifact's configuration and code.")
    parser.add_argument("--data", default="data",
                        help="dataset directory, pgbuild or challenge layout (default: ./data)")
    parser.add_argument("--out", default="artifact.py", help="artifact file to write (default: artifact.py)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="change one setting of the configuration, e.g. train.iterations=500 (repeatable)")
    parser.add_argument("--eval-tokens", type=positive_int, default=1_000_000,
                        help="validation prefix scored at build time")
    parser.add_argument("--eval-modes", default="standard,sliding,ttt", help="modes scored at build time")
    parser.add_argument("--allow-overtime", action="store_true",
                        help="write the artifact even if producing it took longer than train.max_wallclock_seconds")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: the cores not busy)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser.parse_args(argv)


def preset_of(manifest):
    """The configuration an artifact was built with, from its manifest."""
    if "train" not in manifest:
        raise PgError("this artifact carries no training configuration (packed by an older pgbuild)")
    quant = {k: v for k, v in manifest["recipe"].items() if k != "method"}
    return Preset.from_dict({"model": manifest["model"], "train": manifest["train"], "quant": quant,
                             "eval": manifest["eval"]})


def main(argv, archive_path):
    try:
        args = parse_args(argv)
        art = Artifact(archive_path).verify()
        preset = apply_overrides(preset_of(art.manifest), args.assignments)
        modes = parse_modes(args.eval_modes)
        set_threads(args.threads)
        ctx = setup_context(preset.train.require_cuda)
        report = print if ctx.is_main else (lambda *_: None)
        layout = prepare_data(args.data, preset)
        report(f"training on {ctx.device} x{ctx.world}: {preset.model.num_layers} layers x {preset.model.model_dim}, "
               f"{preset.train.batch_tokens:,} tokens/step")
        result = train(preset, layout, ctx, report=report)
        prov = {**of_training(preset, result, ctx.world), "parent_sha256": file_sha256(archive_path)}
        summary = quantize_and_pack(result.model, preset, layout, args.out, ctx, prov, args.eval_tokens, modes,
                                    report=report, allow_overtime=args.allow_overtime, code=Code.of_artifact(art))
        if ctx.is_main:
            shown = {k: v for k, v in summary.items() if k not in ("bits", "tensors")}
            print(json.dumps(shown) if args.json else "\n".join(f"{k}: {v}" for k, v in shown.items()))
        sys.stdout.flush()
        leave_distributed()
        return 0
    except PgError as e:
        return refuse(e)
