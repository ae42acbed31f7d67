"""Reading the CPA model out: the census of its direct-map leaves (what /proc/meminfo's DirectMap
lines should say, docs/cpa.md §11), the translation of one page, and the tables written as a
memory image with the control registers of a CPU running on them, for dumps, walkers and oracles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from x86pt.cpa.kernel import P, PMD_PFN_MASK, PSE, PTE_PFN_MASK, PUD_PFN_MASK, U64, flags_of, large_2_4k
from x86pt.cpa.space import KernelSpace
from x86pt.cpa.tables import Table, table_bytes

if TYPE_CHECKING:  # pragma: no cover
    from x86pt.memory.sparse import SparseMemory
    from x86pt.state import PagingState

MAXPHYADDR = 46


class Exporter(KernelSpace):
    """Census, translation and image export of the kernel space."""

    def translate(self, va: int) -> tuple[int, int, int] | None:
        """(pfn, flags in 4K format, level) of the 4K page at va, or None if no entry."""
        lvl, e = self.leaf(va)
        if not e:
            return None
        if lvl == 1:
            fr = e & PTE_PFN_MASK if e & P or not self.l1tf_invert else ~e & PTE_PFN_MASK
            return fr >> 12, e & ~PTE_PFN_MASK & U64, 1
        fl = flags_of(e, lvl)
        mask = (PMD_PFN_MASK if lvl == 2 else PUD_PFN_MASK) if e & PSE else PTE_PFN_MASK
        off = (va & ((1 << (21 if lvl == 2 else 30)) - 1)) >> 12
        raw = e if e & P or not self.l1tf_invert else ~e  # pmd_pfn/pud_pfn (L1TF)
        return ((raw & mask) >> 12) + off, large_2_4k(fl), lvl

    def census(self) -> dict[str, int]:
        """Leaves of the direct map by size (non-zero entries), plus the highmap PTE tables the
        kernel accounts as direct-map splits (docs/cpa.md §11)."""
        lo, hi = self.dm_bounds()
        n4 = n2 = n1 = 0
        for k, t in self.t1.items():
            if lo <= k << 21 < hi:
                n4 += 512 - t.count(0)
        for k, t in self.t2.items():
            if lo <= k << 30 < hi:
                n2 += sum(1 for e in t if e and (not e & P or e & PSE))
        for k, t in self.t3.items():
            if lo <= k << 39 < hi:
                n1 += sum(1 for e in t if e and (not e & P or e & PSE))
        h = self.highmap_pte_tables()
        return {"4k": n4 + 512 * h, "2m": n2 - h, "1g": n1}

    def highmap_pte_tables(self) -> int:
        """PTE tables of the highmap whose addresses the kernel accounts in direct_pages_count."""
        s = self.start_kernel_map & self.vmask
        e = s + self.layout.kernel_image_size
        return sum(
            1 for k in self.t1 if s <= k << 21 < e and self.virt_addr_counted((k << 21) | ~self.vmask & U64)
        )

    def table_pages(self) -> dict[int, Table]:
        """{physical address: table} of every table page (a shared page once)."""
        pages = {self.pgd_pa: self.pgd}
        for k, t in self.p4d.items():
            pages[self.pgd[k] & PTE_PFN_MASK] = t
        for k, t in self.t3.items():
            pages[self._top_entry(k) & PTE_PFN_MASK] = t
        for k, t in self.t2.items():
            pages[self.t3[k >> 9][k & 511] & PTE_PFN_MASK] = t
        for k, t in self.t1.items():
            pages[self.t2[k >> 9][k & 511] & PTE_PFN_MASK] = t
        return pages

    def export(self) -> "SparseMemory":
        """The tables as a SparseMemory image (+ control registers), for dumps and oracles."""
        from x86pt.memory.sparse import SparseMemory

        mem = SparseMemory(1 << MAXPHYADDR)
        for pa, t in self.table_pages().items():
            mem.pages[pa >> 12] = bytearray(table_bytes(t))
        mem.control_registers = {**self.export_registers(), "maxphyaddr": MAXPHYADDR}
        return mem

    def paging_state(self) -> "PagingState":
        from x86pt.state import PagingState, profile_named

        r = self.export_registers()
        return PagingState(
            cr3=r["cr3"],
            cr0=r["cr0"],
            cr4=r["cr4"],
            efer=r["efer"],
            profile=profile_named("intel"),
            maxphyaddr=MAXPHYADDR,
        )

    def export_registers(self) -> dict[str, int]:
        from x86pt.state import (
            CR0_PE,
            CR0_PG,
            CR0_WP,
            CR4_LA57,
            CR4_PAE,
            CR4_PGE,
            EFER_LMA,
            EFER_LME,
            EFER_NXE,
        )

        return {
            "cr0": CR0_PE | CR0_PG | CR0_WP,
            "cr3": self.pgd_pa,
            "cr4": CR4_PAE | CR4_PGE | (CR4_LA57 if self.levels == 5 else 0),
            "efer": EFER_LME | EFER_LMA | EFER_NXE,
        }
