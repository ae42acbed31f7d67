"""Page-table changes outside CPA: vmalloc mappings (vmap_range / vunmap_range, huge vmalloc's
PMD leaves) and memory hotplug (arch_add_memory maps new RAM through the boot builder;
remove_pagetable clears the leaves of removed RAM and takes them off direct_pages_count).
None of them runs the CPA algorithm; each records what it wrote for the validator (`touched`).
"""

from __future__ import annotations

from x86pt.cpa.boot import BootBuilder
from x86pt.cpa.kernel import P, PSE, PTE_PFN_MASK
from x86pt.cpa.layout import MAX_MAP_LEAVES, MAX_PHYSMEM_BITS, check_direct_map_size
from x86pt.cpa.space import PMD_SIZE, PUD_SIZE
from x86pt.errors import BadInputError, BudgetError


class VmapHotplug(BootBuilder):
    """vmap/vunmap and memory hotplug on the kernel space."""

    def vmap(self, addr: int, pa: int, n: int, huge: bool = False, prot: int | None = None) -> None:
        """Map n pages at addr to consecutive frames from pa (vmap_range); huge = PMD leaves for
        2M-aligned parts (huge vmalloc), 4K elsewhere."""
        if pa & 0xFFF or n < 0 or pa + (n << 12) > 1 << MAX_PHYSMEM_BITS:
            raise BadInputError(
                f"vmap {addr:#x} {pa:#x} {n}: frames must be page aligned and end "
                f"below 2^{MAX_PHYSMEM_BITS} (the model's MAXPHYADDR)"
            )
        leaves = n >> 9 if huge and not (addr - pa) & (PMD_SIZE - 1) else n
        if leaves > MAX_MAP_LEAVES:
            raise BudgetError(
                f"vmap {addr:#x} {pa:#x} {n}: about {leaves} leaves, more than the "
                f"model's limit of {MAX_MAP_LEAVES} per operation"
            )
        prot = self.default_prot if prot is None else prot
        v, p, end = addr & self.vmask, pa, (addr & self.vmask) + (n << 12)
        while v < end:
            if huge and not v & (PMD_SIZE - 1) and not p & (PMD_SIZE - 1) and v + PMD_SIZE <= end:
                self._vmap_huge(addr, v, p | prot | PSE)
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

    def _vmap_huge(self, addr: int, v: int, entry: int) -> None:
        """One PMD leaf of a huge vmalloc mapping at v (vmap_try_huge_pmd)."""
        t, i = self._table(v, 2)
        if t is None:
            raise BadInputError(f"vmap {addr:#x}: a 1G leaf is in the way at {v:#x}")
        if t[i] and t[i] & P and not t[i] & PSE:
            # vmap_try_huge_pmd -> pmd_free_pte_page: an empty PTE table is freed
            if any(self.t1.get(v >> 21, (1,))):
                raise BadInputError(f"vmap {addr:#x}: a PTE table is in the way of a huge mapping")
            del self.t1[v >> 21]
            self.pool.release(t[i] & PTE_PFN_MASK)
            self.counters.tables_freed += 1
            if self.nsp is not None:
                self.nsp.forget(1, v >> 21)
        t[i] = entry
        self._touch_va(v, 2)

    def vunmap(self, addr: int, n: int) -> None:
        v, end = addr & self.vmask, (addr & self.vmask) + (n << 12)
        if end > self.vmask + 1:
            raise BadInputError(f"vunmap {addr:#x} {n}: runs past the end of the address space")
        while v < end:
            lvl, t, i = self.lookup(v)
            if t is None:  # no PUD table: nothing mapped in this 512 GiB
                v = (v | ((1 << 39) - 1)) + 1
                continue
            t[i] = 0
            self._touch_va(v, lvl)
            v += 4096 if lvl == 1 else PMD_SIZE if lvl == 2 else PUD_SIZE

    def memory_add(self, start: int, size: int) -> None:
        """Memory hotplug add: arch_add_memory -> init_memory_mapping (counters +)."""
        if start & (PMD_SIZE - 1) or size & (PMD_SIZE - 1) or size <= 0:
            raise BadInputError("memory_add: start and size must be 2M aligned")
        s, e = start >> 12, (start + size) >> 12
        if any(a < e and s < b for a, b in self.ram):
            raise BadInputError(f"memory_add {start:#x}+{size:#x}: overlaps mapped RAM")
        check_direct_map_size(
            [(a << 12, b << 12) for a, b in self.ram] + [(start, start + size)],
            self.layout.gbpages,
            f"memory_add {start:#x}+{size:#x}",
        )
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
            raise BadInputError(
                f"memory_remove {start:#x}+{size:#x}: ends above 64 TiB, the "
                f"4-level direct map's size (MAX_PHYSMEM_BITS = {MAX_PHYSMEM_BITS})"
            )
        self._clear_direct_leaves(self.page_offset + start, self.page_offset + start + size)
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

    def _clear_direct_leaves(self, va: int, end: int) -> None:
        """Clear every leaf wholly inside [va, end) and take it off direct_pages_count."""
        c = self.counters
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
