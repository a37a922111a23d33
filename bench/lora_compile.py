"""The LoRA mode eager against `eval.compile=true` (dynamic shapes), same weights and tokens.

    python bench/lora_compile.py --checkpoint C.pt --data DIR [--max-val-tokens N] [--set eval.FIELD=VALUE]
                                 [--eager-only]

Three runs of `runtime.evaluate` in mode "lora", each on a fresh copy of the model and after
`torch._dynamo.reset()`: eager, then compiled twice. The first compiled run pays for the
compilation; the second finds inductor's kernels in its on-disk cache, so it shows the steady
cost that a warm cache (or a long evaluation) sees. Prints bpb and seconds for each.
`--eager-only` runs the first alone: the eager path across commits.
"""

import argparse
import copy
import dataclasses
import time

import sentencepiece as spm
import torch

from builder.checkpoint import load_checkpoint
from builder.config import apply_overrides
from builder.pipeline import val_stream
from runtime.api import byte_counts
from runtime.data import find_data
from runtime.evaluate import evaluate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-val-tokens", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="eval.FIELD=VALUE")
    parser.add_argument("--eager-only", action="store_true", help="the eager run alone")
    args = parser.parse_args()
    device = torch.device("cpu")
    model, preset, _ = load_checkpoint(args.checkpoint, device)
    preset = apply_overrides(preset, args.set)
    layout = find_data(args.data, preset.model.vocab_size)
    tokens = val_stream(layout, preset, args.max_val_tokens)
    counts = byte_counts(layout, spm.SentencePieceProcessor(model_file=layout.tokenizer), preset.model.vocab_size,
                         tokens, True)
    model.looping = True
    print(f"{len(tokens) - 1:,} tokens")
    print("| run | bpb | s |\n|---|---:|---:|")
    runs = [("eager", False), ("compiled, first run", True), ("compiled, cached kernels", True)]
    for label, compiled in runs[:1] if args.eager_only else runs:
        torch._dynamo.reset()
        cfg = dataclasses.replace(preset.eval, compile=compiled)
        t0 = time.perf_counter()
        bpb = evaluate(copy.deepcopy(model), tokens, counts, cfg, "lora", device).val_bpb
        print(f"| {label} | {bpb:.10f} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
