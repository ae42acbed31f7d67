"""The boot-time builder: the tables the kernel has before the first CPA call, built from a
layout as arch/x86/mm/init.c and init_64.c build them (init_memory_mapping over the ISA range and
each e820 RAM range, split_mem_range's largest pages, update_page_count), the kernel image's
highmap of head_64.S trimmed by cleanup_highmap, and the module area's preallocated PMD table.
The CPA calls of the boot sequence (free_initmem, mark_rodata_ro) are the CPA model's
(ops.CpaModel.boot_sequence); memory hotplug maps new RAM through `map_direct` too (hotplug.py).
"""

from __future__ import annotations

from x86pt.cpa.kernel import GLOBAL, PAGE_KERNEL_LARGE_EXEC, PSE
from x86pt.cpa.layout import Layout, split_mem_range
from x86pt.cpa.space import PMD_SIZE, PUD_SIZE, KernelSpace
from x86pt.errors import BadInputError


def boot_ram_ranges(layout: Layout) -> list[tuple[int, int]]:
    """The physical ranges init_mem_mapping maps at boot: the ISA range [0, 1M) whatever the
    e820 list says, then each RAM range above 1M."""
    return [(0, 0x100000)] + [(max(s, 0x100000), e) for s, e in layout.ram if e > 0x100000]


class BootBuilder(KernelSpace):
    """Builds the boot tables of a layout into the kernel space."""

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
                    if t is None:  # not reached: a PUD table is always made
                        continue
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
                    if t is None:  # likewise phys_pmd_init and a 2M leaf
                        continue
                    t[i] = pa | self.default_prot
                    c.dpc4k += update_count

    def build_boot_tables(self) -> None:
        """The ISA range and every RAM range of the e820 list mapped at PAGE_OFFSET; the
        highmap of the kernel image with 2M pages (head_64.S, trimmed by cleanup_highmap); the
        module area's skeleton (one PMD table, as the kernel's preallocated top levels)."""
        lo = self.layout
        ranges = boot_ram_ranges(lo)
        self._set_ram([(s >> 12, e >> 12) for s, e in ranges])
        for s, e in ranges:
            self.map_direct(s, e)
        k = lo.kernel
        hi_prot = PAGE_KERNEL_LARGE_EXEC & ~(GLOBAL if lo.pti else 0)
        end = -(-k.brk_end // PMD_SIZE) * PMD_SIZE
        for pa in range(k.text & ~(PMD_SIZE - 1), end, PMD_SIZE):
            va = (self.start_kernel_map + pa - lo.phys_base) & self.vmask
            t, i = self._table(va, 2)
            if t is None:
                raise BadInputError(
                    f"layout {lo.name}: the kernel image at {va:#x} lies under a 1G "
                    "leaf (does it overlap the direct map?)"
                )
            t[i] = pa | hi_prot
        self._table(lo.modules_vaddr & self.vmask, 2)
