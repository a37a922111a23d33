"""`audit --plot`: a PNG of where an artifact's bytes go (matplotlib, the optional `plot` extra)."""

import os

from runtime.errors import PgError
from runtime.files import atomic_path


def write_plot(path, reports):
    """A PNG of where the bytes go: a stacked bar per artifact by role against the budget, and
    bars by tensor group and by layer. Uses the Agg canvas directly (no pyplot global state); the
    directory must exist already (atomic_path would create it, hiding a mistyped --plot path)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PgError("--plot needs matplotlib, which is not installed: pip install 'pgbuild[plot]'") from None

    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise PgError(f"{path}: is a directory; give a file name such as audit.png")
    if not os.path.isdir(os.path.dirname(path)):
        raise PgError(f"{os.path.dirname(path)}: no such directory for --plot")
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic([["roles", "roles"], ["group", "layer"]], height_ratios=[1, 2])
    labels = [_label(r) for r in reports] if len(reports) == 1 else \
        [f"{tag}: {_label(r)}" for tag, r in zip("AB", reports)]
    _plot_roles(axes["roles"], reports, labels)
    _plot_buckets(axes["group"], reports, labels, "by_group", "weights by tensor group (proportional split)")
    _plot_buckets(axes["layer"], reports, labels, "by_layer", "weights by layer (proportional split)")
    with atomic_path(path, "plot") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _label(report):
    return os.path.basename(report["artifact"])


def _thousands(value, _position=None):
    return f"{value:,.0f}"


def _plot_roles(ax, reports, labels):
    """One stacked bar per artifact (first on top), roles in file order, the budget as a line."""
    colors = {"container": "#999999", "code": "#4c72b0", "manifest": "#dd8452", "weights": "#55a868"}
    rows = list(range(len(reports)))[::-1]
    lefts = [0] * len(reports)
    for role in dict.fromkeys(k for r in reports for k in r["by_role"]):
        widths = [r["by_role"].get(role, 0) for r in reports]
        ax.barh(rows, widths, left=lefts, label=role, color=colors.get(role), height=0.6)
        lefts = [left + width for left, width in zip(lefts, widths)]
    for row, r in zip(rows, reports):
        ax.text(r["total_bytes"], row, f"  {r['total_bytes']:,} bytes, headroom {r['headroom']:,}", va="center",
                fontsize="small", color="red" if r["over_budget"] else "black")
    budget = reports[0]["budget_bytes"]
    ax.axvline(budget, color="red", linestyle="--", label=f"budget {budget:,}")
    ax.set_yticks(rows, labels)
    ax.set_xlim(0, max(budget, *(r["total_bytes"] for r in reports)) * 1.02)
    ax.xaxis.set_major_formatter(_thousands)
    ax.set_xlabel("bytes")
    ax.set_title("where the bytes go, by role")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def _plot_buckets(ax, reports, labels, key, title):
    names = list(dict.fromkeys(k for r in reports for k in r[key]))
    width = 0.8 / len(reports)
    for i, (r, label) in enumerate(zip(reports, labels)):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [r[key].get(n, {}).get("bytes", 0) for n in names], width=width, label=label)
    ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.yaxis.set_major_formatter(_thousands)
    ax.set_ylabel("compressed bytes")
    ax.set_title(title)
    if len(reports) > 1:
        ax.legend(fontsize="small")

