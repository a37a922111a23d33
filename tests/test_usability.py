"""What a new user sees: the thread count, baselines beside the bpb, progress, which time rule
ended training, the presets listing and the missing-matplotlib refusal (issue 16)."""

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, run_artifact

from builder.commands import main as cli
from builder.timebudget import describe
from runtime.baselines import baselines, unigram_bits
from runtime.progress import Pace, ProgressLine, estimate_line
from runtime.threads import default_threads, free_cores, set_threads


def test_threads_default_to_free_cores_capped_by_torch():
    assert 1 <= default_threads() <= min(torch.get_num_threads(), free_cores())
    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    # The suite's OMP_NUM_THREADS=1 (conftest) lowers torch's own default, so subprocesses use one.
    proc = subprocess.run([sys.executable, "-c", "from runtime.threads import set_threads; print(set_threads())"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "1", proc.stderr


def test_artifact_takes_threads_and_prints_baselines(artifact, demo_data, clean_env, tmp_path):
    bad = run_artifact(artifact, "eval", "--data", demo_data, "--threads", "0", env=clean_env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "--threads" in bad.stderr
    args = ("eval", "--data", demo_data, "--mode", "standard", "--max-val-tokens", 2000, "--threads", 1)
    result = json.loads(run_artifact(artifact, *args, "--json", env=clean_env, cwd=tmp_path).stdout)
    # A trained model beats the adaptive unigram, which beats knowing nothing.
    assert result["val_bpb"] < result["unigram_bpb"] < result["uniform_bpb"]
    text = run_artifact(artifact, *args, env=clean_env, cwd=tmp_path)
    assert f"uniform {result['uniform_bpb']:.4f}" in text.stdout and "unigram" in text.stdout
    assert "\r" not in text.stderr  # no progress redraws when stderr is not a terminal


def test_unigram_baseline_is_the_sequential_add_one_code():
    targets = np.random.default_rng(0).integers(0, 7, 300)
    counts, bits = np.zeros(7), 0.0
    for i, y in enumerate(targets):
        bits -= math.log2((counts[y] + 1) / (i + 7))
        counts[y] += 1
    assert math.isclose(unigram_bits(targets, 7), bits, rel_tol=1e-12)
    tokens = np.r_[0, targets]
    tables = (np.ones(7, np.int64), np.zeros(7, bool), np.zeros(7, bool))  # one byte per token
    values = baselines(tokens, tables, 7)
    assert math.isclose(values["uniform_bpb"], math.log2(7)) and math.isclose(values["unigram_bpb"], bits / 300)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_only_on_a_terminal():
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        line = ProgressLine("sliding", 1000, stream=stream)
        line.EVERY = 0.0
        line(0, 400)
        line.close()
    assert "sliding: 400/1,000 tokens scored" in terminal.getvalue() and "ETA" in terminal.getvalue()
    assert pipe.getvalue() == ""


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def score_batches(pace, clock, times, rows=10, width=100):
    """Forwards ending at `times`, each reporting `rows` consecutive ranges at once."""
    for t in times:
        clock.now = t
        for _ in range(rows):
            pace(pace.done, pace.done + width)


def test_the_estimate_counts_the_first_batch_once():
    # A first batch of 5 s (compilation, say), then 1,000 positions a second.
    clock, told = Clock(), []
    pace = Pace(10_000, tell=told.append, clock=clock)
    score_batches(pace, clock, [5.0, 6.0])
    assert pace.estimate is None  # one steady batch is not seen whole until the next begins
    score_batches(pace, clock, [7.0, 8.0])
    assert told == [pace] and pace.estimate == 14.0 and pace.first == 5.0  # not 10 x 5 s
    assert estimate_line("sliding", pace, 10_000) == "sliding: about 14 s for 10,000 tokens (first batch 5.0 s)"


def test_fast_forwards_after_a_slow_compiled_first_batch_are_told_apart():
    # A GPU's picture: 3 s of compilation, then 20 ms forwards, 100 positions each; one forward's
    # row calls arrive 10 us apart. (Judged against 1% of the first batch, 30 ms, every pause
    # looked like the same forward and no estimate ever came.)
    clock, told = Clock(), []
    pace = Pace(100_000, tell=told.append, clock=clock)
    for t in [3.0 + 0.02 * k for k in range(60)]:
        for row in range(10):
            clock.now = t + row * 1e-5
            pace(pace.done, pace.done + 10)
    assert told == [pace] and pace.first_batch[1] == 100
    assert pace.estimate == pytest.approx(3.0 + 99_900 / 5000, rel=0.01)  # 5,000 positions a second


def test_a_training_mode_waits_for_an_update_before_estimating():
    clock = Clock()
    pace = Pace(10_000, trains=True, clock=clock)
    score_batches(pace, clock, [5.0, 6.0, 7.0])
    assert pace.estimate is None  # two steady seconds, but no update among them yet
    clock.now = 7.5
    pace.trained(0, 1000)  # an update costing 0.5 s, after the batch that ended at 7.0
    score_batches(pace, clock, [8.5, 9.5])
    # From the first batch's end (5.0, 1,000) to the batch after the update (8.5, 4,000).
    assert pace.estimate == pytest.approx(5.0 + 9000 * 3.5 / 3000)


def test_summary_says_which_rule_ended_training(packed):
    _, summary = packed
    assert summary["stopped_by"] == "step cap" and summary["within_wallclock"]
    line = describe({"train": 50.0, "hessians": 5.0}, 1800, steps=300, iterations=300)
    assert line.startswith("training ended at the step cap") and "within the 1800 s limit" in line
    over = describe({"train": 590.0, "hessians": 20.0}, 600, steps=4000, iterations=20000)
    assert "wallclock limit after 4000" in over and "OVER by 10.0 s" in over


def test_presets_by_section_with_full_names():
    result = CliRunner().invoke(cli.main, ["presets", "--section", "train"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "train.muon_momentum_warmup_start" in result.output and "model.num_layers" not in result.output
    assert "Seed for weight init and data order." in result.output  # a meaning, unwrapped at 100 columns
    listed = json.loads(CliRunner().invoke(cli.main, ["presets", "--section", "eval", "--json"]).output)
    assert set(listed["tiny"]) == {"eval"}


def test_audit_plot_without_matplotlib_is_one_line(artifact, tmp_path):
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('matplotlib is absent here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "builder", "audit", str(artifact), "--plot", str(tmp_path / "a.png")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --plot needs matplotlib, which is not installed: "
                                                "pip install 'pgbuild[plot]'"]
    assert not (tmp_path / "a.png").exists()
