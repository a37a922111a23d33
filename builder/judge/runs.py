"""`pgbuild runs compare` and `pgbuild record`: seeds, significance, and the records folder.

A RUN is either a run folder (written by `pgbuild train-and-pack --run-dir DIR`, see
builder/rundir.py: a flat `summary.json` with `<mode>_bpb`, `bytes`, `path`, `seed`, ... and
`train_log.jsonl`) or an artifact.py, whose manifest carries the same build-time figures under
`metrics` and the seed under `provenance`. Older or hand-written summaries may nest the figures
under `metrics` and the seed under `provenance`; both shapes are read.

The challenge's rule for a new record: beat the current best by at least 0.005 nats at p < 0.01.
Scores are in bits per byte, so the rule is applied per byte: a bpb difference d is d * ln 2 nats
per byte, and 0.005 nats is 0.005 / ln 2 = 0.00721 bpb. (Per token it would depend on the
tokenizer's bytes per token; records state their deltas per byte.) The test is Welch's one-sided
t-test on the per-seed values: H0 mean(A) - mean(B) <= margin, against H1 mean(A) - mean(B) >
margin, with A the baseline runs and B the candidate's.
"""

import datetime
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import click
from rich.console import Console
from rich.table import Table

from runtime.artifact import Artifact
from runtime.errors import PgError
from runtime.evaluate import MODES

SUMMARY = "summary.json"
TRAIN_LOG = "train_log.jsonl"
MIN_NATS = 0.005
ALPHA = 0.01
BUDGET = 16_000_000
FIGURES = ("prequant_bpb",) + tuple(f"{m}_bpb" for m in MODES)


# ----------------------------------------------------------------------------- statistics

def _beta_fraction(a, b, x):
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15

    def guard(v):
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + num * d)
            c = guard(1.0 + num / c)
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges quickly only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def t_sf(t, df):
    """P(T > t) for Student's t with `df` (real, > 0) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def welch_one_sided(a, b, margin=0.0):
    """Welch's t-test of H1: mean(a) - mean(b) > margin. Returns (t, df, p)."""
    if len(a) < 2 or len(b) < 2:
        raise PgError(f"Welch's t-test needs at least 2 runs per group (got {len(a)} and {len(b)})")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    diff = ma - mb - margin
    if va + vb == 0.0:  # identical values within each group: the difference is exact
        return (math.copysign(math.inf, diff) if diff else 0.0), math.inf, (0.0 if diff > 0 else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return t, df, t_sf(t, df)


# ----------------------------------------------------------------------------- reading runs

@dataclass(frozen=True)
class Run:
    """One training run's figures, from a run folder or an artifact."""

    source: str
    seed: object
    """The training seed (None when the source does not say)."""
    figures: dict
    """Build-time bpb figures by name (prequant_bpb, standard_bpb, sliding_bpb, ttt_bpb, ...)."""
    bytes: int
    """Artifact size: os.path.getsize of the artifact when it can be found, else as recorded."""
    artifact: str
    """Path of the run's artifact file, or None if it cannot be found."""
    summary: dict
    logs: tuple
    """Training logs in the run folder."""

    def value(self, metric):
        if metric not in self.figures:
            have = ", ".join(sorted(self.figures)) or "none"
            raise PgError(f"{self.source}: no {metric} (it has: {have}); pick another --metric")
        return self.figures[metric]

    @property
    def label(self):
        return str(self.seed) if self.seed is not None else os.path.basename(os.path.normpath(self.source))


def _figures(table):
    return {k: float(v) for k, v in table.items()
            if k.endswith("_bpb") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise PgError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise PgError(f"{path}: expected one JSON object")
    return value


def _find_artifact(recorded, folder):
    """The run's artifact: its recorded path (absolute, or relative to the folder or the working
    directory), else artifact.py in the folder."""
    candidates = []
    if isinstance(recorded, str) and recorded:
        candidates += [recorded] if os.path.isabs(recorded) else [os.path.join(folder, recorded), recorded]
    candidates.append(os.path.join(folder, "artifact.py"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def run_from_folder(folder):
    path = os.path.join(folder, SUMMARY)
    if not os.path.isfile(path):
        raise PgError(f"{folder}: no {SUMMARY}; run folders are written by `pgbuild train-and-pack --run-dir DIR`")
    summary = _read_json(path)
    figures = _figures(summary)
    if isinstance(summary.get("metrics"), dict):
        figures = {**_figures(summary["metrics"]), **figures}
    provenance = summary.get("provenance") if isinstance(summary.get("provenance"), dict) else {}
    seed = summary.get("seed", provenance.get("seed"))
    artifact = _find_artifact(summary.get("path"), folder)
    size = os.path.getsize(artifact) if artifact else summary.get("bytes")
    logs = sorted({*glob.glob(os.path.join(folder, TRAIN_LOG)), *glob.glob(os.path.join(folder, "*.log"))})
    return Run(folder, seed, figures, size, artifact, summary, tuple(logs))


def run_from_artifact(path):
    art = Artifact(path).verify()
    art.zip.close()
    manifest = art.manifest
    provenance = manifest.get("provenance") or {}
    return Run(path, provenance.get("seed"), _figures(manifest.get("metrics") or {}), os.path.getsize(path), path,
               {}, ())


def load_run(path):
    """A run folder (with summary.json) or an artifact.py."""
    if os.path.isdir(path):
        return run_from_folder(path)
    if os.path.isfile(path):
        return run_from_artifact(path)
    raise PgError(f"{path}: no such run folder or artifact")


# ----------------------------------------------------------------------------- comparing

def group_stats(runs, metric):
    values = [r.value(metric) for r in runs]
    mean, std = mean_std(values)
    return {"n": len(values), "mean": mean, "std": std,
            "runs": [{"source": r.source, "seed": r.seed, "value": v} for r, v in zip(runs, values)]}


def compare(baseline, candidate, metric="ttt_bpb", min_nats=MIN_NATS, alpha=ALPHA):
    """Does `candidate` (runs) beat `baseline` (runs) on `metric` by `min_nats` nats per byte at
    p < alpha? Lower bpb is better."""
    a, b = group_stats(baseline, metric), group_stats(candidate, metric)
    margin = min_nats / math.log(2)
    va, vb = [r["value"] for r in a["runs"]], [r["value"] for r in b["runs"]]
    t, df, p = welch_one_sided(va, vb, margin)
    _, _, p_any = welch_one_sided(va, vb, 0.0)
    delta = a["mean"] - b["mean"]
    return {"metric": metric, "baseline": a, "candidate": b, "delta_bpb": delta,
            "delta_nats_per_byte": delta * math.log(2), "min_nats": min_nats, "margin_bpb": margin, "alpha": alpha,
            "t": t, "df": df, "p": p, "p_any_improvement": p_any, "significant": p < alpha,
            "rule": (f"one-sided Welch t-test, H1: mean(A) - mean(B) > {min_nats} nats/byte = {margin:.5f} bpb "
                     f"(Δbpb × ln 2 = nats per byte), significant at p < {alpha}")}


def render_compare(console, result):
    table = Table(title=f"{result['metric']} per run (lower is better)")
    for column in ("group", "run", "seed", result["metric"]):
        table.add_column(column, justify="right" if column == result["metric"] else "left")
    for name, key in (("A (baseline)", "baseline"), ("B (candidate)", "candidate")):
        group = result[key]
        for i, run in enumerate(group["runs"]):
            table.add_row(name if i == 0 else "", run["source"], str(run["seed"]), f"{run['value']:.5f}")
        table.add_row("", f"[bold]mean ± std (n={group['n']})[/]", "",
                      f"[bold]{group['mean']:.5f} ± {group['std']:.5f}[/]")
        table.add_section()
    console.print(table)
    verdict = "[bold green]yes[/]" if result["significant"] else "[bold red]no[/]"
    console.print(f"Δ = mean(A) − mean(B) = {result['delta_bpb']:+.5f} bpb = "
                  f"{result['delta_nats_per_byte']:+.5f} nats/byte; needed > {result['margin_bpb']:.5f} bpb "
                  f"({result['min_nats']} nats)")
    t, df = result["t"], result["df"]
    console.print(f"Welch t = {t:.3f}, df = {df:.2f}: p = {result['p']:.3g} (any improvement: p = "
                  f"{result['p_any_improvement']:.3g}); B beats A by ≥ {result['min_nats']} nats at p < "
                  f"{result['alpha']}: {verdict}")


class _SplitAtDoubleDash(click.Command):
    """Splits `RUN_A... -- RUN_B...` before click drops the `--`; this command's options may
    appear anywhere, including after the `--`."""

    def parse_args(self, ctx, args):
        if "--" not in args:  # --help, or a missing second group (the command says so)
            ctx.meta["runs_b"] = []
            return super().parse_args(ctx, args)
        cut = args.index("--")
        head, tail, group_b = list(args[:cut]), list(args[cut + 1:]), []
        takes_value = {opt: not p.is_flag for p in self.params if isinstance(p, click.Option) for opt in p.opts}
        while tail:
            item = tail.pop(0)
            if item in takes_value:
                head.append(item)
                if takes_value[item] and tail:
                    head.append(tail.pop(0))
            elif item.split("=", 1)[0] in takes_value:
                head.append(item)
            else:
                group_b.append(item)
        ctx.meta["runs_b"] = group_b
        return super().parse_args(ctx, head)


@click.group()
def runs():
    """Compare groups of runs (run folders or artifacts)."""


@runs.command("compare", cls=_SplitAtDoubleDash)
@click.argument("group_a", nargs=-1, metavar="RUN_A... -- RUN_B...")
@click.option("--metric", default="ttt_bpb", show_default=True, help="figure to compare: prequant_bpb, standard_bpb, "
              "sliding_bpb, ttt_bpb, ...")
@click.option("--min-nats", default=MIN_NATS, show_default=True, help="required improvement in nats per byte")
@click.option("--alpha", default=ALPHA, show_default=True, help="significance level")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
def compare_command(group_a, metric, min_nats, alpha, as_json):
    """Per-group mean, std and n of METRIC, and whether group B (after --) beats group A by at least
    0.005 nats (= 0.005/ln 2 bpb) at p < 0.01 (one-sided Welch t-test on the per-seed values)."""
    group_b = click.get_current_context().meta["runs_b"]
    if not group_a or not group_b:
        raise PgError("give runs on both sides of --: pgbuild runs compare RUN_A... -- RUN_B...")
    result = compare([load_run(p) for p in group_a], [load_run(p) for p in group_b], metric, min_nats, alpha)
    if as_json:
        click.echo(json.dumps(result))
    else:
        render_compare(Console(), result)


# ----------------------------------------------------------------------------- the records folder

def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
            "pytorch_version": prov.get("torch"),
            "compliance": {"artifact_under_16mb": e.artifact_bytes <= e.budget,
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


def _fill(folder, artifact, run_list):
    """Copy the artifact, logs and summaries into `folder`; returns (file names, artifact bytes)."""
    copy = os.path.join(folder, os.path.basename(artifact))
    shutil.copyfile(artifact, copy)
    os.chmod(copy, 0o755)
    if _sha256(copy) != _sha256(artifact):
        raise PgError(f"{artifact}: changed while being copied")
    files = [os.path.basename(artifact)]
    for run in run_list:
        files += _copy_logs(run, folder)
        if run.summary:
            files.append(f"summary_seed{run.label}.json")
            with open(os.path.join(folder, files[-1]), "w") as f:
                json.dump(run.summary, f, indent=1)
    return files, os.path.getsize(copy)


def write_record(artifact, run_paths, out, metric="ttt_bpb", name=None, author=None, github_id=None,
                 track="10min_16mb", budget=BUDGET):
    """Build the records folder in a temporary directory beside `out`, then rename it into place."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise PgError(f"{out}: already exists; choose a new --out (a records folder is written once)")
    if not run_paths:
        raise PgError("give the runs behind the record: --runs RUN_DIR... (run folders or artifacts)")
    art = Artifact(artifact).verify()
    art.zip.close()
    run_list = [load_run(p) for p in run_paths]
    labels = [r.label for r in run_list]
    if len(set(labels)) != len(labels):
        raise PgError(f"runs share a seed ({', '.join(labels)}); a record reports one run per seed")
    mean, std = mean_std([r.value(metric) for r in run_list])
    digest = _sha256(artifact)
    of_runs = [r.label for r in run_list if r.artifact and _sha256(r.artifact) == digest]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=os.path.dirname(out))
    try:
        files, size = _fill(tmp, artifact, run_list)
        entry = Entry(name or f"pgbuild {describe_model(art.manifest)}", track, metric, run_list, mean, std,
                      os.path.basename(artifact), size, art.manifest, of_runs, budget, digest)
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
    return {"out": out, "files": files, **sub}


@click.command()
@click.option("--artifact", required=True, type=click.Path(exists=True, dir_okay=False), help="the artifact to submit")
@click.option("--runs", "run_options", multiple=True, type=click.Path(), help="a run folder or artifact (repeatable)")
@click.argument("more_runs", nargs=-1, type=click.Path(), metavar="[RUN]...")
@click.option("--out", required=True, type=click.Path(), help="records folder to create (must not exist)")
@click.option("--metric", default="ttt_bpb", show_default=True, help="the score reported as val_bpb")
@click.option("--name", help="submission name (default: describes the model)")
@click.option("--author", help="author for submission.json")
@click.option("--github-id", help="GitHub id for submission.json")
@click.option("--track", default="10min_16mb", show_default=True, help="records track")
@click.option("--budget-bytes", default=BUDGET, show_default=True, help="size limit the compliance flags check")
@click.option("--json", "as_json", is_flag=True, help="print the submission as one JSON object")
def record(artifact, run_options, more_runs, out, metric, name, author, github_id, track, budget_bytes, as_json):
    """Write a records folder (README.md with the per-seed results table, submission.json, the
    train logs and the artifact) following the challenge's submission checklist. `--runs R1 R2 R3`
    takes every run listed after it."""
    result = write_record(artifact, list(run_options) + list(more_runs), out, metric, name, author, github_id,
                          track, budget_bytes)
    if as_json:
        click.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"wrote [bold]{result['out']}[/]: val_bpb {result['val_bpb']:.5f} ± {result['val_bpb_std']:.5f} "
                  f"over {len(result['seeds'])} runs, artifact {result['artifact_bytes']:,} bytes")
    for f in result["files"]:
        console.print(f"  {f}")
