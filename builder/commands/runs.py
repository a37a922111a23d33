"""`pgbuild runs compare` (builder/judge/runs.py) and `pgbuild record` (builder/judge/record.py)."""

import json

import click
from rich.console import Console

from builder.commands.group import PgGroup
from builder.judge.record import write_record
from builder.judge.render import render_runs_compare
from builder.judge.runs import ALPHA, MIN_NATS, compare, load_run
from runtime.artifact import BUDGET_BYTES
from runtime.errors import PgError


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


@click.group(cls=PgGroup)
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
        render_runs_compare(Console(), result)


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
@click.option("--budget-bytes", default=BUDGET_BYTES, show_default=True, help="size limit the compliance flags check")
@click.option("--data", type=click.Path(), help="dataset directory: the runs' evaluation times, measured on a "
              "prefix, are scaled to its full validation stream for the time-limit warning")
@click.option("--json", "as_json", is_flag=True, help="print the submission as one JSON object")
def record(artifact, run_options, more_runs, out, metric, name, author, github_id, track, budget_bytes, data,
           as_json):
    """Write a records folder (README.md with the per-seed results table, submission.json, the
    train logs and the artifact) following the challenge's submission checklist. `--runs R1 R2 R3`
    takes every run listed after it. A run whose evaluation would take over 600 s gets a warning."""
    result = write_record(artifact, list(run_options) + list(more_runs), out, metric, name, author, github_id,
                          track, budget_bytes, data)
    err = Console(stderr=True)
    for line in result["warnings"]:
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    if as_json:
        click.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"wrote [bold]{result['out']}[/]: val_bpb {result['val_bpb']:.5f} ± {result['val_bpb_std']:.5f} "
                  f"over {len(result['seeds'])} runs, artifact {result['artifact_bytes']:,} bytes")
    for f in result["files"]:
        console.print(f"  {f}")
