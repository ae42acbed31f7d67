# SPDX-License-Identifier: GPL-2.0-or-later
"""The W+X audit: every writable and executable mapping as the kernel's W+X check reports it
(its ptdump walk, x86pt.formats.ptdump), and those in the hypervisor guard hole the kernel's
check never walks."""

from __future__ import annotations

import numpy as np

from x86pt.coalesce import coalesce, present_only
from x86pt.formats import ptdump
from x86pt.formats.ptdump import walk_ranges
from x86pt.limits import DEFAULT_MAX_ENTRIES
from x86pt.image import Image
from x86pt.scan import EFF_NX, EFF_RW, Chunk, Scanner
from x86pt.state import PagingState


def wx_ranges(img: Image, max_entries: int = DEFAULT_MAX_ENTRIES) -> tuple[list[tuple[int, int]], Scanner]:
    sc = Scanner(img.state, img.memory, max_entries=max_entries, **ptdump.scan_kwargs())
    ranges: list[tuple[int, int]] = []
    for _ in ptdump.ptdump_lines(
        sc.chunks(), img.state, ptdump.linux_markers(img.state.paging_levels), wx=ranges
    ):
        pass
    return ranges, sc


def guard_hole(state: PagingState) -> tuple[int, int]:
    """The hypervisor guard hole, [start of the upper half, start of ptdump's second walk
    range): 16 PGD entries (PML4 slots 256-271, or PML5 slots 256-271) that the kernel's ptdump
    and W+X check never walk."""
    half = 1 << (state.va_bits - 1)
    start = ((1 << 64) - half) & ((1 << 64) - 1)
    return start, walk_ranges(state)[1][0]


def guard_hole_wx(
    img: Image, max_entries: int = DEFAULT_MAX_ENTRIES
) -> tuple[list[tuple[int, int]], int, Scanner]:
    """W+X ranges inside the guard hole (which Linux's check skips), and how many present leaf
    entries lie there at all. The audit looks where the kernel does not: an attacker would."""
    lo, hi = guard_hole(img.state)
    sc = Scanner(img.state, img.memory, max_entries=max_entries, va_range=(lo, hi))
    nx_mask = EFF_NX if img.state.nxe else 0
    ranges: list[tuple[int, int]] = []
    present = 0

    def key(ch: Chunk) -> np.ndarray:
        wx: np.ndarray = ((ch.eff & np.uint8(EFF_RW)) != 0) & ((ch.eff & np.uint8(nx_mask)) == 0)
        return wx.astype(np.uint64)

    for runs in coalesce(present_only(sc.chunks()), key=key):
        for s_, e_, k in zip(runs.start.tolist(), runs.end.tolist(), runs.key.tolist()):
            present += 1
            if k:
                if ranges and ranges[-1][1] == s_:
                    ranges[-1] = (ranges[-1][0], e_)
                else:
                    ranges.append((s_, e_))
    return ranges, present, sc
