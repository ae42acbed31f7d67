"""The operations of a CPA trace (trace.py has the grammar), one named tuple per shape. They are
tuples: `op[0]` is always the operation's name and the fields follow in the order the trace line
gives them, so code that indexes them and code that names the fields read the same op (and an op
equals the plain tuple of its fields). The TLB operations of x86pt.tlb keep their own tuples.
"""

from __future__ import annotations

from typing import NamedTuple


class PageRange(NamedTuple):
    """set_memory_* ADDR NPAGES, vunmap ADDR NPAGES."""

    name: str
    addr: int
    npages: int


class OnePage(NamedTuple):
    """set_direct_map_invalid_noflush / set_direct_map_default_noflush ADDR."""

    name: str
    addr: int


class MapPages(NamedTuple):
    """kernel_map_pages ADDR NPAGES ENABLE (DEBUG_PAGEALLOC)."""

    name: str
    addr: int
    npages: int
    enable: int


class RawCpa(NamedTuple):
    """cpa ADDR NPAGES set=MASK clr=MASK [flags=F] [primary|alias] [force_split]."""

    name: str
    addr: int
    npages: int
    set: int
    clr: int
    flags: int
    primary: bool
    force_split: bool


class Oob(NamedTuple):
    """oob ADDR set=MASK clr=MASK: an out-of-band write of the 4K PTE mapping ADDR."""

    name: str
    addr: int
    set: int
    clr: int


class Vmap(NamedTuple):
    """vmap ADDR PA NPAGES [huge]."""

    name: str
    addr: int
    pa: int
    npages: int
    huge: bool


class Hotplug(NamedTuple):
    """memory_add PA SIZE / memory_remove PA SIZE."""

    name: str
    pa: int
    size: int
