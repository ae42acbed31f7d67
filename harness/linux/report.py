"""`x86pt linux report DIR`: what the kernel did at each step of a collected run, as a table,
plus a fragmentation plot of the direct map.

Per step: CPA calls (top-level / all), splits seen in the trace (1G->2M, 2M->4K), the change of
the kernel's counters (DirectMap4k/2M/1G in /proc/meminfo, direct_map_level{2,3}_splits in
/proc/vmstat), whether the trace accounts for that change, and how many direct-map 4K pages lost
G (counted from the kernel's own ptdump text). The model column is filled in by the CPA model's
replay when x86pt.cpa provides one; until then it says so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from harness.linux.runfolder import load_json, read_artifact
from x86pt.errors import BadInputError

_LINE = re.compile(r"^0x([0-9a-f]+)-0x([0-9a-f]+)\s+\S+\s+(.*)$")


@dataclass(frozen=True)
class PtdumpRange:
    start: int
    end: int
    attrs: tuple[str, ...]  # e.g. ("RW", "PSE", "GLB", "NX", "pmd")

    @property
    def level(self) -> str:
        return self.attrs[-1] if self.attrs else ""


def parse_ptdump(text: str) -> list[PtdumpRange]:
    """The ranges of the kernel's ptdump text (section markers and ESPfix notes skipped)."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if end <= start:  # the last range ends at 2^64, printed as 0
                end += 1 << 64
            out.append(PtdumpRange(start, end, tuple(m.group(3).split())))
    return out


def direct_map_span(layout: dict) -> tuple[int, int]:
    """[PAGE_OFFSET, PAGE_OFFSET + end of the highest System RAM range)."""
    base = int(layout.get("page_offset_base") or layout["symbols"].get("page_offset_base_value", "0"), 16)
    top = max(
        (int(r["end"], 16) for r in layout.get("iomem", []) if r["name"] == "System RAM"), default=1 << 32
    )
    return base, base + ((top + (1 << 30) - 1) & ~((1 << 30) - 1))


def direct_map_stats(ranges: list[PtdumpRange], span: tuple[int, int]) -> dict[str, int]:
    """Bytes of the direct map per leaf level, and 4K pages without G, from ptdump ranges."""
    lo, hi = span
    st = {"pte": 0, "pmd": 0, "pud": 0, "no_glb_pages": 0}
    for r in ranges:
        a, b = max(r.start, lo), min(r.end, hi)
        if a >= b or not ("RW" in r.attrs or "ro" in r.attrs):  # unmapped stretches
            continue
        if r.level in st:
            st[r.level] += b - a
        if "GLB" not in r.attrs:
            st["no_glb_pages"] += (b - a) >> 12
    return st


def _read(path: str) -> str:
    return read_artifact(os.path.dirname(path), os.path.basename(path)).decode("utf-8", "replace")


def steps_of(run_dir: str) -> list[str]:
    if not os.path.isdir(run_dir):
        raise BadInputError(f"{run_dir} is not a directory")
    steps = sorted(d for d in os.listdir(run_dir) if re.fullmatch(r"step-\d+", d))
    if not steps:
        raise BadInputError(f"{run_dir} holds no step-NN directories (not an x86pt linux run)")
    return [os.path.join(run_dir, d) for d in steps]


def model_agreement(run_dir: str, step_dirs: list[str]) -> list[str]:
    """Per step: 'yes'/'no' from the CPA model's replay of step k on image k-1 (harness/linux/
    replay.py: direct-map + highmap leaves, DirectMap counters, split events); '-' for step 0;
    'n/a' where the run kept no image of step k-1 or k (--images last)."""
    from harness.linux.runfolder import read_artifact as _ra
    from harness.linux.replay import replay_step

    if len(step_dirs) < 2:
        return ["-"] * len(step_dirs)

    def has_image(d: str) -> bool:
        try:
            _ra(d, "tables.elf")
            return True
        except BadInputError:
            return False

    images = [has_image(d) for d in step_dirs]
    out = ["-"]
    for k in range(1, len(step_dirs)):
        if not (images[k - 1] and images[k]):
            out.append("n/a")
            continue
        out.append("yes" if replay_step(run_dir, k).identical else "no")
    return out


def report_data(run_dir: str, plot: str | None = None) -> dict:
    """Everything the report shows, as data (`x86pt linux report --json`)."""
    from harness.linux.runfolder import run_meta

    meta = run_meta(run_dir)
    layout = load_json(os.path.join(run_dir, "layout.json"))
    dirs = steps_of(run_dir)
    span = direct_map_span(layout)
    rows = []
    prev = None
    for d in dirs:
        s = load_json(os.path.join(d, "step.json"))
        c = s["counters"]
        dm = direct_map_stats(parse_ptdump(_read(os.path.join(d, "ptdump.txt"))), span)
        row = {
            "step": s["step"],
            "name": s["name"],
            "calls": s["trace"]["top_level_calls"],
            "all_calls": s["trace"]["calls"],
            "s1g": s["trace"]["splits_1g"],
            "s2m": s["trace"]["splits_2m"],
            "counters": c,
            "dm": dm,
        }
        if prev is not None:
            d4k = c.get("DirectMap4k", 0) - prev["counters"].get("DirectMap4k", 0)
            d2m = c.get("DirectMap2M", 0) - prev["counters"].get("DirectMap2M", 0)
            d1g = c.get("DirectMap1G", 0) - prev["counters"].get("DirectMap1G", 0)
            l2 = c.get("direct_map_level2_splits", 0) - prev["counters"].get("direct_map_level2_splits", 0)
            l3 = c.get("direct_map_level3_splits", 0) - prev["counters"].get("direct_map_level3_splits", 0)
            row["delta"] = (d4k, d2m, d1g, l2, l3)
            # a 2M split moves 2048 kB from DirectMap2M to DirectMap4k; a 1G split 1 GiB to 2M
            expect = (
                2048 * row["s2m"],
                1048576 * row["s1g"] - 2048 * row["s2m"],
                -1048576 * row["s1g"],
                row["s2m"],
                row["s1g"],
            )
            row["trace_ok"] = "yes" if expect == row["delta"] else "no"
            row["lost_g"] = dm["no_glb_pages"] - prev["dm"]["no_glb_pages"]
        else:
            row["delta"] = None
            row["trace_ok"] = "-"
            row["lost_g"] = dm["no_glb_pages"]
        rows.append(row)
        prev = row
    for row, ag in zip(rows, model_agreement(run_dir, dirs)):
        row["model"] = ag
    cfg = meta.get("config", {})
    if plot:  # only where asked: a report never writes into the run folder by itself
        write_plot(
            plot, rows, f"{meta.get('kernel_release')} {cfg.get('levels')}-level {meta.get('workload')}"
        )
    return {
        "run": run_dir,
        "kernel_release": meta.get("kernel_release"),
        "kernel_package_version": meta.get("kernel_package_version"),
        "qemu_version": meta.get("qemu_version"),
        "levels": cfg.get("levels"),
        "kaslr": bool(cfg.get("kaslr")),
        "workload": meta.get("workload"),
        "images": cfg.get("images"),
        "wall_seconds": meta.get("wall_seconds"),
        "deterministic_steps": meta.get("deterministic_steps"),
        "chain_consistent": meta.get("chain_consistent"),
        "steps": [
            {
                "step": r["step"],
                "name": r["name"],
                "top_level_calls": r["calls"],
                "calls": r["all_calls"],
                "splits_1g": r["s1g"],
                "splits_2m": r["s2m"],
                "counter_delta": None
                if r["delta"] is None
                else dict(
                    zip(
                        (
                            "DirectMap4k",
                            "DirectMap2M",
                            "DirectMap1G",
                            "direct_map_level2_splits",
                            "direct_map_level3_splits",
                        ),
                        r["delta"],
                    )
                ),
                "trace_accounts": r["trace_ok"],
                "lost_g": r["lost_g"],
                "model": r["model"],
                "counters": r["counters"],
            }
            for r in rows
        ],
        "final_counters": rows[-1]["counters"],
        "plot": plot,
    }


def report(run_dir: str, plot: str | None = None) -> str:
    data = report_data(run_dir, plot)
    out = [
        f"{data['kernel_release']} ({data['kernel_package_version']}), QEMU {data['qemu_version']}, "
        f"{data['levels']}-level, {'kaslr' if data['kaslr'] else 'nokaslr'}, workload "
        f"{data['workload']}; wall {data['wall_seconds']} s, images {data['images']}, "
        f"deterministic steps {data['deterministic_steps']}, chain {data['chain_consistent']}",
        "",
        f"{'step':>4}  {'what':<22} {'calls':>11} {'split 1G':>8} {'split 2M':>8} "
        f"{'dDM4k kB':>9} {'dDM2M kB':>9} {'dDM1G kB':>9} {'trace=ctr':>9} {'lost G':>7} {'model':>5}",
    ]
    for r in data["steps"]:
        d = list(r["counter_delta"].values()) if r["counter_delta"] else ["", "", "", "", ""]
        out.append(
            f"{r['step']:>4}  {r['name'][:22]:<22} {str(r['top_level_calls']) + '/' + str(r['calls']):>11} "
            f"{r['splits_1g']:>8} {r['splits_2m']:>8} {d[0]!s:>9} {d[1]!s:>9} {d[2]!s:>9} "
            f"{r['trace_accounts']:>9} {r['lost_g']:>7} {r['model']:>5}"
        )
    out.append("")
    out.append("final counters: " + " ".join(f"{k}={v}" for k, v in sorted(data["final_counters"].items())))
    out.append(
        "model: the CPA model replaying step k's trace on image k-1 ends with image k's "
        "direct map and the kernel's counters (tools/linux_replay_report.py for details)"
    )
    out.append(
        "lost G: change of direct-map 4K pages mapped without GLB in the kernel's ptdump "
        "(step 0: the count at baseline)"
    )
    out.append(f"plot: {data['plot']}" if data["plot"] else "plot: --plot FILE.png draws one")
    return "\n".join(out) + "\n"


def write_plot(path: str, rows: list[dict], title: str) -> None:
    """Direct map per page size (kernel counters) and pages without G, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from x86pt.memory.atomic import atomic_writer

    xs = [r["step"] for r in rows]
    mib = {
        k: [r["counters"].get(k, 0) / 1024 for r in rows]
        for k in ("DirectMap4k", "DirectMap2M", "DirectMap1G")
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(xs)
    for k, colour in (("DirectMap1G", "#4c72b0"), ("DirectMap2M", "#55a868"), ("DirectMap4k", "#c44e52")):
        ax1.bar(xs, mib[k], bottom=bottom, label=k, color=colour)
        bottom = [b + v for b, v in zip(bottom, mib[k])]
    ax1.set_xlabel("step")
    ax1.set_ylabel("MiB of the direct map")
    ax1.set_title("direct map by page size (/proc/meminfo)")
    ax1.set_xticks(xs)
    ax1.legend(fontsize=8)
    ax2.plot(xs, mib["DirectMap4k"], marker="o", color="#c44e52", label="DirectMap4k (MiB)")
    ax2.plot(
        xs,
        [r["dm"]["no_glb_pages"] * 4 / 1024 for r in rows],
        marker="s",
        color="#8172b2",
        label="4K pages without G (MiB, ptdump)",
    )
    ax2.set_xlabel("step")
    ax2.set_title("fragmentation")
    ax2.set_xticks(xs)
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
