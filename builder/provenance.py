"""Where a checkpoint or an artifact came from: written into every checkpoint and manifest so a
result can be traced to the code, the software and the run that made it."""

import datetime
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def pgbuild_version():
    """The installed pgbuild's version (the manifest names it: audit checks code against it)."""
    try:
        return version("pgbuild")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return None


def git_commit():
    """pgbuild's commit, or None outside a git checkout (and inside an artifact, whose bundled
    modules have no file)."""
    here = globals().get("__file__")
    if here is None:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(here).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment():
    """The code and software that made something, and when."""
    return {"pgbuild_commit": git_commit(), "torch": str(torch.__version__), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def of_training(preset, result, world):
    """A training run's provenance: what `train` did, on how many ranks, in how long."""
    return {**environment(), "seed": preset.train.seed, "steps": result.steps,
            "train_seconds": round(result.seconds, 1), "world_size": world, "train_shards": result.shards,
            "weights": result.weights, "reserve_seconds": round(result.reserve_seconds, 1),
            "setup_seconds": round(result.setup_seconds, 1), "reserve_estimate": result.estimate,
            "compilations": result.compilations}
