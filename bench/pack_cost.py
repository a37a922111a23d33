"""Seconds of the post-training stages for a record-shaped model: GPTQ split over N gloo ranks,
and stream compression with 1 and N workers.

    python bench/pack_cost.py [--recipe r0409|best] [--ranks 1,8] [--workers 1,2] [--set model.F=V ...]

The `record` preset's model (35.9 M parameters) with its initial weights and synthetic Hessians
(x x^T of 4,096 random inputs per matrix): GPTQ costs what it costs on real Hessians of that
shape, and the codes' statistics are those of a Gaussian-like matrix at the recipe's clip.

GPTQ: `pipeline.encode_shares` run by each rank count in gloo processes with one thread each;
every rank's CPU seconds for its share are printed (on a host with a core or GPU per rank, the
slowest rank is the stage's time). With `--recipe best` every candidate of every tensor is
encoded and measured (36 per tensor); `--one-per-shape` then times one tensor of each shape in
one process and shows the arithmetic that scales it to all of them, split over the ranks.

Compression: `build_artifact` of the default plan's codes with a fresh StreamCompressor per
worker count (codec chosen from a sample, `quant.codec_sample_bytes`; `--set
quant.codec_sample_bytes=0` tries every codec on everything), checking every count writes the
same bytes.
"""

import argparse
import os
import pickle
import tempfile
import time

import torch
import torch.distributed as dist
from gloo_ranks import run_on_gloo_ranks

from builder.artifact.budget import candidate_rows
from builder.artifact.pack import StreamCompressor, build_artifact
from builder.artifact.sources import installed_code
from builder.config import apply_overrides
from builder.pipeline import encode_shares
from builder.presets import apply_recipe, get_preset
from builder.quant.policy import Quantizer, is_quantized
from runtime.distributed import Ranks
from runtime.model import GPT


def synthetic_hessians(state, qcfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hessians = {}
    for name, tensor in state.items():
        if is_quantized(name, tensor, qcfg):
            x = torch.randn(4096, tensor.shape[1], generator=gen)
            hessians[name] = x.T @ x / len(x)
    return hessians


def record_quantizer(preset):
    torch.manual_seed(0)
    model = GPT(preset.model)
    model.reset_parameters()
    state = model.state_dict()
    return Quantizer(state, synthetic_hessians(state, preset.quant), preset.quant)


def _rank_main(rank, world, preset, out):
    quantizer = record_quantizer(preset)
    dist.barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    encode_shares(quantizer, Ranks())
    seconds = {"rank_cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
    shares = [None] * world if rank == 0 else None
    dist.gather_object(seconds, shares, dst=0)
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(shares, f)


def split_gptq(preset, world):
    """[{'rank_cpu', 'wall'}] of every rank running encode_shares."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.pkl")
        run_on_gloo_ranks(_rank_main, world, preset, out)
        with open(out, "rb") as f:
            return pickle.load(f)


def one_per_shape(preset, ranks):
    """Times every candidate of one tensor per shape and scales to all tensors, split over ranks."""
    quantizer = record_quantizer(preset)
    by_shape = {}
    for name in quantizer.quantized_names():
        by_shape.setdefault(tuple(quantizer.state[name].shape), []).append(name)
    total = picked = 0.0
    for shape, names in by_shape.items():
        start = time.process_time()
        quantizer.encode(names[0], quantizer.default_plan()[names[0]])
        one = time.process_time() - start
        start = time.process_time()
        candidate_rows(quantizer, names[0])
        rows = time.process_time() - start + one
        total += rows * len(names)
        picked += one * len(names)
        print(f"  shape {shape}: {len(quantizer.candidates(names[0]))} candidates {rows:.1f} s x {len(names)} tensors; "
              f"one encode {one:.2f} s")
    for world in ranks:
        print(f"  {world} rank(s): {total:.1f} / {world} + {picked:.1f} (rank 0 encodes the picks) = "
              f"{total / world + picked:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="r0409")
    parser.add_argument("--ranks", default="1", help="comma-separated rank counts for the GPTQ split")
    parser.add_argument("--workers", default="1,2", help="comma-separated compression worker counts")
    parser.add_argument("--one-per-shape", action="store_true",
                        help="GPTQ: time one tensor per shape and scale (for `best`, whose full run takes long)")
    parser.add_argument("--set", dest="assignments", action="append", default=[])
    args = parser.parse_args()
    preset = apply_overrides(apply_recipe(get_preset("record"), args.recipe), args.assignments)
    ranks = [int(n) for n in args.ranks.split(",")]
    quantizer = record_quantizer(preset)
    print(f"{sum(t.numel() for t in quantizer.state.values()) / 1e6:.1f} M parameters, recipe {args.recipe}, "
          f"{len(quantizer.quantized_names())} quantized matrices")
    if args.one_per_shape:
        print("gptq, one tensor per shape (CPU seconds):")
        one_per_shape(preset, ranks)
    else:
        for world in ranks:
            seconds = split_gptq(preset, world)
            cpu = [s["rank_cpu"] for s in seconds]
            print(f"gptq, {world} rank(s): slowest rank {max(cpu):.1f} s CPU, ranks "
                  f"{' '.join(f'{c:.1f}' for c in cpu)}, wall here {max(s['wall'] for s in seconds):.1f} s")
    start = time.perf_counter()
    encoded = quantizer.encode_all(quantizer.default_plan())
    print(f"gptq in this process (encode_all, default plan): {time.perf_counter() - start:.1f} s")
    info = {"model": preset.model.to_dict(), "eval": preset.eval.to_dict(), "metrics": {}}
    blobs = []
    for workers in map(int, args.workers.split(",")):
        compressor = StreamCompressor(preset.quant.codecs, preset.quant.reorder_groups, workers=workers,
                                      sample_bytes=preset.quant.codec_sample_bytes)
        start = time.perf_counter()
        blobs.append(build_artifact(encoded, info, compressor, installed_code()))
        print(f"compress, {workers} worker(s): {time.perf_counter() - start:.1f} s, {len(blobs[-1]):,} bytes")
    assert all(blob == blobs[0] for blob in blobs), "worker counts wrote different bytes"


if __name__ == "__main__":
    main()
