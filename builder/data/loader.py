"""Training batches: shuffled seq_len+1 windows over the training shards only.

Every rank runs the same seeded sampler over all shards and keeps its own slice of each global
batch, so the sequences of a step do not depend on the world size: N processes see exactly what
one process with N times the gradient accumulation sees (the equivalence the tests check).
"""

import numpy as np
import torch

from runtime.data import read_shard
from runtime.errors import PgError


class ShuffledSequences:
    """Windows without replacement, as the 2026-04-09 record draws them.

    Each shard gets a random phase and a permutation of its windows; each draw picks a shard with
    probability proportional to its remaining windows; when all are used up, a new epoch
    reshuffles. Shards are memory-mapped, so only the windows a rank keeps are read.
    """

    def __init__(self, paths, seq_len, seed=0):
        self.paths = list(paths)
        self.shards = [read_shard(p, mmap=True) for p in self.paths]
        self.seq_len = seq_len
        self.rng = np.random.Generator(np.random.PCG64(seed))
        if all(s.size <= seq_len + 1 for s in self.shards):
            raise PgError(f"training shards are shorter than one sequence of {seq_len + 1} tokens; "
                          f"lower train.seq_len or add data")
        self._new_epoch()

    def _new_epoch(self):
        self.order = []
        for shard in self.shards:
            spare = shard.size - self.seq_len - 1
            phase = int(self.rng.integers(min(self.seq_len, spare) + 1)) if spare >= 0 else 0
            count = max((shard.size - phase - 1) // self.seq_len, 0)
            self.order.append(list(phase + self.seq_len * self.rng.permutation(count)))

    def _draw(self):
        remaining = np.array([len(o) for o in self.order], dtype=np.float64)
        if remaining.sum() == 0:
            self._new_epoch()
            remaining = np.array([len(o) for o in self.order], dtype=np.float64)
        shard = int(self.rng.choice(len(self.order), p=remaining / remaining.sum()))
        return shard, int(self.order[shard].pop())

    def state_dict(self):
        """The sampler's position: RNG state and the windows left in this epoch, per shard."""
        return {"rng": self.rng.bit_generator.state,
                "order": [torch.tensor(o, dtype=torch.int64) for o in self.order]}

    def load_state_dict(self, state):
        if len(state["order"]) != len(self.shards):
            raise PgError(f"the saved data order covers {len(state['order'])} training shards, "
                          f"this dataset has {len(self.shards)}; resume with the same data")
        self.rng.bit_generator.state = state["rng"]
        self.order = [o.tolist() for o in state["order"]]

    def next_batch(self, num_seqs, rank=0, world=1):
        """Draw a global batch of num_seqs * world windows; return this rank's inputs and
        targets, each (num_seqs, seq_len) int64."""
        draws = [self._draw() for _ in range(num_seqs * world)][rank * num_seqs:(rank + 1) * num_seqs]
        windows = np.stack([self.shards[s][start:start + self.seq_len + 1] for s, start in draws])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]
