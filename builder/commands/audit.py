"""`pgbuild audit`: options, then builder/artifact/audit.py's report as JSON, tables or a plot."""

import json
import os
import sys

import click
from rich.console import Console

from builder.artifact.audit import audit_report, compare_reports
from builder.artifact.audit_plot import write_plot
from builder.artifact.audit_render import render_compare, render_report
from runtime.artifact import BUDGET_BYTES


def report_console():
    """stdout console; when piped (no terminal, no COLUMNS) wide enough that the stream table's
    ten columns are not truncated to rich's 80-column default."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=150)


@click.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object instead of tables")
@click.option("--compare", "other", type=click.Path(),
              help="a second artifact to show side by side (deltas = OTHER - ARTIFACT)")
@click.option("--plot", "plot_path", type=click.Path(), help="write a PNG of where the bytes go: by role, by "
              "tensor group, and a heat map of each tensor's compressed bits per parameter, layers by matrix")
@click.option("--budget-bytes", type=click.IntRange(min=1), default=BUDGET_BYTES, show_default=True,
              help="the size limit the headroom is measured against")
@click.option("--submission", "submission_path", type=click.Path(dir_okay=False),
              help="a submission.json whose artifact_sha256 to check (default: one beside ARTIFACT, if any)")
def audit(artifact, as_json, other, plot_path, budget_bytes, submission_path):
    """Byte-budget report of ARTIFACT, read as data and never executed.

    Sections (preamble, zip headers, each member, central directory) sum to the file size exactly;
    weight streams show raw, compressed and order-0 entropy sizes and bits per parameter; weight
    bytes are also split by tensor group and by layer, in proportion to each tensor's raw payload
    within its stream. Every member's CRC-32 and SHA-256 are checked first; the preamble, bootstrap
    and runtime are compared byte for byte with what this pgbuild writes (`canonical`), and the
    file's SHA-256 with a submission.json's.
    """
    report = audit_report(artifact, budget_bytes, submission_path)
    compared = audit_report(other, budget_bytes) if other else None
    if plot_path:
        write_plot(plot_path, [report] + ([compared] if compared else []))
    if as_json:
        if compared:
            report = dict(report, compare=dict(compared, delta=compare_reports(report, compared)))
        click.echo(json.dumps(report))
    else:
        console = report_console()
        render_report(console, report)
        if compared:
            render_compare(console, report, compared, compare_reports(report, compared))
    if plot_path:
        Console(stderr=True).print(f"wrote {plot_path}")
