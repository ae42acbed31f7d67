"""Fragmentation over time: DirectMap4k/2M/1G and page-table pages against the op index, one
line per policy (matplotlib, Agg backend, PNG written atomically)."""
from __future__ import annotations

import io

from x86pt.memory.atomic import write_bytes_atomic


def plot_fragmentation(results, path: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    labels = ("DirectMap4k (MiB)", "DirectMap2M (MiB)", "DirectMap1G (GiB)", "page-table pages")
    scale = (4 / 1024, 2, 1, 1)
    for r in results:
        xs = [s[0] for s in r.samples]
        for k, ax in enumerate(axes):
            ax.plot(xs, [s[k + 1] * scale[k] for s in r.samples], label=f"{r.policy} ({r.kernel})")
    for ax, lab in zip(axes, labels):
        ax.set_ylabel(lab)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("operation index")
    fig.suptitle(title or "direct-map fragmentation")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
