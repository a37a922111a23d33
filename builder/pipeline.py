"""The stages behind the commands: train, quantize + fit the budget + pack, measure.

Quantization and packing run on rank 0; the build-time evaluation of the packed artifact runs on
every rank (the evaluator splits the windows), using the artifact's own bytes and the runtime's
own decoder, so the recorded figures are those of the file that gets written.
"""

import copy
import datetime
import hashlib
import io
import pickle
import platform
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist

from builder.budget import fit_budget
from builder.config import Preset
from builder.pack import StreamCompressor, build_artifact, write_atomic
from builder.quantize import Quantizer, collect_hessians
from runtime.artifact import Artifact
from runtime.cli import load_model
from runtime.data import load_tokens
from runtime.errors import PgError
from runtime.evaluate import byte_tables, evaluate, trim_stream
from runtime.model import GPT

METRICS_RESERVE_BYTES = 1024
"""Room kept under the budget for the build-time figures, which are written into the manifest
after the weights are fixed."""


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(preset, result, world):
    return {"pgbuild_commit": git_commit(), "seed": preset.train.seed, "steps": result.steps,
            "train_seconds": round(result.seconds, 1), "world_size": world, "train_shards": result.shards,
            "torch": str(torch.__version__), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def save_checkpoint(path, model, preset, prov):
    buf = io.BytesIO()
    torch.save({"preset": preset.to_dict(), "state": {k: v.cpu() for k, v in model.state_dict().items()},
                "provenance": prov}, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path, device):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        preset = Preset.from_dict(ckpt["preset"])
        model = GPT(preset.model)
        model.load_state_dict(ckpt["state"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise PgError(f"{path}: not a readable pgbuild checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(device), preset, ckpt["provenance"]


def val_stream(layout, preset, max_tokens):
    return trim_stream(load_tokens(layout, "val", max_tokens), preset.eval.seq_len)


def measure(model, blob, layout, preset, device, eval_tokens, modes):
    """bpb of the unquantized model and of the packed artifact's weights on a validation prefix."""
    import sentencepiece as spm

    tokens = val_stream(layout, preset, eval_tokens)
    tables = byte_tables(spm.SentencePieceProcessor(model_file=layout.tokenizer), preset.model.vocab_size)
    figures = {"eval_tokens": int(len(tokens) - 1)}
    model.looping = True
    figures["prequant_bpb"] = round(evaluate(model, tokens, tables, preset.eval, "standard", device).val_bpb, 5)
    artifact = Artifact(io.BytesIO(blob))
    quantized = load_model(artifact.manifest, artifact.read, device)
    for mode in modes:
        # TTT trains the weights it scores with, so every mode starts from a fresh copy.
        result = evaluate(copy.deepcopy(quantized), tokens, tables, preset.eval, mode, device)
        figures[f"{mode}_bpb"] = round(result.val_bpb, 5)
        figures[f"{mode}_seconds"] = round(result.seconds, 2)
    return figures


def quantize_and_pack(model, preset, layout, out, ctx, prov, eval_tokens, eval_modes, report=print):
    """Hessians -> GPTQ -> budget fit -> measured figures -> artifact at `out`; returns its
    manifest's figures and size. Every rank calls this; rank 0 quantizes and writes."""
    qcfg = preset.quant
    info = {"model": preset.model.to_dict(), "eval": preset.eval.to_dict(),
            "tokenizer_sha256": file_sha256(layout.tokenizer),
            "recipe": {"method": "gptq+sdclip", **qcfg.to_dict()}, "provenance": prov, "metrics": {}}
    blob = plan = None
    if ctx.is_main:
        report("collecting Hessians from training batches")
        hessians = collect_hessians(model, layout, qcfg, preset.train.seq_len, ctx.device, preset.train.seed)
        quantizer = Quantizer(model.state_dict(), hessians, qcfg)
        compressor = StreamCompressor(qcfg.codecs)

        def pack(plan):
            return build_artifact(quantizer.encode_all(plan), info, compressor)

        report("quantizing (GPTQ + SDClip) and packing")
        plan, blob = fit_budget(quantizer, pack, qcfg.budget_bytes, METRICS_RESERVE_BYTES, report)
    if ctx.world > 1:
        shared = [blob]
        dist.broadcast_object_list(shared, src=0)
        blob = shared[0]
    report("measuring bpb at build time")
    info["metrics"] = measure(model, blob, layout, preset, ctx.device, eval_tokens, eval_modes)
    if not ctx.is_main:
        return None
    blob = pack(plan)
    if len(blob) > qcfg.budget_bytes:
        raise PgError(f"packed artifact is {len(blob):,} bytes, over the {qcfg.budget_bytes:,}-byte budget")
    write_atomic(out, blob)
    return {"path": str(out), "bytes": len(blob), "budget_bytes": qcfg.budget_bytes,
            "headroom": qcfg.budget_bytes - len(blob), "bits": plan, **info["metrics"]}
