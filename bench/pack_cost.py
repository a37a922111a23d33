"""Seconds of GPTQ and of stream compression for a record-shaped model, with 1 and N workers.

    python bench/pack_cost.py [--recipe r0409|best] [--workers 1,2] [--set model.F=V ...]

The `record` preset's model (35.9 M parameters) with its initial weights and synthetic Hessians
(x x^T of 4,096 random inputs per matrix): GPTQ costs what it costs on real Hessians of that
shape, and the codes' statistics are those of a Gaussian-like matrix at the recipe's clip. Times
`Quantizer.encode_all` of the recipe's default plan (GPTQ) once, then `build_artifact` of the
same codes with a fresh StreamCompressor per worker count (every codec and layout candidate of
every stream), and checks that every worker count writes the same bytes.
"""

import argparse
import time

import torch

from builder.artifact.pack import StreamCompressor, build_artifact
from builder.artifact.sources import installed_code
from builder.config import apply_overrides
from builder.presets import apply_recipe, get_preset
from builder.quant.policy import Quantizer, is_quantized
from runtime.model import GPT


def synthetic_hessians(state, qcfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hessians = {}
    for name, tensor in state.items():
        if is_quantized(name, tensor, qcfg):
            x = torch.randn(4096, tensor.shape[1], generator=gen)
            hessians[name] = x.T @ x / len(x)
    return hessians


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="r0409")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--set", dest="assignments", action="append", default=[])
    args = parser.parse_args()
    preset = apply_overrides(apply_recipe(get_preset("record"), args.recipe), args.assignments)
    torch.manual_seed(0)
    model = GPT(preset.model)
    model.reset_parameters()
    state = model.state_dict()
    quantizer = Quantizer(state, synthetic_hessians(state, preset.quant), preset.quant)
    start = time.perf_counter()
    encoded = quantizer.encode_all(quantizer.default_plan())
    print(f"{sum(t.numel() for t in state.values()) / 1e6:.1f} M parameters, recipe {args.recipe}")
    print(f"gptq (encode_all, default plan): {time.perf_counter() - start:.1f} s")
    info = {"model": preset.model.to_dict(), "eval": preset.eval.to_dict(), "metrics": {}}
    blobs = []
    for workers in map(int, args.workers.split(",")):
        compressor = StreamCompressor(preset.quant.codecs, preset.quant.reorder_groups, workers=workers)
        start = time.perf_counter()
        blobs.append(build_artifact(encoded, info, compressor, installed_code()))
        print(f"compress, {workers} worker(s): {time.perf_counter() - start:.1f} s, {len(blobs[-1]):,} bytes")
    assert all(blob == blobs[0] for blob in blobs), "worker counts wrote different bytes"


if __name__ == "__main__":
    main()
