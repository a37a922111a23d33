"""Quantization ablation at equal artifact bytes: each technique alone, and all together,
against a record's recipe.

    python bench/quant_ablation.py --checkpoint ckpt.pt --data DIR [--baseline r0409|r0427] [--max-val-tokens N]
        [--set k=v] [--json OUT]

The baseline row (`r0409`, the 2026-04-09 record's recipe, or `r0427`, the 2026-04-27 record's)
packs that recipe at its natural size S. Every other row allocates bit widths by rate-distortion
(quant.allocation=rd) on top of the baseline's settings for the budget S, so all rows cost the same bytes;
the `rd` row isolates the allocator, the others add one technique to it (rows in BUDGET_SCALE get
a fraction of S instead). The gap is the packed artifact's standard bpb minus the unquantized
model's, both scored by the runtime's evaluator on the same validation tokens. Hessians come from
training batches once and are shared by all rows.
"""

import argparse
import copy
import dataclasses
import io
import json
import time

import sentencepiece as spm
import torch

from builder.artifact.budget import allocate, fit_budget
from builder.artifact.pack import StreamCompressor, build_artifact
from builder.artifact.sources import installed_code
from builder.checkpoint import load_checkpoint
from builder.config import apply_overrides
from builder.pipeline import val_stream
from builder.presets import RECIPES, apply_recipe
from builder.quant.calibration import LossProbe, collect_hessians
from builder.quant.policy import Quantizer
from runtime.api import byte_counts, load_model
from runtime.artifact import Artifact
from runtime.data import find_data
from runtime.evaluate import evaluate
from runtime.files import file_sha256

CLIP_SEARCH = RECIPES["best"]["clip_search"]
PRUNE_FRACTIONS = (0.1, 0.25, 0.5)
ROWS = {
    "r0409": "r0409",
    "r0427": "r0427",
    "rd, raw Hessian errors": dict(allocation="rd", probe_tokens=0),
    "rd": dict(allocation="rd"),
    "rd + hessian-aware clip": dict(allocation="rd", hessian_clip_lambda=0.175),
    "rd + clip search": dict(allocation="rd", clip_search=CLIP_SEARCH),
    "rd + int8 control (Path A)": dict(allocation="rd", control_int8=True),
    "rd + hadamard": dict(allocation="rd", transforms=("hadamard",)),
    "rd + awq": dict(allocation="rd", transforms=("awq",)),
    "rd + lqer": dict(allocation="rd", lqer_rank=4),
    "rd + awq + hadamard": dict(allocation="rd", transforms=("hadamard", "awq")),
    "rd + awq + clip search": dict(allocation="rd", transforms=("awq",), clip_search=CLIP_SEARCH),
    "rd + awq + hadamard + clip search": dict(allocation="rd", transforms=("hadamard", "awq"),
                                              clip_search=CLIP_SEARCH),
    "best": "best",
    "rd + prune candidates": dict(allocation="rd", prune_fractions=PRUNE_FRACTIONS),
    "best + prune candidates": dict(RECIPES["best"], prune_fractions=PRUNE_FRACTIONS),
    "r0409 at 98% bytes (fit lowers bits)": {},
    "r0409 at 98% bytes + prune-to-fit": dict(prune_to_fit=0.5),
    "best at 98% bytes": "best",
}
BUDGET_SCALE = {"r0409 at 98% bytes (fit lowers bits)": 0.98, "r0409 at 98% bytes + prune-to-fit": 0.98,
                "best at 98% bytes": 0.98}
"""Rows packed for a fraction of r0409's bytes: prune-to-fit only acts on an over-budget file."""


def pack_blob(model, hessians, probe, preset, info, budget):
    qcfg = dataclasses.replace(preset.quant, budget_bytes=budget)
    quantizer = Quantizer(model.state_dict(), hessians, qcfg, probe if qcfg.probe_tokens else None)
    compressor = StreamCompressor(qcfg.codecs, qcfg.reorder_groups)

    def pack(plan):
        return build_artifact(quantizer.encode_all(plan), info, compressor, installed_code())

    fit = allocate if qcfg.allocation == "rd" else fit_budget
    return fit(quantizer, pack, budget, 0, report=lambda *_: None)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-val-tokens", type=int)
    parser.add_argument("--baseline", default="r0409", choices=("r0409", "r0427"),
                        help="the recipe every other row matches in bytes")
    parser.add_argument("--rows", help="comma-separated subset of: " + "; ".join(ROWS))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override the checkpoint's settings, e.g. quant.probe_tokens=16384")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cpu")
    model, base, _ = load_checkpoint(args.checkpoint, device)
    base = apply_overrides(apply_recipe(base, args.baseline), args.set)
    layout = find_data(args.data, base.model.vocab_size)
    tokens = val_stream(layout, base, args.max_val_tokens)
    tables = byte_counts(layout, spm.SentencePieceProcessor(model_file=layout.tokenizer), base.model.vocab_size,
                         tokens, layout.has_byte_sidecar())
    model.looping = True
    prequant = evaluate(copy.deepcopy(model), tokens, tables, base.eval, "standard", device).val_bpb
    hessians = collect_hessians(model, layout, base.quant, base.train.seq_len, device, base.train.seed)
    probe = LossProbe(model, layout, base.train.seq_len, base.quant.probe_tokens, device, base.train.seed)
    info = {"model": base.model.to_dict(), "eval": base.eval.to_dict(),
            "tokenizer_sha256": file_sha256(layout.tokenizer), "recipe": {}, "provenance": {}, "metrics": {}}
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else list(ROWS)
    results, budget = [], None
    print(f"unquantized standard bpb {prequant:.5f} on {len(tokens) - 1:,} tokens")
    print(f"| recipe | artifact bytes | quantized bpb | gap | gap / {args.baseline} gap | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in [args.baseline] + [r for r in rows if r != args.baseline]:
        spec = ROWS[name]
        preset = apply_recipe(base, spec) if isinstance(spec, str) else \
            dataclasses.replace(base, quant=dataclasses.replace(base.quant, **spec))
        t0 = time.perf_counter()
        row_budget = int(budget * BUDGET_SCALE.get(name, 1.0)) if budget else preset.quant.budget_bytes
        blob = pack_blob(model, hessians, probe, preset, info, row_budget)
        seconds = time.perf_counter() - t0
        budget = budget or len(blob)
        artifact = Artifact(io.BytesIO(blob))
        quantized = load_model(artifact.manifest, artifact.read, device)
        bpb = evaluate(quantized, tokens, tables, base.eval, "standard", device).val_bpb
        gap = bpb - prequant
        results.append({"recipe": name, "bytes": len(blob), "bpb": bpb, "gap": gap, "seconds": round(seconds, 1)})
        ratio = gap / results[0]["gap"] if results[0]["gap"] else float("nan")
        print(f"| {name} | {len(blob):,} | {bpb:.5f} | {gap:+.5f} | {ratio:.3f} | {seconds:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prequant_bpb": prequant, "tokens": len(tokens) - 1, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
