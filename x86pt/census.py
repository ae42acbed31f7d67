"""`x86pt census`: the direct map's DirectMap4k/2M/1G as /proc/meminfo prints them, plus leaf
counts per level and the table pages the tree uses.

Linux counts direct_pages_count[] per level as it maps and splits (docs/cpa.md §5,
arch_report_meminfo()); from an image we reconstruct the same numbers:
  * the leaves in the direct-map range [PAGE_OFFSET, PAGE_OFFSET + 2^46) (2^52 with 5-level);
  * plus the direct-map 4K entries that are not present but still hold their frame
    (set_direct_map_invalid_noflush: secretmem, vm_reset_perms) — the kernel never uncounts them;
  * plus the splits of the kernel-image mapping [__START_KERNEL_map, + KERNEL_IMAGE_SIZE): it
    starts as 2M leaves only and CPA counts every split there too (virt_addr_valid() is true for
    it; docs/cpa.md §5 [reading], confirmed on real 6.1/6.12 kernels in docs/cpa.md §11): each
    page table under it moved 2M -> 512 x 4K in the counters.
tests/test_linux_fixtures.py checks the result against /proc/meminfo of real kernels.
PAGE_OFFSET is given, or detected as the 1 GiB-aligned (KASLR granularity) VA-PA offset that
maps the most bytes in the kernel half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from x86pt.errors import BadInputError
from x86pt.scan import U64, Scanner, ScanStats
from x86pt.state import PagingState

if TYPE_CHECKING:
    from x86pt.memory.base import PhysicalMemory

GiB = 1 << 30
KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map
KERNEL_IMAGE_SIZE = 1 << 30  # with CONFIG_RANDOMIZE_BASE (Debian); 512 MiB without


def meminfo_text(dpc4k: int, dpc2m: int, dpc1g: int, gbpages: bool = True) -> str:
    """arch_report_meminfo() (arch/x86/mm/pat/set_memory.c): direct_pages_count[] in kB as
    "DirectMap4k:    %8lu kB" (4 spaces after the colon); the 1G line only with gbpages."""
    s = f"DirectMap4k:    {dpc4k << 2:8d} kB\n"
    s += f"DirectMap2M:    {dpc2m << 11:8d} kB\n"
    if gbpages:
        s += f"DirectMap1G:    {dpc1g << 20:8d} kB\n"
    return s


@dataclass(frozen=True)
class Census:
    page_offset: int
    detected: bool
    direct_end: int
    direct: dict[int, int]  # SDM level -> leaves inside the direct map
    leaves: dict[int, int]  # SDM level -> leaves anywhere
    tables: dict[int, int]  # SDM level -> table visits
    distinct_tables: int
    issues: int
    levels: int
    invalidated_4k: int = 0  # non-present direct-map PTEs that still hold a frame
    highmap_splits: int = 0  # page tables under the kernel-image mapping (2M splits)

    @property
    def counts(self) -> dict[int, int]:
        """direct_pages_count[] as the kernel keeps it (level -> mappings)."""
        return {
            1: self.direct.get(1, 0) + self.invalidated_4k + 512 * self.highmap_splits,
            2: self.direct.get(2, 0) - self.highmap_splits,
            3: self.direct.get(3, 0),
        }

    def meminfo(self, gbpages: bool = True) -> str:
        c = self.counts
        return meminfo_text(c[1], c[2], c[3], gbpages)

    def to_json(self) -> dict[str, Any]:
        c = self.counts
        return {
            "page_offset": hex(self.page_offset),
            "page_offset_detected": self.detected,
            "direct_map_end": hex(self.direct_end),
            "DirectMap4k_kB": c[1] << 2,
            "DirectMap2M_kB": c[2] << 11,
            "DirectMap1G_kB": c[3] << 20,
            "direct_map_leaves": {
                "4K": self.direct.get(1, 0),
                "2M": self.direct.get(2, 0),
                "1G": self.direct.get(3, 0),
            },
            "invalidated_4k": self.invalidated_4k,
            "kernel_image_splits": self.highmap_splits,
            "leaves": {"4K": self.leaves.get(1, 0), "2M": self.leaves.get(2, 0), "1G": self.leaves.get(3, 0)},
            "table_visits": {str(k): v for k, v in self.tables.items() if k <= self.levels},
            "table_pages": self.distinct_tables,
            "issues": self.issues,
        }

    def render(self, gbpages: bool = True) -> str:
        names = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
        out = [
            self.meminfo(gbpages),
            "\n",
            f"direct map: {self.page_offset:#018x}-{self.direct_end:#018x} "
            f"(PAGE_OFFSET {'detected' if self.detected else 'given'}): leaves 4K "
            f"{self.direct.get(1, 0)}  2M {self.direct.get(2, 0)}  1G {self.direct.get(3, 0)}\n",
            f"also counted as the kernel does: {self.invalidated_4k} invalidated 4K entries, "
            f"{self.highmap_splits} kernel-image 2M splits\n",
            "leaves (whole tree): "
            + "  ".join(f"{lbl} {self.leaves.get(l, 0)}" for l, lbl in ((1, "4K"), (2, "2M"), (3, "1G")))
            + "\n",
            "table pages: "
            + "  ".join(f"{names[l]} {self.tables.get(l, 0)}" for l in range(self.levels, 0, -1))
            + f"  (distinct {self.distinct_tables}, {self.distinct_tables * 4} KiB)\n",
        ]
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
        raise BadInputError(
            "cannot detect PAGE_OFFSET: nothing is mapped in the kernel half; pass --page-offset"
        )
    return max(pick.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def census(
    state: PagingState,
    memory: PhysicalMemory,
    page_offset: int | None = None,
    *,
    kernel_map: tuple[int, int] | None = (KERNEL_MAP, KERNEL_MAP + KERNEL_IMAGE_SIZE),
    **scan_kw: Any,
) -> Census:
    """One scan: kernel-half records are kept (as runs, so a uniform 4K table is one row) until
    PAGE_OFFSET is known, then counted against the direct-map range. `kernel_map` is the
    kernel-image range whose splits the kernel counts too (None: do not count them)."""
    from x86pt.scan import EFF_P

    detected = page_offset is None
    sc = Scanner(state, memory, holes=True, **scan_kw)  # holes: invalidated PTEs count too
    weights: dict[int, int] = {}
    keep_va, keep_level, keep_count = [], [], []
    np_va, np_count = [], []
    hm_blocks: set[int] = set()
    for ch in sc.chunks():
        k = (ch.va >> U64(63)) == U64(1)
        if not k.any():
            continue
        sub = ch if k.all() else ch.take(k)
        present = (sub.eff & np.uint8(EFF_P)) != 0
        if kernel_map is not None:
            pt = (sub.level == 1) & (sub.va >= U64(kernel_map[0])) & (sub.va <= U64(kernel_map[1] - 1))
            if pt.any():
                lo = (sub.va[pt] >> U64(21)).tolist()
                hi = ((sub.va[pt] + sub.span[pt] - U64(1)) >> U64(21)).tolist()
                for a, b in zip(lo, hi):
                    hm_blocks.update(range(a, b + 1))
        gone = ~present & (sub.level == 1) & (sub.raw != 0)
        if gone.any():
            np_va.append(sub.va[gone])
            np_count.append(sub.count[gone])
        if not present.all():
            sub = sub.take(present)
        if detected:
            _offset_weights(sub.va, sub.pa, sub.span, weights)
        keep_va.append(sub.va)
        keep_level.append(sub.level)
        keep_count.append(sub.count)
    if page_offset is None:
        page_offset = _pick(weights)
    end = (page_offset + (1 << (52 if state.la57 else 46))) & ((1 << 64) - 1)

    def inside(va: np.ndarray) -> np.ndarray:
        m = va >= U64(page_offset)
        if end > page_offset:
            m &= va < U64(end)
        return m

    direct = {1: 0, 2: 0, 3: 0}
    if keep_va:
        va, level, count = (np.concatenate(x) for x in (keep_va, keep_level, keep_count))
        sel = inside(va)
        cnt = np.bincount(level[sel], weights=count[sel].astype(np.float64), minlength=4)
        for lvl in (1, 2, 3):
            direct[lvl] = int(cnt[lvl])
    invalid = 0
    if np_va:
        va, count = np.concatenate(np_va), np.concatenate(np_count)
        invalid = int(count[inside(va)].sum())
    st: ScanStats = sc.stats
    return Census(
        page_offset,
        detected,
        end,
        direct,
        dict(st.entries),
        dict(st.tables),
        st.distinct_tables(),
        st.issue_count,
        state.paging_levels,
        invalid,
        len(hm_blocks),
    )
