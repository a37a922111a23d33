"""builder/budget.py and the train -> quantize commands: the artifact always fits the budget."""

import json
import os

import pytest

from conftest import run_pgbuild


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_data):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    run_pgbuild("train", "--preset", "tiny", "--data", demo_data, "--out", path, "--set", "train.iterations=8")
    return path


def quantize(checkpoint, data, out, *extra):
    return run_pgbuild("quantize", "--checkpoint", checkpoint, "--data", data, "--out", out,
                       "--eval-tokens", 1000, "--eval-modes", "standard", "--json", *extra, check=False)


def test_quantize_then_fit_a_tight_budget(checkpoint, demo_data, tmp_path):
    natural = quantize(checkpoint, demo_data, tmp_path / "natural.py")
    assert natural.returncode == 0, natural.stderr
    natural_bytes = json.loads(natural.stdout.splitlines()[-1])["bytes"]
    assert os.path.getsize(tmp_path / "natural.py") == natural_bytes

    budget = int(natural_bytes * 0.7)
    fitted = quantize(checkpoint, demo_data, tmp_path / "fitted.py", "--budget-bytes", budget)
    assert fitted.returncode == 0, fitted.stderr
    summary = json.loads(fitted.stdout.splitlines()[-1])
    size = os.path.getsize(tmp_path / "fitted.py")
    assert size == summary["bytes"] and 0.9 * budget <= size <= budget
    assert summary["headroom"] == budget - size
    assert min(summary["bits"].values()) < 6  # it really lowered precision somewhere


def test_budget_too_small_fails_cleanly_and_writes_nothing(checkpoint, demo_data, tmp_path):
    proc = quantize(checkpoint, demo_data, tmp_path / "tiny.py", "--budget-bytes", 20000)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]  # progress lines come first
    assert last.startswith("error: budget of 20,000 bytes is too small") and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreadable_checkpoint(tmp_path, demo_data):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = quantize(bad, demo_data, tmp_path / "x.py")
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "Traceback" not in proc.stderr
