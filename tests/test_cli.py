"""builder/commands/main.py and builder/config.py: presets, overrides and one-line errors."""

import json

import pytest
from conftest import run_pgbuild

from builder.config import TrainConfig, apply_overrides, field_docs
from builder.presets import get_preset
from runtime.errors import PgError


def test_presets_json_lists_record_and_tiny():
    presets = json.loads(run_pgbuild("presets", "--json").stdout)
    assert {"record", "tiny"} <= set(presets)
    record = presets["record"]
    assert record["model"]["num_layers"] == 11 and record["model"]["model_dim"] == 512
    assert record["train"]["matrix_lr"] == 0.022 and record["train"]["ema_decay"] == 0.9965
    assert record["quant"]["matrix_clip_k"] == 12.85 and record["eval"]["stride"] == 64


def test_every_config_field_is_documented():
    import dataclasses

    from builder.config import QuantConfig
    from runtime.config import EvalConfig, ModelConfig
    for cls in (ModelConfig, TrainConfig, QuantConfig, EvalConfig):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


def test_overrides_are_typed():
    preset = apply_overrides(get_preset("tiny"), ["model.num_layers=3", "train.compile=false", "eval.stride=16",
                                                  "quant.codecs=lzma"])
    assert preset.model.num_layers == 3 and preset.train.compile is False
    assert preset.eval.stride == 16 and preset.quant.codecs == ("lzma",)
    for bad in ("model.nope=1", "num_layers=3", "model.num_layers=three", "model.num_layers"):
        with pytest.raises(PgError):
            apply_overrides(preset, [bad])


@pytest.mark.parametrize("args,needle", [
    (["train-and-pack", "--data", "/nonexistent/dir"], "does not exist"),
    (["train-and-pack", "--preset", "record", "--data", "/tmp"], "CUDA"),
    (["train-and-pack", "--set", "model.bogus=1", "--data", "/tmp"], "model.bogus"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    proc = run_pgbuild(*args, "--out", tmp_path / "a.py", check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "a.py").exists()


def test_vocab_mismatch_is_caught_before_training(demo_data, tmp_path):
    proc = run_pgbuild("train-and-pack", "--data", demo_data, "--set", "model.vocab_size=512",
                       "--out", tmp_path / "a.py", check=False)
    assert proc.returncode == 2 and "vocab_size" in proc.stderr


def test_missing_val_split_is_caught_before_training(demo_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(demo_data / "tokenizer.model", data)
    for shard in demo_data.glob("fineweb_train_*.bin"):
        shutil.copy(shard, data)
    proc = run_pgbuild("train-and-pack", "--data", data, "--out", tmp_path / "a.py", check=False)
    assert proc.returncode == 2 and "fineweb_val" in proc.stderr


@pytest.mark.parametrize("assignment, named", [
    ("model.num_heads=3", "model.model_dim (128) must be a multiple of model.num_heads (3)"),
    ("model.rope_dims=7", "model.rope_dims must be even"),
    ("model.bigram_buckets=1", "model.bigram_buckets must be 0 (off) or at least 2"),
    ("model.ve_layers=1,1", "model.ve_layers must not repeat a layer"),
    ("train.swa_start_frac=2", "train.swa_start_frac must be in [0, 1]"),
    ("train.log_every=0", "train.log_every must be at least 1"),
])
def test_each_refused_setting_is_named_alone(assignment, named):
    with pytest.raises(PgError) as refused:
        apply_overrides(get_preset("tiny"), [assignment])
    assert str(refused.value).startswith(named)
