"""`audit --plot`: a PNG of where an artifact's bytes go (matplotlib, the optional `plot` extra)."""

import os

import numpy as np

from builder.artifact.audit import bits_grid
from runtime.errors import PgError
from runtime.files import atomic_path

HEATMAP_NOTE = ("a weight stream holds one matrix kind at one bit width;\nits compressed bytes are split over "
                "its tensors by size")


def write_plot(path, reports):
    """A PNG of where the bytes go: a stacked bar per artifact by role against the budget, bars by
    tensor group, and per artifact a heat map of the bits per parameter each tensor got, layers by
    matrix kind. Uses the Agg canvas directly (no pyplot global state); the directory must exist
    already (atomic_path would create it, hiding a mistyped --plot path)."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PgError("--plot needs matplotlib, which is not installed: pip install 'pgbuild[plot]'") from None

    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise PgError(f"{path}: is a directory; give a file name such as audit.png")
    if not os.path.isdir(os.path.dirname(path)):
        raise PgError(f"{os.path.dirname(path)}: no such directory for --plot")
    maps = [f"bits {i}" for i in range(len(reports))]
    fig = Figure(figsize=(7 + 6 * len(reports), 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic([["roles"] * (1 + len(reports)), ["group", *maps]], height_ratios=[1, 2])
    labels = [_label(r) for r in reports] if len(reports) == 1 else \
        [f"{tag}: {_label(r)}" for tag, r in zip("AB", reports)]
    _plot_roles(axes["roles"], reports, labels)
    _plot_buckets(axes["group"], reports, labels, "by_group", "weights by tensor group (proportional split)")
    grids = [bits_grid(r["tensors"]) for r in reports]
    values = [b for _, _, bits in grids for row in bits for b in row if b is not None]
    scale = dict(vmin=min(values, default=0), vmax=max(values, default=1),
                 cmap=colormaps["viridis"].with_extremes(bad="white"))
    for name, grid, label in zip(maps, grids, labels):
        image = _plot_bits(axes[name], grid, label, scale)
    fig.colorbar(image, ax=[axes[name] for name in maps], label="bits per parameter", shrink=0.8)
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



def _plot_bits(ax, grid, label, scale):
    """Layers (rows) by matrix kind (columns), coloured and labelled with bits per parameter."""
    rows, columns, bits = grid
    values = np.array([[np.nan if b is None else b for b in row] for row in bits], dtype=float).reshape(
        len(rows), len(columns))
    image = ax.imshow(values, aspect="auto", **scale)
    middle = (scale["vmin"] + scale["vmax"]) / 2
    for (r, c), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize="x-small",
                    color="black" if value > middle else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"layer {r}" if r.isdigit() else r for r in rows])
    ax.set_title(f"{label}: compressed bits per parameter\n(codes + scales) by layer and matrix", fontsize="medium")
    ax.set_xlabel(HEATMAP_NOTE, fontsize="small")
    return image
