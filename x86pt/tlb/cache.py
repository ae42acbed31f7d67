# SPDX-License-Identifier: GPL-2.0-or-later
"""The TLB and paging-structure caches of one logical processor (SDM §4.10.2, §4.10.3): what it may
hold, which entries are usable under the current PCID, fills, and the primitives that drop entries."""

from __future__ import annotations

from typing import Callable, Iterator

from x86pt.state import CR4_PCIDE, CR4_PGE, PagingState
from x86pt.tlb.entries import PAGE_SIZES, U64, PscEntry, TlbEntry, _Path, _sx


# -- one logical processor ----------------------------------------------------------------------
class Caches:
    """The caches of one logical processor: its control registers (a PagingState) and the TLB and
    paging-structure-cache entries it may hold; `Cpu` (x86pt.tlb.invalidate) adds the instructions."""

    def __init__(self, index: int, state: PagingState) -> None:
        self.index = index
        self.state = state
        self.tlb: dict[tuple[int, int], set[TlbEntry]] = {}  # (size, page) -> entries
        self.psc: dict[tuple[int, int], set[PscEntry]] = {}  # (level, base) -> entries

    # -- context ----------------------------------------------------------------------------
    @property
    def pcid(self) -> int:
        """The current PCID: CR3[11:0] with CR4.PCIDE=1, else 000H (SDM §4.10.1)."""
        return self.state.cr3 & 0xFFF if self.state.cr4 & CR4_PCIDE else 0

    def usable(self, e: TlbEntry) -> bool:
        """SDM §4.10.2.3/§4.10.2.4: entries of the current PCID, and global entries of any."""
        return e.pcid == self.pcid or (e.global_ and bool(self.state.cr4 & CR4_PGE))

    def entries(self) -> Iterator[TlbEntry]:
        for s in self.tlb.values():
            yield from s

    def psc_entries(self) -> Iterator[PscEntry]:
        for s in self.psc.values():
            yield from s

    def tlb_for(self, va: int) -> list[TlbEntry]:
        """Usable TLB entries whose page holds va (any page size, §4.10.2.3)."""
        out: list[TlbEntry] = []
        for size in PAGE_SIZES:
            s = self.tlb.get((size, va & ~(size - 1)))
            if s:
                out.extend(e for e in s if self.usable(e))
        return out

    def psc_for(self, va: int) -> list[PscEntry]:
        out: list[PscEntry] = []
        for lv in self.state.levels[:-1]:
            s = self.psc.get((lv.number, va & ~((1 << lv.shift) - 1) & U64))
            if s:
                out.extend(p for p in s if p.pcid == self.pcid)
        return out

    # -- fills ------------------------------------------------------------------------------
    def _add_tlb(self, e: TlbEntry) -> None:
        self.tlb.setdefault((e.size, e.page & U64), set()).add(e)

    def _add_psc(self, path: _Path) -> None:
        pcid = self.pcid
        for n, base, table, rw, us, xd in path.psc:
            span = 1 << self.state.levels[self.state.paging_levels - n].shift
            self.psc.setdefault((n, base & U64), set()).add(PscEntry(pcid, n, base, span, table, rw, us, xd))

    def _fill(self, va: int, path: _Path, dirty: bool) -> None:
        """Cache a walk's translation (§4.10.2.3: only with P=1 and no reserved bits all the way
        down — `path.ok` — the processor having set the A flags first) and its upper entries."""
        self._add_psc(path)
        if path.ok:
            page = _sx(self.state, va & ~(path.size - 1))
            r = path.rights
            assert r is not None  # path.ok: the walk reached a leaf, whose rights it holds
            self._add_tlb(
                TlbEntry(
                    self.pcid,
                    page,
                    path.size,
                    path.frame,
                    r.writable,
                    r.user,
                    r.executable,
                    r.pkey,
                    dirty,
                    path.g,
                )
            )

    # -- invalidation primitives -----------------------------------------------------------
    def _drop_tlb(self, pred: Callable[[TlbEntry], bool]) -> int:
        n = 0
        for key in list(self.tlb):
            s = self.tlb[key]
            keep = {e for e in s if not pred(e)}
            n += len(s) - len(keep)
            if keep:
                self.tlb[key] = keep
            else:
                del self.tlb[key]
        return n

    def _drop_psc(self, pred: Callable[[PscEntry], bool]) -> int:
        n = 0
        for key in list(self.psc):
            s = self.psc[key]
            keep = {p for p in s if not pred(p)}
            n += len(s) - len(keep)
            if keep:
                self.psc[key] = keep
            else:
                del self.psc[key]
        return n

    def _drop_tlb_at(self, va: int, pred: Callable[[TlbEntry], bool]) -> None:
        for size in PAGE_SIZES:
            key = (size, va & ~(size - 1) & U64)
            s = self.tlb.get(key)
            if s:
                keep = {e for e in s if not pred(e)}
                if keep:
                    self.tlb[key] = keep
                else:
                    del self.tlb[key]

    def flush_everything(self) -> None:
        self.tlb.clear()
        self.psc.clear()
