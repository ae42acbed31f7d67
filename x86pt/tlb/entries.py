# SPDX-License-Identifier: GPL-2.0-or-later
"""The records of the TLB model (Intel SDM Vol. 3A §4.10.2.2, §4.10.3.1): a TLB entry, a
paging-structure-cache entry, a translation a CPU may use, and one walk from CR3 or from a cached
upper entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from x86pt.errors import PhysicalAddressError, StateError
from x86pt.state import CR4_PGE, PF_ID, PF_U, PF_W, PagingState
from x86pt.fields import BIT_D, BIT_G, BIT_PS, PK_MASK, PK_SHIFT
from x86pt.walk import Access, Rights


PAGE = 1 << 12
SIZE_2M = 1 << 21
SIZE_1G = 1 << 30
PAGE_SIZES = (PAGE, SIZE_2M, SIZE_1G)
U64 = (1 << 64) - 1
CR3_NOFLUSH = 1 << 63  # MOV to CR3 with CR4.PCIDE=1: bit 63 of the source (SDM §4.10.4.1)
TLB_FLUSH_ALL = U64  # the kernel's `end` for "everything" (arch/x86/include/asm/tlbflush.h)
TLB_SINGLE_PAGE_FLUSH_CEILING = 33  # arch/x86/mm/tlb.c, debugfs-tunable; default since v4.6


class GeneralProtection(StateError):
    """An instruction the model was asked to run would raise #GP(0) (e.g. setting CR4.PCIDE
    while CR3[11:0] is not 0, SDM §4.10.1)."""


class TableReader(Protocol):
    """What the TLB model reads the tables through: one 8-byte entry at a physical address (any
    x86pt.memory image, or the CPA model's live tables, x86pt.cpa.tlbreplay.LiveTables)."""

    def read_u64(self, pa: int) -> int: ...


# -- records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlbEntry:
    """One cached translation (SDM §4.10.2.2). `page` is the first linear address of the page
    (canonical, 64-bit), `frame` the physical address of its first byte. `executable` folds
    EFER.NXE as the walker does. `global_` is G=1 in the leaf with CR4.PGE=1 at fill time."""

    pcid: int
    page: int
    size: int
    frame: int
    writable: bool
    user: bool
    executable: bool
    pkey: int
    dirty: bool
    global_: bool

    @property
    def end(self) -> int:
        return self.page + self.size

    @property
    def rights(self) -> Rights:
        return Rights(self.writable, self.user, self.executable, self.pkey)

    def contains(self, va: int) -> bool:
        return self.page <= va < self.page + self.size

    def describe(self) -> str:
        return (
            f"{self.size >> 10}K page {self.page:#x} -> {self.frame:#x} {self.rights.letters()}"
            f"{' D' if self.dirty else ''}{' G' if self.global_ else ''} pcid={self.pcid}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pcid": self.pcid,
            "page": hex(self.page),
            "size": self.size,
            "frame": hex(self.frame),
            "rw": self.writable,
            "us": self.user,
            "x": self.executable,
            "pkey": self.pkey,
            "dirty": self.dirty,
            "global": self.global_,
        }


@dataclass(frozen=True)
class PscEntry:
    """One paging-structure-cache entry (SDM §4.10.3.1): the entry of `level` (5 PML5E, 4 PML4E,
    3 PDPTE, 2 PDE; never a leaf) that covers [base, base + span) references the table at
    `table`; R/W and U/S are ANDed, XD ORed over it and the entries above it."""

    pcid: int
    level: int
    base: int
    span: int
    table: int
    writable: bool
    user: bool
    xd: bool

    @property
    def name(self) -> str:
        return {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE"}[self.level]

    def describe(self) -> str:
        return (
            f"{self.name}-cache entry {self.base:#x}+{self.span:#x} -> table {self.table:#x} pcid={self.pcid}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pcid": self.pcid,
            "cache": self.name,
            "base": hex(self.base),
            "span": self.span,
            "table": hex(self.table),
            "rw": self.writable,
            "us": self.user,
            "xd": self.xd,
        }


@dataclass(frozen=True)
class Use:
    """One translation a CPU may use for an address. `pa` None: a walk that finds no translation
    (a P=0 entry or reserved bits; `rsvd` says which) — the access faults. Equality is on what
    the access would see (pa, page size, rights); `source` and `dirty` say where it comes from."""

    pa: int | None
    page_size: int | None
    rights: Rights | None
    rsvd: bool = False
    dirty: bool | None = field(default=None, compare=False)
    source: str = field(default="tables", compare=False)


@dataclass(frozen=True)
class _Path:
    """A walk's result: a translation (leaf level/size/frame/rights/D/G) or a miss at `level`,
    and the paging-structure-cache entries the walk may create (before a miss too: §4.10.3.1
    lets a processor cache an upper entry whatever lies below it)."""

    ok: bool
    level: int
    size: int
    frame: int
    rights: Rights | None
    dirty: bool
    g: bool
    psc: tuple[tuple[int, int, int, bool, bool, bool], ...]  # (level, base, table, rw, us, xd)
    rsvd: bool = False


def _sx(state: PagingState, va: int) -> int:
    return state.sign_extend(va & U64)


def _walk_from(
    state: PagingState, memory: TableReader, va: int, below: int, table: int, rw: bool, us: bool, xd: bool
) -> _Path:
    """Walk `va` from `table`, an entry of level `below` + 1 having given (rw, us, xd); `below`
    = paging levels + 1 walks from CR3. Reserved bits as the walker decides them
    (PagingState.walk_plan, SDM §4.5)."""
    psc: list[tuple[int, int, int, bool, bool, bool]] = []
    phys = state.phys_mask
    for level, rsvd_table, leaf_kind, rsvd_leaf in state.walk_plan:
        n = level.number
        if n >= below:
            continue
        e_addr = table | (((va >> level.shift) & 0x1FF) << 3)
        try:
            raw = memory.read_u64(e_addr)
        except PhysicalAddressError:
            raw = 0  # an entry outside memory gives no translation to cache
        if not raw & 1:
            return _Path(False, n, 0, 0, None, False, False, tuple(psc))
        leaf = n == 1 or (leaf_kind is not None and bool(raw & BIT_PS))
        if raw & (rsvd_leaf if leaf and n > 1 else rsvd_table):
            return _Path(False, n, 0, 0, None, False, False, tuple(psc), True)
        rw = rw and bool(raw & 2)
        us = us and bool(raw & 4)
        xd = xd or bool(raw >> 63)
        if leaf:
            size = 1 << level.shift
            rights = Rights(rw, us, not (state.nxe and xd), (raw & PK_MASK) >> PK_SHIFT)
            return _Path(
                True,
                n,
                size,
                raw & phys & ~(size - 1),
                rights,
                bool(raw & BIT_D),
                bool(raw & BIT_G) and bool(state.cr4 & CR4_PGE),
                tuple(psc),
            )
        base = _sx(state, va & ~((1 << level.shift) - 1))
        table = raw & phys
        psc.append((n, base, table, rw, us, xd))
    raise AssertionError("walk ended without a leaf")  # pragma: no cover - level 1 is a leaf


def _error_bits(state: PagingState, access: Access) -> int:
    return (
        (PF_W if access.kind == "write" else 0)
        | (PF_U if access.user_access else 0)
        | (PF_ID if access.kind == "fetch" and (state.nxe or state.smep) else 0)
    )
