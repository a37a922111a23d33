"""builder/artifact/budget.py and the train -> quantize commands: the artifact always fits the budget."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_pgbuild

from builder.artifact.budget import _global_prune_order, _with_pruned, allocate, fit_budget, prune_to_fit
from builder.artifact.pack import StreamCompressor, build_artifact
from builder.artifact.sources import installed_code
from builder.config import QuantConfig
from builder.quant.policy import Quantizer
from builder.quant.primitives import prune_count
from runtime.errors import PgError

INFO = {"model": {}, "eval": {}, "tokenizer_sha256": "0" * 64, "recipe": {}, "provenance": {}, "metrics": {}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_data):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    run_pgbuild("train", "--preset", "tiny", "--data", demo_data, "--out", path, "--set", "train.iterations=120",
                "--set", "train.max_wallclock_seconds=900")
    return path


EVAL_TOKENS = 8192
"""Validation tokens where recipes' bpb are compared (elsewhere 1,000: only sizes are)."""


def quantize(checkpoint, data, out, *extra, eval_tokens=1000):
    """`pgbuild quantize` with the r0409 recipe unless `extra` names another."""
    recipe = [] if "--recipe" in map(str, extra) else ["--recipe", "r0409"]
    return run_pgbuild("quantize", "--checkpoint", checkpoint, "--data", data, "--out", out,
                       "--eval-tokens", eval_tokens, "--eval-modes", "standard", "--json", *recipe, *extra, check=False)


@pytest.fixture(scope="module")
def r0409(checkpoint, demo_data, tmp_path_factory):
    """The r0409 recipe's summary at its natural size (no budget), which the budget tests start from."""
    out = tmp_path_factory.mktemp("r0409") / "r0409.py"
    proc = quantize(checkpoint, demo_data, out, eval_tokens=EVAL_TOKENS)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert os.path.getsize(out) == summary["bytes"]
    return summary


def test_quantize_then_fit_a_tight_budget(r0409, checkpoint, demo_data, tmp_path):
    budget = int(r0409["bytes"] * 0.7)
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


def test_report_lists_every_quantized_tensor(checkpoint, demo_data, tmp_path):
    proc = run_pgbuild("quantize", "--checkpoint", checkpoint, "--data", demo_data, "--out", tmp_path / "b.py",
                       "--recipe", "r0409", "--report", "--eval-tokens", 1000, "--eval-modes", "standard")
    # Headers may wrap on a narrow terminal; tensor names never do.
    for name in ("tok_emb.weight", "blocks.3.mlp.proj.weight", "bits/param", "Hessian"):
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


def test_best_recipe_fills_r0409s_bytes_and_does_not_lose_to_it(r0409, checkpoint, demo_data, tmp_path):
    """`best` (rate-distortion allocation over bits, clips and transforms) at r0409's natural size:
    it fills the budget, mixes encodings, and scores no worse."""
    proc = quantize(checkpoint, demo_data, tmp_path / "best.py", "--recipe", "best", "--budget-bytes", r0409["bytes"],
                    eval_tokens=EVAL_TOKENS)
    assert proc.returncode == 0, proc.stderr
    best = json.loads(proc.stdout.splitlines()[-1])
    assert 0.99 * r0409["bytes"] <= os.path.getsize(tmp_path / "best.py") == best["bytes"] <= r0409["bytes"]
    assert len({row["encoding"] for row in best["tensors"]}) > 1
    assert best["standard_bpb"] <= r0409["standard_bpb"] + 1e-3, (best["standard_bpb"], r0409["standard_bpb"])


def synthetic_quantizer(**quant):
    """Three matrices with Hessians of different column energy, and a real packer."""
    g = torch.Generator().manual_seed(0)
    state, hessians = {}, {}
    for name, rows in (("blocks.0.attn.q.weight", 128), ("blocks.0.mlp.fc.weight", 256),
                       ("blocks.1.mlp.fc.weight", 256)):
        state[name] = torch.randn(rows, 128, generator=g)
        x = torch.randn(1024, 128, generator=g) * (torch.randn(128, generator=g)).exp()
        hessians[name] = x.T @ x / x.size(0)
    quantizer = Quantizer(state, hessians, QuantConfig(gptq_block=64, passthrough_max_numel=1000, **quant))
    compressor = StreamCompressor(("brotli",))
    return quantizer, lambda plan: build_artifact(quantizer.encode_all(plan), INFO, compressor, installed_code())


def zeroed_codes(quantizer, plan):
    """{name: boolean mask of the codes pruning zeroed} against the unpruned encodings."""
    return {n: (quantizer.encode(n, c._replace(prune=0.0)).data != quantizer.encode(n, c).data)
            for n, c in plan.items()}


def test_prune_to_fit_lands_under_the_budget_without_lowering_precision():
    quantizer, pack = synthetic_quantizer(prune_to_fit=0.5)
    natural = len(pack(quantizer.default_plan()))
    cap = natural - 1500
    plan, blob = fit_budget(quantizer, pack, cap, report=lambda *_: None)
    assert len(blob) <= cap and blob == pack(plan)  # the returned bytes are the plan's real artifact
    assert plan.keys() == quantizer.default_plan().keys()
    assert all(c.bits == 6 and c.prune > 0 for c in plan.values())
    # Globally cheapest first: every zeroed code costs no more than any ±1 code left standing.
    zeroed, kept = [], []
    for name, mask in zeroed_codes(quantizer, plan).items():
        full = quantizer.encode(name, plan[name]._replace(prune=0.0))
        indices, costs = quantizer.prune_order(name, plan[name])
        flat_zeroed = mask.reshape(-1)[indices]
        zeroed.append(costs[flat_zeroed])
        kept.append(costs[~flat_zeroed])
        assert (np.abs(full.data[mask]) == 1).all()
    assert np.concatenate(zeroed).max() <= np.concatenate(kept).min()
    # ...and no more than needed (the search stops within 1% of the count): 3% fewer is over.
    total = sum(prune_count(c.prune, len(quantizer.prune_order(n, c)[0])) for n, c in plan.items())
    names, owners, sizes = _global_prune_order(quantizer, quantizer.default_plan())
    assert len(pack(_with_pruned(quantizer.default_plan(), names, owners, sizes, int(total * 0.97)))) > cap


def test_prune_to_fit_off_or_insufficient_falls_back_to_lowering_bits():
    quantizer, pack = synthetic_quantizer(prune_to_fit=0.01)
    plan = quantizer.default_plan()
    blob = pack(plan)
    cap = int(len(blob) * 0.8)
    assert prune_to_fit(quantizer, pack, plan, blob, cap, report=lambda *_: None) is None
    fitted, fitted_blob = fit_budget(quantizer, pack, cap, report=lambda *_: None)
    assert len(fitted_blob) <= cap and min(c.bits for c in fitted.values()) < 6
    off, _ = synthetic_quantizer()
    assert prune_to_fit(off, pack, plan, blob, len(blob) - 10, report=lambda *_: None) is None


def test_rd_allocation_over_budget_is_rescued_by_pruning():
    # With int6 as the only width the allocator cannot shrink; only pruning can fit.
    quantizer, pack = synthetic_quantizer(allocation="rd", rd_bits=(6,), prune_to_fit=0.5)
    cap = len(pack(quantizer.default_plan())) - 1000
    plan, blob = allocate(quantizer, pack, cap, report=lambda *_: None)
    assert len(blob) <= cap and any(c.prune > 0 for c in plan.values())
    stuck, stuck_pack = synthetic_quantizer(allocation="rd", rd_bits=(6,))
    with pytest.raises(PgError, match="too small"):
        allocate(stuck, stuck_pack, cap, report=lambda *_: None)


def test_rd_allocator_fits_with_pruned_candidates_alone():
    # int6 is the only width, and no prune-to-fit: only the pruned candidates can shrink the file.
    quantizer, pack = synthetic_quantizer(allocation="rd", rd_bits=(6,), prune_fractions=(0.1, 0.3, 0.6))
    cap = len(pack(quantizer.default_plan())) - 1000
    plan, blob = allocate(quantizer, pack, cap, report=lambda *_: None)
    assert len(blob) <= cap and blob == pack(plan)
    assert {c.prune for c in plan.values()} <= {0.0, 0.1, 0.3, 0.6} and any(c.prune for c in plan.values())


def test_quantize_prune_to_fit_with_the_cli(checkpoint, demo_data, tmp_path):
    natural = json.loads(quantize(checkpoint, demo_data, tmp_path / "n.py").stdout.splitlines()[-1])["bytes"]
    budget_bytes = natural - 3000
    proc = quantize(checkpoint, demo_data, tmp_path / "p.py", "--budget-bytes", budget_bytes,
                    "--set", "quant.prune_to_fit=0.3")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert os.path.getsize(tmp_path / "p.py") == summary["bytes"] <= budget_bytes
    assert set(summary["bits"].values()) == {6, 8}  # pruning closed the gap, no bit width was lowered
    assert "±1 codes" in proc.stderr + proc.stdout
