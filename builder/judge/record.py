"""The records folder of `pgbuild record`: README.md with the per-seed results table,
submission.json, the train logs, the artifact and its code as train_gpt.py, following the
challenge's submission checklist. The folder is built beside its destination and renamed into
place, so it appears whole or not at all."""

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

from builder.artifact.code import Code
from builder.artifact.pack import FORMAT_VERSION, write_container
from builder.judge.evaltime import run_warnings, validation_positions
from builder.judge.runs import load_run
from builder.judge.stats import mean_std
from runtime.artifact import BUDGET_BYTES, CODE_MEMBERS, Artifact
from runtime.config import MODES
from runtime.errors import PgError
from runtime.files import file_sha256

TRAINING_SCRIPT = "train_gpt.py"
FIGURES = ("prequant_bpb",) + tuple(f"{m}_bpb" for m in MODES)


def _fmt(value):
    return f"{value:.5f}" if isinstance(value, float) else "—"


def results_table(run_list, metric, stats):
    """Markdown: one row per seed with every build-time figure, then mean and std of `metric`."""
    shown = [f for f in FIGURES if any(f in r.figures for r in run_list)]
    if metric not in shown:
        shown.append(metric)
    header = ["seed"] + [f"**{f}**" if f == metric else f for f in shown] + ["artifact bytes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in run_list:
        cells = [f"**{_fmt(r.figures.get(f))}**" if f == metric else _fmt(r.figures.get(f)) for f in shown]
        lines.append("| " + " | ".join([r.label, *cells, f"{r.bytes:,}" if r.bytes is not None else "—"]) + " |")
    for name, value in (("mean", stats["mean"]), ("std", stats["std"])):
        cells = [f"**{value:.5f}**" if f == metric else "" for f in shown]
        lines.append("| " + " | ".join([f"**{name}**", *cells, ""]) + " |")
    return "\n".join(lines)


def describe_model(manifest):
    m = manifest.get("model", {})
    keys = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "vocab_size")
    if not all(k in m for k in keys):
        return "see `python artifact.py info`"
    return (f"{m['num_layers']} layers × {m['model_dim']}, {m['num_heads']} heads / {m['num_kv_heads']} KV heads, "
            f"vocab {m['vocab_size']}")


@dataclass(frozen=True)
class Entry:
    """Everything a records folder states: the submission's facts and the runs behind them."""

    name: str
    track: str
    metric: str
    runs: list
    mean: float
    std: float
    artifact_name: str
    artifact_bytes: int
    """os.path.getsize of the artifact copied into the folder."""
    manifest: dict
    of_runs: list
    """Labels of the runs whose artifact is byte-identical to the submitted one."""
    budget: int
    artifact_sha256: str
    """What `pgbuild audit` compares a received artifact with."""
    code_bytes: int
    """os.path.getsize of train_gpt.py, the artifact's code as a file of its own."""
    model_bytes: int
    """The artifact's manifest and weight members as stored: what decoding the model reads."""


def readme_text(e, files):
    prov = e.manifest.get("provenance") or {}
    origin = (f"It is the artifact of seed{'s' * (len(e.of_runs) > 1)} {', '.join(e.of_runs)}." if e.of_runs else
              "It is not byte-identical to any listed run's artifact (or those could not be found).")
    files_list = "\n".join(f"- `{f}`" for f in files)
    return f"""# {e.name}

**val_bpb = {e.mean:.5f}** ({len(e.runs)}-run mean of `{e.metric}`, std {e.std:.5f}) | \
**{e.artifact_bytes:,} bytes** | track `{e.track}`

## Results

Per-seed figures from each run's build-time evaluation (bits per byte; `{e.metric}` is the score).
Artifact bytes are `os.path.getsize` of each run's artifact where it could be found, else the size the
run recorded.

{results_table(e.runs, e.metric, {"mean": e.mean, "std": e.std})}

Seeds: {", ".join(r.label for r in e.runs)}.

## Artifact

`{e.artifact_name}` holds the evaluation code and the compressed weights in one file:
**{e.artifact_bytes:,} bytes** (`os.path.getsize`), {e.budget - e.artifact_bytes:,} under the {e.budget:,}-byte
budget. {origin} Model: {describe_model(e.manifest)}. Built from seed {prov.get('seed', '?')}, pgbuild commit
{prov.get('pgbuild_commit') or 'unknown'}, torch {prov.get('torch', '?')}. SHA-256 `{e.artifact_sha256}`:
`pgbuild audit {e.artifact_name}` checks a copy against it and whether its code is what pgbuild writes.

`{TRAINING_SCRIPT}` is the same code as a file of its own ({e.code_bytes:,} bytes): run as the records run,

    torchrun --standalone --nproc_per_node=8 {TRAINING_SCRIPT}

it trains from `./data` (the challenge's layout) with the artifact's configuration and writes a new
`artifact.py` (`python {TRAINING_SCRIPT} train --help` for options). Counted as the challenge counts, code
plus compressed model: {e.code_bytes:,} + {e.model_bytes:,} = **{e.code_bytes + e.model_bytes:,} bytes**.

Evaluate it (standard, sliding-window or score-first TTT) with

    python {e.artifact_name} eval --data DATA_DIR --mode ttt

and check its evaluation's legality (causal, normalized, score before update, single pass) with

    pgbuild verify {e.artifact_name} --data DATA_DIR

## Files

{files_list}
"""


def submission(e, author, github_id):
    prov = e.manifest.get("provenance") or {}
    within = [r.summary.get("within_wallclock") for r in e.runs]
    return {"name": e.name, "author": author, "github_id": github_id,
            "date": datetime.date.today().isoformat(), "track": e.track, "metric": e.metric,
            "val_bpb": round(e.mean, 5), "val_bpb_std": round(e.std, 5), "seeds": [r.seed for r in e.runs],
            "seed_results": {r.label: {"val_bpb": r.value(e.metric), "artifact_bytes": r.bytes} for r in e.runs},
            "artifact": e.artifact_name, "artifact_bytes": e.artifact_bytes, "artifact_sha256": e.artifact_sha256,
            "artifact_of_seed": e.of_runs,
            "bytes_code": e.code_bytes, "bytes_model": e.model_bytes, "bytes_total": e.code_bytes + e.model_bytes,
            "pytorch_version": prov.get("torch"),
            "compliance": {"artifact_under_16mb": e.artifact_bytes <= e.budget,
                           "code_plus_model_under_16mb": e.code_bytes + e.model_bytes <= e.budget,
                           "all_seed_artifacts_under_16mb": all(r.bytes is not None and r.bytes <= e.budget
                                                                for r in e.runs),
                           "train_within_wallclock": all(within) if all(w is not None for w in within) else None,
                           "seeds": len(e.runs)}}


def _copy_logs(run, folder):
    """Copies a run's logs into `folder` as train_seed<S>.<ext>; returns the names written."""
    names = []
    for log in run.logs:
        stem, ext = os.path.splitext(os.path.basename(log))
        single = len(run.logs) == 1 or stem == "train_log"
        name = f"train_seed{run.label}{ext}" if single else f"{stem}_seed{run.label}{ext}"
        shutil.copyfile(log, os.path.join(folder, name))
        names.append(name)
    return names


TRAINING_SCRIPT_FIELDS = ("model", "eval", "train", "recipe", "tokenizer_sha256")
"""What a training script keeps of its artifact's manifest: the configuration, no weights or figures."""


def training_script(art):
    """The code of a verified artifact (runtime.artifact.Artifact) as a file of its own, the
    train_gpt.py of a records folder: its bootstrap, runtime and training code with the
    configuration, and no weights. Run without arguments (as torchrun runs a record's script) it
    trains from ./data and writes artifact.py; `eval` refuses, having nothing to score."""
    code = Code.of_artifact(art)
    manifest = {"format": FORMAT_VERSION, "pgbuild": code.version, "default_argv": ["train"],
                **{k: art.manifest[k] for k in TRAINING_SCRIPT_FIELDS if k in art.manifest}}
    return write_container(manifest, dict(code.members), code)


def model_bytes(art):
    """Stored bytes of an artifact's manifest and weights: all but its code and zip structure."""
    return sum(info.compress_size for info in art.zip.infolist() if info.filename not in CODE_MEMBERS)


def _fill(folder, artifact, script_bytes, run_list):
    """Copy the artifact, its training script, logs and summaries into `folder`; returns (file
    names, artifact bytes, training script bytes)."""
    copy = os.path.join(folder, os.path.basename(artifact))
    shutil.copyfile(artifact, copy)
    os.chmod(copy, 0o755)
    if file_sha256(copy) != file_sha256(artifact):
        raise PgError(f"{artifact}: changed while being copied")
    script = os.path.join(folder, TRAINING_SCRIPT)
    with open(script, "wb") as f:
        f.write(script_bytes)
    os.chmod(script, 0o755)
    files = [os.path.basename(artifact), TRAINING_SCRIPT]
    for run in run_list:
        files += _copy_logs(run, folder)
        if run.summary:
            files.append(f"summary_seed{run.label}.json")
            with open(os.path.join(folder, files[-1]), "w") as f:
                json.dump(run.summary, f, indent=1)
    return files, os.path.getsize(copy), os.path.getsize(script)


def write_record(artifact, run_paths, out, metric="ttt_bpb", name=None, author=None, github_id=None,
                 track="10min_16mb", budget=BUDGET_BYTES, data=None):
    """Build the records folder in a temporary directory beside `out`, then rename it into place.
    The result's `warnings` name the runs' evaluations that would run past the time limit, their
    times scaled to the full validation stream of `data` when it is given."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise PgError(f"{out}: already exists; choose a new --out (a records folder is written once)")
    if not run_paths:
        raise PgError("give the runs behind the record: --runs RUN_DIR... (run folders or artifacts)")
    art = Artifact(artifact).verify()
    script, weights = training_script(art), model_bytes(art)
    art.zip.close()
    if os.path.basename(artifact) == TRAINING_SCRIPT:
        raise PgError(f"{artifact}: rename it: the records folder's {TRAINING_SCRIPT} is the training code")
    run_list = [load_run(p) for p in run_paths]
    labels = [r.label for r in run_list]
    if len(set(labels)) != len(labels):
        raise PgError(f"runs share a seed ({', '.join(labels)}); a record reports one run per seed")
    mean, std = mean_std([r.value(metric) for r in run_list])
    full = validation_positions(data, art.manifest["model"]["vocab_size"], art.manifest["eval"]["seq_len"]) \
        if data else None
    warnings = [w for r in run_list for w in run_warnings(r, full)]
    digest = file_sha256(artifact)
    of_runs = [r.label for r in run_list if r.artifact and file_sha256(r.artifact) == digest]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=os.path.dirname(out))
    try:
        files, size, code_size = _fill(tmp, artifact, script, run_list)
        entry = Entry(name or f"pgbuild {describe_model(art.manifest)}", track, metric, run_list, mean, std,
                      os.path.basename(artifact), size, art.manifest, of_runs, budget, digest, code_size,
                      weights)
        sub = submission(entry, author, github_id)
        files = ["README.md", "submission.json"] + files
        with open(os.path.join(tmp, "submission.json"), "w") as f:
            json.dump(sub, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(readme_text(entry, files))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "files": files, "warnings": warnings, **sub}
