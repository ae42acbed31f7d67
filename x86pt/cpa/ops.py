"""The CPA model: the kernel's page tables (the authoritative structure: per-table Python int
lists keyed by the VA they cover), built as the kernel builds them at boot, and the operations of
docs/cpa.md §3 run through the algorithm of §4 with the alias processing of §4.7, the static
protections of §4.6 and the flush rule of §4.8. Merge policies live in merge.py.

Tables: `t3[va >> 39]` is the PUD table under one PGD slot, `t2[va >> 30]` a PMD table,
`t1[va >> 21]` a PTE table (va truncated to 48 bits). A parent entry holds the child's physical
address, so `export()` writes a SparseMemory image any walker, dumper or oracle can read.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

from x86pt.cpa import split as _split
from x86pt.cpa.counters import Counters
from x86pt.cpa.kernel import (CACHE_MASK, CPA_COLLAPSE, CPA_NO_CHECK_ALIAS, DIRTY, EFAULT,
                              GLOBAL, KERNEL_4K, KERNPG_TABLE, NX, P, PAGE_KERNEL,
                              PAGE_KERNEL_LARGE_EXEC, PMD_PFN_MASK, PSE,
                              PTE_PFN_MASK, PUD_PFN_MASK, RW, TLB_SINGLE_PAGE_FLUSH_CEILING, U64,
                              KernelVersion, flags_of, kernel_version)
from x86pt.cpa.layout import (MAX_MAP_LEAVES, MAX_PHYSMEM_BITS, Layout, check_direct_map_size,
                              split_mem_range)
from x86pt.errors import BadInputError, BudgetError

M48 = (1 << 48) - 1
M57 = (1 << 57) - 1
PMD_SIZE = 1 << 21
PUD_SIZE = 1 << 30


class TablePool:
    """Physical pages for page tables: freed pages are reused first (LIFO, like a per-cpu list)."""

    def __init__(self, ranges: tuple[tuple[int, int], ...], taken: set[int] | None = None) -> None:
        self.ranges = list(ranges)
        self.free: list[int] = []
        self._r = 0
        self._next = self.ranges[0][0] if self.ranges else 0
        self.taken = taken or set()
        self.in_use = 0
        self.high_water = 0
        self.gen = 0            # bumped by every alloc/release: a table may have moved

    def alloc(self) -> int:
        if self.free:
            pa = self.free.pop()
        else:
            while True:
                if self._r >= len(self.ranges):
                    raise BadInputError("page-table pool exhausted (give the layout a larger table_pool)")
                if self._next + 4096 > self.ranges[self._r][1]:
                    self._r += 1
                    if self._r < len(self.ranges):
                        self._next = self.ranges[self._r][0]
                    continue
                pa = self._next
                self._next += 4096
                if pa not in self.taken:
                    break
        self.in_use += 1
        self.gen += 1
        if self.in_use > self.high_water:
            self.high_water = self.in_use
        return pa

    def release(self, pa: int) -> None:
        self.in_use -= 1
        self.gen += 1
        self.free.append(pa)


@dataclass
class Call:
    """struct cpa_data, the parts that vary per call."""

    __slots__ = ("set", "clr", "force_split", "flags", "primary", "flushtlb", "force_flush_all",
                 "pfn", "force_static_prot")
    set: int
    clr: int
    force_split: bool
    flags: int
    primary: bool
    flushtlb: bool
    force_flush_all: bool
    pfn: int
    force_static_prot: bool


class CpaModel:
    """One kernel's page tables and its CPA. `policy` is one of merge.POLICIES."""

    def __init__(self, layout: Layout, version: KernelVersion | str = "6.15", policy: str = "none",
                 *, boot: bool = True) -> None:
        from x86pt.cpa.merge import make_policy
        layout.check()
        self.layout = layout
        self.version = kernel_version(version) if isinstance(version, str) else version
        self.counters = Counters()
        self.pool = TablePool(layout.table_pool)
        self.pgd: list[int] = [0] * 512
        self.pgd_pa = self.pool.alloc()
        self.t3: dict[int, list[int]] = {}
        self.t2: dict[int, list[int]] = {}
        self.t1: dict[int, list[int]] = {}
        # Table keys are VAs masked to the paging width: 48 bits (4-level) or 57 (5-level, where
        # the PML5 index sits above the PGD/P4D index); `p4d` holds a 5-level model's P4D tables.
        self.vmask = M48
        self.levels = 4
        self.p4d: dict[int, list[int]] = {}
        self.shared: frozenset[int] = frozenset()   # table pages with several parents (ESPfix)
        # L1TF PTE inversion (arch/x86/include/asm/pgtable-invert.h, unconditional since 4.19):
        # non-present, non-empty entries hold the inverted frame (flags as they are). On for
        # images imported from real kernels (importer.py), off for generated models. Every
        # writer of the model (CPA, splits, in-place rewrites, the `oob` writer) keeps one
        # encoding per model, so an entry's frame always reads back as pte_pfn() would.
        self.l1tf_invert = False
        self.running = False                 # system_state == SYSTEM_RUNNING
        self.kernel_set_to_readonly = False
        self.touched: set[int] | None = None  # (key << 2 | table level) written by the current op
        self.nsp = None                      # nr-same-prot bookkeeping (merge.NrSameProt)
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
        self.ram: list[tuple[int, int]] = []       # pfn ranges mapped (pfn_mapped[])
        self._ram_starts: list[int] = []
        self.max_pfn_mapped = 0
        self.default_prot = PAGE_KERNEL & ~(GLOBAL if lo.pti else 0)
        self.policy = make_policy(policy, self)
        if boot:
            self.boot()

    # -- small helpers -------------------------------------------------------------------------
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

    def split_page_count(self, level: int) -> None:
        c = self.counters
        if level == 2:
            if c.dpc2m == 0:                  # the kernel does nothing at all then
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

    def write(self, tl: int, key: int, t: list, i: int, new: int) -> None:
        """Every CPA write of an entry goes through here (the RFC's set_pte_adjust_nr_same_prot
        hook point); 4K updates inline the same steps for speed."""
        old = t[i]
        t[i] = new
        self.counters.entries_written += 1
        if self.touched is not None:
            self.touched.add((((key << 9) | i) << 2) | tl)
        if self.nsp is not None:
            self.nsp.adjust(tl, key, t, i, old, new)

    def on_new_table(self, tl: int, key: int, children: list, ref: int) -> None:
        if self.nsp is not None:
            self.nsp.new_table(tl, key, children, ref)

    # -- lookup (lookup_address) -----------------------------------------------------------------
    def lookup(self, va: int) -> tuple[int, list | None, int]:
        """(level, table, index) of the entry mapping `va`; table None when a level above is none.
        A PUD/PMD entry is returned when it is a leaf or not present (lookup_address)."""
        v = va & self.vmask
        t = self.t3.get(v >> 39)
        if t is None:
            return 4, None, 0
        i = (v >> 30) & 511
        e = t[i]
        if not e or not e & P or e & PSE:
            return 3, t, i
        t = self.t2[v >> 30]
        i = (v >> 21) & 511
        e = t[i]
        if not e or not e & P or e & PSE:
            return 2, t, i
        return 1, self.t1[v >> 21], (v >> 12) & 511

    def leaf(self, va: int) -> tuple[int, int]:
        """(level, entry) mapping va; entry 0 when unmapped."""
        lvl, t, i = self.lookup(va)
        return (lvl, 0) if t is None else (lvl, t[i])

    def translate(self, va: int) -> tuple[int, int, int] | None:
        """(pfn, flags in 4K format, level) of the 4K page at va, or None if no entry."""
        from x86pt.cpa.kernel import large_2_4k
        lvl, e = self.leaf(va)
        if not e:
            return None
        if lvl == 1:
            fr = e & PTE_PFN_MASK if e & P or not self.l1tf_invert else ~e & PTE_PFN_MASK
            return fr >> 12, e & ~PTE_PFN_MASK & U64, 1
        fl = flags_of(e, lvl)
        mask = (PMD_PFN_MASK if lvl == 2 else PUD_PFN_MASK) if e & PSE else PTE_PFN_MASK
        off = (va & ((1 << (21 if lvl == 2 else 30)) - 1)) >> 12
        raw = e if e & P or not self.l1tf_invert else ~e     # pmd_pfn/pud_pfn (L1TF)
        return ((raw & mask) >> 12) + off, large_2_4k(fl), lvl

    # -- building (boot, vmalloc, hotplug: not CPA) ----------------------------------------------
    def _table(self, v: int, level: int, create: bool = True) -> tuple[list | None, int]:
        """(table of `level` covering v, index of v in it), creating tables above as the boot
        mapping code and vmap do (parent = _KERNPG_TABLE)."""
        t3 = self.t3.get(v >> 39)
        if t3 is None:
            if not create:
                return None, 0
            t3 = self.t3[v >> 39] = [0] * 512
            self._set_top(v, self.pool.alloc() | KERNPG_TABLE)
        if level == 3:
            return t3, (v >> 30) & 511
        i3 = (v >> 30) & 511
        t2 = self.t2.get(v >> 30)
        if t2 is None:
            if not create or (t3[i3] & P and t3[i3] & PSE):
                return None, 0
            t2 = self.t2[v >> 30] = [0] * 512
            t3[i3] = self.pool.alloc() | KERNPG_TABLE
            self._boot_table(v)
        if level == 2:
            return t2, (v >> 21) & 511
        i2 = (v >> 21) & 511
        t1 = self.t1.get(v >> 21)
        if t1 is None:
            if not create or (t2[i2] & P and t2[i2] & PSE):
                return None, 0
            t1 = self.t1[v >> 21] = [0] * 512
            t2[i2] = self.pool.alloc() | KERNPG_TABLE
            self._boot_table(v)
        return t1, (v >> 12) & 511

    def set_levels(self, levels: int) -> None:
        """4- or 5-level paging (LA57): the width of the key space and whether a P4D level sits
        between the root (PML5) and the PUD tables."""
        if levels not in (4, 5):
            raise BadInputError(f"paging levels must be 4 or 5, not {levels}")
        self.levels = levels
        self.vmask = M57 if levels == 5 else M48

    def _set_top(self, v: int, entry: int) -> None:
        """Point the PGD (4-level) or P4D (5-level) slot covering v at a new PUD table."""
        gi = (v >> 39) & 511
        if self.levels == 4:
            self.pgd[gi] = entry
            return
        i5 = (v >> 48) & 511
        p4d = self.p4d.get(i5)
        if p4d is None:
            p4d = self.p4d[i5] = [0] * 512
            self.pgd[i5] = self.pool.alloc() | KERNPG_TABLE
        p4d[gi] = entry

    def _top_entry(self, k3: int) -> int:
        """The PGD/P4D entry pointing at PUD table t3[k3]."""
        if self.levels == 4:
            return self.pgd[k3 & 511]
        return self.p4d[(k3 >> 9) & 511][k3 & 511]

    def _boot_table(self, v: int) -> None:
        lo, hi = self.dm_bounds()
        if self.running and not lo <= v < hi:
            self.counters.vmalloc_tables += 1

    def map_direct(self, start: int, end: int, update_count: bool = True) -> None:
        """init_memory_mapping / arch_add_memory: map RAM [start, end) at PAGE_OFFSET with the
        largest pages alignment allows; update_page_count for each mapping."""
        c = self.counters
        big = self.default_prot | PSE
        for s, e, size in split_mem_range(start, end, self.layout.gbpages):
            for pa in range(s, e, size):
                v = (self.page_offset + pa) & self.vmask
                if size == PUD_SIZE:
                    t, i = self._table(v, 3)
                    t[i] = pa | big
                    c.dpc1g += update_count
                elif size == PMD_SIZE:
                    t, i = self._table(v, 2)
                    if t is None:
                        # a 1G leaf already maps it (hot-remove left a partly covered leaf,
                        # a merge rebuilt one): phys_pud_init keeps it, uncounted after boot
                        continue
                    t[i] = pa | big
                    c.dpc2m += update_count
                else:
                    t, i = self._table(v, 1)
                    if t is None:                 # likewise phys_pmd_init and a 2M leaf
                        continue
                    t[i] = pa | self.default_prot
                    c.dpc4k += update_count

    def boot(self) -> None:
        """Build the address space as the kernel does: the ISA range and every RAM range of the
        e820 list mapped at PAGE_OFFSET; the highmap of the kernel image with 2M pages
        (head_64.S, trimmed by cleanup_highmap); then free_initmem and mark_rodata_ro through CPA
        before SYSTEM_RUNNING (DirectMap counters change, vmstat does not)."""
        lo = self.layout
        ranges = [(0, 0x100000)] + [(max(s, 0x100000), e) for s, e in lo.ram if e > 0x100000]
        self._set_ram([(s >> 12, e >> 12) for s, e in ranges])
        for s, e in ranges:
            self.map_direct(s, e)
        k = lo.kernel
        hi_prot = PAGE_KERNEL_LARGE_EXEC & ~(GLOBAL if lo.pti else 0)
        end = -(-k.brk_end // PMD_SIZE) * PMD_SIZE
        for pa in range(k.text & ~(PMD_SIZE - 1), end, PMD_SIZE):
            t, i = self._table((self.start_kernel_map + pa - lo.phys_base) & self.vmask, 2)
            t[i] = pa | hi_prot
        # module area skeleton: one PMD table, as the kernel's preallocated top levels
        self._table(lo.modules_vaddr & self.vmask, 2)
        self.boot_sequence()
        self.running = True

    def hva(self, pa: int) -> int:
        return self.start_kernel_map + pa - self.layout.phys_base

    def boot_sequence(self) -> None:
        k = self.layout.kernel
        # free_initmem: free_kernel_image_pages("unused kernel image (initmem)")
        self.free_kernel_image_pages(self.hva(k.init_begin), self.hva(k.init_end))
        # mark_rodata_ro (arch/x86/mm/init_64.c)
        start, end = self.hva(k.text), self.hva(k.end_rodata_hpage_align)
        self.set_memory_ro(start, (end - start) >> 12)
        self.kernel_set_to_readonly = True
        all_end = self.hva(-(-k.brk_end // PMD_SIZE) * PMD_SIZE)
        text_end = self.hva(k.etext)
        self.set_memory_nx(text_end, (all_end - text_end) >> 12)
        self.free_kernel_image_pages(text_end, self.hva(k.start_rodata))
        self.free_kernel_image_pages(self.hva(k.end_rodata), self.hva(k.sdata))

    def free_kernel_image_pages(self, begin: int, end: int) -> None:
        n = (end - begin) >> 12
        if n <= 0:
            return
        self.set_memory_nx(begin, n)         # free_init_pages without debug_pagealloc
        self.set_memory_rw(begin, n)
        if self.layout.pti:
            self.set_memory_np_noalias(begin, n)

    # -- the CPA algorithm (docs/cpa.md §4) -------------------------------------------------------------
    def static_protections(self, prot: int, start: int, pfn: int, npg: int, lpsize: int) -> int:
        """static_protections (docs/cpa.md §4.6); 64-bit, no PCI BIOS rule."""
        if not prot & P:
            return prot
        end = start + npg * 4096 - 1
        forbidden = 0
        if start <= self.etext_va - 1 and self.text_va <= end:          # protect_kernel_text
            forbidden = NX
        if self.kernel_set_to_readonly and (lpsize != npg * 4096 or start & (lpsize - 1)):
            if start <= self.hpage_align_va - 1 and self.text_va <= end:  # protect_kernel_text_ro
                if self.lookup(start)[0] != 1:
                    forbidden |= RW
        if self.kernel_set_to_readonly and pfn <= self.rodata_epfn and self.rodata_spfn <= pfn + npg - 1:
            forbidden |= RW                                               # protect_rodata
        return prot & ~forbidden

    def verify_rwx(self, old: int, new: int) -> None:
        """verify_rwx: warn-only W^X check (upper levels are _KERNPG_TABLE: RW, executable)."""
        if self.version.verify_rwx and (old ^ new) & (RW | NX) and (new & (RW | NX)) == RW:
            self.counters.wx_warnings += 1

    def change_page_attr_set_clr(self, addr: int, numpages: int, set_: int, clr: int,
                                 force_split: bool = False, flags: int = 0) -> int:
        """change_page_attr_set_clr (docs/cpa.md §4.1). Returns 0 or a negative errno."""
        c = self.counters
        c.cpa_calls += 1
        if not set_ and not clr and not force_split:
            c.cpa_noop_calls += 1
            return 0
        if addr & 0xFFF:
            c.unaligned_warnings += 1
            addr &= ~0xFFF
        if numpages <= 0:
            c.cpa_noop_calls += 1
            return 0
        call = Call(set_, clr, force_split, flags, True, False, False, 0, False)
        err = self.set_clr(call, addr, numpages)
        if not call.flushtlb:
            if err:
                c.errors += 1
            return err
        cache = bool(set_ & CACHE_MASK)
        if err:
            c.errors += 1
            c.flush_all += 1                  # cpa_flush_all
            c.wbinvd += cache
            if self.flush_hook is not None:
                self.flush_hook("all")
            return err
        if call.force_flush_all or numpages > TLB_SINGLE_PAGE_FLUSH_CEILING:
            c.flush_all += 1
            if self.flush_hook is not None:
                self.flush_hook("all")
        else:
            c.flush_ranges += 1
            c.invlpg_pages += numpages
            if self.flush_hook is not None:
                self.flush_hook("range", addr, addr + numpages * 4096)
        if cache:
            c.clflush_pages += numpages
        if flags & CPA_COLLAPSE:
            self.policy.collapse(addr, numpages)
        return 0

    def set_clr(self, call: Call, addr: int, numpages: int) -> int:
        """__change_page_attr_set_clr (docs/cpa.md §4.2): step through the range, the alias after each
        primary step with the same chunk size."""
        if not call.set and not call.clr and not call.force_split:
            return 0
        if call.force_split:
            self.policy.on_force_4k(addr, numpages)
        cur, rem = addr, numpages
        alias = call.primary and not call.flags & CPA_NO_CHECK_ALIAS
        while rem > 0:
            n = self.change_page_attr(call, cur, rem)
            if n < 0:
                return n
            if alias:
                r = self.process_alias(call, cur, n)
                if r:
                    return r
            cur += n << 12
            rem -= n
        return 0

    def change_page_attr(self, call: Call, address: int, numpages: int) -> int:
        """__change_page_attr (docs/cpa.md §4.3). Returns pages consumed or a negative errno."""
        while True:
            v = address & self.vmask
            t = self.t3.get(v >> 39)
            if t is None:
                return self.process_fault(call, address)
            i = (v >> 30) & 511
            e = t[i]
            level = 3
            if e and e & P and not e & PSE:
                t = self.t2[v >> 30]
                i = (v >> 21) & 511
                e = t[i]
                level = 2
                if e and e & P and not e & PSE:
                    key = v >> 21
                    t = self.t1[key]
                    i = (v >> 12) & 511
                    old = t[i]
                    if not old:
                        return self.process_fault(call, address)
                    # 4K PTE: new = (old & ~clr) | set, static protections, protnone, write
                    self.counters.setchecked_4k += 1
                    pfnbits = old & PTE_PFN_MASK
                    if not old & P and self.l1tf_invert:
                        # L1TF: a non-present PTE holds the inverted frame (pte_pfn undoes
                        # protnone_mask, pgtable-invert.h)
                        pfnbits ^= PTE_PFN_MASK
                    new_prot = ((old & ~call.clr) | call.set) & ~PTE_PFN_MASK & U64
                    pfn = pfnbits >> 12
                    if new_prot & P:
                        # only text NX and rodata RW can bind a 4K-mapped page (text_ro needs a
                        # large mapping at `address`): skip the call when neither range is hit
                        if (self.text_va <= address < self.etext_va
                                or self.rodata_spfn <= pfn <= self.rodata_epfn):
                            new_prot = self.static_protections(new_prot, address, pfn, 1, 0)
                    else:
                        new_prot &= ~GLOBAL
                    if (old ^ new_prot) & (RW | NX) and (new_prot & (RW | NX)) == RW \
                            and self.version.verify_rwx:
                        self.counters.wx_warnings += 1
                    # pfn_pte: __pte_needs_invert(prot) stores a non-present frame inverted
                    if new_prot and not new_prot & P and self.l1tf_invert:
                        pfnbits ^= PTE_PFN_MASK
                    new = pfnbits | new_prot
                    call.pfn = pfn
                    if new != old:
                        t[i] = new
                        call.flushtlb = True
                        self.counters.entries_written += 1
                        if self.touched is not None:
                            self.touched.add(((v >> 12) << 2) | 1)
                        if self.nsp is not None:
                            self.nsp.adjust(1, key, t, i, old, new)
                    return 1
            if not e:
                return self.process_fault(call, address)
            n = _split.should_split(self, call, level, t, i, address, numpages)
            if n > 0:
                return n
            _split.split_large_page(self, call, level, t, i, address)

    def process_fault(self, call: Call, address: int) -> int:
        """__cpa_process_fault for the kernel page tables (no cpa->pgd)."""
        if not call.primary:
            return 1
        if self.in_direct_map(address):       # holes in the direct map are expected
            call.pfn = (address - self.page_offset) >> 12
            return 1
        if self.highmap_spfn <= call.pfn <= self.highmap_epfn:
            return EFAULT
        self.counters.zero_pte_warnings += 1  # WARN "CPA: called for zero pte"
        return EFAULT

    def process_alias(self, call: Call, vaddr: int, n: int) -> int:
        """cpa_process_alias (docs/cpa.md §4.7)."""
        pfn = call.pfn
        ram = self.ram
        j = bisect.bisect_right(self._ram_starts, pfn) - 1
        if j < 0 or pfn >= ram[j][1]:
            return 0
        s, cl = call.set, call.clr
        if self.version.nx_alias_strip:
            s &= ~NX
            cl &= ~NX
        po = self.page_offset
        if not po <= vaddr < po + (self.max_pfn_mapped << 12):
            alias = Call(s, cl, call.force_split, call.flags & ~6, False, False, False, 0, False)
            call.force_flush_all = True
            r = self.set_clr(alias, po + (pfn << 12), n)
            if r:
                return r
        # within(vaddr, _text, _brk_end) excludes _brk_end itself (set_memory.c, v6.1..v6.18)
        if not (self.text_va <= vaddr < self.brk_end_va) and self.highmap_spfn <= pfn <= self.highmap_epfn:
            alias = Call(s, cl, call.force_split, call.flags & ~6, False, False, False, 0, False)
            call.force_flush_all = True
            self.set_clr(alias, self.hva(pfn << 12), n)   # errors ignored
        return 0

    # -- the API (docs/cpa.md §3) ---------------------------------------------------------------------
    def _nx_only_flags(self, set_: int, clr: int) -> int:
        # before 6.2 an NX-only change skipped alias processing altogether
        if not self.version.nx_alias_strip and (set_ | clr) == NX:
            return CPA_NO_CHECK_ALIAS
        return 0

    def set_memory_ro(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, 0, self.version.set_memory_ro_clr)

    def set_memory_rw(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, RW, 0)

    def set_memory_x(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, 0, NX, flags=self._nx_only_flags(0, NX))

    def set_memory_nx(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, NX, 0, flags=self._nx_only_flags(NX, 0))

    def set_memory_rox(self, addr: int, n: int) -> int:
        v = self.version
        if not v.native_rox:                  # generic helper before 6.2: ro, then x
            r = self.set_memory_ro(addr, n)
            return r or self.set_memory_x(addr, n)
        clr = RW | NX | (DIRTY if v.ro_clears_dirty else 0)
        return self.change_page_attr_set_clr(addr, n, 0, clr,
                                             flags=CPA_COLLAPSE if v.collapse else 0)

    def set_memory_np(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, 0, P)

    def set_memory_np_noalias(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, 0, P, flags=CPA_NO_CHECK_ALIAS)

    def set_memory_p(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, P, 0)

    def set_memory_4k(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, KERNEL_4K if self.version.kernel_4k_bit else 0,
                                             0, force_split=True)

    def set_memory_global(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, GLOBAL, 0)

    def set_memory_nonglobal(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, 0, GLOBAL)

    def _set_pages(self, addr: int, n: int, set_: int, clr: int) -> int:
        """__set_pages_np / __set_pages_p: __change_page_attr_set_clr directly (no canon, no
        flush); 6.1 runs it as primary=0, later kernels as primary with CPA_NO_CHECK_ALIAS."""
        self.counters.cpa_calls += 1
        prim = self.version.set_pages_primary
        call = Call(set_, clr, False, CPA_NO_CHECK_ALIAS, prim, False, False, 0, False)
        r = self.set_clr(call, addr & ~0xFFF, n)
        if r:
            self.counters.errors += 1
        return r

    def set_direct_map_invalid_noflush(self, addr: int, n: int = 1) -> int:
        return self._set_pages(addr, n, 0, self.version.set_pages_np_clr)

    def set_direct_map_default_noflush(self, addr: int, n: int = 1) -> int:
        return self._set_pages(addr, n, P | RW, 0)

    def kernel_map_pages(self, addr: int, n: int, enable: int) -> int:
        """__kernel_map_pages (DEBUG_PAGEALLOC): __set_pages_p/np, then a local flush only."""
        r = (self._set_pages(addr, n, P | RW, 0) if enable else
             self._set_pages(addr, n, 0, self.version.set_pages_np_clr))
        self.counters.local_flushes += 1
        if self.flush_hook is not None:
            self.flush_hook("local")
        return r

    def cpa(self, addr: int, n: int, set_: int, clr: int, flags: int = 0, primary: bool = True,
            force_split: bool = False) -> int:
        """A raw change_page_attr call as a kernel trace records it: primary = the whole
        change_page_attr_set_clr (alias processing, flush, collapse); alias = one bare
        __change_page_attr_set_clr(primary=0) (no alias, no flush, holes ignored)."""
        if flags & 6:
            raise BadInputError("CPA_ARRAY / CPA_PAGES_ARRAY calls are not modelled (one address per call)")
        if primary:
            return self.change_page_attr_set_clr(addr, n, set_, clr, force_split, flags)
        self.counters.cpa_calls += 1
        call = Call(set_, clr, force_split, flags, False, False, False, 0, False)
        return self.set_clr(call, addr & ~0xFFF, n)

    # -- out-of-band writers ---------------------------------------------------------------------
    def oob(self, addr: int, set_: int, clr: int) -> bool:
        """A set_pte on the 4K PTE mapping addr behind CPA's back, as kfence_protect_page does:
        no CPA, no counters (nr-same-prot is not told), a local INVLPG. False (kfence's WARN)
        when addr is not mapped by a PTE. The masks change flags, never the frame: in a model
        with L1TF inversion the frame is stored inverted while the entry is non-present (as
        kfence does since "x86/kfence: avoid writing L1TF-vulnerable PTEs"); a raw P toggle
        there would leave a frame pte_pfn() decodes as a different page."""
        lvl, t, i = self.lookup(addr)
        if t is None or lvl != 1 or not t[i]:
            self.counters.oob_rejected += 1
            return False
        old = t[i]
        frame = old & PTE_PFN_MASK
        if self.l1tf_invert and not old & P:
            frame ^= PTE_PFN_MASK                      # pte_pfn undoes protnone_mask
        flags = ((old & ~clr) | set_) & ~PTE_PFN_MASK & U64
        if self.l1tf_invert and flags and not flags & P:
            frame ^= PTE_PFN_MASK                      # pfn_pte: __pte_needs_invert
        t[i] = frame | flags
        self.counters.oob_writes += 1
        self.counters.local_flushes += 1
        if self.flush_hook is not None:       # kfence: flush_tlb_one_kernel on this CPU only
            self.flush_hook("page", addr & ~0xFFF)
        if self.touched is not None:
            self.touched.add((((addr & self.vmask) >> 12) << 2) | 1)
        return True

    # -- vmalloc and hotplug (page-table changes outside CPA) ------------------------------------
    def vmap(self, addr: int, pa: int, n: int, huge: bool = False, prot: int | None = None) -> None:
        """Map n pages at addr to consecutive frames from pa (vmap_range); huge = PMD leaves for
        2M-aligned parts (huge vmalloc), 4K elsewhere."""
        if pa & 0xFFF or n < 0 or pa + (n << 12) > 1 << MAX_PHYSMEM_BITS:
            raise BadInputError(f"vmap {addr:#x} {pa:#x} {n}: frames must be page aligned and end "
                                f"below 2^{MAX_PHYSMEM_BITS} (the model's MAXPHYADDR)")
        leaves = n >> 9 if huge and not (addr - pa) & (PMD_SIZE - 1) else n
        if leaves > MAX_MAP_LEAVES:
            raise BudgetError(f"vmap {addr:#x} {pa:#x} {n}: about {leaves} leaves, more than the "
                              f"model's limit of {MAX_MAP_LEAVES} per operation")
        prot = self.default_prot if prot is None else prot
        v, p, end = addr & self.vmask, pa, (addr & self.vmask) + (n << 12)
        while v < end:
            if huge and not v & (PMD_SIZE - 1) and not p & (PMD_SIZE - 1) and v + PMD_SIZE <= end:
                t, i = self._table(v, 2)
                if t[i] and t[i] & P and not t[i] & PSE:
                    # vmap_try_huge_pmd -> pmd_free_pte_page: an empty PTE table is freed
                    if any(self.t1.get(v >> 21, (1,))):
                        raise BadInputError(f"vmap {addr:#x}: a PTE table is in the way of a huge mapping")
                    del self.t1[v >> 21]
                    self.pool.release(t[i] & PTE_PFN_MASK)
                    self.counters.tables_freed += 1
                    if self.nsp is not None:
                        self.nsp.st[1].pop(v >> 21, None)
                t[i] = p | prot | PSE
                self._touch_va(v, 2)
                v += PMD_SIZE
                p += PMD_SIZE
                continue
            t, i = self._table(v, 1)
            if t is None:
                raise BadInputError(f"vmap {addr:#x}: a large leaf is in the way at {v:#x}")
            t[i] = p | prot
            self._touch_va(v, 1)
            v += 4096
            p += 4096

    def vunmap(self, addr: int, n: int) -> None:
        v, end = addr & self.vmask, (addr & self.vmask) + (n << 12)
        if end > self.vmask + 1:
            raise BadInputError(f"vunmap {addr:#x} {n}: runs past the end of the address space")
        while v < end:
            lvl, t, i = self.lookup(v)
            if t is None:                 # no PUD table: nothing mapped in this 512 GiB
                v = (v | ((1 << 39) - 1)) + 1
                continue
            t[i] = 0
            self._touch_va(v, lvl)
            v += 4096 if lvl == 1 else PMD_SIZE if lvl == 2 else PUD_SIZE

    def _touch_va(self, v: int, tl: int) -> None:
        if self.touched is not None:
            self.touched.add(((v >> (3 + 9 * tl)) << 2) | tl)

    def memory_add(self, start: int, size: int) -> None:
        """Memory hotplug add: arch_add_memory -> init_memory_mapping (counters +)."""
        if start & (PMD_SIZE - 1) or size & (PMD_SIZE - 1) or size <= 0:
            raise BadInputError("memory_add: start and size must be 2M aligned")
        s, e = start >> 12, (start + size) >> 12
        if any(a < e and s < b for a, b in self.ram):
            raise BadInputError(f"memory_add {start:#x}+{size:#x}: overlaps mapped RAM")
        check_direct_map_size([(a << 12, b << 12) for a, b in self.ram] + [(start, start + size)],
                              self.layout.gbpages, f"memory_add {start:#x}+{size:#x}")
        self.map_direct(start, start + size)
        self._set_ram(self.ram + [(s, e)])
        for pa in range(start, start + size, PMD_SIZE):
            self._touch_va((self.page_offset + pa) & self.vmask, 2)

    def memory_remove(self, start: int, size: int) -> None:
        """Memory hot-remove (remove_pagetable, direct=true): clear fully covered leaves and
        subtract them from the counters; a partly covered large leaf stays (the kernel does not
        split on hot-remove)."""
        if start & (PMD_SIZE - 1) or size & (PMD_SIZE - 1) or size <= 0:
            raise BadInputError("memory_remove: start and size must be 2M aligned")
        if start + size > 1 << MAX_PHYSMEM_BITS:
            raise BadInputError(f"memory_remove {start:#x}+{size:#x}: ends above 64 TiB, the "
                                f"4-level direct map's size (MAX_PHYSMEM_BITS = {MAX_PHYSMEM_BITS})")
        c = self.counters
        va, end = self.page_offset + start, self.page_offset + start + size
        while va < end:
            lvl, t, i = self.lookup(va)
            span = 4096 if lvl == 1 else PMD_SIZE if lvl == 2 else PUD_SIZE if lvl == 3 else 1 << 39
            if t is None or not t[i]:
                va = (va | (span - 1)) + 1
                continue
            base = va & ~(span - 1)
            if base >= va and base + span <= end:
                t[i] = 0
                self._touch_va(va & self.vmask, lvl)
                if lvl == 1:
                    c.dpc4k -= 1
                elif lvl == 2:
                    c.dpc2m -= 1
                else:
                    c.dpc1g -= 1
            va = base + span
        s, e = start >> 12, (start + size) >> 12
        out = []
        for a, b in self.ram:
            if b <= s or a >= e:
                out.append((a, b))
            else:
                if a < s:
                    out.append((a, s))
                if b > e:
                    out.append((e, b))
        self._set_ram(out)

    # -- census and export -----------------------------------------------------------------------
    def table_count(self) -> int:
        return 1 + len(self.t3) + len(self.t2) + len(self.t1)

    def dm_bounds(self) -> tuple[int, int]:
        lo = self.page_offset & self.vmask
        return lo, lo + (1 << 46)

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
        s = self.start_kernel_map & self.vmask
        e = s + self.layout.kernel_image_size
        return sum(1 for k in self.t1 if s <= k << 21 < e and self.virt_addr_counted((k << 21) | ~self.vmask & U64))

    def export(self):
        """The tables as a SparseMemory image (+ control registers), for dumps and oracles."""
        import numpy as np
        from x86pt.memory.sparse import SparseMemory
        mem = SparseMemory(1 << 46)

        def put(pa: int, t: list[int]) -> None:
            mem.pages[pa >> 12] = bytearray(np.array(t, dtype="<u8").tobytes())

        put(self.pgd_pa, self.pgd)
        for k, t in self.p4d.items():
            put(self.pgd[k] & PTE_PFN_MASK, t)
        for k, t in self.t3.items():
            put(self._top_entry(k) & PTE_PFN_MASK, t)
        for k, t in self.t2.items():
            put(self.t3[k >> 9][k & 511] & PTE_PFN_MASK, t)
        for k, t in self.t1.items():
            put(self.t2[k >> 9][k & 511] & PTE_PFN_MASK, t)
        mem.control_registers = {**self.export_registers(), "maxphyaddr": 46}
        return mem

    def paging_state(self):
        from x86pt.state import PagingState, profile_named
        r = self.export_registers()
        return PagingState(cr3=r["cr3"], cr0=r["cr0"], cr4=r["cr4"], efer=r["efer"],
                           profile=profile_named("intel"), maxphyaddr=46)

    def export_registers(self) -> dict[str, int]:
        from x86pt.state import CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, EFER_LMA, EFER_LME, EFER_NXE
        from x86pt.state import CR4_LA57
        return {"cr0": CR0_PE | CR0_PG | CR0_WP, "cr3": self.pgd_pa,
                "cr4": CR4_PAE | CR4_PGE | (CR4_LA57 if self.levels == 5 else 0),
                "efer": EFER_LME | EFER_LMA | EFER_NXE}


API: dict[str, Callable] = {
    name: getattr(CpaModel, name) for name in (
        "set_memory_ro", "set_memory_rw", "set_memory_x", "set_memory_nx", "set_memory_rox",
        "set_memory_np", "set_memory_np_noalias", "set_memory_p", "set_memory_4k",
        "set_memory_global", "set_memory_nonglobal")
}
