"""Rich output of the judge's reports: `verify`'s checks and verdicts, `runs compare`'s groups."""

from rich.table import Table

from runtime.baselines import describe as describe_baselines

CHECK_TITLES = {"causal": "C1 causal", "normalized": "C2 normalized", "score_first": "C3 score before update",
                "single_pass": "C4 single pass", "bytes": "byte accounting"}


def render_verify(console, report):
    console.print(f"[bold]{report['artifact']}[/]: its own runtime (runtime.xz {report['runtime_sha256'][:12]}…) "
                  f"executed on {report['device']}, {report['positions']:,} positions"
                  + (f", overrides {' '.join(report['overrides'])}" if report["overrides"] else ""))
    table = Table(title="legality checks (issue #1017)")
    for column in ("mode", "check", "result", "evidence"):
        table.add_column(column, overflow="fold")
    for mode, result in report["modes"].items():
        for i, (key, check) in enumerate(result["checks"].items()):
            mark = "[green]pass[/]" if check["passed"] else "[bold red]FAIL[/]"
            table.add_row(f"{mode} ({result['val_bpb']:.5f} bpb)" if i == 0 else "", CHECK_TITLES[key], mark,
                          check["summary"])
        table.add_section()
    console.print(table)
    console.print(verdict_table(report["modes"]))
    console.print("[bold green]all checks pass[/]" if report["passed"] else "[bold red]verification failed[/]")


def verdict(mode, result):
    """One line per mode, printed as soon as the mode is done: PASS, or FAIL and which checks."""
    failed = [CHECK_TITLES[k] for k, c in result["checks"].items() if not c["passed"]]
    head = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
    return f"verify {mode}: {head}  {result['val_bpb']:.5f} bpb{describe_baselines(result)}  {result['seconds']:.1f} s"


def verdict_table(results):
    table = Table(title="verdicts")
    for column in ("mode", "verdict", "val_bpb", "uniform bpb", "unigram bpb", "seconds", "full eval s (projected)"):
        table.add_column(column, justify="left" if column in ("mode", "verdict") else "right")
    for mode, r in results.items():
        projected = f"{r['projected_eval_seconds']:,.0f}"
        table.add_row(mode, "[green]PASS[/]" if r["passed"] else "[bold red]FAIL[/]", f"{r['val_bpb']:.5f}",
                      f"{r['uniform_bpb']:.4f}", f"{r['unigram_bpb']:.4f}", f"{r['seconds']:.1f}",
                      projected if not r["time_warning"] else f"[bold red]{projected}[/]")
    return table


def render_runs_compare(console, result):
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
    beats = "[bold green]yes[/]" if result["significant"] else "[bold red]no[/]"
    console.print(f"Δ = mean(A) − mean(B) = {result['delta_bpb']:+.5f} bpb = "
                  f"{result['delta_nats_per_byte']:+.5f} nats/byte; needed > {result['margin_bpb']:.5f} bpb "
                  f"({result['min_nats']} nats)")
    t, df = result["t"], result["df"]
    console.print(f"Welch t = {t:.3f}, df = {df:.2f}: p = {result['p']:.3g} (any improvement: p = "
                  f"{result['p_any_improvement']:.3g}); B beats A by ≥ {result['min_nats']} nats at p < "
                  f"{result['alpha']}: {beats}")
