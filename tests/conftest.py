"""Shared fixtures: a real dataset built from the committed public-domain fixture, and one real
artifact trained and packed by the `pgbuild` CLI, reused by every test that needs one."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# bench/gloo_ranks.py is shared with the bench scripts; spawned ranks import it by name, and
# inherit this sys.path.
sys.path.insert(0, str(ROOT / "bench"))
FIXTURE = ROOT / "tests" / "fixtures" / "demo_corpus.jsonl.xz"
VAL_DOCS = 20
# A step cap, not a wallclock cap, so a loaded machine gives the same model, only later.
TRAIN_SETTINGS = ["--set", "train.iterations=150", "--set", "train.max_wallclock_seconds=900"]
# One torch thread everywhere: on a shared or loaded machine more threads make the suite several
# times slower, not faster. Subprocesses (pgbuild, artifact.py, bench scripts) inherit it through
# the environment, where their --threads default (runtime/threads.py) is capped by torch's own.
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/fixtures/golden_pack.json from this run (after an intended change)")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    import torch

    torch.set_num_threads(1)


def run_pgbuild(*args, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "builder", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pgbuild {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from builder.data.build import build_dataset

    out = tmp_path_factory.mktemp("data")
    build_dataset(FIXTURE, 1024, out, val_docs=VAL_DOCS)
    return out


@pytest.fixture(scope="session")
def caseops_data(tmp_path_factory):
    """The fixture built with the 2026-04-27 record's CaseOps transform (tokenizer, shards and the
    validation byte sidecar)."""
    from builder.data.build import build_dataset

    out = tmp_path_factory.mktemp("caseops_data")
    build_dataset(FIXTURE, 1024, out, val_docs=VAL_DOCS, case_ops=True)
    return out


@pytest.fixture(scope="session")
def packed(tmp_path_factory, demo_data):
    """(artifact path, train-and-pack's JSON summary) for a tiny model trained on the fixture."""
    out = tmp_path_factory.mktemp("artifact") / "artifact.py"
    proc = run_pgbuild("train-and-pack", "--preset", "tiny", "--data", demo_data, "--out", out,
                       *TRAIN_SETTINGS, "--eval-tokens", 6000, "--json")
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def artifact(packed):
    return packed[0]


@pytest.fixture(scope="session")
def fixture_model(artifact, demo_data):
    """(the artifact's model on CPU, the demo dataset's layout, its byte tables): what the
    evaluation tests score with. Tests that adapt the model must deep-copy it."""
    import torch

    from runtime.api import load_model, load_tokenizer
    from runtime.artifact import Artifact
    from runtime.data import find_data
    from runtime.evaluate import byte_tables

    art = Artifact(str(artifact))
    layout = find_data(str(demo_data), 1024)
    sp = load_tokenizer(layout.tokenizer, art.manifest, False)
    return load_model(art.manifest, art.read, torch.device("cpu")), layout, byte_tables(sp, 1024), sp


@pytest.fixture(scope="session")
def clean_env(tmp_path_factory):
    """An environment where pgbuild's packages cannot be imported: a folder first on PYTHONPATH
    shadows them with packages that raise on import, so the artifact must bring its own runtime."""
    shadow = tmp_path_factory.mktemp("shadow")
    for name in ("builder", "runtime", "templates"):
        (shadow / name).mkdir()
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} must not be importable here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(shadow)
    return env


def run_artifact(path, *args, env, cwd):
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def load_bench_script(name):
    """bench/NAME.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _evaluate_on_rank(rank, world, model_path, tokens, tables, cfg, mode, out_path):
    import numpy as np
    import torch

    from runtime.evaluate import evaluate

    result = evaluate(torch.load(model_path, weights_only=False), tokens, tables, cfg, mode, torch.device("cpu"))
    if rank == 0:
        np.save(out_path, result.nll)


def nll_on_gloo_ranks(model, tokens, tables, cfg, mode, tmp_path, world=2):
    """Per-position NLLs of `evaluate` run by `world` gloo processes with one thread each."""
    import numpy as np
    import torch
    from gloo_ranks import run_on_gloo_ranks

    torch.save(model, tmp_path / "model.pt")
    run_on_gloo_ranks(_evaluate_on_rank, world, tmp_path / "model.pt", tokens, tables, cfg, mode,
                      tmp_path / "nll.npy")
    return np.load(tmp_path / "nll.npy")
