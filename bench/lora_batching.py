"""What the LoRA mode's batching costs at the record's scale, counted, not timed.

    python bench/lora_batching.py --data DIR [--docs 50000] [--seed 0] [--set eval.FIELD=VALUE]

Document lengths are drawn (with replacement, seeded) from the documents of DIR's training
shards, as many as the challenge's validation set holds (50,000). Every forward of the lora mode
has lora_group_rows rows of its chunk's window width (runtime/lora_ttt.py), so a schedule's
cost is the token positions its forwards hold: sum over batches and chunks of rows x width. The
useful part is each document's own windows; the rest is padding. Three schedules of the same
documents, phases as configured (default: the eval config's, the record's 2,500 documents in 3
phases, batches of 64, chunks of 48, windows up to 2,048):

- stream order, batches cut in stream order (pgbuild before 2026-12-06's fourth session);
- stream order, each segment between phases batched longest first (pgbuild now);
- the record's order (lora_order=record): all documents batched by length, longest first.
"""

import argparse
import math

import numpy as np

from builder.config import apply_overrides
from builder.presets import get_preset
from runtime.data import find_data, load_tokens
from runtime.lora_ttt import documents, groups, phase_ends, record_schedule, stream_schedule


def forward_positions(batches, lengths, cfg):
    """Token positions the forwards of these batches hold, and the documents' own share."""
    chunk, rows = cfg.lora_chunk_tokens, min(cfg.lora_group_rows, cfg.lora_batch_docs)
    width = [min((c + 1) * chunk, cfg.seq_len) for c in range(math.ceil(max(lengths) / chunk))]
    held = useful = 0
    for batch in batches:
        chunks = [math.ceil(lengths[i] / chunk) for i in batch]
        for c in range(max(chunks)):
            running = sum(n > c for n in chunks)
            held += math.ceil(running / rows) * rows * width[c]
            useful += running * width[c]
    return held, useful


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="eval.FIELD=VALUE")
    args = parser.parse_args()
    preset = apply_overrides(get_preset("record"), args.set)
    cfg = preset.eval
    layout = find_data(args.data, None)
    train = load_tokens(layout, "train")
    pool = np.array([end - first for first, end in documents(train, preset.model.bos_id)][1:])  # the first may be cut
    lengths = np.random.default_rng(args.seed).choice(pool, args.docs).tolist()
    bounds = np.cumsum([0] + lengths).tolist()
    docs = list(zip(bounds[:-1], bounds[1:]))
    print(f"{args.docs:,} documents drawn from {len(pool):,} (mean {np.mean(lengths):.0f} tokens, "
          f"max {max(lengths):,}); batches of {cfg.lora_batch_docs}, {cfg.lora_phases} phases over "
          f"{cfg.lora_phase_docs:,} documents, chunks of {cfg.lora_chunk_tokens}, windows up to {cfg.seq_len}")
    ends = phase_ends(cfg, len(docs))
    segments = zip([0] + ends, ends + [len(docs)])
    schedules = {
        "stream order, stream batches": [b for first, end in segments
                                         for b in groups(list(range(first, end)), cfg.lora_batch_docs)],
        "stream order, longest first per segment": [b for batches, _ in stream_schedule(docs, cfg) for b in batches],
        "the record's order": [b for batches, _ in record_schedule(docs, cfg) for b in batches],
    }
    print("| schedule | forward positions | documents' own | padding share | vs the record's |")
    print("|---|---:|---:|---:|---:|")
    record_held = forward_positions(schedules["the record's order"], lengths, cfg)[0]
    for name, batches in schedules.items():
        held, useful = forward_positions(batches, lengths, cfg)
        print(f"| {name} | {held / 1e9:.2f} G | {useful / 1e9:.2f} G | {1 - useful / held:.1%} | "
              f"{held / record_held:.2f}x |")


if __name__ == "__main__":
    main()
