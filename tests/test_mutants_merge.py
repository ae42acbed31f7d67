# SPDX-License-Identifier: GPL-2.0-or-later
"""The merge policies (x86pt/cpa/merge.py) shown to fail: each policy's rule of docs/cpa.md §7 run
on small direct maps built by hand (one PTE table or PMD table placed in an otherwise empty model)
with every expected entry, table, counter and flush written out from the text: §7.2 (collapse_pmd_page
/ collapse_pud_page: present, aligned first frame, no _PAGE_KERNEL_4K, equal flags, consecutive
frames; PUD only after a PMD collapse and with gbpages; one full flush, then the pages freed), §7.3
(nr_same_prot: -1 leaving same_prot, +1 entering, re-baseline at 0 on entry 0, merge at 512 with a
present same_prot, PSE for a PMD table, cascading through the parent's count), §7.4 (ideal: every
touched table, never a region set_memory_4k covered) and §5.1/§5.2 (collapse_page_count, vmstat
only while running) — never taken from the model's output.

Constants (docs/cpa.md §2.2): __PAGE_KERNEL_LARGE = 0x80000000000001E3, a PTE of __PAGE_KERNEL =
0x8000000000000163, _KERNPG_TABLE = 0x63, PAT = bit 7 in a PTE and bit 12 in a large leaf,
_PAGE_KERNEL_4K = bit 11.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from x86pt.cpa import merge
from x86pt.cpa.layout import Layout
from x86pt.cpa.ops import CpaModel
from x86pt.errors import BadInputError

PO = 0xFFFF888000000000
M48 = (1 << 48) - 1
VM = 0xFFFFC90000000000  # vmalloc_start: not counted in direct_pages_count
LARGE = 0x80000000000001E3
KPTE = 0x8000000000000163
PFN52 = 0x000FFFFFFFFFF000
LAY = Layout("hand-6g", ((0x0, 0x180000000),))
NOGB = replace(LAY, name="hand-6g-nogb", gbpages=False)


def space(policy="upstream", version="6.15", layout=LAY):
    m = CpaModel(layout, version, policy, boot=False)
    m._set_ram([(0, 0x180000)])
    m.running = True
    return m


def k2(va):
    """Key of the PTE table covering va (tables.py: t1[va >> 21], va masked to 48 bits)."""
    return (va & M48) >> 21


def k3(va):
    """Key of the PMD table covering va (t2[va >> 30])."""
    return (va & M48) >> 30


def pte_table(m, va, pa, flags=KPTE, step=4096):
    """A PTE table mapping va's 2M region: entry k = (pa + k * step) | flags."""
    t, _ = m._table((va & M48) & ~0x1FFFFF, 1)
    for k in range(512):
        t[k] = (pa + k * step) | flags
    return t


def pmd_leaves(m, va, pa, flags=LARGE, skip=()):
    """The PMD table of va's 1G region filled with 2M leaves, slot k = (pa + k * 2M) | flags (pa:
    the frame of slot 0), except the slots in skip (left as they are)."""
    t, _ = m._table((va & M48) & ~0x3FFFFFFF, 2)
    for k in range(512):
        if k not in skip:
            t[k] = (pa + (k << 21)) | flags
    return t


def one_region_1g(m, base=0x40000000, flags=KPTE, pflags=LARGE):
    """1G at PO+base: slot 1 a PTE table of 4K pages, the other 511 slots 2M leaves; counted."""
    pt = pte_table(m, PO + base + 0x200000, base + 0x200000, flags)
    t2 = pmd_leaves(m, PO + base, base, pflags, skip={1})
    m.counters.dpc4k, m.counters.dpc2m, m.counters.dpc1g = 512, 511, 0
    return t2, pt


def counts(m):
    c = m.counters
    return (c.dpc4k, c.dpc2m, c.dpc1g)


# -- mergeability (§7.2, §7.4) ----------------------------------------------------------------------


def test_pte_table_mergeable_rules():
    m = space()
    pol = m.policy
    assert pol.pte_table_mergeable(pte_table(m, PO + 0x20000000, 0x20000000))
    assert not pol.pte_table_mergeable(pte_table(m, PO + 0x20000000, 0x20000000, KPTE & ~1))  # not P
    for first in (0x20001000, 0x20100000, 0x20200000 - 0x1000):  # first frame not 2M aligned
        assert not pol.pte_table_mergeable(pte_table(m, PO + 0x20000000, first))
    assert not pol.pte_table_mergeable(pte_table(m, PO + 0x20000000, 0x20000000, KPTE | 0x800))  # 4K bit
    t = pte_table(m, PO + 0x20000000, 0x20000000)
    t[300] &= ~2  # one entry's flags differ
    assert not pol.pte_table_mergeable(t)
    t = pte_table(m, PO + 0x20000000, 0x20000000)
    t[511] += 0x1000  # frames not consecutive
    assert not pol.pte_table_mergeable(t)


def test_pmd_table_mergeable_rules():
    m = space()
    pol = m.policy
    assert pol.pmd_table_mergeable(pmd_leaves(m, PO + 0x40000000, 0x40000000))
    assert not pol.pmd_table_mergeable(pmd_leaves(m, PO + 0x40000000, 0x40000000, LARGE & ~1))
    assert not pol.pmd_table_mergeable(pmd_leaves(m, PO + 0x40000000, 0x40000000, LARGE & ~0x80))  # no PSE
    for first in (0x40200000, 0x60000000, 0x50000000):  # not 1G aligned
        assert not pol.pmd_table_mergeable(pmd_leaves(m, PO + 0x40000000, first))
    t = pmd_leaves(m, PO + 0x40000000, 0x40000000)
    t[7] |= 0x10  # PCD on one leaf
    assert not pol.pmd_table_mergeable(t)


# -- upstream: cpa_collapse_large_pages (§7.2) ------------------------------------------------------


def test_upstream_collapses_pmd_then_pud():
    m = space()
    t2, pt = one_region_1g(m)
    pud, pi = m.t3[(PO + 0x40000000 & M48) >> 39], ((PO + 0x40000000) >> 30) & 511
    table_pas = {t2[1] & PFN52, pud[pi] & PFN52}
    in_use = m.pool.in_use
    seen = []
    m.flush_hook = lambda kind, *a: seen.append((kind, a, set(m.pool.free) & table_pas))
    m.policy.collapse(PO + 0x40203000, 4)
    assert m.leaf(PO + 0x40203000) == (3, 0x40000000 | LARGE)
    assert pud[pi] == 0x40000000 | LARGE
    assert k2(PO + 0x40200000) not in m.t1 and k3(PO + 0x40000000) not in m.t2
    c = m.counters
    assert counts(m) == (0, 0, 1)
    assert (c.collapse_2m, c.collapse_1g, c.merge_2m, c.merge_1g, c.all_merges) == (1, 1, 0, 0, 2)
    # one full flush before the pages go back to the pool
    assert seen == [("all", (), set())] and (c.flush_all, c.flush_all_merge) == (1, 1)
    assert set(m.pool.free) == table_pas and m.pool.in_use == in_use - 2 and c.tables_freed == 2


def test_upstream_pat_moves_back_to_bit_12():
    m = space(layout=NOGB)
    pte_table(m, PO + 0x20000000, 0x20000000, KPTE | 0x80 | 0x8)  # PAT (bit 7) and PWT
    m.policy.collapse(PO + 0x20000000, 1)
    assert m.leaf(PO + 0x20000000) == (2, 0x20000000 | 0x1000 | 0x8 | LARGE)


def test_upstream_without_gbpages_stops_at_2m():
    m = space(layout=NOGB)
    one_region_1g(m)
    m.policy.collapse(PO + 0x40200000, 512)
    assert m.leaf(PO + 0x40200000) == (2, 0x40200000 | LARGE)
    assert counts(m) == (0, 512, 0) and m.counters.collapse_1g == 0 and m.counters.tables_freed == 1


def test_upstream_range_ends_are_exclusive():
    """Candidates: every 2M-aligned address from first & PMD_MASK below the end of the range."""
    m = space(layout=NOGB)
    for r in (0x20000000, 0x20200000, 0x20400000):
        pte_table(m, PO + r, r)
    m.policy.collapse(PO + 0x20000000, 512)  # ends exactly where the next region starts
    assert [m.leaf(PO + r)[0] for r in (0x20000000, 0x20200000, 0x20400000)] == [2, 1, 1]
    m.policy.collapse(PO + 0x203FF000, 2)  # the last page of one region and the first of the next
    assert [m.leaf(PO + r)[0] for r in (0x20000000, 0x20200000, 0x20400000)] == [2, 2, 2]
    assert m.counters.collapse_2m == 3 and m.counters.flush_all == 2 and m.counters.flush_all_merge == 2


def test_upstream_not_on_old_kernels():
    m = space(version="6.1")
    assert m.policy.note == "kernel 6.1 has no CPA_COLLAPSE: upstream behaves as none"
    assert space().policy.note == ""
    one_region_1g(m)
    m.policy.collapse(PO + 0x40200000, 512)
    assert m.leaf(PO + 0x40200000)[0] == 1 and m.counters.flush_all == 0


def test_upstream_skips_leaves_holes_and_bad_tables():
    m = space()
    # a 1G leaf at PO+1G, a non-present PUD slot at PO+2G, a 2M leaf in a PMD table at PO+3G
    t3, i3 = m._table((PO + 0x40000000) & M48, 3)
    t3[i3] = 0x40000000 | LARGE
    pmd_leaves(m, PO + 0xC0000000, 0xC0000000)
    # a non-present PMD slot in a PMD table at PO+4G: the slot holds no table
    t2 = pmd_leaves(m, PO + 0x100000000, 0x100000000, skip={0})
    t2[0] = 0
    # a PTE table that is not a run (frame gap)
    pt = pte_table(m, PO + 0x140000000, 0x140000000)
    pt[3] += 0x1000
    for va in (PO + 0x40000000, PO + 0x80000000, PO + 0xC0000000, PO + 0x100000000, PO + 0x140000000):
        m.policy.collapse(va, 512)
    m.policy.collapse(0xFFFF900000000000, 1)  # no PUD table at all there
    assert m.counters.all_merges == 0 and m.counters.flush_all == 0


def test_upstream_vmalloc_collapse_is_not_counted():
    m = space(layout=NOGB)
    pte_table(m, VM + 0x200000, 0x20000000)
    m.counters.dpc4k = 7
    m.policy.collapse(VM + 0x200000, 512)
    assert m.leaf(VM + 0x200000) == (2, 0x20000000 | LARGE)
    assert counts(m) == (7, 0, 0) and m.counters.collapse_2m == 0 and m.counters.all_merges == 1


def test_collapse_before_running_moves_direct_map_not_vmstat():
    m = space(layout=NOGB)
    m.running = False
    pte_table(m, PO + 0x20000000, 0x20000000)
    m.counters.dpc4k = 512
    m.policy.collapse(PO + 0x20000000, 512)
    assert counts(m) == (0, 1, 0) and m.counters.collapse_2m == 0


def test_merge_records_the_parent_write():
    m = space(layout=NOGB)
    pte_table(m, PO + 0x20000000, 0x20000000)
    m.touched = set()
    m.policy.collapse(PO + 0x20000000, 1)
    # the PMD entry of the region: table t2[va >> 30], index (va >> 21) & 511
    assert m.touched == {(k2(PO + 0x20000000) << 2) | 2}


# -- ideal (§7.4) ----------------------------------------------------------------------------------


def touched_pte(va):
    return (((va & M48) >> 12) << 2) | 1


def touched_pmd(va):
    return (((va & M48) >> 21) << 2) | 2


def test_ideal_merges_touched_tables_and_cascades():
    m = space("ideal")
    assert m.policy.needs_touched
    one_region_1g(m)
    m.policy.after_op({touched_pte(PO + 0x40205000)})
    assert m.leaf(PO + 0x40205000) == (3, 0x40000000 | LARGE)
    c = m.counters
    assert (c.merge_2m, c.merge_1g, c.collapse_2m, c.collapse_1g) == (1, 1, 0, 0)
    assert counts(m) == (0, 0, 1) and c.flush_all == 1 and c.tables_freed == 2


def test_ideal_without_gbpages_stops_at_2m():
    m = space("ideal", layout=NOGB)
    one_region_1g(m)
    m.policy.after_op({touched_pte(PO + 0x40205000)})
    assert m.leaf(PO + 0x40205000) == (2, 0x40200000 | LARGE) and m.counters.merge_1g == 0


def test_ideal_pmd_entry_write_merges_its_pmd_table():
    """A whole-2M rewrite writes a PMD entry: its PMD table is looked at (1G merge)."""
    m = space("ideal")
    pmd_leaves(m, PO + 0x40000000, 0x40000000)
    m.counters.dpc2m = 512
    m.policy.after_op({touched_pmd(PO + 0x40600000)})
    assert m.leaf(PO + 0x40600000) == (3, 0x40000000 | LARGE) and counts(m) == (0, 0, 1)
    m2 = space("ideal", layout=NOGB)
    pmd_leaves(m2, PO + 0x40000000, 0x40000000)
    m2.policy.after_op({touched_pmd(PO + 0x40600000)})
    assert m2.leaf(PO + 0x40600000)[0] == 2


def test_ideal_pmd_entry_pointing_at_a_table_looks_at_that_table():
    """A PMD entry written to point at a (mergeable) PTE table: that table is looked at."""
    m = space("ideal", layout=NOGB)
    pte_table(m, PO + 0x20000000, 0x20000000)
    m.policy.after_op({touched_pmd(PO + 0x20000000)})
    assert m.leaf(PO + 0x20000000) == (2, 0x20000000 | LARGE)


def test_ideal_leaves_untouched_and_pud_writes_alone():
    m = space("ideal", layout=NOGB)
    pte_table(m, PO + 0x20000000, 0x20000000)
    m.policy.after_op({touched_pte(PO + 0x20200000)})  # another region
    m.policy.after_op({(((PO & M48) >> 30) << 2) | 3})  # a PUD entry write
    m.policy.after_op(set())
    m.policy.after_op(None)
    assert m.leaf(PO + 0x20000000)[0] == 1 and m.counters.all_merges == 0


def test_ideal_never_merges_a_region_set_memory_4k_covered():
    m = space("ideal", layout=NOGB)
    for r in (0x20000000, 0x20200000, 0x20400000):
        pte_table(m, PO + r, r)
    m.policy.on_force_4k(PO + 0x20000000 + 0x1FF000, 1)  # the last page of the first region
    m.policy.after_op({touched_pte(PO + r) for r in (0x20000000, 0x20200000, 0x20400000)})
    assert [m.leaf(PO + r)[0] for r in (0x20000000, 0x20200000, 0x20400000)] == [1, 2, 2]


def test_ideal_pinned_regions_are_exactly_the_covered_ones():
    m = space("ideal")
    m.policy.on_force_4k(PO + 0x20000000, 512)  # ends at a region boundary
    assert m.policy.pinned == {k2(PO + 0x20000000)}
    m.policy.on_force_4k(PO + 0x207FF000, 2)  # the last page of one region and the first of the next
    want = {k2(PO + 0x20000000), k2(PO + 0x20600000), k2(PO + 0x20800000)}
    assert m.policy.pinned == want
    m.policy.on_force_4k(PO + 0x20A00000 + 0x3000, 1)
    assert m.policy.pinned == want | {k2(PO + 0x20A00000)}


def test_ideal_set_memory_4k_through_the_model():
    """set_memory_4k on a 2M leaf, then set_memory_ro/rw back on 6.1 (no 4K bit): the ideal
    policy still leaves the region 4K-mapped; without the pin it would merge."""
    m = space("ideal", version="6.1", layout=NOGB)
    t2 = pmd_leaves(m, PO, 0)
    m.counters.dpc2m = 512
    assert m.set_memory_4k(PO + 0x20000000, 1) == 0
    m.touched = set()
    m.set_memory_ro(PO + 0x20001000, 1)
    m.set_memory_rw(PO + 0x20001000, 1)
    m.policy.after_op(m.touched)
    assert m.leaf(PO + 0x20000000) == (1, 0x20000000 | KPTE)
    assert t2[256] & 0xFFF == 0x63  # the region at 512 MiB: slot 256, still a table pointer


# -- nr-same-prot (§7.3) -----------------------------------------------------------------------------


def test_rfc_counts_a_split_table_down_and_up_and_merges_at_512():
    m = space("nr-same-prot", version="6.1", layout=NOGB)
    pmd_leaves(m, PO, 0)
    m.counters.dpc2m = 512
    key = k2(PO + 0x20000000)
    m.set_memory_ro(PO + 0x20003000, 1)  # split: same_prot = the 4K form of the leaf
    assert m.policy.st[1] == {key: [KPTE, 511]}
    assert m.policy.recount(1, key) == (511, 511)
    m.set_memory_ro(PO + 0x20004000, 2)
    assert m.policy.st[1][key] == [KPTE, 509]
    m.set_memory_ro(PO + 0x20004000, 1)  # no change: nothing written
    assert m.policy.st[1][key] == [KPTE, 509]
    m.set_memory_rw(PO + 0x20003000, 3)  # 6.1: D was kept, so back to same_prot
    assert key not in m.policy.st[1] and key not in m.t1
    assert m.leaf(PO + 0x20003000) == (2, 0x20000000 | LARGE)
    c = m.counters
    assert (c.merge_2m, c.collapse_2m, c.all_merges, c.tables_freed) == (1, 0, 1, 1)
    assert counts(m) == (0, 512, 0)
    assert c.flush_all_merge == 1


def test_rfc_merge_cascades_through_the_parent_count():
    m = space("nr-same-prot", version="6.1")
    t3, i3 = m._table((PO + 0x40000000) & M48, 3)
    t3[i3] = 0x40000000 | LARGE
    m.counters.dpc1g = 1
    seen = []
    m.flush_hook = lambda kind, *a: seen.append(kind)
    m.set_memory_ro(PO + 0x40203000, 1)  # 1G split, then 2M split
    assert m.policy.st[2] == {k3(PO + 0x40000000): [LARGE, 511]}  # the PMD entry became a pointer
    assert m.policy.st[1] == {k2(PO + 0x40200000): [KPTE, 511]}
    seen.clear()
    fa = m.counters.flush_all
    m.set_memory_rw(PO + 0x40203000, 1)
    assert m.leaf(PO + 0x40203000) == (3, 0x40000000 | LARGE)
    assert m.policy.st == {1: {}, 2: {}}
    c = m.counters
    assert (c.merge_2m, c.merge_1g, c.tables_freed) == (1, 1, 2) and counts(m) == (0, 0, 1)
    # one full flush per merged table, inside the PTE write; then cpa_flush of the 1-page call
    assert seen == ["all", "all", "range"] and c.flush_all_merge == 2 and c.flush_all == fa + 2


def test_rfc_rebaselines_at_zero():
    m = space("nr-same-prot")
    pol = m.policy
    t = pte_table(m, PO + 0x20000000, 0x20000000)
    key = k2(PO + 0x20000000)
    ro = KPTE & ~2
    t[1] = 0x20001000 | 0x8000000000000023  # a third protection on one entry (not entry 0)
    pol.st[1][key] = [ro, 1]  # as if one entry (5) were the last with same_prot
    old = t[5]
    t[5] = 0x20005000 | KPTE  # the write happened; adjust is told after
    pol.adjust(1, key, t, 5, 0x20005000 | ro, old)
    # leaving same_prot took the count to 0: re-baseline on entry 0 (KPTE), recount: 511
    assert pol.st[1][key] == [KPTE, 511] and m.counters.all_merges == 0


def test_rfc_no_merge_for_non_present_or_pointer_same_prot():
    m = space("nr-same-prot")
    pol = m.policy
    np_ = KPTE & ~0x101  # not present (and PROTNONE cleared)
    t = pte_table(m, PO + 0x20000000, 0x20000000, np_)
    key = k2(PO + 0x20000000)
    t[9] = 0x20009000 | KPTE
    pol.st[1][key] = [np_, 511]
    m.write(1, key, t, 9, 0x20009000 | np_)
    assert pol.st[1][key] == [np_, 512] and key in m.t1 and m.counters.all_merges == 0
    # a PMD table whose same_prot is a table pointer (no PSE): never merged
    t2, _ = m._table((PO + 0x40000000) & M48, 2)
    for k in range(512):
        t2[k] = (0x1000000 + 4096 * k) | 0x63
    key2 = k3(PO + 0x40000000)
    t2[4] = 0
    pol.st[2][key2] = [0x63, 511]
    m.write(2, key2, t2, 4, 0x1004000 | 0x63)
    assert pol.st[2][key2] == [0x63, 512] and key2 in m.t2 and m.counters.all_merges == 0


def test_rfc_untracked_tables_and_levels():
    m = space("nr-same-prot")
    pol = m.policy
    t = pte_table(m, PO + 0x20000000, 0x20000000)
    m.write(1, k2(PO + 0x20000000), t, 0, t[0])  # not born from a split: nothing tracked
    t3, i3 = m._table((PO + 0x40000000) & M48, 3)
    m.write(3, k3(PO + 0x40000000) >> 9, t3, i3, 0x40000000 | LARGE)  # a PUD write: no count
    assert pol.st == {1: {}, 2: {}}
    assert pol.recount(1, k2(PO + 0x20000000)) is None and pol.recount(3, 0) is None
    pol.st[1][5] = [KPTE, 512]
    pol.forget(1, 5)
    pol.forget(1, 5)  # unknown: ignored
    pol.forget(2, 6)
    assert pol.st == {1: {}, 2: {}}


def test_rfc_recount_sees_a_write_behind_its_back():
    m = space("nr-same-prot")
    pol = m.policy
    t = pte_table(m, PO + 0x20000000, 0x20000000)
    key = k2(PO + 0x20000000)
    pol.new_table(1, key, t, KPTE)
    assert pol.st[1][key] == [KPTE, 512]
    t[3] &= ~1  # kfence's set_pte: CPA is not told
    assert pol.recount(1, key) == (512, 511)
    pmd = pmd_leaves(m, PO + 0x40000000, 0x40000000)
    pol.new_table(2, k3(PO + 0x40000000), pmd, LARGE)
    pmd[8] |= 0x1000
    assert pol.recount(2, k3(PO + 0x40000000)) == (512, 511)


def test_rfc_merged_pmd_leaf_keeps_pat_large():
    m = space("nr-same-prot", layout=NOGB)
    pol = m.policy
    t = pte_table(m, PO + 0x20000000, 0x20000000, KPTE | 0x80)  # PAT in 4K form
    key = k2(PO + 0x20000000)
    pol.st[1][key] = [KPTE | 0x80, 511]
    t[2] = 0x20002000 | KPTE  # the one entry without PAT
    m.write(1, key, t, 2, 0x20002000 | KPTE | 0x80)
    assert m.leaf(PO + 0x20000000) == (2, 0x20000000 | 0x1000 | LARGE)


# -- the rest --------------------------------------------------------------------------------------


def test_va_of_a_table_key():
    assert merge._va(k2(PO + 0x40200000), 21) == PO + 0x40200000
    assert merge._va(k3(PO + 0x40000000), 30) == PO + 0x40000000
    assert merge._va(0x40200000 >> 21, 21) == 0x40200000  # low half: no sign extension
    assert merge._va(0x7FFFFFE00000 >> 21, 21) == 0x7FFFFFE00000


def test_make_policy():
    m = space("none")
    for name, cls in (
        ("none", merge.Policy),
        ("upstream", merge.Upstream),
        ("nr-same-prot", merge.NrSameProt),
        ("ideal", merge.Ideal),
    ):
        assert type(merge.make_policy(name, m)) is cls
    with pytest.raises(BadInputError) as e:
        merge.make_policy("greedy", m)
    assert str(e.value) == "unknown merge policy 'greedy' (one of none, upstream, nr-same-prot, ideal)"


def test_flush_and_free_with_nothing_queued_flushes_nothing():
    m = space()
    seen = []
    m.flush_hook = lambda *a: seen.append(a)
    m.policy.flush_and_free()
    assert seen == [] and m.counters.flush_all == 0


def test_pud_collapse_records_both_parent_writes():
    """A PMD collapse writes the PMD entry (level 2), the cascade the PUD entry (level 3): each
    recorded as (table key << 9 | index) << 2 | level."""
    m = space()
    one_region_1g(m)
    m.touched = set()
    m.policy.collapse(PO + 0x40200000, 1)
    assert m.touched == {(k2(PO + 0x40200000) << 2) | 2, (k3(PO + 0x40000000) << 2) | 3}


def test_upstream_first_candidate_is_the_2m_page_of_the_first_address():
    """first & PMD_MASK: a range starting in the second 2M page of a 4M block does not reach
    back to the first one."""
    m = space(layout=NOGB)
    for r in (0x20000000, 0x20200000):
        pte_table(m, PO + r, r)
    m.policy.collapse(PO + 0x20205000, 1)
    assert [m.leaf(PO + r)[0] for r in (0x20000000, 0x20200000)] == [1, 2]
