"""What a model that learned nothing scores on the same tokens, printed beside every bpb so a
trained model can be told from a broken one.

- uniform: every position costs log2(vocab) bits, divided by the same byte count as the model's.
- unigram: an adaptive add-one unigram, each target charged -log2((count so far + 1) / (positions
  so far + vocab)) from the targets already scored before it. It sees nothing a legal evaluator
  could not (no oracle fitted on the scored tokens, no training shards, which an artifact may not
  have), so it is a real causal compressor of the stream and a fair floor to beat.
"""

import math

import numpy as np

from .evaluate import target_bytes


def unigram_bits(targets, vocab):
    """Total bits of `targets` under the adaptive add-one unigram."""
    targets = np.asarray(targets, np.int64)
    order = np.argsort(targets, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(targets[order]) != 0])
    lengths = np.diff(np.r_[starts, len(targets)])
    seen = np.empty(len(targets), np.float64)  # how often each target occurred before its position
    seen[order] = np.arange(len(targets)) - np.repeat(starts, lengths)
    return float(-np.log2((seen + 1) / (np.arange(len(targets)) + vocab)).sum())


def baselines(tokens, tables, vocab):
    """{'uniform_bpb', 'unigram_bpb'} for scoring every position of `tokens` (trimmed, as evaluated)."""
    tokens = np.asarray(tokens)
    total_bytes = int(target_bytes(tokens, tables).sum())
    positions = len(tokens) - 1
    return {"uniform_bpb": positions * math.log2(vocab) / total_bytes,
            "unigram_bpb": unigram_bits(tokens[1:], vocab) / total_bytes}


def describe(values):
    """` (uniform 2.345, unigram 1.234 bpb)`: the text that follows a printed bpb."""
    return f" (baselines: uniform {values['uniform_bpb']:.4f}, unigram {values['unigram_bpb']:.4f} bpb)"
