"""Start a CPA model from an existing image (an ELF core or raw dump plus its paging state):
the kernel half of the tables (PML4 or PML5 entries 256..511) is read into the model's structure,
the RAM list comes from the layout, and direct_pages_count starts at the census of the tables
(the kernel's own counters are not in a memory image).

Real kernels share some table pages between several parent entries: the ESPfix area
(init_espfix_bsp / init_espfix_ap) points many PUD entries at one PMD page and many PMD entries at
one PTE page. Such a page is imported once and the same table object is installed under every key
that references it, so a write through one alias is seen through all of them as on hardware. The
model never splits there (CPA is not called on ESPfix addresses); `shared` lists those pages.
A page seen at two different levels is a loop or a corrupt image and is refused.
"""

from __future__ import annotations

from typing import Any

from x86pt.cpa.boot import boot_ram_ranges
from x86pt.cpa.kernel import P, PSE, PTE_PFN_MASK
from x86pt.cpa.layout import Layout
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.tables import Table, TablePool, table_from_bytes, table_of, zero_table
from x86pt.errors import ImageError


def model_from_image(image: Any, layout: Layout, kernel: str, policy: str) -> CpaModel:
    """`image`: an x86pt.image.Image, or a (memory, PagingState) pair."""
    memory, state = (image.memory, image.state) if hasattr(image, "memory") else image
    levels = state.paging_levels
    if levels not in (4, 5):
        raise ImageError(f"the CPA model handles 4- and 5-level paging images, not {levels}-level")
    m = CpaModel(layout, kernel, policy, boot=False)
    m.set_levels(levels)
    m.l1tf_invert = True  # a real kernel's tables hold inverted frames
    root = state.cr3 & PTE_PFN_MASK
    seen: dict[int, tuple[int, Table]] = {root: (levels, zero_table())}  # pa -> (level, table)
    shared: set[int] = set()

    def read(pa: int, level: int) -> Table:
        got = seen.get(pa)
        if got is not None:
            if got[0] != level:
                raise ImageError(
                    f"page table {pa:#x} is referenced as a level-{got[0]} and a "
                    f"level-{level} table (looping tables?)"
                )
            shared.add(pa)
            return got[1]
        if not memory.contains(pa, 4096):
            raise ImageError(f"page table {pa:#x} is outside the image")
        t = table_from_bytes(memory.table(pa).astype("<u8").tobytes())
        seen[pa] = (level, t)
        return t

    def pud_tree(k4: int, e: int) -> None:
        """The PUD table under one PGD/P4D entry, and everything below; k4 = (va & vmask) >> 39."""
        t3 = read(e & PTE_PFN_MASK, 3)
        m.t3[k4] = t3
        for i3, e3 in enumerate(t3):
            if not e3 & P or e3 & PSE:
                continue
            k3 = (k4 << 9) | i3
            t2 = read(e3 & PTE_PFN_MASK, 2)
            m.t2[k3] = t2
            for i2, e2 in enumerate(t2):
                if not e2 & P or e2 & PSE:
                    continue
                m.t1[(k3 << 9) | i2] = read(e2 & PTE_PFN_MASK, 1)

    if not memory.contains(root, 4096):
        raise ImageError(f"CR3 {root:#x} points outside the image")
    top = table_from_bytes(memory.table(root).astype("<u8").tobytes())
    m.pgd = table_of([0] * 256 + top[256:].tolist())
    m.pgd_pa = root
    for gi in range(256, 512):
        e = top[gi]
        if not e & P:
            continue
        if levels == 4:
            pud_tree(gi, e)
            continue
        p4d = read(e & PTE_PFN_MASK, 4)
        m.p4d[gi] = p4d
        for i4, e4 in enumerate(p4d):
            if e4 & P:
                pud_tree((gi << 9) | i4, e4)
    m._set_ram([(s >> 12, e >> 12) for s, e in boot_ram_ranges(layout)])
    taken = set(seen)
    pool = TablePool(layout.table_pool, taken)
    m.pool = pool
    pool.in_use = pool.high_water = len(taken)
    m.shared = frozenset(shared)
    cen = m.census()
    c = m.counters
    c.dpc4k, c.dpc2m, c.dpc1g = cen["4k"], cen["2m"], cen["1g"]
    m.running = True
    m.kernel_set_to_readonly = True
    return m
