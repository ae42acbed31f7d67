"""The table store of the CPA model: the kernel's page-table pages and their entries, nothing
about what the entries mean to CPA.

A table is 512 packed unsigned 64-bit entries (`array('Q')`: 4 KiB, the page as the CPU reads
it), not a list of Python ints, where every entry above 2^30 is an object of its own (32 bytes
and a pointer) and a model of ~7,000 tables took six times the bytes of its tables. Tables are
keyed by the VA they cover: `t3[va >> 39]` is the PUD table under one PGD slot, `t2[va >> 30]` a
PMD table, `t1[va >> 21]` a PTE table (va masked to the paging width, `vmask`: 48 bits with
4-level paging, 57 with 5-level, where `p4d[va >> 48]` holds the P4D tables). A parent entry
holds the child's physical address, from `pool`, so the tables can be written out as an image
any walker can read (export.py). The same table object may sit under several keys (ESPfix,
importer.py): a write through one key is seen through all of them, as on hardware.

Whole-table work (a split's 512 children, a merge's contiguity test, a census) goes through the
functions below, which use numpy on the table's buffer where it pays.
"""

from __future__ import annotations

import sys
from array import array
from typing import TYPE_CHECKING, Iterable, TypeAlias

from x86pt.cpa.kernel import KERNPG_TABLE, P, PSE
from x86pt.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from numpy.typing import NDArray

M48 = (1 << 48) - 1
M57 = (1 << 57) - 1
ENTRIES = 512
_ZERO_PAGE = bytes(8 * ENTRIES)

Table: TypeAlias = "array[int]"  # array('Q') of 512 entries


def zero_table() -> Table:
    """A table page of 512 empty entries."""
    return array("Q", _ZERO_PAGE)


def table_of(entries: Iterable[int]) -> Table:
    """A table page holding these 512 entries."""
    t = array("Q", entries)
    if len(t) != ENTRIES:
        raise ValueError(f"a page table holds {ENTRIES} entries, not {len(t)}")
    return t


def table_from_bytes(data: bytes) -> Table:
    """A table page from its 4 KiB little-endian image."""
    if len(data) != 8 * ENTRIES:
        raise ValueError(f"a page table is {8 * ENTRIES} bytes, not {len(data)}")
    t = array("Q")
    t.frombytes(data)
    if sys.byteorder != "little":  # pragma: no cover
        t.byteswap()
    return t


def table_bytes(t: Table) -> bytes:
    """The 4 KiB little-endian image of a table page."""
    if sys.byteorder != "little":  # pragma: no cover
        t = array("Q", t)
        t.byteswap()
    return t.tobytes()


def entries(t: Table) -> NDArray[np.uint64]:
    """The table's entries as a numpy view (no copy; valid while the table lives)."""
    import numpy as np

    return np.frombuffer(t, dtype=np.uint64)


_steps: dict[int, NDArray[np.uint64]] = {}


def run_table(first: int, step: int) -> Table:
    """The table `first, first + step, ..., first + 511 * step` (a split's children: one frame
    step apart, the flags of `first`). numpy adds the 512 values at C speed; it is loaded on the
    first call, so a model that never splits does not pay its import."""
    steps = _steps.get(step)
    if steps is None:
        import numpy as np

        steps = _steps[step] = np.arange(ENTRIES, dtype=np.uint64) * np.uint64(step)
    t = array("Q")
    t.frombytes((steps + first).tobytes())
    return t


def xor_table(t: Table, mask: int) -> Table:
    """Every entry of `t` XOR `mask` (a new table)."""
    import numpy as np

    out = array("Q")
    out.frombytes((entries(t) ^ np.uint64(mask)).tobytes())
    return out


def is_run(t: Table, step: int) -> bool:
    """Whether t is `t[0], t[0] + step, ...` (512 entries one step apart, no wrap past 2^64)."""
    first = t[0]
    last = first + (ENTRIES - 1) * step
    if t[ENTRIES - 1] != last or last >> 64:
        return False
    return t == run_table(first, step)


class TablePool:
    """Physical pages for page tables: freed pages are reused first (LIFO, like a per-cpu list)."""

    def __init__(self, ranges: tuple[tuple[int, int], ...], taken: set[int] | None = None) -> None:
        self.ranges = list(ranges)
        self.free: list[int] = []
        self._r = 0
        self._next = self.ranges[0][0] if self.ranges else 0
        self.taken = taken or set()
        self.in_use = 0
        self.high_water = 0
        self.gen = 0  # bumped by every alloc/release: a table may have moved

    def alloc(self) -> int:
        pa = self.free.pop() if self.free else self._fresh()
        self.in_use += 1
        self.gen += 1
        if self.in_use > self.high_water:
            self.high_water = self.in_use
        return pa

    def _fresh(self) -> int:
        """The next never-used page of the pool ranges, skipping pages already taken."""
        while True:
            if self._r >= len(self.ranges):
                raise BadInputError("page-table pool exhausted (give the layout a larger table_pool)")
            if self._next + 4096 > self.ranges[self._r][1]:
                self._r += 1
                if self._r < len(self.ranges):
                    self._next = self.ranges[self._r][0]
                continue
            pa = self._next
            self._next += 4096
            if pa not in self.taken:
                return pa

    def release(self, pa: int) -> None:
        self.in_use -= 1
        self.gen += 1
        self.free.append(pa)


class PageTables:
    """The tables of one address space, keyed by the VA they cover (see the module text)."""

    def __init__(self, pool: TablePool) -> None:
        self.pool = pool
        self.pgd: Table = zero_table()
        self.pgd_pa = pool.alloc()
        self.t3: dict[int, Table] = {}
        self.t2: dict[int, Table] = {}
        self.t1: dict[int, Table] = {}
        self.p4d: dict[int, Table] = {}
        self.vmask = M48
        self.levels = 4
        self.shared: frozenset[int] = frozenset()  # table pages with several parents (ESPfix)

    def set_levels(self, levels: int) -> None:
        """4- or 5-level paging (LA57): the width of the key space and whether a P4D level sits
        between the root (PML5) and the PUD tables."""
        if levels not in (4, 5):
            raise BadInputError(f"paging levels must be 4 or 5, not {levels}")
        self.levels = levels
        self.vmask = M57 if levels == 5 else M48

    def table_count(self) -> int:
        return 1 + len(self.t3) + len(self.t2) + len(self.t1)

    # -- lookup (lookup_address) -----------------------------------------------------------------
    def lookup(self, va: int) -> tuple[int, Table | None, int]:
        """(level, table, index) of the entry mapping `va`; table None when a level above is none.
        A PUD/PMD entry is returned when it is a leaf or not present (lookup_address)."""
        v = va & self.vmask
        t = self.t3.get(v >> 39)
        if t is None:
            return 4, None, 0
        i = (v >> 30) & 511
        e = t[i]
        if not e or not e & P or e & PSE:
            return 3, t, i
        t = self.t2[v >> 30]
        i = (v >> 21) & 511
        e = t[i]
        if not e or not e & P or e & PSE:
            return 2, t, i
        return 1, self.t1[v >> 21], (v >> 12) & 511

    def leaf(self, va: int) -> tuple[int, int]:
        """(level, entry) mapping va; entry 0 when unmapped."""
        lvl, t, i = self.lookup(va)
        return (lvl, 0) if t is None else (lvl, t[i])

    # -- building tables (boot, vmalloc, hotplug) ------------------------------------------------
    def _table(self, v: int, level: int, create: bool = True) -> tuple[Table | None, int]:
        """(table of `level` covering v, index of v in it), creating tables above as the boot
        mapping code and vmap do (parent = _KERNPG_TABLE). None when a large leaf covers v."""
        t3 = self.t3.get(v >> 39)
        if t3 is None:
            if not create:
                return None, 0
            t3 = self.t3[v >> 39] = zero_table()
            self._set_top(v, self.pool.alloc() | KERNPG_TABLE)
        if level == 3:
            return t3, (v >> 30) & 511
        i3 = (v >> 30) & 511
        t2 = self.t2.get(v >> 30)
        if t2 is None:
            if not create or (t3[i3] & P and t3[i3] & PSE):
                return None, 0
            t2 = self.t2[v >> 30] = zero_table()
            t3[i3] = self.pool.alloc() | KERNPG_TABLE
            self.table_created(v)
        if level == 2:
            return t2, (v >> 21) & 511
        i2 = (v >> 21) & 511
        t1 = self.t1.get(v >> 21)
        if t1 is None:
            if not create or (t2[i2] & P and t2[i2] & PSE):
                return None, 0
            t1 = self.t1[v >> 21] = zero_table()
            t2[i2] = self.pool.alloc() | KERNPG_TABLE
            self.table_created(v)
        return t1, (v >> 12) & 511

    def table_created(self, v: int) -> None:
        """Called when _table allocates a PMD or PTE table for v (the kernel space counts them)."""

    def _set_top(self, v: int, entry: int) -> None:
        """Point the PGD (4-level) or P4D (5-level) slot covering v at a new PUD table."""
        gi = (v >> 39) & 511
        if self.levels == 4:
            self.pgd[gi] = entry
            return
        i5 = (v >> 48) & 511
        p4d = self.p4d.get(i5)
        if p4d is None:
            p4d = self.p4d[i5] = zero_table()
            self.pgd[i5] = self.pool.alloc() | KERNPG_TABLE
        p4d[gi] = entry

    def _top_entry(self, k3: int) -> int:
        """The PGD/P4D entry pointing at PUD table t3[k3]."""
        if self.levels == 4:
            return self.pgd[k3 & 511]
        return self.p4d[(k3 >> 9) & 511][k3 & 511]
