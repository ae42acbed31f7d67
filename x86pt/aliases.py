# SPDX-License-Identifier: GPL-2.0-or-later
"""Every virtual address of a physical one: the leaves of a whole tree that map a physical address
(`x86pt find`)."""

from __future__ import annotations

import numpy as np

from x86pt.coalesce import present_only
from x86pt.limits import DEFAULT_MAX_ENTRIES
from x86pt.memory.base import PhysicalMemory
from x86pt.scan import SHIFT, U64, Scanner
from x86pt.state import PagingState


def find_aliases(
    state: PagingState, memory: PhysicalMemory, pa: int, max_entries: int = DEFAULT_MAX_ENTRIES
) -> tuple[list[tuple[int, int, int, int, int]], Scanner]:
    """Every (va, level, raw, eff) whose leaf maps physical address `pa`."""
    hits: list[tuple[int, int, int, int, int]] = []
    p = U64(pa)
    sc = Scanner(state, memory, max_entries=max_entries)
    for ch in present_only(sc.chunks()):
        inside = (ch.pa <= p) & (p - ch.pa < ch.span)
        for i in np.nonzero(inside)[0].tolist():
            off = pa - int(ch.pa[i])
            size = 1 << int(SHIFT[ch.level[i]])
            k = off // size  # which entry of the run
            hits.append(
                (
                    int(ch.va[i]) + off,
                    int(ch.level[i]),
                    int(ch.raw[i]) + k * size,
                    int(ch.eff[i]),
                    int(ch.entry_addr[i]) + 8 * k,
                )
            )
    return hits, sc
