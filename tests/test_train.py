"""builder/train.py and builder/loader.py: distributed equivalence, schedules, data hygiene."""

import os

import numpy as np
import torch

from builder.loader import ShuffledSequences
from conftest import run_pgbuild
from runtime.data import find_data

SHORT = ["--set", "train.iterations=3", "--set", "train.ema_decay=0", "--set", "train.micro_batch_tokens=1024"]


def train_checkpoint(data, out, *extra):
    run_pgbuild("train", "--preset", "tiny", "--data", data, "--out", out, *SHORT, *extra)
    return torch.load(out, weights_only=True)


def test_two_processes_match_one_process_with_accumulation(demo_data, tmp_path):
    """gloo DDP over 2 ranks (2 micro-batches each) vs 1 rank with 4: same batch, same weights."""
    single = train_checkpoint(demo_data, tmp_path / "one.pt")
    double = train_checkpoint(demo_data, tmp_path / "two.pt", "--nproc-per-node", 2)
    assert double["provenance"]["world_size"] == 2 and single["provenance"]["world_size"] == 1
    for name, value in single["state"].items():
        torch.testing.assert_close(double["state"][name], value, rtol=1e-3, atol=1e-3, msg=name)


def test_record_preset_trains_on_cpu_with_shrunk_shapes(demo_data, tmp_path):
    ckpt = tmp_path / "record.pt"
    run_pgbuild("train", "--preset", "record", "--data", demo_data, "--out", ckpt,
                "--set", "train.require_cuda=false", "--set", "model.vocab_size=1024",
                "--set", "model.model_dim=128", "--set", "model.mlp_mult=2", "--set", "train.seq_len=64",
                "--set", "train.batch_tokens=512", "--set", "train.micro_batch_tokens=512",
                "--set", "train.iterations=2")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["preset"]["model"]["num_layers"] == 11 and saved["preset"]["model"]["num_loops"] == 2
    assert saved["provenance"]["steps"] == 2


def test_loader_reads_only_training_shards(demo_data):
    layout = find_data(str(demo_data), 1024)
    loader = ShuffledSequences(layout.shards("train"), 64, seed=0)
    assert loader.paths and all(os.path.basename(p).startswith("fineweb_train_") for p in loader.paths)


def test_loader_slices_one_global_batch_across_ranks(demo_data):
    layout = find_data(str(demo_data), 1024)
    whole, _ = ShuffledSequences(layout.shards("train"), 64, seed=3).next_batch(8)
    halves = [ShuffledSequences(layout.shards("train"), 64, seed=3).next_batch(4, rank, 2)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    x, y = ShuffledSequences(layout.shards("train"), 64, seed=3).next_batch(2)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_draws_without_replacement_within_an_epoch(tmp_path):
    from builder.dataset import write_shard

    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000) % 60000)
    loader = ShuffledSequences([str(tmp_path / "fineweb_train_000000.bin")], 10, seed=1)
    starts = [int(loader.next_batch(1)[0][0, 0]) for _ in range(99)]
    assert len(set(starts)) == 99


def test_uneven_batch_split_is_refused(demo_data, tmp_path):
    proc = run_pgbuild("train", "--preset", "tiny", "--data", demo_data, "--out", tmp_path / "x.pt",
                       "--set", "train.micro_batch_tokens=3000", check=False)
    assert proc.returncode == 2 and "does not split" in proc.stderr
    assert not (tmp_path / "x.pt").exists()
