"""CPU cost of two post-training stages: score-first TTT and GPTQ Hessian collection.

    python bench/eval_cost.py --data DIR [--preset tiny] [--parts ttt,hessians] [--procs 1,2]
                              [--ttt-tokens 8193] [--set section.field=value ...] [--json OUT]

One thread per process (torch.set_num_threads(1); run it with OMP_NUM_THREADS=1). The model is
the preset's, freshly initialised with seed 0: neither stage's cost depends on the weights. Each
row has wall seconds and CPU seconds (time.process_time, the slowest rank's): on a machine shared
with other jobs only the CPU seconds are comparable from run to run.

- ttt: `runtime.evaluate` in mode "ttt" on the first --ttt-tokens validation tokens (trimmed to
  whole eval.seq_len sequences), one process; prints seconds and bpb (the CPU seconds include
  reading the tokenizer and the tokens).
- hessians: `builder.quant.calibration.collect_hessians` with the preset's quant section, on 1 and on N
  gloo processes (torch.multiprocessing, localhost); prints each run's seconds and the largest
  relative difference of the N-process Hessians from the 1-process ones.
"""

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed as dist
from gloo_ranks import run_on_gloo_ranks

from builder.config import apply_overrides
from builder.presets import get_preset
from builder.quant.calibration import collect_hessians
from runtime.data import find_data, load_tokens
from runtime.evaluate import byte_tables, evaluate, trim_stream
from runtime.model import GPT

CPU = torch.device("cpu")


def fresh_model(preset):
    torch.manual_seed(0)
    model = GPT(preset.model)
    model.reset_parameters()
    return model.eval()


def time_ttt(preset, layout, tokens):
    model = fresh_model(preset)
    cpu_start = time.process_time()
    tables = byte_tables(spm.SentencePieceProcessor(model_file=layout.tokenizer), preset.model.vocab_size)
    stream = trim_stream(load_tokens(layout, "val", tokens), preset.eval.seq_len)
    result = evaluate(copy.deepcopy(model), stream, tables, preset.eval, "ttt", CPU)
    return {"part": "ttt", "tokens": result.tokens, "seconds": round(result.seconds, 3),
            "cpu_seconds": round(time.process_time() - cpu_start, 3), "val_bpb": round(result.val_bpb, 8)}


def _hessian_rank(rank, world, preset, layout, out_dir):
    model = fresh_model(preset)
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    hessians = collect_hessians(model, layout, preset.quant, preset.train.seq_len, CPU, preset.train.seed,
                                rank=rank, world=world)
    times = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}
    torch.save({**times, "hessians": hessians}, Path(out_dir) / f"rank{rank}.pt")


def time_hessians(preset, layout, world):
    with tempfile.TemporaryDirectory() as out_dir:
        run_on_gloo_ranks(_hessian_rank, world, preset, layout, out_dir)  # one rank too: the same code path
        runs = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
    times = {key: round(max(r[key] for r in runs), 3) for key in ("seconds", "cpu_seconds")}
    return times, runs[0]["hessians"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--parts", default="ttt,hessians")
    parser.add_argument("--procs", default="1,2", help="process counts for the Hessian collection")
    parser.add_argument("--ttt-tokens", type=int, default=8193)
    parser.add_argument("--set", action="append", default=[], dest="assignments")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = apply_overrides(get_preset(args.preset), args.assignments)
    layout = find_data(args.data, preset.model.vocab_size)
    rows = []
    if "ttt" in args.parts:
        rows.append(time_ttt(preset, layout, args.ttt_tokens))
        print(json.dumps(rows[-1]), flush=True)
    if "hessians" in args.parts:
        reference = None
        for world in map(int, args.procs.split(",")):
            times, hessians = time_hessians(preset, layout, world)
            row = {"part": "hessians", "procs": world, **times, "tensors": len(hessians)}
            if reference is None:
                reference = hessians
            else:
                row["max_rel_diff"] = max(float((hessians[k] - h).abs().max() / h.abs().max())
                                          for k, h in reference.items())
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
