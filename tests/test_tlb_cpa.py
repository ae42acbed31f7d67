# SPDX-License-Identifier: GPL-2.0-or-later
"""The TLB model driven as `cpa replay --tlb` will drive it (x86pt.tlb.TlbReplay), on the CPA
model's own tables: a *_noflush call leaves a dangerous window on every CPU until the caller's
flush_tlb_kernel_range; a set_memory_ro whose flush is left out keeps the window open at the op
that made it; the flush rule of arch/x86/mm/tlb.c (v6.15) closes it."""

from __future__ import annotations

from x86pt.cpa.layout import layout_named
from x86pt.cpa.ops import CpaModel
from x86pt.tlb import TlbReplay, WindowTracker, Difference, parse_tlb_line

KB4 = 1 << 12


def replay_on(layout="laptop-4g", **kw):
    m = CpaModel(layout_named(layout), "6.15")
    return m, TlbReplay(m.export(), m.paging_state(), 2, **kw)


def test_noflush_window_until_the_callers_flush():
    m, r = replay_on()
    a = m.layout.page_offset + 0x40123000
    r.begin_op(m.export(), [(a, a + KB4)])
    m.set_direct_map_invalid_noflush(a)
    diffs, closed = r.end_op(0, m.export())
    assert [(d.cpu, d.start, d.end, d.kind, d.severity) for d in diffs] == [
        (0, a, a + KB4, "present", "dangerous"),
        (1, a, a + KB4, "present", "dangerous"),
    ]
    assert closed == []
    r.begin_op(m.export())
    r.trace_op(parse_tlb_line(f"flush_tlb_kernel_range {a:#x} {a + KB4:#x}"))
    diffs, closed = r.end_op(1, m.export())
    assert diffs == []
    assert [(w.cpu, w.start, w.kind, w.opened, w.closed) for w in closed] == [
        (0, a, "present", 0, 1),
        (1, a, "present", 0, 1),
    ]


def test_a_missing_flush_is_reported_at_its_op_and_address():
    for with_flush in (True, False):
        m, r = replay_on()
        a = m.layout.page_offset + 0x40200000 + 5 * KB4
        r.begin_op(m.export(), [(a, a + KB4)])
        m.set_memory_ro(a, 1)  # splits the direct map's large page, then one PTE
        if with_flush:  # cpa_flush: 1 page <= 33 -> INVLPG on every CPU
            r.flush(m.export(), "range", a, a + KB4)
        diffs, _ = r.end_op(7, m.export())
        got = [(w.cpu, w.start, w.end, w.kind, w.opened) for w in r.tracker.dangerous_open()]
        if with_flush:
            assert got == [] and diffs == []
        else:
            assert got == [(0, a, a + KB4, "rw", 7), (1, a, a + KB4, "rw", 7)]


def test_window_tracker_closes_only_the_flushed_part():
    t = WindowTracker()

    def d(s, e):
        return Difference(1, s, e, "rw", "dangerous", "", "")

    t.update(3, [d(0x1000, 0x5000)])
    closed = t.update(4, [d(0x1000, 0x2000), d(0x3000, 0x6000)])
    assert [(w.start, w.end, w.opened, w.closed) for w in closed] == [(0x2000, 0x3000, 3, 4)]
    assert [(w.start, w.end, w.opened) for w in t.open_windows()] == [
        (0x1000, 0x2000, 3),
        (0x3000, 0x5000, 3),
        (0x5000, 0x6000, 4),
    ]
