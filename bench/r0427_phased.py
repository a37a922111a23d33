"""Phased LoRA TTT as the 2026-04-27 record orders it, against pgbuild's `lora` mode, on the same
weights and validation tokens (CPU).

    python bench/r0427_phased.py --checkpoint C.pt --data DIR [--max-val-tokens N] [--phase-docs P]
        [--set eval.FIELD=VALUE]

The checkpoint is a pgbuild one of an r0427-shaped model (`--preset r0427`); its weights are
handed to the record's own code (../shared/reference/r0427_train_gpt.py, loaded as the tests load
it) through `to_r0427`, the inverse of builder.train.importer.from_r0427. Both then score the
same prefix with the same adapter rank, chunk, optimizer and phase settings. pgbuild runs its
lora mode twice: in stream order (phases on the stream's first documents, so no score depends on
later text) and with `lora_order=record` (the record's schedule, which
tests/test_reference_r0427.py proves equal to its code from the same adapter init; here the
adapters' random init differs). The standard mode is scored by both as a check that the weights
arrived intact.
"""

import argparse
import copy
import dataclasses
import math
import time

import sentencepiece as spm
import torch
from race import r0427_env
from reference import load_reference_module

from builder.checkpoint import load_checkpoint
from builder.config import apply_overrides
from builder.pipeline import val_stream
from builder.train.importer import R0427_BANKS, R0427_LANES, R0427_NAMES, _flip_rope_rows
from runtime.api import byte_counts
from runtime.data import find_data
from runtime.evaluate import evaluate


def to_r0427(state, cfg):
    """A pgbuild state dict of ModelConfig `cfg` as the record's `state_dict` (banks stacked, names
    mapped, RoPE rows flipped back; lane weights of the sequential layers at their init)."""
    n, out = cfg.num_layers, {}
    flipped = dict(state)
    for layer in range(n):
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            key = f"blocks.{layer}.attn.{name}.weight"
            flipped[key] = _flip_rope_rows(state[key], heads, cfg)
    used = set()
    for bank, parts in R0427_BANKS.items():
        keys = [f"blocks.{layer}.{part}" for part in parts for layer in range(n)]
        out[bank] = torch.stack([flipped[k] for k in keys])
        used.update(keys)
    lanes = {"lane_post": torch.ones(n, 2, 2), "lane_resid": torch.full((n, 2), 1.1)}
    for name, t in flipped.items():
        parts = name.split(".")
        if name in used:
            continue
        if parts[0] == "blocks" and parts[-1] in lanes:
            lanes[parts[-1]][int(parts[1])] = t
        elif name.endswith(".attn.gate_w"):
            out[name.replace(".attn.gate_w", ".attn.attn_gate_w")] = t
        else:
            out[{v: k for k, v in R0427_NAMES.items()}.get(name, name)] = t
    out.update({record: lanes[ours] for record, ours in R0427_LANES.items()})
    return out


def record_env(preset, data_dir, tokenizer, phase_docs):
    """The race's mapping of the preset onto the record's Hyperparameters, with eval_val scoring
    one sequence per batch (its document segments are then pgbuild's rows) and the phases over
    `phase_docs` documents."""
    return {**r0427_env(preset, data_dir, 0, tokenizer), "VAL_BATCH_TOKENS": 8 * preset.eval.seq_len,
            "PHASED_TTT_PREFIX_DOCS": phase_docs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-val-tokens", type=int)
    parser.add_argument("--phase-docs", type=int, help="documents the phases train on (default: eval.lora_phase_docs)")
    parser.add_argument("--set", action="append", default=[], metavar="eval.FIELD=VALUE")
    args = parser.parse_args()
    device = torch.device("cpu")
    model, preset, _ = load_checkpoint(args.checkpoint, device)
    preset = apply_overrides(preset, args.set)
    if args.phase_docs is not None:
        preset = dataclasses.replace(preset, eval=dataclasses.replace(preset.eval, lora_phase_docs=args.phase_docs))
    cfg, evalc = preset.model, preset.eval
    layout = find_data(args.data, cfg.vocab_size)
    tokens = val_stream(layout, preset, args.max_val_tokens)
    counts = byte_counts(layout, spm.SentencePieceProcessor(model_file=layout.tokenizer), cfg.vocab_size, tokens, True)
    model.looping = True

    ref = load_reference_module("r0427", record_env(preset, layout.shard_dir, layout.tokenizer, evalc.lora_phase_docs),
                                cpu=True)
    ref.BOS_ID = cfg.bos_id
    h = ref.Hyperparameters()
    val = ref.ValidationData(h, device)
    val.val_tokens, val.val_bytes = val.val_tokens[:len(tokens)], val.val_bytes[:len(tokens)]
    assert torch.equal(val.val_tokens, torch.from_numpy(tokens.astype("int64")).to(val.val_tokens.dtype))

    def record_model():
        m = ref.GPT(h).float()
        m.load_state_dict(to_r0427(model.state_dict(), cfg))
        m.looping_active = True
        return m

    docs = len(ref._find_docs(val.val_tokens))
    print(f"{len(tokens) - 1:,} tokens, {docs} documents; phases: {evalc.lora_phases} over the first "
          f"{min(evalc.lora_phase_docs, docs)} documents; LoRA rank {evalc.lora_rank}, chunk {evalc.lora_chunk_tokens}")
    print("| mode | pgbuild bpb | s | the record's code, bpb | s |")
    print("|---|---:|---:|---:|---:|")
    runs = [("standard", "standard", evalc, True), ("lora, stream order", "lora", evalc, True),
            # The record's lora run serves both of pgbuild's orders.
            ("lora, lora_order=record", "lora", dataclasses.replace(evalc, lora_order="record"), False)]
    for label, mode, ecfg, record_too in runs:
        t0 = time.perf_counter()
        ours = evaluate(copy.deepcopy(model), tokens, counts, ecfg, mode, device).val_bpb
        t1 = time.perf_counter()
        if not record_too:
            print(f"| {label} | {ours:.5f} | {t1 - t0:.0f} | | |", flush=True)
            continue
        m = record_model()
        theirs = (ref.eval_val(h, device, val, m) if mode == "standard"
                  else ref.eval_val_ttt_phased(h, m, device, val, m.forward_ttt))[1]
        print(f"| {label} | {ours:.5f} | {t1 - t0:.0f} | {theirs:.5f} | {time.perf_counter() - t1:.0f} |", flush=True)
        if mode == "standard" and not math.isclose(ours, theirs, abs_tol=1e-5):
            raise SystemExit("standard bpb differs: the weights did not arrive intact")


if __name__ == "__main__":
    main()
