"""builder/config.py PRESETS: every preset resolves, says where it comes from, and trains."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from builder.commands import main as cli
from builder.config import apply_overrides
from builder.presets import PRESETS, get_preset
from builder.train.trainer import Context, train
from runtime.data import find_data

SHRINK = ["model.model_dim=128", "model.num_heads=2", "model.num_kv_heads=1", "model.vocab_size=1024",
          "train.seq_len=64", "train.batch_tokens=512", "train.micro_batch_tokens=512", "train.require_cuda=false",
          "train.iterations=2", "train.max_wallclock_seconds=1000000"]
"""CPU shapes: the presets' depth, features and schedules, at width 128 (heads of 64 so every
RoPE setting fits) and the demo tokenizer's vocabulary."""


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only wait on each other
    yield
    torch.set_num_threads(threads)


def test_presets_are_the_seeds():
    assert {"record", "pr1716", "pr456", "pr1731", "baseline", "tiny"} <= set(PRESETS)
    for name, make in PRESETS.items():
        assert make.__doc__ and len(make.__doc__) > 60, f"preset {name} needs a docstring saying what it is"
    pr1716, pr456, baseline = get_preset("pr1716"), get_preset("pr456"), get_preset("baseline")
    assert (pr1716.model.bigram_buckets, pr1716.model.bigram_dim, pr1716.model.smear_gate) == (16384, 32, True)
    assert (pr456.model.num_layers, pr456.model.mlp_activation, pr456.model.xsa_last_n) == (10, "relu2", 3)
    assert (pr456.train.swa_every, pr456.train.qat_threshold, pr456.train.muon_weight_decay) == (50, 0.15, 0.04)
    assert "inferred" in PRESETS["pr1731"].__doc__.lower() and get_preset("pr1731").quant.transforms
    assert (baseline.model.num_layers, baseline.model.model_dim, baseline.model.mlp_mult, baseline.model.vocab_size,
            baseline.model.num_loops, baseline.model.xsa_last_n, baseline.model.parallel_residual_start) == \
        (9, 512, 2.0, 1024, 0, 0, -1)
    listed = json.loads(CliRunner().invoke(cli.main, ["presets", "--json"]).output)
    assert listed["pr1716"]["model"]["bigram_buckets"] == 16384 and set(listed) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_two_steps_on_cpu(name, demo_data):
    preset = apply_overrides(get_preset(name), SHRINK)
    result = train(preset, find_data(str(demo_data), 1024), Context(torch.device("cpu")), report=lambda *_: None)
    assert result.steps == 2 and all(math.isfinite(e["loss"]) for e in result.log)
    assert len(result.model.blocks) == get_preset(name).model.num_layers
    assert (result.model.bigram_emb is not None) == bool(preset.model.bigram_buckets)
