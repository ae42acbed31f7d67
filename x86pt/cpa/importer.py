"""Start a CPA model from an existing image (an ELF core or raw dump plus its paging state):
the kernel half of the tables (PML4 256..511) is read into the model's structure, the RAM list
comes from the layout, and direct_pages_count starts at the census of the tables (the kernel's
own counters are not in a memory image)."""
from __future__ import annotations

from x86pt.cpa.kernel import P, PSE, PTE_PFN_MASK
from x86pt.cpa.layout import Layout
from x86pt.cpa.ops import CpaModel, TablePool
from x86pt.errors import ImageError


def model_from_image(image, layout: Layout, kernel: str, policy: str) -> CpaModel:
    """`image`: an x86pt.image.Image, or a (memory, PagingState) pair."""
    memory, state = (image.memory, image.state) if hasattr(image, "memory") else image
    if state.paging_levels != 4:
        raise ImageError("the CPA model handles 4-level paging images only")
    m = CpaModel(layout, kernel, policy, boot=False)
    root = state.cr3 & PTE_PFN_MASK
    taken = {root}

    def read(pa: int) -> list[int]:
        if pa in taken and pa != root:
            raise ImageError(f"page table {pa:#x} is referenced twice (looping tables?)")
        taken.add(pa)
        return [int(x) for x in memory.table(pa)]

    pgd = [int(x) for x in memory.table(root)]
    m.pgd = [0] * 256 + pgd[256:]
    m.pgd_pa = root
    for gi in range(256, 512):
        e = pgd[gi]
        if not e & P:
            continue
        k4 = gi                                    # t3 key = (va & M48) >> 39
        t3 = read(e & PTE_PFN_MASK)
        m.t3[k4] = t3
        for i3, e3 in enumerate(t3):
            if not e3 & P or e3 & PSE:
                continue
            k3 = (k4 << 9) | i3
            t2 = read(e3 & PTE_PFN_MASK)
            m.t2[k3] = t2
            for i2, e2 in enumerate(t2):
                if not e2 & P or e2 & PSE:
                    continue
                m.t1[(k3 << 9) | i2] = read(e2 & PTE_PFN_MASK)
    ranges = [(0, 0x100000)] + [(max(s, 0x100000), e) for s, e in layout.ram if e > 0x100000]
    m._set_ram([(s >> 12, e >> 12) for s, e in ranges])
    pool = TablePool(layout.table_pool, taken)
    m.pool = pool
    pool.in_use = pool.high_water = len(taken)
    cen = m.census()
    c = m.counters
    c.dpc4k, c.dpc2m, c.dpc1g = cen["4k"], cen["2m"], cen["1g"]
    m.running = True
    m.kernel_set_to_readonly = True
    return m
