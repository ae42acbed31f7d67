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

from harness.linux.collect import load_json, read_artifact
from x86pt.errors import BadInputError

_LINE = re.compile(r"^0x([0-9a-f]+)-0x([0-9a-f]+)\s+\S+\s+(.*)$")


@dataclass(frozen=True)
class PtdumpRange:
    start: int
    end: int
    attrs: tuple[str, ...]     # e.g. ("RW", "PSE", "GLB", "NX", "pmd")

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
            if end <= start:            # the last range ends at 2^64, printed as 0
                end += 1 << 64
            out.append(PtdumpRange(start, end, tuple(m.group(3).split())))
    return out


def direct_map_span(layout: dict) -> tuple[int, int]:
    """[PAGE_OFFSET, PAGE_OFFSET + end of the highest System RAM range)."""
    base = int(layout.get("page_offset_base") or layout["symbols"].get("page_offset_base_value", "0"), 16)
    top = max((int(r["end"], 16) for r in layout.get("iomem", []) if r["name"] == "System RAM"),
              default=1 << 32)
    return base, base + ((top + (1 << 30) - 1) & ~((1 << 30) - 1))


def direct_map_stats(ranges: list[PtdumpRange], span: tuple[int, int]) -> dict[str, int]:
    """Bytes of the direct map per leaf level, and 4K pages without G, from ptdump ranges."""
    lo, hi = span
    st = {"pte": 0, "pmd": 0, "pud": 0, "no_glb_pages": 0}
    for r in ranges:
        a, b = max(r.start, lo), min(r.end, hi)
        if a >= b or not ("RW" in r.attrs or "ro" in r.attrs):   # unmapped stretches
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
    replay.py: direct-map + highmap leaves, DirectMap counters, split events); '-' for step 0."""
    from harness.linux.replay import replay_run
    if len(step_dirs) < 2:
        return ["-"] * len(step_dirs)
    return ["-"] + ["yes" if r.identical else "no" for r in replay_run(run_dir)]


def report(run_dir: str, plot: str | None = None) -> str:
    meta = load_json(os.path.join(run_dir, "run.json"))
    layout = load_json(os.path.join(run_dir, "layout.json"))
    dirs = steps_of(run_dir)
    span = direct_map_span(layout)
    rows = []
    prev = None
    for d in dirs:
        s = load_json(os.path.join(d, "step.json"))
        c = s["counters"]
        dm = direct_map_stats(parse_ptdump(_read(os.path.join(d, "ptdump.txt"))), span)
        row = {"step": s["step"], "name": s["name"], "calls": s["trace"]["top_level_calls"],
               "all_calls": s["trace"]["calls"], "s1g": s["trace"]["splits_1g"],
               "s2m": s["trace"]["splits_2m"], "counters": c, "dm": dm}
        if prev is not None:
            d4k = c.get("DirectMap4k", 0) - prev["counters"].get("DirectMap4k", 0)
            d2m = c.get("DirectMap2M", 0) - prev["counters"].get("DirectMap2M", 0)
            d1g = c.get("DirectMap1G", 0) - prev["counters"].get("DirectMap1G", 0)
            l2 = c.get("direct_map_level2_splits", 0) - prev["counters"].get("direct_map_level2_splits", 0)
            l3 = c.get("direct_map_level3_splits", 0) - prev["counters"].get("direct_map_level3_splits", 0)
            row["delta"] = (d4k, d2m, d1g, l2, l3)
            # a 2M split moves 2048 kB from DirectMap2M to DirectMap4k; a 1G split 1 GiB to 2M
            expect = (2048 * row["s2m"], 1048576 * row["s1g"] - 2048 * row["s2m"], -1048576 * row["s1g"],
                      row["s2m"], row["s1g"])
            row["trace_ok"] = "yes" if expect == row["delta"] else "no"
            row["lost_g"] = dm["no_glb_pages"] - prev["dm"]["no_glb_pages"]
        else:
            row["delta"] = None
            row["trace_ok"] = "-"
            row["lost_g"] = dm["no_glb_pages"]
        rows.append(row)
        prev = row
    agree = model_agreement(run_dir, dirs)
    cfg = meta.get("config", {})
    out = [f"{meta.get('kernel_release')} ({meta.get('kernel_package_version')}), QEMU {meta.get('qemu_version')}, "
           f"{cfg.get('levels')}-level, {'kaslr' if cfg.get('kaslr') else 'nokaslr'}, workload "
           f"{meta.get('workload')}; wall {meta.get('wall_seconds')} s, deterministic steps "
           f"{meta.get('deterministic_steps')}",
           "",
           f"{'step':>4}  {'what':<22} {'calls':>11} {'split 1G':>8} {'split 2M':>8} "
           f"{'dDM4k kB':>9} {'dDM2M kB':>9} {'dDM1G kB':>9} {'trace=ctr':>9} {'lost G':>7} {'model':>5}"]
    for row, ag in zip(rows, agree):
        d = row["delta"] or ("", "", "", "", "")
        out.append(f"{row['step']:>4}  {row['name'][:22]:<22} {str(row['calls']) + '/' + str(row['all_calls']):>11} "
                   f"{row['s1g']:>8} {row['s2m']:>8} {d[0]!s:>9} {d[1]!s:>9} {d[2]!s:>9} "
                   f"{row['trace_ok']:>9} {row['lost_g']:>7} {ag:>5}")
    last = rows[-1]["counters"]
    out.append("")
    out.append("final counters: " + " ".join(f"{k}={v}" for k, v in sorted(last.items())))
    out.append("model: the CPA model replaying step k's trace on image k-1 ends with image k's "
               "direct map and the kernel's counters (tools/linux_replay_report.py for details)")
    out.append("lost G: change of direct-map 4K pages mapped without GLB in the kernel's ptdump "
               "(step 0: the count at baseline)")
    plot = plot or os.path.join(run_dir, "fragmentation.png")
    write_plot(plot, rows, f"{meta.get('kernel_release')} {cfg.get('levels')}-level {meta.get('workload')}")
    out.append(f"plot: {plot}")
    return "\n".join(out) + "\n"


def write_plot(path: str, rows: list[dict], title: str) -> None:
    """Direct map per page size (kernel counters) and pages without G, step by step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from x86pt.memory.atomic import atomic_writer
    xs = [r["step"] for r in rows]
    mib = {k: [r["counters"].get(k, 0) / 1024 for r in rows] for k in ("DirectMap4k", "DirectMap2M", "DirectMap1G")}
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
    ax2.plot(xs, [r["dm"]["no_glb_pages"] * 4 / 1024 for r in rows], marker="s", color="#8172b2",
             label="4K pages without G (MiB, ptdump)")
    ax2.set_xlabel("step")
    ax2.set_title("fragmentation")
    ax2.set_xticks(xs)
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
