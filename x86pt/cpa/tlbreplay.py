# SPDX-License-Identifier: GPL-2.0-or-later
"""`cpa replay --tlb`: a trace replayed on the CPA model with the TLB model (x86pt.tlb) of N CPUs
alongside. Before each op every CPU may cache the translations the op can change (the primary
range and its direct-map/highmap aliases); each flush the CPA model issues is applied at the
point the kernel issues it, on the tables as they are then; the trace's own TLB ops (recorded
flushes, touches) are applied where they stand. After each op the differences between what a
CPU may use and the tables are reported, and the windows they open and close are tracked.

An API call ends after its op and the TLB ops that follow it in the trace (a recorded trace
puts the kernel's flushes after the call line). A dangerous window still open there, opened by
an op whose flush is its own (not set_direct_map_*_noflush, kernel_map_pages, a bare `cpa …
alias`, or kfence's `oob`, whose flushes belong to the caller or are local by design), is a
finding; every window still open at the trace's end is one too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from x86pt.cpa.kernel import PTE_PFN_MASK, U64
from x86pt.cpa.ops import API, CpaModel
from x86pt.cpa.tables import Table
from x86pt.tlb import TLB_OPS, Difference, FlushDone, TlbReplay, Window

PAGE = 4096
# Ops whose missing flush is the caller's business (their windows are checked at the trace's end
# only): the *_noflush calls (the caller flushes, e.g. vm_reset_perms), __kernel_map_pages
# (DEBUG_PAGEALLOC: a local flush only, arch/x86/mm/pat/set_memory.c), a bare alias call (its
# flush is the enclosing call's), kfence's PTE write (arch/x86/include/asm/kfence.h: a local
# flush_tlb_one_kernel; other CPUs may keep the old entry, which kfence accepts).
CALLER_FLUSHES = (
    "set_direct_map_invalid_noflush",
    "set_direct_map_default_noflush",
    "kernel_map_pages",
    "oob",
)
TLB_NAMES = frozenset(TLB_OPS)

if TYPE_CHECKING:
    from x86pt.cpa.trace import Op


class LiveTables:
    """read_u64 over the CPA model's tables as they are now (no export): physical address ->
    the model's table list. The index is rebuilt when a table was allocated or freed since."""

    def __init__(self, m: CpaModel) -> None:
        self.m = m
        self._gen = -1
        self._idx: dict[int, Table] = {}

    def _rebuild(self) -> None:
        m = self.m
        idx = {m.pgd_pa >> 12: m.pgd}
        for k, t in m.p4d.items():
            idx[(m.pgd[k] & PTE_PFN_MASK) >> 12] = t
        for k, t in m.t3.items():
            idx[(m._top_entry(k) & PTE_PFN_MASK) >> 12] = t
        for k, t in m.t2.items():
            idx[(m.t3[k >> 9][k & 511] & PTE_PFN_MASK) >> 12] = t
        for k, t in m.t1.items():
            idx[(m.t2[k >> 9][k & 511] & PTE_PFN_MASK) >> 12] = t
        self._idx = idx
        self._gen = m.pool.gen

    def read_u64(self, pa: int) -> int:
        if self._gen != self.m.pool.gen:
            self._rebuild()
        t = self._idx.get(pa >> 12)
        return t[(pa & 0xFFF) >> 3] if t is not None else 0


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def op_ranges(m: CpaModel, op: Op) -> list[tuple[int, int]]:
    """Every linear range `op` may change, from the tables before it: the primary range and,
    for CPA calls, the direct-map and highmap aliases of the frames it maps (cpa_process_alias,
    arch/x86/mm/pat/set_memory.c)."""
    name = op[0]
    if name in API or name == "cpa":
        addr, n = op[1] & ~0xFFF & U64, op[2]
        out = [(addr, addr + n * PAGE)]
        alias = name != "cpa" or op[6]
        if alias:
            lo = m.layout
            hm_end = m.start_kernel_map + lo.kernel_image_size
            for i in range(n):
                t = m.translate(addr + i * PAGE)
                if t is None:
                    continue
                pfn = t[0]
                if m.pfn_mapped(pfn):
                    d = m.page_offset + (pfn << 12)
                    out.append((d, d + PAGE))
                h = m.start_kernel_map + (pfn << 12) - lo.phys_base
                if m.highmap_spfn <= pfn <= m.highmap_epfn and m.start_kernel_map <= h < hm_end:
                    out.append((h, h + PAGE))
        return _merge(out)
    if name in ("set_direct_map_invalid_noflush", "set_direct_map_default_noflush", "oob"):
        a = op[1] & ~0xFFF
        return [(a, a + PAGE)]
    if name in ("kernel_map_pages", "vmap", "vunmap"):
        a = op[1] & ~0xFFF
        n = op[3] if name == "vmap" else op[2]
        return [(a, a + n * PAGE)]
    if name in ("memory_add", "memory_remove"):
        a = m.page_offset + op[1]
        return [(a, a + op[2])]
    return []


@dataclass
class OpReport:
    index: int
    op: str
    differences: list[Difference]
    closed: list[Window]
    flushes: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "op": self.op,
            "differences": [d.to_json() for d in self.differences],
            "closed": [w.to_json() for w in self.closed],
            "flushes": self.flushes,
        }


@dataclass
class CallFinding:
    """Dangerous windows still open when the API call ending at op `index` returned."""

    index: int
    op: str
    windows: list[Window]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "op": self.op, "windows": [w.to_json() for w in self.windows]}


@dataclass
class TlbResult:
    ncpus: int
    assume: str
    flushes_from: str
    kernel: str
    ops: int = 0
    seconds: float = 0.0
    reports: list[OpReport] = field(default_factory=list)
    findings: list[CallFinding] = field(default_factory=list)
    open_at_end: list[Window] = field(default_factory=list)
    closed: list[Window] = field(default_factory=list)
    flush_all_done: int = 0
    invlpg_pages_done: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.findings) or any(w.severity == "dangerous" for w in self.open_at_end)

    def to_json(self) -> dict[str, Any]:
        return {
            "cpus": self.ncpus,
            "assume": self.assume,
            "flushes": self.flushes_from,
            "kernel": self.kernel,
            "ops": self.ops,
            "seconds": round(self.seconds, 3),
            "ops_per_s": round(self.ops / self.seconds) if self.seconds else None,
            "flushes_done": {"flush_all": self.flush_all_done, "invlpg_pages": self.invlpg_pages_done},
            "model_counters": {
                "flush_all": self.counters.get("flush_all", 0),
                "invlpg_pages": self.counters.get("invlpg_pages", 0),
            },
            "ops_with_differences": [r.to_json() for r in self.reports],
            "windows_closed": [w.to_json() for w in self.closed],
            "dangerous_at_end_of_call": [f.to_json() for f in self.findings],
            "open_at_end": [w.to_json() for w in self.open_at_end],
            "ok": not self.failed,
        }


def _flush_json(d: FlushDone) -> dict[str, Any]:
    if d.full:
        return {"full": True, "cpus": list(d.cpus)}
    return {
        "pages": [hex(p) for p in d.pages[:8]] + (["…"] if len(d.pages) > 8 else []),
        "npages": len(d.pages),
        "cpus": list(d.cpus),
    }


def replay_tlb(
    m: CpaModel,
    ops: list[Op],
    *,
    ncpus: int = 2,
    assume: str = "speculate",
    flushes: str = "model",
    runner_cpu: int = 0,
    on_flush: Callable[[int, str, int, int], object] | None = None,
) -> TlbResult:
    """Replay `ops` on `m` with the TLB model. `runner_cpu` is the CPU that runs each op: the
    target of local flushes (kernel_map_pages, kfence). `on_flush(index, kind, start, end)` is
    told of every flush the CPA model issues (also when flushes come from the trace)."""
    from x86pt.cpa.trace import apply_op, format_op

    mem = LiveTables(m)
    kernel = m.version.name
    r = TlbReplay(mem, m.paging_state(), ncpus, kernel=kernel, assume=assume, flushes=flushes)
    res = TlbResult(ncpus, assume, flushes, kernel)

    cur = [-1]

    def hook(kind: str, start: int = 0, end: int = U64) -> None:
        if on_flush is not None:
            on_flush(cur[0], kind, start, end)
        cpu = runner_cpu if kind in ("local", "page") else None
        r.flush(mem, kind, start, end, cpu)

    m.flush_hook = hook
    before = m.counters.snapshot()
    checked: set[int] = set()  # ops whose windows are checked at the end of their call
    pending: tuple[int, str] | None = None  # the last API call, ended by the next non-TLB op
    t0 = time.perf_counter()

    def end_call() -> None:
        if pending is None:
            return
        bad = [w for w in r.tracker.dangerous_open() if w.opened in checked]
        if bad:
            res.findings.append(CallFinding(pending[0], pending[1], bad))

    try:
        for idx, op in enumerate(ops):
            cur[0] = idx
            name = op[0]
            is_tlb = name in TLB_NAMES
            if not is_tlb:
                end_call()
                pending = None
                r.begin_op(mem, op_ranges(m, op))
            n_before = len(r.flushes_done)
            if is_tlb:
                r.trace_op(op, mem)
            else:
                apply_op(m, op)
                if name in API or (name == "cpa" and op[6]):
                    checked.add(idx)
                    pending = (idx, format_op(op))
            diffs, closed = r.end_op(idx, mem)
            done = r.flushes_done[n_before:]
            if diffs or closed:
                res.reports.append(OpReport(idx, op_text(op), diffs, closed, [_flush_json(d) for d in done]))
        end_call()
    finally:
        m.flush_hook = None
    res.seconds = time.perf_counter() - t0
    res.ops = len(ops)
    res.closed = list(r.tracker.closed)
    res.open_at_end = r.tracker.open_windows()
    every = tuple(range(ncpus))
    res.flush_all_done = sum(d.full for d in r.flushes_done if d.cpus == every)
    res.invlpg_pages_done = sum(len(d.pages) for d in r.flushes_done if not d.full and d.cpus == every)
    res.counters = {k: v - before.get(k, 0) for k, v in m.counters.snapshot().items() if isinstance(v, int)}
    return res


def op_text(op: Op) -> str:
    from x86pt.cpa.trace import format_op

    return format_op(op)


def render_text(res: TlbResult) -> str:
    """The human report: each op with differences, then the findings."""
    out = [
        f"TLB model: {res.ncpus} CPUs, fills {res.assume}, flushes from the {res.flushes_from}, "
        f"kernel {res.kernel}; {res.ops} ops"
    ]
    for rep in res.reports:
        out.append(f"op {rep.index}: {rep.op}")
        for d in rep.differences:
            out.append(
                f"  cpu {d.cpu} {d.start & U64:#x}-{d.end & U64:#x} {d.kind:<7} {d.severity:<9} "
                f"cached: {d.cached}; tables: {d.current}"
            )
        for w in rep.closed:
            out.append(
                f"  closed: cpu {w.cpu} {w.start:#x}-{w.end:#x} {w.kind} {w.severity} "
                f"(opened at op {w.opened})"
            )
    for f in res.findings:
        for w in f.windows:
            out.append(
                f"DANGEROUS at the end of op {f.index} ({f.op}): cpu {w.cpu} "
                f"{w.start:#x}-{w.end:#x} {w.kind}, open since op {w.opened}"
            )
    for w in res.open_at_end:
        out.append(
            f"open at the end of the trace: cpu {w.cpu} {w.start:#x}-{w.end:#x} {w.kind} "
            f"{w.severity}, since op {w.opened}"
        )
    out.append(
        f"flushes done: {res.flush_all_done} full, {res.invlpg_pages_done} INVLPG pages "
        f"(model counters over the trace: flush_all {res.counters.get('flush_all', 0)}, "
        f"invlpg_pages {res.counters.get('invlpg_pages', 0)})"
    )
    out.append("result: " + ("DANGEROUS WINDOW" if res.failed else "ok"))
    return "\n".join(out)
