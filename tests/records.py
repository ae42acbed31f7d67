"""Scanner records written by hand, for the tests of what consumes them (coalesce, the QEMU
renderers): one Chunk from rows of (va, count, level, raw, pa, eff)."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import numpy as np

from x86pt.scan import U64, Chunk


def chunk(*rows: tuple[int, int, int, int, int, int]) -> Chunk:
    """rows: (va, count, level, raw, pa, eff); no rows gives an empty chunk."""
    va, cnt, lvl, raw, pa, eff = zip(*rows) if rows else [()] * 6
    return Chunk(
        np.array(va, U64),
        np.array(cnt, U64),
        np.array(lvl, np.uint8),
        np.array(raw, U64),
        np.array(pa, U64),
        np.array(eff, np.uint8),
        np.zeros(len(va), U64),
    )
