# SPDX-License-Identifier: GPL-2.0-or-later
"""The CPA validator (x86pt/cpa/validate.py) shown to fail, and to say so in the right words: each
invariant of docs/cpa.md §9 is broken on purpose behind the model's back (a PTE's frame, a flag, the
present bit, a table pointer's RW/NX, direct_pages_count, an nr_same_prot count, a merge undoing
set_memory_4k) on a small direct map, and the violation is expected at the op that next touches the
damage, with the invariant, the page and the two values written out by hand: frames are va -
PAGE_OFFSET (§9 (a)), flags the kernel's constants (__PAGE_KERNEL = 0x8000000000000163, the RO
form without RW|D = ...121 on 6.6+, _KERNPG_TABLE = 0x63), never taken from the validator.
"""

from __future__ import annotations

from x86pt.cpa.layout import Layout
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.trace import parse_trace, replay
from x86pt.cpa.validate import Validator, Violation

PO = 0xFFFF888000000000
# RAM 1M..64M (2M leaves above 2M; the kernel image at 16M..62M) and 1G..2G (one 1G leaf)
LAY = Layout("hand-small", ((0x0, 0x9F000), (0x100000, 0x4000000), (0x40000000, 0x80000000)))
KPTE = 0x8000000000000163
RO = 0x8000000000000121


def run(lines, damage=None, after=1, policy="none", version="6.15", checks="abcd", model=None):
    """Replay `lines` validated; `damage(m)` runs after the first `after` ops."""
    m = model or CpaModel(LAY, version, policy)
    kw = {}
    if damage is not None:
        kw = {"checkpoints": frozenset({after}), "on_checkpoint": lambda mm, done: damage(mm)}
    r = replay(m, parse_trace(lines), validate=True, samples=0, checks=checks, **kw)
    return m, r.violation


def pte_table(m, va):
    lvl, t, i = m.lookup(va)
    assert lvl == 1
    return t


def test_violation_text():
    v = Violation(3, "b", "something")
    assert str(v) == "op 3: invariant (b) violated: something"


def test_clean_ops_pass():
    _, v = run([f"set_memory_ro {PO + 0x601000:#x} 1", f"set_memory_rw {PO + 0x601000:#x} 1"])
    assert v is None


def test_a_wrong_frame():
    def damage(m):
        pte_table(m, PO + 0x600000)[2] += 0x1000  # page 0x602000 now maps 0x603000

    _, v = run([f"set_memory_ro {PO + 0x601000:#x} 1", f"set_memory_ro {PO + 0x605000:#x} 1"], damage)
    assert (v.op_index, v.invariant) == (1, "a")
    assert v.message == "direct-map page 0xffff888000602000 now maps frame 0x603000, not 0x602000"


def test_b_wrong_flags():
    def damage(m):
        pte_table(m, PO + 0x600000)[2] &= ~(1 << 63)  # NX lost

    _, v = run([f"set_memory_ro {PO + 0x601000:#x} 1", f"set_memory_ro {PO + 0x605000:#x} 1"], damage)
    assert (v.op_index, v.invariant) == (1, "b")
    assert v.message == (
        "translation of 0xffff888000602000: tables give frame 0x602000 flags 0x163 (P|RW|A|D|G), "
        "the op sequence asks for frame 0x602000 flags 0x8000000000000163 (P|RW|A|D|G|NX)"
    )


def test_b_present_bit():
    def damage(m):
        pte_table(m, PO + 0x600000)[2] &= ~1

    _, v = run([f"set_memory_ro {PO + 0x601000:#x} 1", f"set_memory_ro {PO + 0x605000:#x} 1"], damage)
    assert (v.op_index, v.invariant) == (1, "b")
    assert v.message == (
        "present bit of 0xffff888000602000: tables give frame 0x602000 flags 0x8000000000000162 "
        "(RW|A|D|G|NX), the op sequence asks for frame 0x602000 flags 0x8000000000000163 (P|RW|A|D|G|NX)"
    )


def test_checks_subset_a_only_ignores_flags():
    def damage(m):
        pte_table(m, PO + 0x600000)[2] &= ~(1 << 63)

    _, v = run(
        [f"set_memory_ro {PO + 0x601000:#x} 1", f"set_memory_ro {PO + 0x605000:#x} 1"], damage, checks="a"
    )
    assert v is None


def test_c_counter_drift():
    seen = {}

    def damage(m):
        c = m.counters
        seen["want"] = (c.dpc4k, c.dpc2m, c.dpc1g)
        seen["h"] = m.highmap_pte_tables()
        c.dpc4k += 1

    _, v = run([f"set_memory_ro {PO + 0x601000:#x} 1", f"set_memory_ro {PO + 0x605000:#x} 1"], damage)
    k4, m2, g1 = seen["want"]
    assert (v.op_index, v.invariant) == (1, "c")
    assert v.message == (
        f"direct_pages_count 4k/2M/1G = {(k4 + 1, m2, g1)} but the tables hold {(k4, m2, g1)} "
        f"(census incl. {seen['h']} highmap PTE tables)"
    )


def test_d_nr_same_prot_drift_from_an_oob_write():
    """kfence's write behind CPA's back (docs/cpa.md §7.3): the split table's count says 511 (one
    page made RO), a recount after the out-of-band P clear finds 510."""
    _, v = run(
        [f"set_memory_ro {PO + 0x601000:#x} 1", f"oob {PO + 0x602000:#x} set=0x0 clr=0x1"],
        policy="nr-same-prot",
    )
    assert (v.op_index, v.invariant) == (1, "d")
    assert v.message == "nr_same_prot of the PTE table for 0xffff888000600000 is 511 but a recount gives 510"


def test_d_only_with_d_in_checks():
    _, v = run(
        [f"set_memory_ro {PO + 0x601000:#x} 1", f"oob {PO + 0x602000:#x} set=0x0 clr=0x1"],
        policy="nr-same-prot",
        checks="abc",
    )
    assert v is None


def _split_then_restrict(mask_clear=0, mask_set=0, checks="abcd"):
    """Validator.check after a split whose new PMD pointer is then damaged (RW cleared / NX set)."""
    m = CpaModel(LAY, "6.15", "none")
    val = Validator(m, checks)
    op = parse_trace([f"set_memory_ro {PO + 0x601000:#x} 1"])[0]
    m.touched = set()
    res = m.set_memory_ro(PO + 0x601000, 1)
    v = (PO + 0x600000) & ((1 << 48) - 1)
    t2 = m.t2[v >> 30]
    ptr = t2[(v >> 21) & 511]
    assert ptr & 0xFFF == 0x63
    t2[(v >> 21) & 511] = (ptr & ~mask_clear) | mask_set
    return val.check(0, op, res, m.touched), ptr


def test_b_table_pointer_without_rw():
    v, ptr = _split_then_restrict(mask_clear=2)
    assert (v.op_index, v.invariant) == (0, "b")
    # the first page the restriction changes: the region's first page, present and writable
    assert v.message == (
        f"page 0xffff888000600000: the PMD entry for 0xffff888000600000 points to a table with "
        f"RW=0 NX=0 ({(ptr & ~2):#x}): it restricts every page below it"
    )


def test_b_table_pointer_with_nx_over_nx_pages():
    """NX on the pointer over pages that are all NX already: no page is named."""
    v, ptr = _split_then_restrict(mask_set=1 << 63)
    assert v.invariant == "b"
    assert v.message == (
        f"PMD entry for 0xffff888000600000 points to a table with RW=1 NX=1 ({ptr | 1 << 63:#x}): "
        "it restricts every page below it"
    )


def test_table_pointer_check_needs_b():
    v, _ = _split_then_restrict(mask_clear=2, checks="acd")
    assert v is None


def test_oob_finding_no_pte_after_set_memory_4k():
    def damage(m):
        # a merge undoing set_memory_4k: the 2M leaf back in place of the PTE table
        v = (PO + 0x600000) & ((1 << 48) - 1)
        m.t2[v >> 30][(v >> 21) & 511] = 0x600000 | 0x80000000000009E3
        del m.t1[v >> 21]

    _, v = run([f"set_memory_4k {PO + 0x601000:#x} 1", f"oob {PO + 0x601000:#x} set=0x0 clr=0x1"], damage)
    assert (v.op_index, v.invariant) == (1, "b")
    assert v.message == (
        "out-of-band write to 0xffff888000601000 found no 4K PTE although set_memory_4k "
        "was asked for that page (a merge undid it)"
    )


def test_a_after_hotplug_page_by_page():
    """After a hot-plug event the regions are compared page by page (§9), only what the op
    touched: damage on the page the next op changes is found there, in the added memory."""

    def damage(m):
        pte_table(m, PO + 0x80000000)[5] += 0x1000

    _, v = run(
        [
            "memory_add 0x80000000 0x8000000",
            f"set_memory_ro {PO + 0x80001000:#x} 1",
            f"set_memory_ro {PO + 0x80005000:#x} 1",
        ],
        damage,
        after=2,
    )
    assert (v.op_index, v.invariant) == (2, "a")
    assert v.message == "direct-map page 0xffff888080005000 now maps frame 0x80006000, not 0x80005000"


def test_b_after_hotplug_flags():
    def damage(m):
        pte_table(m, PO + 0x600000)[5] &= ~(1 << 63)

    _, v = run(
        [
            "memory_add 0x80000000 0x8000000",
            f"set_memory_ro {PO + 0x601000:#x} 1",
            f"set_memory_ro {PO + 0x605000:#x} 1",
        ],
        damage,
        after=2,
    )
    assert (v.op_index, v.invariant) == (2, "b")
    assert v.message == (
        "translation of 0xffff888000605000: tables give frame 0x605000 flags 0x121 (P|A|G), "
        "the op sequence asks for frame 0x605000 flags 0x8000000000000121 (P|A|G|NX)"
    )


def test_hotplug_add_remove_clean():
    _, v = run(
        [
            "memory_add 0x80000000 0x8000000",
            f"set_memory_ro {PO + 0x80001000:#x} 1",
            f"set_memory_ro {PO + 0x80000000:#x} 1",  # the first page of the added block
            f"set_memory_ro {PO + 0x88000000:#x} 1",  # the first page past it: not mapped
            "memory_remove 0x80000000 0x8000000",
            f"set_memory_ro {PO + 0x601000:#x} 1",
            "memory_add 0x80000000 0x8000000",
            f"set_memory_np {PO + 0x80200000:#x} 512",
        ]
    )
    assert v is None


def test_1g_split_damage_found_2m_by_2m():
    """A 1G split writes the PUD entry: the whole gigabyte is compared; a 2M leaf of the new PMD
    table with a wrong frame is found (slot 100: 1G + 200M)."""
    m = CpaModel(LAY, "6.15", "none")
    val = Validator(m)
    op = parse_trace([f"set_memory_ro {PO + 0x40001000:#x} 1"])[0]
    m.touched = set()
    res = m.set_memory_ro(PO + 0x40001000, 1)
    v = (PO + 0x40000000) & ((1 << 48) - 1)
    t2 = m.t2[v >> 30]
    assert t2[100] == (0x40000000 + (100 << 21)) | 0x80000000000001E3
    t2[100] += 1 << 21
    r = val.check(0, op, res, m.touched)
    assert (r.op_index, r.invariant) == (0, "a")
    assert r.message == "direct-map page 0xffff88804c800000 now maps frame 0x4ca00000, not 0x4c800000"


VM = 0xFFFFFFFFC0400000  # module area
SKM = 0xFFFFFFFF80000000


def every_op_kind(version):
    """One trace with every op kind of the trace format, on direct-map, vmalloc and kernel-image
    pages (text at 16M, rodata from 32M, the kernel image ending at 62M), with aliases."""
    return [
        f"vmap {VM:#x} 0x601000 3",
        f"set_memory_ro {VM:#x} 2",
        f"set_memory_x {VM:#x} 1",
        f"set_memory_nx {VM:#x} 1",
        f"set_memory_rw {VM:#x} 2",
        f"set_memory_rox {VM + 0x1000:#x} 2",
        f"set_memory_np {PO + 0x800000:#x} 3",
        f"set_memory_p {PO + 0x800000:#x} 2",
        f"set_memory_np_noalias {PO + 0x801000:#x} 1",
        f"set_memory_4k {PO + 0xA00000:#x} 2",
        f"oob {PO + 0xA01000:#x} set=0x0 clr=0x1",
        f"oob {PO + 0xA01000:#x} set=0x1 clr=0x0",
        f"set_memory_global {PO + 0xA00000:#x} 1",
        f"set_memory_nonglobal {PO + 0xA00000:#x} 3",
        f"set_direct_map_invalid_noflush {PO + 0xC00000:#x}",
        f"set_direct_map_default_noflush {PO + 0xC00000:#x}",
        f"kernel_map_pages {PO + 0xC02000:#x} 2 0",
        f"kernel_map_pages {PO + 0xC02000:#x} 1 1",
        f"cpa {PO + 0xE00000:#x} 4 set=0x0 clr=0x2",
        f"cpa {PO + 0xE04000:#x} 2 set=0x0 clr=0x2 alias",
        f"cpa {PO + 0xE06000:#x} 1 set=0x800 clr=0x0 force_split",
        f"cpa {PO + 0x1000000:#x} 1 set=0x0 clr=0x0",
        f"set_memory_rw {PO + 0x2001000:#x} 1",  # rodata: stays RO
        f"set_memory_nx {SKM + 0x1001000:#x} 1",  # text: stays executable
        f"set_memory_ro {PO + 0x40000000 + 0x5000:#x} 1",  # in the 1G leaf
        f"set_memory_np {PO + 0x40200000:#x} 512",
        f"set_memory_p {PO + 0x40200000:#x} 512",
        f"set_memory_np {VM + 0x2000:#x} 1",  # the alias loses P, and G with it
        f"set_memory_p {VM + 0x2000:#x} 1",
        f"vunmap {VM:#x} 3",
        "memory_add 0x80000000 0x8000000",
        f"set_memory_ro {PO + 0x80001000:#x} 1",
        f"set_memory_np {PO + 0x80200000:#x} 512",
        "memory_remove 0x80200000 0x200000",
        f"set_memory_rw {PO + 0x80001000:#x} 1",
        f"set_memory_ro {PO + 0x601000:#x} 1",
    ]


def test_every_op_kind_passes_on_every_kernel_and_encoding():
    for version in ("6.1", "6.6", "6.15"):
        for policy in ("none", "ideal"):
            for l1tf in (False, True):
                m = CpaModel(LAY, version, policy)
                m.l1tf_invert = l1tf
                _, v = run(every_op_kind(version), model=m)
                assert v is None, (version, policy, l1tf, v)


def k2_of(va):
    return (va & ((1 << 48) - 1)) >> 21


def test_expected_pte_table_of_a_changed_region():
    """The 512 PTEs the reference asks for, as pfn_pte stores them (§9): frame | 4K flags, one
    page RO; a region the op sequence never changed: its 2M leaf's frames with the leaf's flags
    in 4K format (PSE dropped)."""
    m = CpaModel(LAY, "6.15", "none")
    val = Validator(m)
    op = parse_trace([f"set_memory_ro {PO + 0x601000:#x} 1"])[0]
    m.touched = set()
    assert val.check(0, op, m.set_memory_ro(PO + 0x601000, 1), m.touched) is None
    want = [(0x600000 + 4096 * j) | (RO if j == 1 else KPTE) for j in range(512)]
    assert list(val.expected_pte_table(k2_of(PO + 0x600000))) == want
    assert list(val.expected_pte_table(k2_of(PO + 0x800000))) == [
        (0x800000 + 4096 * j) | KPTE for j in range(512)
    ]
    assert list(val.expected_pte_table(k2_of(0xFFFF900000000000))) == [0] * 512  # nothing maps it


def test_expected_pte_table_l1tf_non_present_is_inverted():
    m = CpaModel(LAY, "6.15", "none")
    m.l1tf_invert = True
    val = Validator(m)
    op = parse_trace([f"set_memory_np {PO + 0x600000:#x} 2"])[0]
    m.touched = set()
    assert val.check(0, op, m.set_memory_np(PO + 0x600000, 2), m.touched) is None
    pfn52 = 0x000FFFFFFFFFF000
    np_ = 0x8000000000000062  # P and G (PROTNONE) cleared
    want = [
        ((~(0x600000 + 4096 * j) & pfn52) | np_) if j < 2 else (0x600000 + 4096 * j) | KPTE
        for j in range(512)
    ]
    assert list(val.expected_pte_table(k2_of(PO + 0x600000))) == want
    assert list(m.t1[k2_of(PO + 0x600000)]) == want  # the model stores the same


def test_expected_pte_table_after_hotplug_is_none():
    m, v = run(["memory_add 0x80000000 0x8000000"])
    val = Validator(m)
    val.check(0, parse_trace(["memory_add 0x80000000 0x200000"])[0], None, set())
    assert val.expected_pte_table(k2_of(PO + 0x600000)) is None


def test_initial_counter_check_is_before_op_0():
    """Counters already off at replay start: the violation is dated before the first op (-1)."""
    m = CpaModel(LAY, "6.15", "none")
    m.counters.dpc2m -= 1
    v = Validator(m).initial()
    assert (v.op_index, v.invariant) == (-1, "c")
    assert str(v).startswith("op -1: invariant (c) violated: direct_pages_count 4k/2M/1G = ")
    assert Validator(m, "ab").initial() is None


# -- the hot-plug history's span decisions (Reference.span_event, touched_by_events) ---------------
# A span [v, end) of the direct map covers frames (v - PAGE_OFFSET) >> 12 .. (end - 1 - PAGE_OFFSET)
# >> 12 (addresses as the reference keys them, their low 48 bits); a hot-plug event (spfn, epfn, added) covers frames spfn .. epfn - 1, and the latest event
# over a frame decides it (docs/cpa.md §9: after a hot-plug event pages are compared one by one,
# a 2M span one event covers wholly is decided by that event). The events are written by hand.
S = 0x80000  # the frame at 2G, PO + 0x80000000
K48 = (1 << 48) - 1  # the reference keys addresses by their low 48 bits (4-level paging)
V = (PO + (S << 12)) & K48
HIGH = 0xFFFFFFFF80000000 & K48  # the kernel image's map, outside the direct map
END2M = V + 0x200000  # the 2M span frames S .. S + 511


def ref_with(events):
    from x86pt.cpa.validate import Reference

    r = Reference(CpaModel(LAY, "6.15", "none"))
    r.events = list(events)
    return r


def test_span_event_no_event_or_outside_the_direct_map():
    assert ref_with([]).span_event(V, END2M) is None
    assert ref_with([(S, S + 512, True)]).span_event(HIGH, HIGH + 0x200000) is None
    # the span's start is in the direct map (its last 4K page), its end past it: no decision
    top = (PO + (1 << 46)) & K48
    assert ref_with([(0, 1 << 40, True)]).span_event(top - 4096, top + 4096) is None
    assert not ref_with([(0, 1 << 40, True)]).touched_by_events(top - 4096, top + 4096)


def test_span_event_exact_cover():
    """An event over exactly frames S .. S + 511 decides the 2M span: (its index, added?)."""
    assert ref_with([(S, S + 512, True)]).span_event(V, END2M) == (0, True)
    assert ref_with([(S, S + 512, False)]).span_event(V, END2M) == (0, False)


def test_span_event_partial_cover_is_no_decision():
    """An event missing the span's first or last frame, or covering only its first or last
    frame, decides nothing (None: page by page)."""
    assert ref_with([(S + 1, S + 512, True)]).span_event(V, END2M) is None  # misses frame S
    assert ref_with([(S, S + 511, True)]).span_event(V, END2M) is None  # misses frame S + 511
    assert ref_with([(S - 512, S + 1, True)]).span_event(V, END2M) is None  # only frame S
    assert ref_with([(S + 511, S + 1024, True)]).span_event(V, END2M) is None  # only S + 511


def test_span_event_latest_overlapping_event_decides():
    whole_add, whole_remove = (S, S + 512, True), (S - 512, S + 1024, False)
    before, after = (S - 1024, S, True), (S + 512, S + 1024, True)  # adjacent, not overlapping
    # the latest overlapping event is index 1 of 3; the one after it (2) does not overlap
    assert ref_with([whole_add, whole_remove, after]).span_event(V, END2M) == (1, False)
    assert ref_with([whole_remove, whole_add, before]).span_event(V, END2M) == (1, True)
    # an event ending at frame S (epfn exclusive) or starting at S + 512 does not overlap
    assert ref_with([whole_add, before]).span_event(V, END2M) == (0, True)
    assert ref_with([whole_add, after]).span_event(V, END2M) == (0, True)
    # an event touching only the last frame is the latest overlapping one: no decision
    assert ref_with([whole_add, (S + 511, S + 512, False)]).span_event(V, END2M) is None


def test_span_event_byte_spans():
    """The span is in bytes: [V, V + 1) is frame S only, [V, V + 0x1001) frames S and S + 1."""
    assert ref_with([(S, S + 1, True)]).span_event(V, V + 1) == (0, True)
    assert ref_with([(S, S + 1, True)]).span_event(V, V + 0x1001) is None
    assert ref_with([(S, S + 1, True)]).touched_by_events(V, V + 1)
    assert not ref_with([(S + 1, S + 2, True)]).touched_by_events(V, V + 0x1000)
    assert ref_with([(S + 1, S + 2, True)]).touched_by_events(V, V + 0x1001)


def test_touched_by_events():
    assert not ref_with([]).touched_by_events(V, END2M)
    assert ref_with([(S, S + 512, True)]).touched_by_events(V, END2M)
    assert ref_with([(S + 511, S + 512, False)]).touched_by_events(V, END2M)  # the last frame only
    assert ref_with([(S - 5, S + 1, False)]).touched_by_events(V, END2M)  # the first frame only
    assert not ref_with([(S - 1024, S, True)]).touched_by_events(V, END2M)  # ends at frame S
    assert not ref_with([(S + 512, S + 1024, True)]).touched_by_events(V, END2M)  # starts past it
    assert not ref_with([(S, S + 512, True)]).touched_by_events(HIGH, HIGH + 0x200000)


def test_expected_pte_table_irregular_region_is_none():
    """A 2M region whose PMD entry points to a PTE table the replay-start tables do not hold
    (dropped here by hand: the first 2M, a PTE table because of the hole at 0x9F000) is not one
    table or run: no table is offered (None), the region is compared page by page."""
    m = CpaModel(LAY, "6.15", "none")
    k2 = k2_of(PO)
    assert k2 in m.t1
    del m.t1[k2]
    assert Validator(m).expected_pte_table(k2) is None
