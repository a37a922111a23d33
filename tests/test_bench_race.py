"""bench/race.py: the shrunk race on CPU (the record's own script against pgbuild), the preset ->
environment mapping against the record script's defaults, and the log parsing on its real log."""

import itertools
import json
import math

import pytest
import torch
from conftest import load_bench_script, run_bench_script
from oracle import REFERENCE, load_reference

from builder.presets import get_preset

LOG = REFERENCE / "r0409_train_seed42.log"
needs_reference = pytest.mark.skipif(not (REFERENCE / "r0409_train_gpt.py").exists(),
                                     reason=f"{REFERENCE} is absent: the race needs the record's script")


race = load_bench_script("race")


def run_race(*args):
    return run_bench_script("race", *args)


def raced(record, tmp_path_factory, *args):
    """(table, --json payload) of a race against `record` that must finish."""
    if not (REFERENCE / f"{record}_train_gpt.py").exists():
        pytest.skip(f"{REFERENCE} is absent: the race needs the record's script")
    out = tmp_path_factory.mktemp("race") / "race.json"
    proc = run_race("--record", record, *args, "--json", out)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def cpu_race(demo_data, tmp_path_factory):
    """The CPU defaults (preset tiny, 4 s of training each, 2048 validation tokens), with
    1024-token TTT chunks so that TTT trains between chunks."""
    return raced("r0409", tmp_path_factory, "--data", demo_data, "--set", "eval.ttt_chunk_tokens=1024")


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
    env = race.r0409_env(get_preset("record"), "/data", warmup_steps=20)
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
    assert proc.stderr.strip() == "error: the r0409 script has no model.smear_gate; race a preset without them"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_gpu_varlen_stand_in_equals_the_per_segment_one_and_compiles_whole():
    """On a GPU the record's varlen kernel runs as flex_attention, inside its fullgraph compile
    (the per-segment stand-in reads the boundaries on the host). Fed cu_seqlens as the record
    builds them (padded with the total to a bucket of 8), it equals the per-segment stand-in, and
    dynamo traces it whole."""
    from reference import flex_flash_attn_varlen_func, sdpa_flash_attn_varlen_func

    total, heads = 300, (4, 2, 2)
    cu = torch.tensor([0, 40, 128, 129, 200, 300, 300, 300], dtype=torch.int32)
    q, k, v = (torch.randn(total, h, 16, generator=torch.Generator().manual_seed(h)) for h in heads)
    per_segment = sdpa_flash_attn_varlen_func(q, k, v, cu, cu, 128, 128, causal=True)
    assert torch.allclose(flex_flash_attn_varlen_func(q, k, v, cu, cu, 128, 128, causal=True), per_segment, atol=1e-5)
    whole = torch.compile(flex_flash_attn_varlen_func, fullgraph=True, backend="eager")
    assert torch.allclose(whole(q, k, v, cu, cu, 128, 128, causal=True), per_segment, atol=1e-5)


LOG_R0427 = REFERENCE / "r0427_train_seed42.log"


def logged_hyperparameters(path):
    """The 'Hyperparameters:' block at the head of a record's log, as {name: text}."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index("Hyperparameters:") + 1
    block = itertools.takewhile(lambda line: line.startswith("  "), lines[start:])
    return {name.strip(): value.strip() for name, _, value in (line.partition(":") for line in block)}


@pytest.mark.skipif(not LOG_R0427.exists(), reason=f"{LOG_R0427} is absent")
def test_r0427_preset_maps_onto_the_records_logged_run():
    """Every variable the race sets for the `r0427` preset equals the value the record's seed-42
    run logged, but the seed and the race's own data, logging and fused-kernel settings; the LoRA
    alpha (a class attribute the log does not list) is its script's default."""
    env = race.r0427_env(get_preset("r0427"), "/data", warmup_steps=20, tokenizer="/tok.model")
    logged = logged_hyperparameters(LOG_R0427)
    race_own = {"SEED", "DATA_PATH", "TOKENIZER_PATH", "TRAIN_LOG_EVERY", "FUSED_CE_ENABLED", "TTT_LORA_ALPHA"}
    assert env["TTT_LORA_ALPHA"] == 144.0
    for name, value in env.items():
        if name in race_own:
            continue
        text = logged[name.lower()]
        expected = {"True": 1, "False": 0}.get(text, text)
        assert float(value) == pytest.approx(float(expected)), name


@pytest.fixture(scope="module")
def cpu_race_r0427(caseops_data, tmp_path_factory):
    """--record r0427 at the CPU defaults: tiny with r0427's switches on a CaseOps build, 4 s of
    training each, 4,096 validation tokens (one batch of the record's eval_val)."""
    return raced("r0427", tmp_path_factory, "--data", caseops_data)


def test_cpu_race_against_r0427_trains_and_scores_the_same_thing(cpu_race_r0427):
    table, payload = cpu_race_r0427
    assert "| measurement | r0427 (reference script) | pgbuild | pgbuild / reference | goal |" in table
    for label in ("bpb, standard (document-masked)", "eval seconds, standard + LoRA TTT"):
        assert f"| {label} |" in table
    assert payload["facts"]["failures"] == {} and payload["facts"]["eval_tokens"] == 4096
    ref, ours = payload["sides"]["reference"], payload["sides"]["pgbuild"]
    # Same architecture; the record also stores lane weights for its sequential layers (6 each).
    assert ref["params"] - ours["params"] == 6 * 3 and ours["params"] == 855_011
    for side in (ref, ours):
        assert side["steps"] >= 1 and side["tokens_per_step"] == 4096
        for mode in ("standard", "lora"):
            assert side[mode]["tokens"] == 4096 and side[mode]["seconds"] > 0
            assert math.isfinite(side[mode]["bpb"]) and 1.0 < side[mode]["bpb"] < 5.0
        assert side["lora"]["bpb"] < side["standard"]["bpb"]  # the adapters and phases did train
        assert side["eval_seconds"] == pytest.approx(side["standard"]["seconds"] + side["lora"]["seconds"])


def test_the_races_need_their_own_kind_of_data(demo_data, caseops_data):
    plain = run_race("--data", demo_data, "--record", "r0427")
    assert plain.returncode == 2 and plain.stderr.strip().endswith(
        "no byte sidecar; the r0427 race runs on a CaseOps build (pgbuild data build --caseops)")
    caseops = run_race("--data", caseops_data)
    assert caseops.returncode == 2 and caseops.stderr.strip().endswith("race it with --record r0427")
    partial = run_race("--data", caseops_data, "--record", "r0427", "--eval-tokens", "2048")
    assert partial.returncode == 2 and "scores whole batches only" in partial.stderr
    assert len(partial.stderr.strip().splitlines()) == 1
