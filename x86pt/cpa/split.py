"""Large-page handling of CPA (docs/cpa.md §4.4, §4.5): decide keep / rewrite in place / split,
and split a 1G leaf into 512 2M leaves or a 2M leaf into 512 PTEs.

Functions take the model (x86pt.cpa.ops.CpaModel) as their first argument; they are the kernel's
`__should_split_large_page` and `__split_large_page` steps, written from the spec's description.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from x86pt.cpa.kernel import (GLOBAL, KERNPG_TABLE, P, PMD_PFN_MASK, PSE, PTE_PFN_MASK,
                              PUD_PFN_MASK, U64, k4_2_large, large_2_4k)

if TYPE_CHECKING:  # pragma: no cover
    from x86pt.cpa.ops import CpaModel, Call

M48 = (1 << 48) - 1


def should_split(m: "CpaModel", c: "Call", level: int, t: list, i: int, address: int,
                 numpages: int) -> int:
    """__should_split_large_page. Returns pages consumed (> 0: leaf kept or rewritten) or 0:
    split and retry. Step numbers refer to docs/cpa.md §4.4."""
    if c.force_split:
        return 0
    old = t[i]
    if level == 2:
        psize, pmask = 1 << 21, PMD_PFN_MASK
        m.counters.checked_2m += 1
    else:
        psize, pmask = 1 << 30, PUD_PFN_MASK
        m.counters.checked_1g += 1
    # pmd_pgprot/pud_pgprot: without PSE (a non-present leaf) bit 12 is PFN, as in a PTE.
    fmask = pmask if old & PSE else PTE_PFN_MASK
    old_prot = old & ~fmask & U64
    # pmd_pfn/pud_pfn: a non-present entry holds the inverted frame (L1TF, pgtable-invert.h)
    old_pfn = ((old if old & P or not m.l1tf_invert else ~old) & fmask) >> 12
    lpaddr = address & ~(psize - 1)
    n_in = (lpaddr + psize - address) >> 12
    if numpages > n_in:                       # step 3: clip to this large page
        numpages = n_in
    req = (large_2_4k(old_prot) & ~c.clr) | c.set
    req = k4_2_large(req)
    if req & P:
        req |= PSE
    else:
        req &= ~GLOBAL                         # pgprot_clear_protnone_bits
    c.pfn = old_pfn + ((address & (psize - 1)) >> 12)
    npl = psize >> 12
    # step 5: the existing mapping must already obey the static protections
    chk = m.static_protections(old_prot, lpaddr, old_pfn, npl, psize)
    if chk != old_prot:
        m.counters.static_conflicts += 1
        c.force_static_prot = True
        return 0
    if req == old_prot:                        # step 6: same prot, keep (any alignment)
        if level == 2:
            m.counters.sameprot_2m += 1
        else:
            m.counters.sameprot_1g += 1
        return numpages
    if address != lpaddr or numpages != npl:   # step 7: partial coverage
        return 0
    new = m.static_protections(req, lpaddr, old_pfn, npl, psize)
    m.verify_rwx(old_prot, new)
    if new != req:                              # step 9: a static protection forbids part
        return 0
    # step 10: __set_pmd_pte(pfn_pte(old_pfn, new)) in place; pfn_pte stores the frame
    # inverted when the new prot is non-present (L1TF), whatever the old entry held
    frame = old_pfn << 12
    if m.l1tf_invert and new and not new & P:
        frame = ~frame & PTE_PFN_MASK
    m.write(level, (address & m.vmask) >> (30 if level == 2 else 39), t, i, frame | new)
    c.flushtlb = True
    if level == 2:
        m.counters.preserved_2m += 1
    else:
        m.counters.preserved_1g += 1
    return numpages


def split_large_page(m: "CpaModel", c: "Call", level: int, t: list, i: int, address: int) -> None:
    """__split_large_page: one new table, children inherit the leaf's prot exactly (PAT moved to
    bit 7 for PTEs; PSE dropped from a non-present 1G), counters, parent = _KERNPG_TABLE, and a
    full TLB flush (Intel TLB application note)."""
    old = t[i]
    v = address & m.vmask
    if level == 2:
        fmask = PMD_PFN_MASK if old & PSE else PTE_PFN_MASK
        ref = large_2_4k(old & ~fmask & U64)
        base = old & fmask
        inc, lpinc = 1 << 12, 1 << 12
        lpaddr = address & ~((1 << 21) - 1)
    else:
        fmask = PUD_PFN_MASK if old & PSE else PTE_PFN_MASK
        ref = old & ~fmask & U64
        if not ref & P:
            ref &= ~PSE
        base = old & fmask
        inc, lpinc = 1 << 21, 1 << 21
        lpaddr = address & ~((1 << 30) - 1)
    if not ref & P:
        ref &= ~GLOBAL
    if not old & P and m.l1tf_invert:
        base = ~old & fmask                     # pmd_pfn/pud_pfn undo the L1TF inversion
    if c.force_static_prot and level == 2:
        children = []
        for k in range(512):
            pfn = (base + k * inc) >> 12
            children.append((base + k * inc) | m.static_protections(ref, lpaddr + k * lpinc, pfn, 1, 0))
    else:
        # a PUD split cannot be fixed up ("Cannot fixup static protections for PUD split")
        first = base | ref
        children = list(range(first, first + 512 * inc, inc))
    if ref and not ref & P and m.l1tf_invert:
        # pfn_pte/pfn_pmd with a non-present prot store each child's frame inverted
        cmask = PTE_PFN_MASK if level == 2 else PMD_PFN_MASK
        children = [e ^ cmask for e in children]
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
