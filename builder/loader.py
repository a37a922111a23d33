"""Training batches: the 2026-04-09 record's shuffled sequence loader, over training shards only."""

import numpy as np
import torch

from runtime.data import read_shard


class ShuffledSequences:
    """Random seq_len+1 windows without replacement, per rank.

    Rank r owns shards r, r+W, ... (all shards when there are fewer than ranks). Each shard gets a
    random phase and a permutation of its windows, and each draw picks a shard with probability
    proportional to its remaining windows; when all are used up, a new epoch reshuffles.
    """

    def __init__(self, paths, seq_len, rank=0, world=1, seed=0):
        owned = paths[rank::world] if len(paths) >= world else paths
        self.shards = [read_shard(p, mmap=True) for p in owned]
        self.paths = owned
        self.seq_len = seq_len
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        if all(s.size <= seq_len + 1 for s in self.shards):
            raise ValueError(f"training shards are shorter than one sequence of {seq_len} tokens")
        self._new_epoch()

    def _new_epoch(self):
        self.order = []
        for shard in self.shards:
            phase = int(self.rng.integers(min(self.seq_len, max(shard.size - self.seq_len - 1, 1))))
            count = max((shard.size - phase - 1) // self.seq_len, 0)
            self.order.append(list(phase + self.seq_len * self.rng.permutation(count)))

    def _draw(self):
        remaining = np.array([len(o) for o in self.order], dtype=np.float64)
        if remaining.sum() == 0:
            self._new_epoch()
            remaining = np.array([len(o) for o in self.order], dtype=np.float64)
        shard = int(self.rng.choice(len(self.order), p=remaining / remaining.sum()))
        start = int(self.order[shard].pop())
        return self.shards[shard][start:start + self.seq_len + 1]

    def next_batch(self, num_seqs):
        """Inputs and targets, each (num_seqs, seq_len) int64."""
        windows = torch.from_numpy(np.stack([self._draw() for _ in range(num_seqs)]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]
