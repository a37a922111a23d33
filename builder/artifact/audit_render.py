"""The `audit` report as rich tables: sections by role, weight streams against their entropy,
weights by group and by layer, build-time figures, integrity and headroom, and two artifacts side
by side."""

import os

from rich.table import Table

from builder.artifact.audit import SPLIT_NOTE, group_bytes


def _num(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _pct(part, whole):
    return f"{100 * part / whole:.2f}%" if whole else "-"


def headroom_line(report):
    headroom, budget = report["headroom"], report["budget_bytes"]
    if headroom < 0:
        return f"[bold red]OVER BUDGET by {-headroom:,} bytes[/] ({report['total_bytes']:,} > {budget:,})"
    return (f"[bold green]headroom {headroom:,} bytes[/] "
            f"({report['total_bytes']:,} of {budget:,}, {_pct(headroom, budget)} free)")


def roles_table(report):
    """Every section, grouped under its role with a subtotal, as a share of the file."""
    total = report["total_bytes"]
    table = Table(title="bytes by role (sums to the file size)")
    for col in ("role", "section", "bytes", "% of file", "detail"):
        table.add_column(col, justify="right" if col in ("bytes", "% of file") else "left")
    for role, role_bytes in report["by_role"].items():
        members = [s for s in report["sections"] if s["role"] == role]
        for s in members:
            table.add_row(role, s["name"], _num(s["bytes"]), _pct(s["bytes"], total), _section_detail(s))
        table.add_row(f"[bold]{role}[/]", "[bold]subtotal[/]", f"[bold]{role_bytes:,}[/]", _pct(role_bytes, total), "",
                      end_section=True)
    table.add_row("[bold]total[/]", "", f"[bold]{total:,}[/]", "100.00%", "")
    return table


def _section_detail(s):
    if "members" in s:
        return f"{s['members']} members"
    if "stream" in s:
        return f"{s['codec']}, {s['tensors']} tensor{'' if s['tensors'] == 1 else 's'}"
    if "zip_method" in s:
        raw = s.get("raw_bytes", s["uncompressed_bytes"])
        return f"{s['zip_method']}, {raw:,} bytes unpacked"
    return ""


def streams_table(report):
    """Each weight stream next to the order-0 entropy of its symbols: how close the codec gets."""
    table = Table(title="weight streams")
    cols = ("stream", "codec", "tensors", "params", "bits", "raw", "stored", "entropy", "stored/entropy", "bits/param")
    table.caption = "entropy: order-0 entropy of the stream's symbols (int codes as bytes, fp16 as 16-bit words)"
    for col in cols:
        table.add_column(col, justify="left" if col in ("stream", "codec") else "right", no_wrap=col == "stream")
    for s in report["sections"]:
        if "stream" not in s:
            continue
        ratio = s["bytes"] / s["entropy_bytes"] if s["entropy_bytes"] else None
        codec = f"{s['codec']}+shuffle{s['shuffle']}" if s.get("shuffle") else s["codec"]
        table.add_row(s["stream"], codec, _num(s["tensors"]), _num(s["params"]), _num(s["bits"]),
                      _num(s["raw_bytes"]), _num(s["bytes"]), _num(round(s["entropy_bytes"])), _num(ratio, 3),
                      _num(s["bits_per_param"], 3))
    return table


def breakdown_table(title, key_name, buckets, weight_total):
    table = Table(title=title, caption="compressed bytes split in proportion to raw payload bytes within each stream")
    for col in (key_name, "tensors", "params", "raw bytes", "compressed", "% of weights", "bits/param"):
        table.add_column(col, justify="left" if col == key_name else "right")
    for key, b in buckets.items():
        table.add_row(str(key), _num(b["tensors"]), _num(b["params"]), _num(b["raw_bytes"]), _num(b["bytes"]),
                      _pct(b["bytes"], weight_total), _num(b["bits_per_param"], 3))
    return table


def metrics_table(report):
    table = Table(title="build-time figures (recorded in the manifest)", show_header=False)
    for key, value in report["metrics"].items():
        shown = f"{value:.5f}" if "bpb" in key and isinstance(value, float) else \
            f"{value:,}" if isinstance(value, int) else f"{value:g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    return table


def integrity_lines(report):
    """What the checksums proved, whether the code is what this pgbuild writes, and the file's
    SHA-256 against the submission's."""
    code = report["code"]
    marks = {True: "[green]canonical[/]", False: "[bold red]NOT canonical[/]", None: "[yellow]not checked[/]"}
    shown = ", ".join(f"{name} {marks[flag]}" for name, flag in code["canonical"].items())
    against = (f"pgbuild {code['checked_with']}" if code["built_by"] == code["checked_with"] else
               f"built by pgbuild {code['built_by']}, this is {code['checked_with']}: cannot reproduce its code")
    lines = ["CRC-32 and SHA-256 of every member verified", f"code ({against}): {shown}", f"sha256 {report['sha256']}"]
    sub = report["submission"]
    if sub:
        verdict = {True: "[green]matches[/]", False: "[bold red]DIFFERS from[/]", None: "no artifact_sha256 in"}
        lines[-1] += f" ({verdict[sub['matches']]} {sub['path']})"
    return lines


def render_report(console, report):
    console.print(f"[bold]{report['artifact']}[/]: {report['summary']}")
    for line in integrity_lines(report):
        console.print(line)
    console.print(roles_table(report))
    console.print(streams_table(report))
    weights = report["by_role"].get("weights", 0)
    console.print(breakdown_table("weights by tensor group", "group", report["by_group"], weights))
    console.print(breakdown_table("weights by layer", "layer", report["by_layer"], weights))
    if report["metrics"]:
        console.print(metrics_table(report))
    console.print(headroom_line(report))


def render_compare(console, a, b, delta):
    """Both artifacts side by side: roles, groups, totals and bpb, with b - a deltas."""
    table = Table(title="comparison (delta = B - A)", caption="groups: " + SPLIT_NOTE)
    table.add_column("")
    for col in (f"A: {os.path.basename(a['artifact'])}", f"B: {os.path.basename(b['artifact'])}", "delta", "delta %"):
        table.add_column(col, justify="right")

    def row(label, x, y, d, digits=0, more_is_better=False):
        fmt = (lambda v: _num(v, digits)) if digits else (lambda v: _num(v))
        worse = d and (d < 0 if more_is_better else d > 0)  # more bytes or higher bpb is worse
        color = "" if not d else "red" if worse else "green"
        shown = f"[{color}]{'+' if d > 0 else ''}{fmt(d)}[/]" if color else fmt(d)
        table.add_row(label, fmt(x), fmt(y), shown, _pct(d, x) if x else "-")

    for role in delta["by_role"]:
        row(f"role: {role}", a["by_role"].get(role, 0), b["by_role"].get(role, 0), delta["by_role"][role])
    ga, gb = group_bytes(a), group_bytes(b)
    for group in delta["by_group"]:
        row(f"group: {group}", ga.get(group, 0), gb.get(group, 0), delta["by_group"][group])
    row("[bold]total bytes[/]", a["total_bytes"], b["total_bytes"], delta["total_bytes"])
    row("headroom", a["headroom"], b["headroom"], delta["headroom"], more_is_better=True)
    for key, d in delta["metrics"].items():
        row(f"metric: {key}", a["metrics"][key], b["metrics"][key], d, digits=5)
    console.print(table)

