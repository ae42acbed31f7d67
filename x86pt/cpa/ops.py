"""The CPA model: one kernel's page tables (tables.py, space.py), built as the kernel builds
them at boot (boot.py), changed by vmalloc and memory hotplug (hotplug.py), read out as an image
(export.py), and the operations of docs/cpa.md §3 run through the algorithm of §4: this file.

As set_memory.c carries one `struct cpa_data` through small named functions, a `Call` (kernel.py)
goes through change_page_attr_set_clr (§4.1) -> __change_page_attr_set_clr (§4.2, the alias of
§4.7 after each step) -> __change_page_attr (§4.3: a 4K PTE updated in place; a large leaf kept,
rewritten or split by split.py, §4.4, §4.5) -> the flush (§4.8) and, with CPA_COLLAPSE, the merge
policy's collapse (merge.py, §7). Static protections (§4.6) are in protect.py.
"""

from __future__ import annotations

import bisect
from typing import Callable

from x86pt.cpa import protect
from x86pt.cpa import split as _split
from x86pt.cpa.export import Exporter
from x86pt.cpa.hotplug import VmapHotplug
from x86pt.cpa.kernel import (
    CACHE_MASK,
    CPA_COLLAPSE,
    CPA_NO_CHECK_ALIAS,
    DIRTY,
    EFAULT,
    GLOBAL,
    KERNEL_4K,
    NX,
    P,
    PSE,
    PTE_PFN_MASK,
    RW,
    TLB_SINGLE_PAGE_FLUSH_CEILING,
    U64,
    Call,
    KernelVersion,
)
from x86pt.cpa.layout import Layout
from x86pt.cpa.merge import make_policy
from x86pt.cpa.space import PMD_SIZE
from x86pt.cpa.tables import TablePool
from x86pt.errors import BadInputError

__all__ = ["API", "Call", "CpaModel", "TablePool"]


class CpaModel(VmapHotplug, Exporter):
    """One kernel's page tables and its CPA. `policy` is one of merge.POLICIES."""

    def __init__(
        self,
        layout: Layout,
        version: KernelVersion | str = "6.15",
        policy: str = "none",
        *,
        boot: bool = True,
    ) -> None:
        super().__init__(layout, version)
        self.policy = make_policy(policy, self)
        if boot:
            self.boot()

    static_protections = protect.static_protections
    verify_rwx = protect.verify_rwx

    # -- boot (docs/cpa.md §10) ------------------------------------------------------------------
    def boot(self) -> None:
        """Build the address space as the kernel does (boot.py), then free_initmem and
        mark_rodata_ro through CPA before SYSTEM_RUNNING (DirectMap counters change, vmstat
        does not)."""
        self.build_boot_tables()
        self.boot_sequence()
        self.running = True

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
        self.set_memory_nx(begin, n)  # free_init_pages without debug_pagealloc
        self.set_memory_rw(begin, n)
        if self.layout.pti:
            self.set_memory_np_noalias(begin, n)

    # -- the CPA algorithm (docs/cpa.md §4) --------------------------------------------------------
    def change_page_attr_set_clr(
        self, addr: int, numpages: int, set_: int, clr: int, force_split: bool = False, flags: int = 0
    ) -> int:
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
        if err:
            c.errors += 1
            if call.flushtlb:
                self.cpa_flush_all(bool(set_ & CACHE_MASK))
            return err
        if call.flushtlb:  # nothing changed: no flush, no collapse
            self.cpa_flush(call, addr, numpages)
            if flags & CPA_COLLAPSE:
                self.policy.collapse(addr, numpages)
        return 0

    def cpa_flush(self, call: Call, addr: int, numpages: int) -> None:
        """cpa_flush (docs/cpa.md §4.8): a full flush past the ceiling or when an alias was
        changed, else one INVLPG per page; clflush when a cache bit was set."""
        c = self.counters
        if call.force_flush_all or numpages > TLB_SINGLE_PAGE_FLUSH_CEILING:
            c.flush_all += 1
            if self.flush_hook is not None:
                self.flush_hook("all")
        else:
            c.flush_ranges += 1
            c.invlpg_pages += numpages
            if self.flush_hook is not None:
                self.flush_hook("range", addr, addr + numpages * 4096)
        if call.set & CACHE_MASK:
            c.clflush_pages += numpages

    def cpa_flush_all(self, cache: bool) -> None:
        """cpa_flush_all after an error: flush_tlb_all (and wbinvd for a cache change)."""
        c = self.counters
        c.flush_all += 1
        c.wbinvd += cache
        if self.flush_hook is not None:
            self.flush_hook("all")

    def set_clr(self, call: Call, addr: int, numpages: int) -> int:
        """__change_page_attr_set_clr (docs/cpa.md §4.2): step through the range, the alias after
        each primary step with the same chunk size."""
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
        """__change_page_attr (docs/cpa.md §4.3): look the address up (lookup_address) and change
        what maps it: a 4K PTE, or a large leaf kept, rewritten or split (and looked up again).
        Returns pages consumed or a negative errno."""
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
                    return self.update_pte(call, address, v)
            if not e:
                return self.process_fault(call, address)
            n = _split.should_split(self, call, level, t, i, address, numpages)
            if n > 0:
                return n
            _split.split_large_page(self, call, level, t, i, address)

    def update_pte(self, call: Call, address: int, v: int) -> int:
        """The 4K branch of __change_page_attr: new = (old & ~clr) | set, static protections,
        verify_rwx, PROTNONE bits cleared, the frame put back (inverted when not present, L1TF);
        written only if the entry changed. It inlines `write` for speed."""
        key = v >> 21
        t = self.t1[key]
        i = (v >> 12) & 511
        old = t[i]
        if not old:
            return self.process_fault(call, address)
        self.counters.setchecked_4k += 1
        pfnbits = old & PTE_PFN_MASK
        if not old & P and self.l1tf_invert:
            # L1TF: a non-present PTE holds the inverted frame (pte_pfn undoes protnone_mask,
            # pgtable-invert.h)
            pfnbits ^= PTE_PFN_MASK
        new_prot = ((old & ~call.clr) | call.set) & ~PTE_PFN_MASK & U64
        pfn = pfnbits >> 12
        if new_prot & P:
            # only text NX and rodata RW can bind a 4K-mapped page (text_ro needs a large
            # mapping at `address`): skip the call when neither range is hit
            if self.text_va <= address < self.etext_va or self.rodata_spfn <= pfn <= self.rodata_epfn:
                new_prot = protect.static_protections(self, new_prot, address, pfn, 1, 0)
        else:
            new_prot &= ~GLOBAL
        if (old ^ new_prot) & (RW | NX) and (new_prot & (RW | NX)) == RW and self.version.verify_rwx:
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

    def process_fault(self, call: Call, address: int) -> int:
        """__cpa_process_fault for the kernel page tables (no cpa->pgd)."""
        if not call.primary:
            return 1
        if self.in_direct_map(address):  # holes in the direct map are expected
            call.pfn = (address - self.page_offset) >> 12
            return 1
        if self.highmap_spfn <= call.pfn <= self.highmap_epfn:
            return EFAULT
        self.counters.zero_pte_warnings += 1  # WARN "CPA: called for zero pte"
        return EFAULT

    def process_alias(self, call: Call, vaddr: int, n: int) -> int:
        """cpa_process_alias (docs/cpa.md §4.7): the same change on the direct-map alias of a
        page mapped elsewhere, and on the highmap alias of a kernel-image page mapped outside
        the image; either makes the primary call's flush a full one."""
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
            call.force_flush_all = True
            r = self.set_clr(_alias_call(call, s, cl), po + (pfn << 12), n)
            if r:
                return r
        # within(vaddr, _text, _brk_end) excludes _brk_end itself (set_memory.c, v6.1..v6.18)
        if not (self.text_va <= vaddr < self.brk_end_va) and self.highmap_spfn <= pfn <= self.highmap_epfn:
            call.force_flush_all = True
            self.set_clr(_alias_call(call, s, cl), self.hva(pfn << 12), n)  # errors ignored
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
        if not v.native_rox:  # generic helper before 6.2: ro, then x
            r = self.set_memory_ro(addr, n)
            return r or self.set_memory_x(addr, n)
        clr = RW | NX | (DIRTY if v.ro_clears_dirty else 0)
        return self.change_page_attr_set_clr(addr, n, 0, clr, flags=CPA_COLLAPSE if v.collapse else 0)

    def set_memory_np(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, 0, P)

    def set_memory_np_noalias(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, 0, P, flags=CPA_NO_CHECK_ALIAS)

    def set_memory_p(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(addr, n, P, 0)

    def set_memory_4k(self, addr: int, n: int) -> int:
        return self.change_page_attr_set_clr(
            addr, n, KERNEL_4K if self.version.kernel_4k_bit else 0, 0, force_split=True
        )

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
        r = (
            self._set_pages(addr, n, P | RW, 0)
            if enable
            else self._set_pages(addr, n, 0, self.version.set_pages_np_clr)
        )
        self.counters.local_flushes += 1
        if self.flush_hook is not None:
            self.flush_hook("local")
        return r

    def cpa(
        self,
        addr: int,
        n: int,
        set_: int,
        clr: int,
        flags: int = 0,
        primary: bool = True,
        force_split: bool = False,
    ) -> int:
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
            frame ^= PTE_PFN_MASK  # pte_pfn undoes protnone_mask
        flags = ((old & ~clr) | set_) & ~PTE_PFN_MASK & U64
        if self.l1tf_invert and flags and not flags & P:
            frame ^= PTE_PFN_MASK  # pfn_pte: __pte_needs_invert
        t[i] = frame | flags
        self.counters.oob_writes += 1
        self.counters.local_flushes += 1
        if self.flush_hook is not None:  # kfence: flush_tlb_one_kernel on this CPU only
            self.flush_hook("page", addr & ~0xFFF)
        if self.touched is not None:
            self.touched.add((((addr & self.vmask) >> 12) << 2) | 1)
        return True


def _alias_call(call: Call, set_: int, clr: int) -> Call:
    """The cpa_data of an alias call: primary=0, the array modes off, nothing reported yet."""
    return Call(set_, clr, call.force_split, call.flags & ~6, False, False, False, 0, False)


API: dict[str, Callable[[CpaModel, int, int], int]] = {
    name: getattr(CpaModel, name)
    for name in (
        "set_memory_ro",
        "set_memory_rw",
        "set_memory_x",
        "set_memory_nx",
        "set_memory_rox",
        "set_memory_np",
        "set_memory_np_noalias",
        "set_memory_p",
        "set_memory_4k",
        "set_memory_global",
        "set_memory_nonglobal",
    )
}
