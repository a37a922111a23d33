"""builder/judge (runs, stats, record): the Welch test, `pgbuild runs compare` and `pgbuild record` on
real run folders."""

import json
import math
import os
import zipfile

import pytest
from conftest import run_pgbuild

from builder.judge.runs import compare, load_run
from builder.judge.stats import betainc, t_sf, welch_one_sided
from builder.rundir import RunDir
from runtime.artifact import CODE_MEMBERS, Artifact

BASELINE = {1: 1.0810, 2: 1.0812, 3: 1.0808}
BETTER = {4: 1.0700, 5: 1.0703, 6: 1.0698}  # 0.011 bpb = 0.0076 nats/byte better
SLIGHTLY = {7: 1.0760, 8: 1.0762, 9: 1.0758}  # 0.005 bpb = 0.0035 nats/byte better


def write_run(folder, summary, seed, ttt_bpb):
    """A run folder as `train-and-pack --run-dir` writes it, from the fixture's real summary with
    this seed's figures."""
    run = RunDir(folder)
    run.write_summary(dict(summary, seed=seed, ttt_bpb=ttt_bpb, sliding_bpb=ttt_bpb + 0.002), "tiny")
    run.write_log([{"step": 1, "loss": 6.9, "lr_mul": 1.0, "looping": False, "qat": False, "seconds": 0.5,
                    "tokens_per_second": 8000.0, "seed": seed}])
    return folder


@pytest.fixture(scope="module")
def run_dirs(packed, tmp_path_factory):
    _, summary = packed
    root = tmp_path_factory.mktemp("runs")
    return {seed: str(write_run(root / f"seed{seed}", summary, seed, bpb))
            for seed, bpb in {**BASELINE, **BETTER, **SLIGHTLY}.items()}


def test_student_t_tail_matches_tables():
    # Two-decimal critical values from a t table: one-sided 1% and 5% points.
    assert t_sf(3.365, 5) == pytest.approx(0.01, abs=2e-5)
    assert t_sf(2.015, 5) == pytest.approx(0.05, abs=2e-4)
    assert t_sf(2.764, 10) == pytest.approx(0.01, abs=2e-5)
    assert t_sf(0.0, 7.3) == pytest.approx(0.5)
    assert t_sf(-2.015, 5) == pytest.approx(0.95, abs=2e-4)
    assert t_sf(1.0, 1) == pytest.approx(0.25)  # Cauchy: atan(1)/pi from the top
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248)  # I_0.4(2,3) = 1 - sum_{j<2} C(4,j).4^j .6^(4-j)


def test_welch_matches_scipy():
    from scipy import stats  # the [test] extra: an independent implementation, never skipped
    a, b = [1.0810, 1.0812, 1.0808, 1.0815], [1.0700, 1.0703, 1.0690]
    t, df, p = welch_one_sided(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    assert t == pytest.approx(ref.statistic, rel=1e-9) and p == pytest.approx(ref.pvalue, rel=1e-6)
    shifted = stats.ttest_ind(a, [v + 0.005 for v in b], equal_var=False, alternative="greater")
    assert welch_one_sided(a, b, 0.005)[2] == pytest.approx(shifted.pvalue, rel=1e-6)


def test_runs_are_read_from_folders_and_artifacts(run_dirs, artifact):
    run = load_run(run_dirs[4])
    assert run.seed == 4 and run.figures["ttt_bpb"] == BETTER[4] and run.bytes == os.path.getsize(artifact)
    assert run.logs and run.logs[0].endswith("train_log.jsonl")
    from_artifact = load_run(str(artifact))
    manifest = Artifact(str(artifact)).manifest
    assert from_artifact.seed == manifest["provenance"]["seed"]
    assert from_artifact.figures["ttt_bpb"] == manifest["metrics"]["ttt_bpb"]


def test_a_clear_improvement_is_significant(run_dirs):
    result = compare([load_run(run_dirs[s]) for s in BASELINE], [load_run(run_dirs[s]) for s in BETTER])
    assert result["delta_bpb"] == pytest.approx(0.010967, abs=1e-6)
    assert result["delta_nats_per_byte"] == pytest.approx(result["delta_bpb"] * math.log(2))
    assert result["margin_bpb"] == pytest.approx(0.005 / math.log(2))
    assert result["significant"] and result["p"] < 0.01 and result["baseline"]["n"] == 3


def test_cli_compare_applies_the_005_nat_margin(run_dirs):
    a = [run_dirs[s] for s in BASELINE]
    proc = run_pgbuild("runs", "compare", *a, "--", *(run_dirs[s] for s in SLIGHTLY), "--json")
    result = json.loads(proc.stdout)
    # Better beyond doubt, but by 0.0035 nats per byte, short of the 0.005 the challenge asks for.
    assert result["p_any_improvement"] < 0.001 and result["p"] > 0.5 and not result["significant"]
    assert result["candidate"]["mean"] == pytest.approx(1.0760) and result["candidate"]["std"] == pytest.approx(0.0002)
    table = run_pgbuild("runs", "compare", "--metric", "sliding_bpb", *a, "--", *(run_dirs[s] for s in BETTER))
    assert "sliding_bpb" in table.stdout and "yes" in table.stdout and "1.07203" in table.stdout


def test_cli_compare_errors(run_dirs, artifact):
    one = run_pgbuild("runs", "compare", run_dirs[1], "--", run_dirs[4], run_dirs[5], check=False)
    assert one.returncode == 2 and "at least 2 runs per group" in one.stderr
    missing = run_pgbuild("runs", "compare", run_dirs[1], run_dirs[2], "--", run_dirs[4], run_dirs[5],
                          "--metric", "nope_bpb", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "no nope_bpb" in missing.stderr
    empty = run_pgbuild("runs", "compare", os.path.dirname(str(artifact)), "--", run_dirs[4], check=False)
    assert empty.returncode == 2 and "no summary.json" in empty.stderr


def test_record_folder(run_dirs, artifact, tmp_path):
    out = tmp_path / "records" / "2026-05-01_tiny"
    proc = run_pgbuild("record", "--artifact", artifact, "--runs", *(run_dirs[s] for s in BETTER), "--out", out,
                       "--author", "someone", "--json")
    result = json.loads(proc.stdout)
    size = os.path.getsize(artifact)
    assert sorted(os.listdir(out)) == sorted(["README.md", "submission.json", "artifact.py", "train_gpt.py"]
                                             + [f"train_seed{s}.jsonl" for s in BETTER]
                                             + [f"summary_seed{s}.json" for s in BETTER])
    assert (out / "artifact.py").read_bytes() == artifact.read_bytes()
    sub = json.loads((out / "submission.json").read_text())
    assert sub == {k: v for k, v in result.items() if k not in ("out", "files", "warnings")}
    assert result["warnings"] == [] and "warning" not in proc.stderr  # the tiny model evaluates in seconds
    assert sub["val_bpb"] == pytest.approx(1.07003, abs=1e-5) and sub["val_bpb_std"] == pytest.approx(0.00025, abs=1e-5)
    assert sub["artifact_bytes"] == size and sub["compliance"]["artifact_under_16mb"] and sub["author"] == "someone"
    assert sub["seeds"] == [4, 5, 6] and sub["seed_results"]["5"] == {"val_bpb": 1.0703, "artifact_bytes": size}
    assert sub["artifact_of_seed"] == ["4", "5", "6"]  # every run recorded this very file as its artifact
    # Counted as the challenge counts: the code file's size plus the model's stored bytes.
    with zipfile.ZipFile(artifact) as zf:
        model = sum(i.compress_size for i in zf.infolist() if i.filename not in CODE_MEMBERS)
    assert sub["bytes_code"] == os.path.getsize(out / "train_gpt.py") and sub["bytes_model"] == model
    assert sub["bytes_total"] == sub["bytes_code"] + sub["bytes_model"] <= 16_000_000
    assert sub["compliance"]["code_plus_model_under_16mb"]
    readme = (out / "README.md").read_text()
    assert f"{sub['bytes_total']:,}" in readme and "torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert "| 5 |" in readme and "**1.07030**" in readme and f"{size:,}" in readme and "**1.07003**" in readme
    assert json.loads((out / "train_seed4.jsonl").read_text())["seed"] == 4

    again = run_pgbuild("record", "--artifact", artifact, "--runs", run_dirs[4], "--out", out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run_pgbuild("record", "--artifact", artifact, "--runs", run_dirs[4], "--metric", "nope_bpb",
                      "--out", tmp_path / "records" / "other", check=False)
    assert bad.returncode == 2 and sorted(os.listdir(tmp_path / "records")) == ["2026-05-01_tiny"]  # no leftovers


def test_record_warns_of_an_evaluation_past_the_time_limit(packed, artifact, demo_data, tmp_path):
    _, summary = packed
    slow = str(write_run(tmp_path / "slow", dict(summary, ttt_seconds=100.0), 11, 1.07))
    quiet = run_pgbuild("record", "--artifact", artifact, "--runs", slow, "--out", tmp_path / "a", "--json")
    assert json.loads(quiet.stdout)["warnings"] == []  # 100 s, on the prefix the run scored
    # Scaled to the whole validation stream, the prefix's 100 s become more than 600.
    loud = run_pgbuild("record", "--artifact", artifact, "--runs", slow, "--out", tmp_path / "b", "--data", demo_data,
                       "--json")
    warnings = json.loads(loud.stdout)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ttt evaluation would take about ")
    assert f"(100.0 s for {summary['eval_tokens']:,} tokens, scaled to the full validation stream's" in warnings[0]
    assert warnings[0] in loud.stderr and os.path.isdir(tmp_path / "b")  # a warning, not a refusal
