"""The kernel's view of its address space, under CPA, the boot builder, vmalloc and the merge
policies alike: the layout and the kernel version, the RAM the direct map covers (pfn_mapped[]),
the kernel image's symbols as virtual addresses, direct_pages_count[] accounting
(docs/cpa.md §5.1), and the one place every CPA write of an entry goes through (`write`), with
the hooks the validator, the merge policies and the TLB model listen on.
"""

from __future__ import annotations

import bisect
from typing import Callable, Protocol

from x86pt.cpa.counters import Counters
from x86pt.cpa.kernel import GLOBAL, PAGE_KERNEL, KernelVersion, kernel_version
from x86pt.cpa.layout import Layout
from x86pt.cpa.tables import PageTables, Table, TablePool

PMD_SIZE = 1 << 21
PUD_SIZE = 1 << 30


class SameProtCounts(Protocol):
    """The RFC's nr_same_prot bookkeeping as the space calls it (merge.NrSameProt)."""

    def adjust(self, tl: int, key: int, t: Table, i: int, old: int, new: int) -> None: ...

    def new_table(self, tl: int, key: int, children: Table, ref: int) -> None: ...

    def forget(self, tl: int, key: int) -> None: ...

    def recount(self, tl: int, key: int) -> tuple[int, int] | None: ...


class KernelSpace(PageTables):
    """One kernel's page tables and what the kernel knows about them."""

    def __init__(self, layout: Layout, version: KernelVersion | str = "6.15") -> None:
        layout.check()
        super().__init__(TablePool(layout.table_pool))
        self.layout = layout
        self.version = kernel_version(version) if isinstance(version, str) else version
        self.counters = Counters()
        # L1TF PTE inversion (arch/x86/include/asm/pgtable-invert.h, unconditional since 4.19):
        # non-present, non-empty entries hold the inverted frame (flags as they are). On for
        # images imported from real kernels (importer.py), off for generated models. Every
        # writer of the model (CPA, splits, in-place rewrites, the `oob` writer) keeps one
        # encoding per model, so an entry's frame always reads back as pte_pfn() would.
        self.l1tf_invert = False
        self.running = False  # system_state == SYSTEM_RUNNING
        self.kernel_set_to_readonly = False
        self.touched: set[int] | None = None  # (key << 2 | table level) written by the current op
        self.nsp: SameProtCounts | None = None  # nr-same-prot bookkeeping (merge.NrSameProt)
        self.free_queue: list[int] = []
        # Called as flush_hook(kind, start, end) at each TLB flush the kernel issues, at the point
        # it issues it (x86pt.tlb.TlbReplay.flush): "all" (flush_tlb_all), "range" (cpa_flush of
        # [start, end)), "local" (this CPU's __flush_tlb_all), "page" (one INVLPG of start).
        self.flush_hook: Callable[..., object] | None = None
        lo = layout
        self.page_offset = lo.page_offset
        self.start_kernel_map = lo.start_kernel_map
        k = lo.kernel
        self.sym = k
        self.text_va = lo.start_kernel_map + k.text - lo.phys_base
        self.etext_va = lo.start_kernel_map + k.etext - lo.phys_base
        self.hpage_align_va = lo.start_kernel_map + k.end_rodata_hpage_align - lo.phys_base
        self.brk_end_va = lo.start_kernel_map + k.brk_end - lo.phys_base
        self.rodata_spfn = k.start_rodata >> 12
        self.rodata_epfn = (k.end_rodata >> 12) - 1
        self.highmap_spfn = k.text >> 12
        self.highmap_epfn = (-(-k.brk_end // PMD_SIZE) * PMD_SIZE - 1) >> 12
        self.ram: list[tuple[int, int]] = []  # pfn ranges mapped (pfn_mapped[])
        self._ram_starts: list[int] = []
        self.max_pfn_mapped = 0
        self.default_prot = PAGE_KERNEL & ~(GLOBAL if lo.pti else 0)

    # -- RAM and address ranges ------------------------------------------------------------------
    def _set_ram(self, ranges: list[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for s, e in sorted(ranges):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
            else:
                merged.append((s, e))
        self.ram = merged
        self._ram_starts = [s for s, _ in merged]
        self.max_pfn_mapped = merged[-1][1] if merged else 0

    def pfn_mapped(self, pfn: int) -> bool:
        """pfn_range_is_mapped(pfn, pfn + 1)."""
        i = bisect.bisect_right(self._ram_starts, pfn) - 1
        return i >= 0 and pfn < self.ram[i][1]

    def in_direct_map(self, va: int) -> bool:
        return self.page_offset <= va < self.page_offset + (self.max_pfn_mapped << 12)

    def in_highmap(self, va: int) -> bool:
        return self.start_kernel_map <= va < self.start_kernel_map + self.layout.kernel_image_size

    def hva(self, pa: int) -> int:
        """The highmap (kernel image) address of physical address pa (__START_KERNEL_map)."""
        return self.start_kernel_map + pa - self.layout.phys_base

    def dm_bounds(self) -> tuple[int, int]:
        """The direct map's key-space range [PAGE_OFFSET, PAGE_OFFSET + 64 TiB)."""
        lo = self.page_offset & self.vmask
        return lo, lo + (1 << 46)

    def virt_addr_counted(self, address: int) -> bool:
        """virt_addr_valid(address) && pfn_range_is_mapped(__pa(address)): the condition under
        which a split/collapse is accounted in direct_pages_count (true for highmap too)."""
        if address >= self.start_kernel_map:
            x = address - self.start_kernel_map
            if x >= self.layout.kernel_image_size:
                return False
            pfn = (x + self.layout.phys_base) >> 12
        elif address >= self.page_offset:
            pfn = (address - self.page_offset) >> 12
            if pfn >= self.max_pfn_mapped:
                return False
        else:
            return False
        return self.pfn_mapped(pfn)

    # -- direct_pages_count (docs/cpa.md §5.1) ---------------------------------------------------
    def split_page_count(self, level: int) -> None:
        c = self.counters
        if level == 2:
            if c.dpc2m == 0:  # the kernel does nothing at all then
                return
            c.dpc2m -= 1
            c.dpc4k += 512
            if self.running:
                c.split_2m += 1
        else:
            if c.dpc1g == 0:
                return
            c.dpc1g -= 1
            c.dpc2m += 512
            if self.running:
                c.split_1g += 1

    def collapse_page_count(self, level: int, rfc: bool = False) -> None:
        """collapse_page_count (6.15, no zero guard) / merge_page_count (RFC)."""
        c = self.counters
        if level == 2:
            c.dpc2m += 1
            c.dpc4k -= 512
            if self.running:
                if rfc:
                    c.merge_2m += 1
                else:
                    c.collapse_2m += 1
        else:
            c.dpc1g += 1
            c.dpc2m -= 512
            if self.running:
                if rfc:
                    c.merge_1g += 1
                else:
                    c.collapse_1g += 1

    def table_created(self, v: int) -> None:
        """A PMD/PTE table allocated outside CPA: vmalloc's, once the kernel runs."""
        lo, hi = self.dm_bounds()
        if self.running and not lo <= v < hi:
            self.counters.vmalloc_tables += 1

    # -- writes and their listeners ----------------------------------------------------------------
    def write(self, tl: int, key: int, t: Table, i: int, new: int) -> None:
        """Every CPA write of an entry goes through here (the RFC's set_pte_adjust_nr_same_prot
        hook point); 4K updates inline the same steps for speed."""
        old = t[i]
        t[i] = new
        self.counters.entries_written += 1
        if self.touched is not None:
            self.touched.add((((key << 9) | i) << 2) | tl)
        if self.nsp is not None:
            self.nsp.adjust(tl, key, t, i, old, new)

    def on_new_table(self, tl: int, key: int, children: Table, ref: int) -> None:
        if self.nsp is not None:
            self.nsp.new_table(tl, key, children, ref)

    def _touch_va(self, v: int, tl: int) -> None:
        """Record a write outside CPA (vmap, hotplug, oob) of the level-tl entry mapping v."""
        if self.touched is not None:
            self.touched.add(((v >> (3 + 9 * tl)) << 2) | tl)
