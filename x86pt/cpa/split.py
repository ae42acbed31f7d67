"""Large-page handling of CPA (docs/cpa.md §4.4, §4.5): decide keep / rewrite in place / split,
and split a 1G leaf into 512 2M leaves or a 2M leaf into 512 PTEs.

Functions take the kernel space (space.KernelSpace, the CPA model) and the call's cpa_data as
their first arguments; they are the kernel's `__should_split_large_page` and `__split_large_page`
steps, written from the spec's description.
"""

from __future__ import annotations

from x86pt.cpa.kernel import (
    GLOBAL,
    KERNPG_TABLE,
    P,
    PMD_PFN_MASK,
    PSE,
    PTE_PFN_MASK,
    PUD_PFN_MASK,
    U64,
    Call,
    k4_2_large,
    large_2_4k,
)
from x86pt.cpa.protect import static_protections, verify_rwx
from x86pt.cpa.space import KernelSpace
from x86pt.cpa.tables import Table, run_table, table_of, xor_table


def should_split(m: KernelSpace, c: Call, level: int, t: Table, i: int, address: int, numpages: int) -> int:
    """__should_split_large_page. Returns pages consumed (> 0: leaf kept or rewritten) or 0:
    split and retry. Step numbers refer to docs/cpa.md §4.4."""
    if c.force_split:  # step 1
        return 0
    psize, old_prot, old_pfn = _large_leaf(m, level, t[i])  # step 2
    lpaddr = address & ~(psize - 1)
    n_in = (lpaddr + psize - address) >> 12
    if numpages > n_in:  # step 3: clip to this large page
        numpages = n_in
    req = _requested_prot(c, old_prot)  # step 4
    c.pfn = old_pfn + ((address & (psize - 1)) >> 12)
    npl = psize >> 12
    # step 5: the existing mapping must already obey the static protections
    if static_protections(m, old_prot, lpaddr, old_pfn, npl, psize) != old_prot:
        m.counters.static_conflicts += 1
        c.force_static_prot = True
        return 0
    if req == old_prot:  # step 6: same prot, keep (any alignment)
        if level == 2:
            m.counters.sameprot_2m += 1
        else:
            m.counters.sameprot_1g += 1
        return numpages
    if address != lpaddr or numpages != npl:  # step 7: partial coverage
        return 0
    new = static_protections(m, req, lpaddr, old_pfn, npl, psize)  # step 8
    verify_rwx(m, old_prot, new)
    if new != req:  # step 9: a static protection forbids part
        return 0
    _rewrite_leaf(m, c, level, t, i, address, old_pfn, new)  # step 10
    return numpages


def _large_leaf(m: KernelSpace, level: int, old: int) -> tuple[int, int, int]:
    """(page size, protection, first pfn) of a PMD (2M) or PUD (1G) leaf; counts "checked"."""
    if level == 2:
        psize, pmask = 1 << 21, PMD_PFN_MASK
        m.counters.checked_2m += 1
    else:
        psize, pmask = 1 << 30, PUD_PFN_MASK
        m.counters.checked_1g += 1
    # pmd_pgprot/pud_pgprot: without PSE (a non-present leaf) bit 12 is PFN, as in a PTE.
    fmask = pmask if old & PSE else PTE_PFN_MASK
    # pmd_pfn/pud_pfn: a non-present entry holds the inverted frame (L1TF, pgtable-invert.h)
    old_pfn = ((old if old & P or not m.l1tf_invert else ~old) & fmask) >> 12
    return psize, old & ~fmask & U64, old_pfn


def _requested_prot(c: Call, old_prot: int) -> int:
    """The call's masks applied to a large leaf's protection, in 4K format and back (PSE added
    when present, PROTNONE bits cleared when not)."""
    req = k4_2_large((large_2_4k(old_prot) & ~c.clr) | c.set)
    if req & P:
        return req | PSE
    return req & ~GLOBAL  # pgprot_clear_protnone_bits


def _rewrite_leaf(
    m: KernelSpace, c: Call, level: int, t: Table, i: int, address: int, old_pfn: int, new: int
) -> None:
    """__set_pmd_pte(pfn_pte(old_pfn, new)) in place; pfn_pte stores the frame inverted when the
    new prot is non-present (L1TF), whatever the old entry held. Counts "preserved"."""
    frame = old_pfn << 12
    if m.l1tf_invert and new and not new & P:
        frame = ~frame & PTE_PFN_MASK
    m.write(level, (address & m.vmask) >> (30 if level == 2 else 39), t, i, frame | new)
    c.flushtlb = True
    if level == 2:
        m.counters.preserved_2m += 1
    else:
        m.counters.preserved_1g += 1


def split_large_page(m: KernelSpace, c: Call, level: int, t: Table, i: int, address: int) -> None:
    """__split_large_page: one new table, children inherit the leaf's prot exactly (PAT moved to
    bit 7 for PTEs; PSE dropped from a non-present 1G), counters, parent = _KERNPG_TABLE, and a
    full TLB flush (Intel TLB application note)."""
    ref, base = _split_reference(m, level, t[i])
    children = _split_children(m, c, level, ref, base, address)
    _install_split(m, level, t, i, address, children, ref)


def _split_reference(m: KernelSpace, level: int, old: int) -> tuple[int, int]:
    """(reference protection of the children, physical address of the first child's frame) of
    the large leaf `old`: pgprot_large_2_4k for a 2M leaf's PTEs, the PUD's protection as it is
    for a 1G leaf's PMDs (PSE dropped if not present); PROTNONE bits cleared."""
    if level == 2:
        fmask = PMD_PFN_MASK if old & PSE else PTE_PFN_MASK
        ref = large_2_4k(old & ~fmask & U64)
    else:
        fmask = PUD_PFN_MASK if old & PSE else PTE_PFN_MASK
        ref = old & ~fmask & U64
        if not ref & P:
            ref &= ~PSE
    if not ref & P:
        ref &= ~GLOBAL
    base = old & fmask
    if not old & P and m.l1tf_invert:
        base = ~old & fmask  # pmd_pfn/pud_pfn undo the L1TF inversion
    return ref, base


def _split_children(m: KernelSpace, c: Call, level: int, ref: int, base: int, address: int) -> Table:
    """The 512 entries of the new table: frames one child apart with the reference protection,
    each 4K child filtered by the static protections when the leaf broke them (force_static_prot)."""
    inc = 1 << 12 if level == 2 else 1 << 21
    if c.force_static_prot and level == 2:
        lpaddr = address & ~((1 << 21) - 1)
        children = table_of(
            (base + k * inc) | static_protections(m, ref, lpaddr + k * inc, (base + k * inc) >> 12, 1, 0)
            for k in range(512)
        )
    else:
        # a PUD split cannot be fixed up ("Cannot fixup static protections for PUD split")
        children = run_table(base | ref, inc)
    if ref and not ref & P and m.l1tf_invert:
        # pfn_pte/pfn_pmd with a non-present prot store each child's frame inverted
        children = xor_table(children, PTE_PFN_MASK if level == 2 else PMD_PFN_MASK)
    return children


def _install_split(
    m: KernelSpace, level: int, t: Table, i: int, address: int, children: Table, ref: int
) -> None:
    """Hang the new table under the leaf's slot: a page from the pool, direct_pages_count moved
    one level down (when the address is counted), the parent entry rewritten as _KERNPG_TABLE
    through the CPA write, and flush_tlb_all."""
    v = address & m.vmask
    pa = m.pool.alloc()
    m.counters.tables_allocated += 1
    m.counters.all_splits += 1
    if level == 2:
        key = v >> 21
        m.t1[key] = children
        m.on_new_table(1, key, children, ref)
    else:
        key = v >> 30
        m.t2[key] = children
        m.on_new_table(2, key, children, ref)
    if m.virt_addr_counted(address):
        m.split_page_count(level)
    m.write(level, v >> (30 if level == 2 else 39), t, i, pa | KERNPG_TABLE)
    m.counters.flush_all += 1
    m.counters.flush_all_split += 1
    if m.flush_hook is not None:
        m.flush_hook("all")
