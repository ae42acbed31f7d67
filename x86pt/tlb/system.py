# SPDX-License-Identifier: GPL-2.0-or-later
"""N logical processors over one memory (`TlbSystem`): what a CPU may use for an address, touches
and speculative fills, flushes on a set of CPUs, and the difference report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from x86pt.errors import BadInputError
from x86pt.state import CR4_PCIDE, CR4_PGE, PF_P, PF_PK, PF_RSVD, PagingState
from x86pt.walk import Access, check_rights, walk
from x86pt.tlb.differences import DiffMemo, Difference, _descend, cpu_differences, merge_differences
from x86pt.tlb.entries import (
    PAGE,
    U64,
    PscEntry,
    TableReader,
    TlbEntry,
    Use,
    _error_bits,
    _Path,
    _sx,
    _walk_from,
)
from x86pt.tlb.invalidate import Cpu

if TYPE_CHECKING:
    from x86pt.walk import TableMemory

# what an access may do: ("ok", physical address) or ("page_fault", error code)
Outcome = tuple[str, int]


# -- N processors over one memory ---------------------------------------------------------------
class TlbSystem:
    """N logical processors sharing one physical memory, each with its own control registers
    and caches. `memory` may be replaced between operations (a CPA model exports a new image
    after each op); the caches are never told: that is the point."""

    def __init__(self, memory: TableReader, state: PagingState, ncpus: int = 2) -> None:
        if ncpus < 1:
            raise BadInputError("a TLB model needs at least one CPU")
        self.memory = memory
        self.cpus = [Cpu(i, state) for i in range(ncpus)]

    def cpu(self, i: int) -> Cpu:
        try:
            return self.cpus[i]
        except (IndexError, TypeError):
            raise BadInputError(f"no CPU {i!r} (the model has {len(self.cpus)})") from None

    def selected(self, which: int | None) -> list[Cpu]:
        return list(self.cpus) if which is None else [self.cpu(which)]

    # -- what a CPU may use ------------------------------------------------------------------
    def _candidates(self, c: Cpu, va: int, access: Access | None) -> list[tuple[Use, _Path | None]]:
        """Every way c may translate va now (SDM §4.10.3.2): a usable TLB entry for its page
        number; a walk from a paging-structure-cache entry for va (the tables below it read
        from memory); a walk from CR3. A write never completes through an entry cached with
        D=0: §4.8 makes every write set D in the leaf, so it re-walks (what QEMU does too; the
        SDM states the rule, not the mechanism)."""
        st = c.state
        va = _sx(st, va)
        write = access is not None and access.kind == "write"
        out: list[tuple[Use, _Path | None]] = []
        for e in c.tlb_for(va):
            if write and not e.dirty:
                continue
            out.append((Use(e.frame + (va - e.page), e.size, e.rights, False, e.dirty, "tlb"), None))
        starts: list[tuple[str, int, int, bool, bool, bool]] = [
            ("tables", st.paging_levels + 1, st.root, True, True, False)
        ]
        starts += [(f"{p.name}-cache", p.level, p.table, p.writable, p.user, p.xd) for p in c.psc_for(va)]
        for src, below, table, rw, us, xd in starts:
            path = _walk_from(st, self.memory, va, below, table, rw, us, xd)
            if path.ok:
                u = Use(path.frame + (va & (path.size - 1)), path.size, path.rights, False, path.dirty, src)
            else:
                u = Use(None, None, None, path.rsvd, None, src)
            out.append((u, path))
        return out

    def may_use(self, cpu: int, va: int, access: Access | None = None) -> frozenset[Use]:
        """The set of translations CPU `cpu` may use for `va` now, the current tables' among
        them (a Use with pa None when a walk finds no translation)."""
        c = self.cpu(cpu)
        if not c.state.canonical(va & U64):
            raise BadInputError(f"{va:#x} is not canonical")
        return frozenset(u for u, _ in self._candidates(c, va, access))

    def table_use(self, cpu: int, va: int) -> Use:
        """The translation the current tables give (a walk from CR3)."""
        c = self.cpu(cpu)
        path = _walk_from(
            c.state, self.memory, _sx(c.state, va), c.state.paging_levels + 1, c.state.root, True, True, False
        )
        if path.ok:
            return Use(path.frame + (va & (path.size - 1)), path.size, path.rights, False, path.dirty)
        return Use(None, None, None, path.rsvd)

    def outcomes(self, cpu: int, va: int, access: Access | None = None) -> frozenset[Outcome]:
        """What an access may do now: ("ok", pa) or ("page_fault", error code) per Use, the
        rights decided by the walker's rules under the CPU's current CR0/CR4/PKRU."""
        access = access or Access()
        c = self.cpu(cpu)
        return frozenset(self._outcome(c.state, u, access) for u, _ in self._candidates(c, va, access))

    @staticmethod
    def _outcome(st: PagingState, u: Use, access: Access) -> Outcome:
        base = _error_bits(st, access)
        if u.pa is None:
            return ("page_fault", base | ((PF_P | PF_RSVD) if u.rsvd else 0))
        assert u.rights is not None  # a translation (pa set) carries its rights
        denied, key, _ = check_rights(st, u.rights, access)
        if denied:
            return ("page_fault", base | PF_P | (PF_PK if key else 0))
        return ("ok", u.pa)

    # -- fills -------------------------------------------------------------------------------
    def touch(
        self, cpu: int, va: int, access: Access | None = None, *, update_ad: bool = False
    ) -> frozenset[Outcome]:
        """CPU `cpu` makes an access to va. Every walk it may make that allows the access may be
        cached (§4.10.2.3), with D=1 if a write (§4.8) and its upper entries in the
        paging-structure caches (§4.10.3.1). If every way the CPU may translate va faults, the
        fault happens and it removes the TLB entries for va's page number and the
        paging-structure-cache entries for va of the current PCID (§4.10.4.1, page faults) —
        nothing is cached from a faulting access. Returns the possible outcomes.
        `update_ad` writes the A/D flags of the walk from CR3 to memory (x86pt.walk)."""
        access = access or Access()
        c = self.cpu(cpu)
        va = _sx(c.state, va)
        cands = self._candidates(c, va, access)
        outs: set[Outcome] = set()
        fills: list[_Path] = []
        for u, path in cands:
            o = self._outcome(c.state, u, access)
            outs.add(o)
            if o[0] == "ok" and path is not None:
                fills.append(path)
        if all(o[0] == "page_fault" for o in outs):
            pcid = c.pcid
            c._drop_tlb_at(va, lambda e: e.pcid == pcid)
            c._drop_psc(lambda p: p.pcid == pcid and p.base <= va < p.base + p.span)
        else:
            for path in fills:
                c._fill(va, path, path.dirty or access.kind == "write")
            if update_ad:
                # update_ad writes the A/D bits back: the caller's tables are writable then
                walk(c.state, cast("TableMemory", self.memory), va, access, update_ad=True)
        return frozenset(outs)

    def speculate(self, cpu: int | None, start: int, end: int) -> int:
        """Cache on `cpu` (None: every CPU) every translation the tables give for [start, end),
        as prefetches and speculative accesses may (§4.10.2.3; no access is made, so no rights
        check and no fault), and every table-referencing entry above them (§4.10.3.1). One
        descent of the tables per CPU context, each entry read once; one TLB entry per leaf.
        Returns the number of TLB entries made per CPU."""
        groups: dict[tuple[int, int, int, int, int], list[Cpu]] = {}
        for c in self.selected(cpu):
            groups.setdefault((c.state.root, c.state.cr4, c.state.efer, c.state.m, c.pcid), []).append(c)
        n = 0
        for (_, cr4, _, _, pcid), cs in groups.items():
            st = cs[0].state
            g_ok = bool(cr4 & CR4_PGE)
            tlb: list[TlbEntry] = []
            psc: list[PscEntry] = []
            for item in _descend(st, self.memory, start & ~(PAGE - 1), end):
                if item[0] == "leaf":
                    _, page, size, frame, rw, us, x, pkey, dirty, g = item
                    tlb.append(TlbEntry(pcid, page, size, frame, rw, us, x, pkey, dirty, g and g_ok))
                else:
                    _, level, base, span, table, rw, us, xd = item
                    psc.append(PscEntry(pcid, level, base, span, table, rw, us, xd))
            for c in cs:
                for e in tlb:
                    c._add_tlb(e)
                for p in psc:
                    c.psc.setdefault((p.level, p.base & U64), set()).add(p)
            n = len(tlb)
        return n

    # -- invalidations on several CPUs ------------------------------------------------------
    def invlpg(self, va: int, cpu: int | None = None) -> None:
        for c in self.selected(cpu):
            c.invlpg(va)

    def flush_all(self, cpu: int | None = None) -> None:
        """The kernel's __flush_tlb_all on each selected CPU: INVPCID type 2 when PCIDs are on
        (invpcid_flush_all), else a CR4.PGE toggle, else a CR3 reload."""
        for c in self.selected(cpu):
            if c.state.cr4 & CR4_PCIDE:
                c.invpcid(2)
            elif c.state.cr4 & CR4_PGE:
                c.toggle_pge()
            else:
                c.mov_cr3(c.state.cr3)

    def to_json(self) -> dict[str, Any]:
        """What each CPU may hold, sorted by address: for a report or a golden file."""
        return {
            "cpus": [
                {
                    "cpu": c.index,
                    "cr3": hex(c.state.cr3),
                    "cr4": hex(c.state.cr4),
                    "pcid": c.pcid,
                    "tlb": [e.to_json() for e in sorted(c.entries(), key=_tlb_key)],
                    "psc": [p.to_json() for p in sorted(c.psc_entries(), key=_psc_key)],
                }
                for c in self.cpus
            ]
        }

    # -- the difference report ----------------------------------------------------------------
    def differences(self, cpu: int | None = None, *, prune: bool = False) -> list["Difference"]:
        """Every range where a CPU may use a cached translation that differs from the current
        tables (see `cpu_differences()`). With `prune`, entries that match the tables are dropped
        afterwards: right for a replay that re-fills every range before changing it
        (TlbReplay with assume="speculate"), wrong for one that relies on `touch` fills."""
        out: list[Difference] = []
        memo: DiffMemo = {}
        for c in self.selected(cpu):
            out.extend(cpu_differences(c, self.memory, memo, prune=prune))
        return merge_differences(out)


def _tlb_key(e: TlbEntry) -> tuple[int, int, int, int, bool, bool, bool, int, bool, bool]:
    return (
        e.page & U64,
        e.size,
        e.pcid,
        e.frame,
        e.writable,
        e.user,
        e.executable,
        e.pkey,
        e.dirty,
        e.global_,
    )


def _psc_key(p: PscEntry) -> tuple[int, int, int, int, bool, bool, bool]:
    return (p.base & U64, -p.level, p.pcid, p.table, p.writable, p.user, p.xd)
