"""bench/race.py: the shrunk race on CPU (the record's own script against pgbuild), the preset ->
environment mapping against the record script's defaults, and the log parsing on its real log."""

import json
import math

import pytest
from conftest import load_bench_script, run_bench_script
from oracle import REFERENCE, load_reference

from builder.presets import get_preset

LOG = REFERENCE / "r0409_train_seed42.log"
needs_reference = pytest.mark.skipif(not (REFERENCE / "r0409_train_gpt.py").exists(),
                                     reason=f"{REFERENCE} is absent: the race needs the record's script")


race = load_bench_script("race")


def run_race(*args):
    return run_bench_script("race", *args)


@pytest.fixture(scope="module")
def cpu_race(demo_data, tmp_path_factory):
    """The CPU defaults (preset tiny, 4 s of training each, 2048 validation tokens), with
    1024-token TTT chunks so that TTT trains between chunks."""
    if not (REFERENCE / "r0409_train_gpt.py").exists():
        pytest.skip(f"{REFERENCE} is absent: the race needs the record's script")
    out = tmp_path_factory.mktemp("race") / "race.json"
    proc = run_race("--data", demo_data, "--set", "eval.ttt_chunk_tokens=1024", "--json", out)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_cpu_race_prints_one_table_with_both_sides(cpu_race):
    table, payload = cpu_race
    assert "| measurement | r0409 (reference script) | pgbuild | pgbuild / reference | goal |" in table
    for label in ("training steps in 4 s", "train tokens/s", "MFU (mean over the run)", "peak memory (training)",
                  "bpb, sliding (stride 32)", "bpb, score-first TTT (1024-token chunks, 1 epochs)",
                  "eval seconds, sliding + TTT"):
        assert f"| {label} |" in table
    assert payload["facts"]["failures"] == {} and payload["facts"]["eval_tokens"] == 2048
    assert len(payload["rows"]) == len(table.split("\n\n")[1].splitlines()) - 2


def test_cpu_race_sides_train_and_score_the_same_thing(cpu_race):
    _, payload = cpu_race
    ref, ours = payload["sides"]["reference"], payload["sides"]["pgbuild"]
    # The environment built from the preset gives the record's script the same architecture.
    assert ref["params"] == ours["params"] == 854_800
    for side in (ref, ours):
        assert side["steps"] >= 1 and side["train_seconds"] > 0 and side["tokens_per_step"] == 4096
        assert side["tokens_per_second"] == pytest.approx(side["steps"] * 4096 / side["train_seconds"])
        for mode in ("sliding", "ttt"):
            assert side[mode]["tokens"] == 2048 and side[mode]["seconds"] > 0
            assert math.isfinite(side[mode]["bpb"]) and 1.0 < side[mode]["bpb"] < 5.0
        assert side["ttt"]["bpb"] != side["sliding"]["bpb"]  # TTT did train between chunks
        assert side["eval_seconds"] == pytest.approx(side["sliding"]["seconds"] + side["ttt"]["seconds"])
    tokens_row = next(r for r in payload["rows"] if r["measurement"] == "train tokens/s")
    assert tokens_row["ratio"] == pytest.approx(ours["tokens_per_second"] / ref["tokens_per_second"])


@needs_reference
def test_record_preset_maps_onto_the_record_scripts_defaults():
    """Every variable the race sets for `record` equals the record script's own default, except
    QK_GAIN_INIT, which its 8xH100 run set to 5.25 (its log's header), and the race's own data,
    validation, logging and reserve settings."""
    env = race.reference_env(get_preset("record"), "/data", warmup_steps=20)
    h = load_reference("r0409").Hyperparameters
    ran_with = {"QK_GAIN_INIT": 5.25}
    race_own = {"DATA_DIR", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY", "GPTQ_RESERVE_SECONDS"}
    for name, value in env.items():
        if name in race_own:
            continue
        expected = ran_with.get(name, getattr(h, name.lower()))
        assert float(value) == pytest.approx(float(expected)), name
    assert env["GPTQ_RESERVE_SECONDS"] == 12.0  # the preset's reserve; the race sets 0 on both sides


@needs_reference
def test_parse_reference_log_reads_the_records_real_log():
    lines = LOG.read_text(encoding="utf-8").splitlines()
    parsed = race.parse_reference_log(lines, 786432)
    assert parsed == dict(params=35_944_536, looping_from_step=2018, train_seconds=588.047, steps=4550)
    # A run that ends on its step cap has no stop message: its last per-step line counts.
    capped = race.parse_reference_log(["model_params:10", "1/3 train_loss: 9.0 train_time: 0.0m tok/s: 100",
                                       "3/3 train_loss: 8.0 train_time: 0.1m tok/s: 200"], 50)
    assert capped == dict(params=10, looping_from_step=None, steps=3, train_seconds=0.75)


def test_a_preset_the_record_cannot_mirror_is_one_error_line(demo_data):
    proc = run_race("--data", demo_data, "--set", "model.smear_gate=true")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: the record's script has no model.smear_gate; race a preset without them"
