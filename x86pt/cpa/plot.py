"""Fragmentation over time as small multiples: one row per metric (DirectMap4k, DirectMap2M,
DirectMap1G, page-table pages), one column per policy, rows sharing their y axis. Policies that
behave alike would draw on top of each other in one panel; side by side every line is readable
and the shared axis keeps them comparable. Each panel names its final value; a validator
violation is marked where the replay stopped (matplotlib, Agg backend, PNG written atomically)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

from x86pt.memory.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from x86pt.cpa.trace import ReplayResult

METRICS = (
    ("DirectMap4k", "MiB", 4 / 1024),
    ("DirectMap2M", "MiB", 2),
    ("DirectMap1G", "GiB", 1),
    ("page-table pages", "", 1),
)
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def plot_fragmentation(results: Sequence[ReplayResult], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, len(results))
    diff = len(results) > 1 and all(len(r.samples) == len(results[0].samples) for r in results)
    ncols = cols + (1 if diff else 0)
    cost = all(r.cost_series for r in results)
    nrows = len(METRICS) + (1 if cost else 0)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.4 * ncols + 1.2, 9 + (2.2 if cost else 0)), sharex=True, squeeze=False
    )
    for row in axes:
        for ax in row[1:cols]:
            ax.sharey(row[0])
            ax.tick_params(labelleft=False)
    for c, r in enumerate(results):
        xs = [s[0] for s in r.samples]
        colour = COLOURS[c % len(COLOURS)]
        for k, (name, unit, scale) in enumerate(METRICS):
            ax = axes[k][c]
            ys = [s[k + 1] * scale for s in r.samples]
            ax.plot(xs, ys, color=colour, linewidth=1.4)
            if ys:
                last = ys[-1]
                text = f"{last:,.0f}" if last >= 100 or last == int(last) else f"{last:,.1f}"
                ax.annotate(
                    f"end: {text} {unit}".rstrip(),
                    xy=(0.98, 0.06),
                    xycoords="axes fraction",
                    ha="right",
                    va="bottom",
                    fontsize="small",
                    bbox={"boxstyle": "round", "fc": "white", "ec": colour, "alpha": 0.85},
                )
            if r.violation is not None:
                ax.axvline(r.violation.op_index, color="black", linestyle=":", linewidth=1)
            ax.grid(True, alpha=0.3)
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
            if c == 0:
                ax.set_ylabel(f"{name}" + (f" ({unit})" if unit else ""))
        if cost:
            # the cost panel: page walks per 1000 accesses at the --cost checkpoints
            ax = axes[len(METRICS)][c]
            xs = [k for k, _ in r.cost_series]
            ys = [1000 * v.walks for _, v in r.cost_series]
            ax.plot(xs, ys, color=colour, linewidth=1.4, marker="o", markersize=3)
            ax.annotate(
                f"end: {ys[-1]:,.1f}",
                xy=(0.98, 0.06),
                xycoords="axes fraction",
                ha="right",
                va="bottom",
                fontsize="small",
                bbox={"boxstyle": "round", "fc": "white", "ec": colour, "alpha": 0.85},
            )
            ax.grid(True, alpha=0.3)
            if c == 0:
                ax.set_ylabel(f"page walks / 1k accesses\n({r.cost_series[-1][1].pattern})")
        head = f"{r.policy} ({r.kernel})"
        if r.violation is not None:
            head += f"\nstopped: invariant ({r.violation.invariant}) at op {r.violation.op_index}"
        axes[0][c].set_title(head, color=colour, fontsize="medium")
        axes[-1][c].set_xlabel("operation index")
    if diff:
        # the last column: every policy minus the first one, so equal policies lie on zero and
        # the others' gains or losses are read off directly
        base = results[0]
        for k, (_name, _unit, scale) in enumerate(METRICS):
            ax = axes[k][cols]
            for c, r in enumerate(results[1:], 1):
                xs = [s[0] for s in r.samples]
                ys = [(s[k + 1] - b[k + 1]) * scale for s, b in zip(r.samples, base.samples)]
                ax.plot(
                    xs,
                    ys,
                    color=COLOURS[c % len(COLOURS)],
                    linewidth=1.4 + 0.8 * (len(results) - c),
                    alpha=0.9,
                    label=r.policy,
                )
            ax.axhline(0, color=COLOURS[0], linewidth=1)
            ax.grid(True, alpha=0.3)
            ax.yaxis.tick_right()
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        if cost and all(len(r.cost_series) == len(base.cost_series) for r in results):
            ax = axes[len(METRICS)][cols]
            for c, r in enumerate(results[1:], 1):
                xs = [k for k, _ in r.cost_series]
                ys = [1000 * (v.walks - b.walks) for (_, v), (_, b) in zip(r.cost_series, base.cost_series)]
                ax.plot(
                    xs,
                    ys,
                    color=COLOURS[c % len(COLOURS)],
                    marker="o",
                    markersize=3,
                    linewidth=1.4 + 0.8 * (len(results) - c),
                    alpha=0.9,
                )
            ax.axhline(0, color=COLOURS[0], linewidth=1)
            ax.grid(True, alpha=0.3)
            ax.yaxis.tick_right()
        axes[0][cols].set_title(f"difference to {base.policy}", fontsize="medium")
        axes[0][cols].legend(loc="best", fontsize="small")
        axes[-1][cols].set_xlabel("operation index")
    fig.suptitle(title or "direct-map fragmentation")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
