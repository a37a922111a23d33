"""`pgbuild verify`: options, then builder/judge/verify.py's checks, with each mode's verdict on
stderr as it finishes and the report as tables or JSON at the end."""

import json
import sys

import click
from rich.console import Console

from builder.commands.threads import threads_option
from builder.judge.render import render_verify, verdict
from builder.judge.verify import verify_artifact
from builder.progress import scoring_progress


@click.command()
@threads_option
@click.argument("artifact", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="dataset directory (pgbuild or challenge layout)")
@click.option("--tokens", type=click.IntRange(min=2), help="validation prefix to score (default: three TTT chunks, "
              "at least four sequences; a shorter one gets TTT chunks that fit it)")
@click.option("--mode", "modes", multiple=True,
              help="eval mode to verify (repeatable; default: every mode the artifact has)")
@click.option("--set", "assignments", multiple=True, metavar="eval.FIELD=VALUE",
              help="override an eval setting of the artifact for the verification, e.g. eval.ttt_chunk_tokens=1024")
@click.option("--probes", default=3, show_default=True, help="cut points t for the causality check")
@click.option("--atol", default=1e-6, show_default=True,
              help="C1/C4 tolerance in nats, on top of the measured replay noise")
@click.option("--tokenizer", type=click.Path(), help="tokenizer .model (default: found under --data)")
@click.option("--device", help="torch device (default: cuda if available)")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def verify(artifact, data, tokens, modes, assignments, probes, atol, tokenizer, device, as_json):
    """Run ARTIFACT's own evaluation code and check the four legality conditions (causal,
    normalized, score before update, single pass) in every eval mode. This EXECUTES the artifact's
    bundled code (unlike `audit`). Exit status 0 only if every check passes; a mode whose plain
    evaluation, projected to the full validation stream, would take over 600 s here gets a warning."""
    err = Console(stderr=True)

    def say(line):
        err.print(line, markup=False, highlight=False, soft_wrap=True)

    with scoring_progress(not as_json, err) as track:
        report = verify_artifact(artifact, data, tokens, modes, assignments, probes, device, atol, tokenizer,
                                 progress=(lambda _: None) if as_json else (lambda m: err.print(f"[dim]{m}[/]")),
                                 on_mode=lambda mode, result: say(verdict(mode, result)), track=track, note=say)
    if as_json:
        click.echo(json.dumps(report))
    else:
        render_verify(Console(width=max(Console().width, 140)), report)
    if not report["passed"]:
        sys.exit(1)
