"""builder/budget.py and the train -> quantize commands: the artifact always fits the budget."""

import json
import os

import pytest

from conftest import run_pgbuild


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_data):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    run_pgbuild("train", "--preset", "tiny", "--data", demo_data, "--out", path, "--set", "train.iterations=120",
                "--set", "train.max_wallclock_seconds=900")
    return path


def quantize(checkpoint, data, out, *extra):
    """`pgbuild quantize` with the r0409 recipe unless `extra` names another."""
    recipe = [] if "--recipe" in map(str, extra) else ["--recipe", "r0409"]
    return run_pgbuild("quantize", "--checkpoint", checkpoint, "--data", data, "--out", out,
                       "--eval-tokens", 1000, "--eval-modes", "standard", "--json", *recipe, *extra, check=False)


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


def test_rate_distortion_allocation_fills_the_budget(checkpoint, demo_data, tmp_path):
    natural = json.loads(quantize(checkpoint, demo_data, tmp_path / "r0409.py", "--recipe", "r0409").stdout.splitlines()[-1])
    budget = int(natural["bytes"] * 0.8)
    proc = quantize(checkpoint, demo_data, tmp_path / "rd.py", "--recipe", "r0409", "--set", "quant.allocation=rd",
                    "--set", "quant.clip_search=0.5,1.0", "--budget-bytes", budget)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert 0.99 * budget <= os.path.getsize(tmp_path / "rd.py") <= budget
    assert len({row["encoding"] for row in summary["tensors"]}) > 1  # it mixed encodings


def test_report_lists_every_quantized_tensor(checkpoint, demo_data, tmp_path):
    proc = run_pgbuild("quantize", "--checkpoint", checkpoint, "--data", demo_data, "--out", tmp_path / "b.py",
                       "--recipe", "r0409", "--report", "--eval-tokens", 1000, "--eval-modes", "standard")
    for name in ("tok_emb.weight", "blocks.3.mlp.proj.weight", "bits/param", "Hessian-weighted error"):
        assert name in proc.stdout


def test_recipe_file_and_unknown_recipe(checkpoint, demo_data, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text("[quant]\nmatrix_bits = 5\n")
    proc = quantize(checkpoint, demo_data, tmp_path / "a.py", "--recipe", recipe)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout.splitlines()[-1])["bits"].values()) == {5, 8}
    bad = quantize(checkpoint, demo_data, tmp_path / "b.py", "--recipe", "nope")
    assert bad.returncode == 2 and "unknown recipe" in bad.stderr


def test_eval_checkpoint_scores_the_unquantized_model(checkpoint, demo_data):
    proc = run_pgbuild("eval", "--checkpoint", checkpoint, "--data", demo_data, "--max-val-tokens", 2000, "--json")
    result = json.loads(proc.stdout)
    assert result["mode"] == "standard" and result["tokens"] > 1000 and result["val_bpb"] > 0


def test_best_recipe_does_not_lose_to_r0409_at_equal_bytes(checkpoint, demo_data, tmp_path):
    def standard_bpb(*extra):
        proc = run_pgbuild("quantize", "--checkpoint", checkpoint, "--data", demo_data, "--out", tmp_path / "a.py",
                           "--eval-tokens", 8192, "--eval-modes", "standard", "--json", *extra)
        return json.loads(proc.stdout.splitlines()[-1])

    r0409 = standard_bpb("--recipe", "r0409")
    best = standard_bpb("--recipe", "best", "--budget-bytes", r0409["bytes"])
    assert best["bytes"] <= r0409["bytes"]
    assert best["standard_bpb"] <= r0409["standard_bpb"] + 1e-3, (best["standard_bpb"], r0409["standard_bpb"])
