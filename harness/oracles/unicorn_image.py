# SPDX-License-Identifier: GPL-2.0-or-later
"""The harness in the caller's image, for the unicorn oracle (harness/oracles/unicorn_oracle.py):
the image check, the writes that install the harness (its GDT, its page tables and its slot in
the caller's root table; layout in harness/oracles/unicorn_program.py), the protection key its
user view carries, and page runs for moving memory in few large calls."""

from __future__ import annotations

import functools

from x86pt.oracle import HARNESS_SLOT, RIG_IMAGE_BASE
from x86pt.errors import BadInputError
from x86pt.memory.base import PAGE
from x86pt.memory.sparse import SparseMemory
from x86pt.state import PagingState
from x86pt.fields import BIT_A as _PTE_A, BIT_D as _PTE_D, BIT_P as _PTE_P, BIT_RW as _PTE_RW
from x86pt.fields import BIT_US as _PTE_US
from harness.oracles.unicorn_program import _Q, GDT, H_GDT, H_PD, H_PDPT, H_PML4, H_PT_K, H_PT_U


def _check_image(memory: SparseMemory, ram_size: int) -> None:
    if not isinstance(memory, SparseMemory):
        raise BadInputError(f"the unicorn oracle takes a SparseMemory image, not {type(memory).__name__}")
    for pn in memory.pages:
        pa = pn * PAGE
        if not RIG_IMAGE_BASE <= pa < ram_size:
            raise BadInputError(
                f"image page {pa:#x} is outside the rig's image region [{RIG_IMAGE_BASE:#x}, {ram_size:#x})"
            )


@functools.lru_cache(maxsize=32)
def _harness_pt(flags: int) -> bytes:
    """A PT mapping the harness's 2 MiB (PA 0..H_END) with `flags` (immutable: safe to cache)."""
    return b"".join(_Q.pack((k << 12) | flags) for k in range(512))


def _runs(pages) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs, so engine memory moves in few large calls."""
    out: list[tuple[int, int]] = []
    for pn in sorted(pages):
        if out and out[-1][0] + out[-1][1] == pn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pn, 1))
    return out


def _harness_tables(state: PagingState, user_key: int) -> list[tuple[int, bytes]]:
    """(pa, bytes) writes that install the harness, and its slot in the caller's root."""
    table = _PTE_P | _PTE_RW | _PTE_US | _PTE_A
    writes: list[tuple[int, bytes]] = []
    writes.append((H_GDT, b"".join(_Q.pack(d) for d in GDT)))
    root_slot = state.root + 8 * HARNESS_SLOT
    if state.la57:
        writes.append((root_slot, _Q.pack(H_PML4 | table)))
        writes.append((H_PML4 + 8 * HARNESS_SLOT, _Q.pack(H_PDPT | table)))
    else:
        writes.append((root_slot, _Q.pack(H_PDPT | table)))
    writes.append((H_PDPT + 8 * 511, _Q.pack(H_PD | table)))
    writes.append((H_PD, _Q.pack(H_PT_K | table) + _Q.pack(H_PT_U | table)))
    kflags = _PTE_P | _PTE_RW | _PTE_A | _PTE_D
    writes.append((H_PT_K, _harness_pt(kflags)))
    writes.append((H_PT_U, _harness_pt(kflags | _PTE_US | (user_key << 59))))
    return writes


def _free_pkey(state: PagingState) -> int | None:
    """A protection key whose PKRU AD and WD bits are both clear (SDM docs/oracles.md §2), for the harness's
    user pages; None when PKRU closes every key."""
    if not state.pke:
        return 0
    for k in range(16):
        if not (state.pkru >> (2 * k)) & 3:
            return k
    return None
