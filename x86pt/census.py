"""`x86pt census`: the direct map's DirectMap4k/2M/1G as /proc/meminfo prints them, plus leaf
counts per level and the table pages the tree uses.

Linux counts direct_pages_count[] per level as it maps and splits (spec/cpa.md §2,
arch_report_meminfo()); from an image we count the leaves that lie in the direct-map range
[PAGE_OFFSET, PAGE_OFFSET + 2^46) (2^52 with 5-level paging). Known difference from a live kernel
(spec/oracle-linux.md §9.1): the kernel also counts splits of the kernel-image ("highmap")
alias, which lie outside that range, so its DirectMap4k is higher by those pieces.
PAGE_OFFSET is given, or detected as the 1 GiB-aligned (KASLR granularity) VA-PA offset that
maps the most bytes in the kernel half.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from x86pt.coalesce import present_only
from x86pt.errors import BadInputError
from x86pt.scan import U64, Scanner, ScanStats
from x86pt.state import PagingState

GiB = 1 << 30


@dataclass(frozen=True)
class Census:
    page_offset: int
    detected: bool
    direct_end: int
    direct: dict[int, int]          # SDM level -> leaves inside the direct map
    leaves: dict[int, int]          # SDM level -> leaves anywhere
    tables: dict[int, int]          # SDM level -> table visits
    distinct_tables: int
    issues: int
    levels: int

    def meminfo(self, gbpages: bool = True) -> str:
        """arch_report_meminfo(): "DirectMap4k:    %8lu kB" (4 spaces after the colon)."""
        s = f"DirectMap4k:    {self.direct.get(1, 0) << 2:8d} kB\n"
        s += f"DirectMap2M:    {self.direct.get(2, 0) << 11:8d} kB\n"
        if gbpages:
            s += f"DirectMap1G:    {self.direct.get(3, 0) << 20:8d} kB\n"
        return s

    def to_json(self) -> dict:
        return {"page_offset": hex(self.page_offset), "page_offset_detected": self.detected,
                "direct_map_end": hex(self.direct_end),
                "DirectMap4k_kB": self.direct.get(1, 0) << 2, "DirectMap2M_kB": self.direct.get(2, 0) << 11,
                "DirectMap1G_kB": self.direct.get(3, 0) << 20,
                "leaves": {"4K": self.leaves.get(1, 0), "2M": self.leaves.get(2, 0), "1G": self.leaves.get(3, 0)},
                "table_visits": {str(k): v for k, v in self.tables.items() if k <= self.levels},
                "table_pages": self.distinct_tables, "issues": self.issues}

    def render(self, gbpages: bool = True) -> str:
        names = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
        out = [self.meminfo(gbpages), "\n",
               f"direct map: {self.page_offset:#018x}-{self.direct_end:#018x} "
               f"(PAGE_OFFSET {'detected' if self.detected else 'given'})\n",
               "leaves (whole tree): " + "  ".join(
                   f"{lbl} {self.leaves.get(l, 0)}" for l, lbl in ((1, "4K"), (2, "2M"), (3, "1G"))) + "\n",
               "table pages: " + "  ".join(f"{names[l]} {self.tables.get(l, 0)}"
                                           for l in range(self.levels, 0, -1))
               + f"  (distinct {self.distinct_tables}, {self.distinct_tables * 4} KiB)\n"]
        if self.issues:
            out.append(f"issues: {self.issues} (see x86pt dump --format json)\n")
        return "".join(out)


def _offset_weights(va: np.ndarray, pa: np.ndarray, span: np.ndarray, weights: dict[int, int]) -> None:
    off = va - pa
    u, inv = np.unique(off, return_inverse=True)
    w = np.bincount(inv, weights=span.astype(np.float64))
    for o, ww in zip(u.tolist(), w.tolist()):
        weights[o] = weights.get(o, 0) + int(ww)


def _pick(weights: dict[int, int]) -> int:
    aligned = {o: w for o, w in weights.items() if o % GiB == 0}
    pick = aligned or weights
    if not pick:
        raise BadInputError("cannot detect PAGE_OFFSET: nothing is mapped in the kernel half; "
                            "pass --page-offset")
    return max(pick.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def census(state: PagingState, memory, page_offset: int | None = None, **scan_kw) -> Census:
    """One scan: kernel-half records are kept (as runs, so a uniform 4K table is one row) until
    PAGE_OFFSET is known, then counted against the direct-map range."""
    detected = page_offset is None
    sc = Scanner(state, memory, **scan_kw)
    weights: dict[int, int] = {}
    keep_va, keep_level, keep_count = [], [], []
    for ch in present_only(sc.chunks()):
        k = (ch.va >> U64(63)) == U64(1)
        if not k.any():
            continue
        sub = ch if k.all() else ch.take(k)
        if detected:
            _offset_weights(sub.va, sub.pa, sub.span, weights)
        keep_va.append(sub.va)
        keep_level.append(sub.level)
        keep_count.append(sub.count)
    if detected:
        page_offset = _pick(weights)
    end = (page_offset + (1 << (52 if state.la57 else 46))) & ((1 << 64) - 1)
    direct = {1: 0, 2: 0, 3: 0}
    if keep_va:
        va, level, count = (np.concatenate(x) for x in (keep_va, keep_level, keep_count))
        inside = va >= U64(page_offset)
        if end > page_offset:
            inside &= va < U64(end)
        cnt = np.bincount(level[inside], weights=count[inside].astype(np.float64), minlength=4)
        for lvl in (1, 2, 3):
            direct[lvl] = int(cnt[lvl])
    st: ScanStats = sc.stats
    return Census(page_offset, detected, end, direct, dict(st.entries), dict(st.tables),
                  st.distinct_tables(), st.issue_count, state.paging_levels)
