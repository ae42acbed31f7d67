# SPDX-License-Identifier: GPL-2.0-or-later
"""The large-page steps of CPA (x86pt/cpa/split.py) shown to fail: __should_split_large_page's ten
steps and __split_large_page, each on a small direct map built by hand (one 2M or 1G leaf placed
in an otherwise empty model), with every expected entry, return value and counter written out
from docs/cpa.md §2 (bit values, pgprot_large_2_4k / 4k_2_large, PROTNONE, L1TF inversion),
§4.4 (the steps), §4.5 (the split), §4.6 (static protections) and §5.1/§5.3 (counters) — never
taken from the model's output.

Constants used below (docs/cpa.md §2.2): __PAGE_KERNEL_LARGE = P|RW|A|D|PSE|G|NX =
0x80000000000001E3; a PTE of __PAGE_KERNEL = 0x8000000000000163; _KERNPG_TABLE = 0x63; PAT is bit
7 in a PTE and bit 12 (0x1000) in a large leaf; PTE_PFN_MASK = bits 51:12 = 0x000FFFFFFFFFF000,
the PMD frame mask bits 51:21 = 0x000FFFFFFFE00000.
"""

from __future__ import annotations

from x86pt.cpa import split
from x86pt.cpa.kernel import Call
from x86pt.cpa.layout import KernelImage, Layout
from x86pt.cpa.ops import CpaModel

PO = 0xFFFF888000000000  # PAGE_OFFSET
SKM = 0xFFFFFFFF80000000  # __START_KERNEL_map (phys_base 0)
LARGE = 0x80000000000001E3  # __PAGE_KERNEL_LARGE
LARGE_RO = 0x80000000000001A1  # P|A|PSE|G|NX (RW and D cleared, 6.15)
KPTE = 0x8000000000000163  # __PAGE_KERNEL in a PTE
PFN52 = 0x000FFFFFFFFFF000
PMD52 = 0x000FFFFFFFE00000
# The kernel image: rodata starts 1 MiB into the 2M page at 32 MiB, so that large page is half
# rodata; text ends 3 pages into the 2M page at 30 MiB.
IMG = KernelImage(
    text=0x1000000,
    etext=0x1E03000,
    start_rodata=0x2100000,
    end_rodata=0x2A13000,
    end_rodata_hpage_align=0x2C00000,
    sdata=0x2C00000,
    init_begin=0x3373000,
    init_end=0x37BA000,
    brk_end=0x3E3F000,
)
LAY = Layout("hand-6g", ((0x0, 0x180000000),), kernel=IMG)


def space(version="6.15", policy="none", l1tf=False, ro=False):
    """An empty, running model of 6 GiB of RAM: nothing is mapped until a test places a leaf."""
    m = CpaModel(LAY, version, policy, boot=False)
    m._set_ram([(0, 0x180000)])
    m.l1tf_invert = l1tf
    m.kernel_set_to_readonly = ro
    return m


def place(m, va, level, entry):
    """Write one leaf (level 2: PMD, 3: PUD) mapping va; returns (table, index)."""
    t, i = m._table(va & m.vmask, level)
    t[i] = entry
    m.running = True
    return t, i


def call(set_=0, clr=0, force_split=False):
    return Call(set_, clr, force_split, 0, True, False, False, 0, False)


def pte_at(m, va):
    lvl, t, i = m.lookup(va)
    return lvl, t[i]


# -- __should_split_large_page (docs/cpa.md §4.4) ---------------------------------------------------


def test_force_split_splits_whatever_the_request():
    m = space()
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
    assert split.should_split(m, call(force_split=True), 2, t, i, PO + 0x20000000, 512) == 0  # step 1
    assert m.counters.checked_2m == 0  # before step 2: nothing looked at


def test_sameprot_2m_keeps_the_leaf_and_consumes_to_its_end():
    m = space()
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
    c = call(set_=0x8000000000000000)  # NX: the leaf has it already
    # 0x5000 into the 2M page: 512 - 5 = 507 pages are left in it
    assert split.should_split(m, c, 2, t, i, PO + 0x20005000, 1000) == 507
    assert c.pfn == 0x20005  # the pfn of the address looked at
    assert split.should_split(m, c, 2, t, i, PO + 0x20005000, 507) == 507
    assert split.should_split(m, c, 2, t, i, PO + 0x20005000, 3) == 3
    assert t[i] == 0x20000000 | LARGE and not c.flushtlb
    cn = m.counters
    assert (cn.checked_2m, cn.sameprot_2m, cn.checked_1g, cn.sameprot_1g) == (3, 3, 0, 0)
    assert (cn.preserved_2m, cn.static_conflicts) == (0, 0)


def test_sameprot_1g():
    m = space()
    t, i = place(m, PO + 0x40000000, 3, 0x40000000 | LARGE)
    c = call(set_=0x100)  # G: already set
    # 0x12345000 into the 1G page: 2^18 - 0x12345 pages left
    assert split.should_split(m, c, 3, t, i, PO + 0x52345000, 1 << 20) == (1 << 18) - 0x12345
    assert c.pfn == 0x52345
    cn = m.counters
    assert (cn.checked_1g, cn.sameprot_1g, cn.checked_2m, cn.sameprot_2m) == (1, 1, 0, 0)


def test_partial_coverage_splits():
    m = space()
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
    ro = call(clr=0x42)  # RW|D (set_memory_ro, 6.6+)
    assert split.should_split(m, ro, 2, t, i, PO + 0x20000000, 511) == 0  # from the base, short
    assert split.should_split(m, ro, 2, t, i, PO + 0x20001000, 511) == 0  # to the end, not from base
    assert t[i] == 0x20000000 | LARGE and m.counters.preserved_2m == 0
    assert split.should_split(m, ro, 2, t, i, PO + 0x20000000, 512) == 512  # all of it: rewritten
    assert t[i] == 0x20000000 | LARGE_RO and ro.flushtlb
    assert m.counters.preserved_2m == 1 and m.counters.preserved_1g == 0


def test_whole_1g_rewritten_in_place():
    m = space()
    t, i = place(m, PO + 0x40000000, 3, 0x40000000 | LARGE)
    m.touched = set()
    c = call(clr=0x42)
    assert split.should_split(m, c, 3, t, i, PO + 0x40000000, 1 << 18) == 1 << 18
    assert t[i] == 0x40000000 | LARGE_RO and c.flushtlb
    assert (m.counters.preserved_1g, m.counters.preserved_2m) == (1, 0)
    assert m.counters.entries_written == 1
    _touched_is(m, (3, t, i))


def _touched_is(m, *want):
    """m.touched names exactly the (level, table, index) entries written: each record is
    (key << 9 | index) << 2 | level, key being the table's key (tables.py: t3[va >> 39],
    t2[va >> 30], t1[va >> 21])."""
    got = set()
    for ek in m.touched:
        lvl, k = ek & 3, ek >> 2
        got.add((lvl, id({1: m.t1, 2: m.t2, 3: m.t3}[lvl][k >> 9]), k & 511))
    assert got == {(lvl, id(t), i) for lvl, t, i in want}


def test_rewrite_2m_records_the_written_entry():
    m = space()
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
    m.touched = set()
    assert split.should_split(m, call(clr=0x42), 2, t, i, PO + 0x20000000, 512) == 512
    _touched_is(m, (2, t, i))


def test_pat_large_moves_through_4k_format():
    """A 2M leaf with PAT (bit 12) asked to set PWT: the request is made in 4K format (PAT at bit
    7) and put back (bit 12), frame intact."""
    m = space()
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | 0x1000 | LARGE)
    c = call(set_=0x8)
    assert split.should_split(m, c, 2, t, i, PO + 0x20000000, 512) == 512
    assert t[i] == 0x20000000 | 0x1000 | 0x8 | LARGE
    assert c.pfn == 0x20000
    # PAT already set in 4K format: the same protection, kept
    assert split.should_split(m, call(set_=0x80), 2, t, i, PO + 0x20000000, 512) == 512
    assert m.counters.sameprot_2m == 1


def test_non_present_rewrite_clears_pse_and_protnone():
    """set_memory_np on a whole 2M leaf: P cleared; not present, so no PSE and G (PROTNONE) cleared:
    0x80000000000001E3 -> 0x8000000000000062 (frame kept)."""
    m = space()
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
    assert split.should_split(m, call(clr=0x1), 2, t, i, PO + 0x20000000, 512) == 512
    assert t[i] == 0x20000000 | 0x8000000000000062
    # ... and back: present again, PSE added, G not restored (docs/cpa.md §2.4)
    c = call(set_=0x1)
    assert split.should_split(m, c, 2, t, i, PO + 0x20000000, 512) == 512
    assert t[i] == 0x20000000 | 0x80000000000000E3 and c.pfn == 0x20000


def test_l1tf_non_present_leaf_frame_is_inverted_and_undone():
    m = space(l1tf=True)
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
    assert split.should_split(m, call(clr=0x1), 2, t, i, PO + 0x20000000, 512) == 512
    inv = ~0x20000000 & PFN52  # pfn_pmd of a non-present prot stores the frame inverted
    assert t[i] == inv | 0x8000000000000062
    c = call(set_=0x1)
    assert split.should_split(m, c, 2, t, i, PO + 0x20005000, 507) == 0  # partial: split
    assert c.pfn == 0x20005  # pmd_pfn undid the inversion
    assert split.should_split(m, c, 2, t, i, PO + 0x20000000, 512) == 512
    assert t[i] == 0x20000000 | 0x80000000000000E3 and c.pfn == 0x20000


def test_l1tf_off_non_present_frame_is_stored_as_is():
    m = space(l1tf=False)
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | 0x8000000000000062)
    c = call(set_=0x1)
    assert split.should_split(m, c, 2, t, i, PO + 0x20003000, 1) == 0
    assert c.pfn == 0x20003


def test_l1tf_prot_zero_is_not_inverted():
    """Clearing every flag leaves prot 0: pfn_pte inverts only a non-zero non-present value."""
    m = space(l1tf=True)
    t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
    assert split.should_split(m, call(clr=0x8000000000000FFF), 2, t, i, PO + 0x20000000, 512) == 512
    assert t[i] == 0x20000000


def test_old_prot_breaking_static_protections_forces_a_split():
    """An RW 2M leaf whose second half is rodata (PFNs 0x2100..0x21ff), after mark_rodata_ro: step
    5 sets force_static_prot and splits; the split fixes each 4K child (§4.5)."""
    m = space(ro=True)
    t, i = place(m, PO + 0x2000000, 2, 0x2000000 | LARGE)
    c = call(set_=0x8000000000000000)  # NX: same prot, but step 5 comes first
    assert split.should_split(m, c, 2, t, i, PO + 0x2000000, 512) == 0
    assert c.force_static_prot and m.counters.static_conflicts == 1 and m.counters.sameprot_2m == 0
    split.split_large_page(m, c, 2, t, i, PO + 0x2005000)
    kids = m.t1[((PO + 0x2000000) & m.vmask) >> 21]
    want = [(0x2000000 + 4096 * k) | (KPTE if k < 256 else KPTE & ~2) for k in range(512)]
    assert list(kids) == want


def test_old_prot_outside_rodata_is_no_conflict():
    """The 2M page just below rodata (PFNs 0x1e00..0x1fff) is not in conflict."""
    m = space(ro=True)
    t, i = place(m, PO + 0x1E00000, 2, 0x1E00000 | LARGE)
    c = call(set_=0x8000000000000000)
    assert split.should_split(m, c, 2, t, i, PO + 0x1E00000, 512) == 512
    assert not c.force_static_prot and m.counters.static_conflicts == 0


def test_request_a_static_protection_forbids_splits():
    """Step 9: set_memory_rw on the whole half-rodata 2M page, already RO: the static protections
    take RW away from the request, so it is not rewritten in place but split."""
    m = space(ro=True)
    t, i = place(m, PO + 0x2000000, 2, 0x2000000 | LARGE_RO)
    c = call(set_=0x2)
    assert split.should_split(m, c, 2, t, i, PO + 0x2000000, 512) == 0
    assert not c.force_static_prot and m.counters.static_conflicts == 0
    assert t[i] == 0x2000000 | LARGE_RO and m.counters.preserved_2m == 0


def test_wx_warning_on_whole_leaf_rewrite():
    """verify_rwx (6.2+): set_memory_x on an RW leaf leaves RW=1, NX=0: one warning; 6.1 none."""
    for version, warned in (("6.15", 1), ("6.1", 0)):
        m = space(version)
        t, i = place(m, PO + 0x20000000, 2, 0x20000000 | LARGE)
        assert split.should_split(m, call(clr=0x8000000000000000), 2, t, i, PO + 0x20000000, 512) == 512
        assert t[i] == 0x20000000 | 0x1E3
        assert m.counters.wx_warnings == warned


def test_highmap_text_end_split_with_static_fixup():
    """The highmap 2M page at 30 MiB holds the last 3 text pages: NX is forbidden there (step 5
    conflict), and the fixed-up children are executable exactly for those 3 pages."""
    m = space()
    va = SKM + 0x1E00000
    t, i = place(m, va, 2, 0x1E00000 | LARGE)
    c = call(clr=0x2)
    assert split.should_split(m, c, 2, t, i, va + 0x7000, 1) == 0
    assert c.force_static_prot and m.counters.static_conflicts == 1
    split.split_large_page(m, c, 2, t, i, va + 0x7000)
    kids = list(m.t1[(va & m.vmask) >> 21])
    assert kids == [(0x1E00000 + 4096 * k) | (KPTE & ~(1 << 63) if k < 3 else KPTE) for k in range(512)]


# -- __split_large_page (docs/cpa.md §4.5) ----------------------------------------------------------


def test_split_2m_children_pat_moves_to_bit_7():
    m = space()
    va = PO + 0x20000000
    t, i = place(m, va, 2, 0x20000000 | 0x1000 | LARGE)
    m.counters.dpc2m = 1
    m.touched = set()
    split.split_large_page(m, call(), 2, t, i, va + 0x3000)
    kids = m.t1[(va & m.vmask) >> 21]
    assert list(kids) == [(0x20000000 + 4096 * k) | 0x80000000000001E3 for k in range(512)]
    pa = t[i] & PFN52
    assert t[i] == pa | 0x63 and pa  # the parent: a table page from the pool, _KERNPG_TABLE
    assert pte_at(m, va + 0x5000) == (1, 0x20005000 | 0x80000000000001E3)
    cn = m.counters
    assert (cn.dpc2m, cn.dpc4k, cn.split_2m, cn.split_1g) == (0, 512, 1, 0)
    assert (cn.tables_allocated, cn.all_splits, cn.flush_all, cn.flush_all_split) == (1, 1, 1, 1)
    _touched_is(m, (2, t, i))


def test_split_1g_children_keep_the_pud_prot():
    m = space()
    va = PO + 0x40000000
    t, i = place(m, va, 3, 0x40000000 | 0x1000 | LARGE)
    m.counters.dpc1g = 2
    m.touched = set()
    split.split_large_page(m, call(), 3, t, i, va + 0x12345000)
    kids = m.t2[(va & m.vmask) >> 30]
    assert list(kids) == [(0x40000000 + (k << 21)) | 0x1000 | LARGE for k in range(512)]
    assert t[i] & 0xFFF == 0x63 and (t[i] & PFN52) % 4096 == 0
    assert pte_at(m, va + 0x12345000) == (2, 0x52200000 | 0x1000 | LARGE)
    cn = m.counters
    assert (cn.dpc1g, cn.dpc2m, cn.split_1g, cn.split_2m) == (1, 512, 1, 0)
    _touched_is(m, (3, t, i))


def test_split_not_counted_before_running_nor_when_count_is_zero():
    m = space()
    va = PO + 0x20000000
    t, i = place(m, va, 2, 0x20000000 | LARGE)
    m.running = False
    m.counters.dpc2m = 1
    split.split_large_page(m, call(), 2, t, i, va)
    assert (m.counters.dpc2m, m.counters.dpc4k, m.counters.split_2m) == (0, 512, 0)


def test_split_outside_the_direct_map_is_not_counted():
    """A huge vmalloc leaf (not virt_addr_valid): direct_pages_count does not move."""
    m = space()
    va = 0xFFFFC90000200000
    t, i = place(m, va, 2, 0x20000000 | LARGE)
    m.counters.dpc2m = 5
    split.split_large_page(m, call(), 2, t, i, va)
    assert (m.counters.dpc2m, m.counters.dpc4k, m.counters.split_2m) == (5, 0, 0)
    assert m.counters.all_splits == 1
    assert pte_at(m, va + 0x1000) == (1, 0x20001000 | KPTE)


def test_split_non_present_2m_clears_protnone():
    """A non-present 2M leaf (no PSE, G = PROTNONE still set by hand): PTE children keep the
    frame run and the flags without G."""
    m = space()
    va = PO + 0x20000000
    t, i = place(m, va, 2, 0x20000000 | 0x8000000000000162)
    split.split_large_page(m, call(), 2, t, i, va)
    kids = m.t1[(va & m.vmask) >> 21]
    assert list(kids) == [(0x20000000 + 4096 * k) | 0x8000000000000062 for k in range(512)]


def test_split_non_present_2m_l1tf_children_inverted():
    m = space(l1tf=True)
    va = PO + 0x20000000
    t, i = place(m, va, 2, (~0x20000000 & PFN52) | 0x8000000000000062)
    split.split_large_page(m, call(), 2, t, i, va)
    kids = m.t1[(va & m.vmask) >> 21]
    assert list(kids) == [(~(0x20000000 + 4096 * k) & PFN52) | 0x8000000000000062 for k in range(512)]


def test_split_present_2m_l1tf_not_inverted():
    m = space(l1tf=True)
    va = PO + 0x20000000
    t, i = place(m, va, 2, 0x20000000 | LARGE)
    split.split_large_page(m, call(), 2, t, i, va)
    assert list(m.t1[(va & m.vmask) >> 21]) == [(0x20000000 + 4096 * k) | KPTE for k in range(512)]


def test_split_zero_prot_leaf_l1tf_children_plain():
    """A leaf holding only a (stored inverted) frame: prot 0, so pfn_pte stores plain frames."""
    m = space(l1tf=True)
    va = PO + 0x20000000
    t, i = place(m, va, 2, ~0x20000000 & PFN52)
    split.split_large_page(m, call(), 2, t, i, va)
    assert list(m.t1[(va & m.vmask) >> 21]) == [0x20000000 + 4096 * k for k in range(512)]


def test_split_non_present_1g_drops_pse():
    m = space()
    va = PO + 0x40000000
    t, i = place(m, va, 3, 0x40000000 | 0x80000000000001E2)  # PSE and G kept by hand, P clear
    split.split_large_page(m, call(), 3, t, i, va)
    kids = m.t2[(va & m.vmask) >> 30]
    assert list(kids) == [(0x40000000 + (k << 21)) | 0x8000000000000062 for k in range(512)]


def test_split_non_present_1g_l1tf():
    """A non-present PUD with PSE, as pfn_pud stores it (frame inverted under the PUD mask, bits
    51:30 = 0x000FFFFFC0000000): pud_pfn undoes the inversion; pfn_pmd stores each child's frame
    inverted under the PMD mask."""
    m = space(l1tf=True)
    va = PO + 0x40000000
    t, i = place(m, va, 3, (~0x40000000 & 0x000FFFFFC0000000) | 0x80000000000000E2)
    split.split_large_page(m, call(), 3, t, i, va)
    kids = m.t2[(va & m.vmask) >> 30]
    assert list(kids) == [(~(0x40000000 + (k << 21)) & PMD52) | 0x8000000000000062 for k in range(512)]


def test_split_non_present_1g_without_pse_l1tf():
    """Without PSE the PUD's frame mask is the PTE's (bit 12 on)."""
    m = space(l1tf=True)
    va = PO + 0x40000000
    t, i = place(m, va, 3, (~0x40000000 & PFN52) | 0x8000000000000062)
    split.split_large_page(m, call(), 3, t, i, va)
    kids = m.t2[(va & m.vmask) >> 30]
    # base = ~old & PTE mask = 0x40000000; the children: frames 2M apart, stored inverted (PMD mask)
    assert list(kids) == [(~(0x40000000 + (k << 21)) & PMD52) | 0x8000000000000062 for k in range(512)]


def test_pud_split_is_never_fixed_up():
    """force_static_prot on a 1G split: the 2M children inherit the PUD prot unchanged, rodata
    included ("Cannot fixup static protections for PUD split")."""
    m = space(ro=True)
    va = PO
    t, i = place(m, va, 3, 0x0 | LARGE)
    c = call(clr=0x8000000000000000)
    assert split.should_split(m, c, 3, t, i, va + 0x2000000, 1) == 0
    assert c.force_static_prot and m.counters.static_conflicts == 1
    split.split_large_page(m, c, 3, t, i, va + 0x2000000)
    assert list(m.t2[(va & m.vmask) >> 30]) == [(k << 21) | LARGE for k in range(512)]


def test_split_tells_nr_same_prot_the_reference():
    for level, va, frame in ((2, PO + 0x20000000, 0x20000000), (3, PO + 0x40000000, 0x40000000)):
        m = space(policy="nr-same-prot")
        t, i = place(m, va, level, frame | 0x1000 | LARGE)
        split.split_large_page(m, call(), level, t, i, va)
        if level == 2:
            assert m.policy.st == {1: {(va & m.vmask) >> 21: [KPTE | 0x80, 512]}, 2: {}}
        else:
            assert m.policy.st == {1: {}, 2: {(va & m.vmask) >> 30: [0x1000 | LARGE, 512]}}


def test_split_flush_hook_sees_the_new_table():
    m = space()
    va = PO + 0x20000000
    t, i = place(m, va, 2, 0x20000000 | LARGE)
    seen = []
    m.flush_hook = lambda kind, *a: seen.append((kind, a, t[i] & 0xFFF, pte_at(m, va + 0x1000)))
    split.split_large_page(m, call(), 2, t, i, va)
    assert seen == [("all", (), 0x63, (1, 0x20001000 | KPTE))]


def test_split_then_retry_through_the_model():
    """The model's own loop (§4.4 last line): set_memory_ro of one page in a 1G leaf splits twice
    and then changes exactly that PTE."""
    m = space()
    place(m, PO + 0x40000000, 3, 0x40000000 | LARGE)
    m.counters.dpc1g = 1
    assert m.set_memory_ro(PO + 0x40201000, 1) == 0
    assert pte_at(m, PO + 0x40201000) == (1, 0x40201000 | 0x8000000000000121)
    assert pte_at(m, PO + 0x40202000) == (1, 0x40202000 | KPTE)
    assert pte_at(m, PO + 0x40400000) == (2, 0x40400000 | LARGE)
    cn = m.counters
    assert (cn.dpc1g, cn.dpc2m, cn.dpc4k) == (0, 511, 512)
    assert (cn.split_1g, cn.split_2m, cn.tables_allocated) == (1, 1, 2)


def test_each_split_takes_its_own_table_page():
    m = space()
    va = PO + 0x40000000
    t, i = place(m, va, 3, 0x40000000 | LARGE)
    split.split_large_page(m, call(), 3, t, i, va)
    t2 = m.t2[(va & m.vmask) >> 30]
    split.split_large_page(m, call(), 2, t2, 0, va)
    assert t2[0] & 0xFFF == 0x63 and t2[0] & PFN52 != t[i] & PFN52
    assert m.pool.in_use == 1 + 1 + 2  # the PGD, the PUD table placed, one page per split


def test_text_ro_spares_a_request_covering_one_whole_large_page():
    """protect_kernel_text_ro (§4.6) forbids RW in [_text, __end_rodata_hpage_align) mapped large
    after mark_rodata_ro, unless the range is exactly one aligned large page: steps 5 and 8 look
    at the whole large page, so an RW text leaf (executable: 0x1E3) is neither a step-5 conflict
    nor kept from a whole-leaf rewrite."""
    m = space(ro=True)
    va = SKM + 0x1200000  # inside [_text, _etext)
    t, i = place(m, va, 2, 0x1200000 | 0x1E3)
    c = call(set_=0x100)  # G: the same protection
    assert split.should_split(m, c, 2, t, i, va, 1) == 1
    assert not c.force_static_prot and m.counters.static_conflicts == 0
    c = call(clr=0x100)  # nonglobal, the whole leaf
    assert split.should_split(m, c, 2, t, i, va, 512) == 512
    assert t[i] == 0x1200000 | 0xE3 and m.counters.preserved_2m == 1


def test_counters_add_up():
    """Each counter counts every event, not just the last one (x86/cpa_stats, §5.3)."""
    m = space(ro=True)
    t, i = place(m, PO + 0x40000000, 3, 0x40000000 | LARGE)
    for _ in range(2):
        split.should_split(m, call(set_=0x100), 3, t, i, PO + 0x40000000, 1)
    for clr in (0x42, 0x100):
        assert split.should_split(m, call(clr=clr), 3, t, i, PO + 0x40000000, 1 << 18) == 1 << 18
    cn = m.counters
    assert (cn.checked_1g, cn.sameprot_1g, cn.preserved_1g) == (4, 2, 2)
    t2, i2 = place(m, PO + 0x2000000, 2, 0x2000000 | LARGE)  # half rodata: a step-5 conflict
    for _ in range(3):
        assert split.should_split(m, call(set_=0x100), 2, t2, i2, PO + 0x2000000, 1) == 0
    assert m.counters.static_conflicts == 3
