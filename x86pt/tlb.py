# SPDX-License-Identifier: GPL-2.0-or-later
"""An architectural model of the TLBs and paging-structure caches of N logical processors
(Intel SDM Vol. 3A §4.10), and the kernel's TLB flushes as trace operations.

The SDM lets a processor cache a translation whenever the paging structures give one (also for
prefetches and speculative accesses, §4.10.2.3), keep it after software changes the structures,
and drop it at any time (§4.10.2.2). So the model never guesses what one CPU holds: each CPU
carries the set of entries it *may* hold, fills add to it, and only the invalidations the SDM
requires (§4.10.4.1) remove from it. `may_use()` answers with the set of translations a CPU may
use for an address — the cached ones it may hold plus every walk it may make, from CR3 or from a
paging-structure-cache entry — never with one guess.

What one TLB entry holds (§4.10.2.2): the page frame, R/W and U/S ANDed and XD ORed over the walk,
the protection key, the dirty flag of the leaf, the PCID it was made under and whether it is
global (G=1 in the leaf with CR4.PGE=1, §4.10.2.4). A 2M/1G translation is one entry for the
whole page; a processor that splits it into 4K pieces is indistinguishable by the §4.10.2.3 rule
that INVLPG and page faults remove all of them.

What a paging-structure-cache entry holds (§4.10.3.1): for a PML5E/PML4E/PDPTE/PDE that
references a table, the table's address and the rights accumulated down to that entry. Entries
are never global; they belong to the PCID they were made under.

Also here: `differences()` (every range where a cached translation differs from the tables, benign
or dangerous), and the trace operations `flush_tlb_all`, `flush_tlb_kernel_range`, `invlpg`,
`touch`, ... with `apply_tlb_op()`, a pure function of a `TlbSystem` for `cpa replay --tlb`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from x86pt.errors import BadInputError, PhysicalAddressError, StateError
from x86pt.state import (CR0_PG, CR4_LA57, CR4_PAE, CR4_PCIDE, CR4_PGE, CR4_SMEP, PF_ID, PF_P,
                         PF_PK, PF_RSVD, PF_U, PF_W, PagingState)
from x86pt.walk import BIT_D, BIT_PS, Access, Rights, check_rights, walk

PAGE = 1 << 12
SIZE_2M = 1 << 21
SIZE_1G = 1 << 30
PAGE_SIZES = (PAGE, SIZE_2M, SIZE_1G)
U64 = (1 << 64) - 1
CR3_NOFLUSH = 1 << 63          # MOV to CR3 with CR4.PCIDE=1: bit 63 of the source (SDM §4.10.4.1)
BIT_G = 1 << 8
TLB_FLUSH_ALL = U64            # the kernel's `end` for "everything" (arch/x86/include/asm/tlbflush.h)
TLB_SINGLE_PAGE_FLUSH_CEILING = 33   # arch/x86/mm/tlb.c, debugfs-tunable; default since v4.6


class GeneralProtection(StateError):
    """An instruction the model was asked to run would raise #GP(0) (e.g. setting CR4.PCIDE
    while CR3[11:0] is not 0, SDM §4.10.1)."""


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
        return (f"{self.size >> 10}K page {self.page:#x} -> {self.frame:#x} {self.rights.letters()}"
                f"{' D' if self.dirty else ''}{' G' if self.global_ else ''} pcid={self.pcid}")

    def to_json(self) -> dict:
        return {"pcid": self.pcid, "page": hex(self.page), "size": self.size, "frame": hex(self.frame),
                "rw": self.writable, "us": self.user, "x": self.executable, "pkey": self.pkey,
                "dirty": self.dirty, "global": self.global_}


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
        return (f"{self.name}-cache entry {self.base:#x}+{self.span:#x} -> table {self.table:#x} "
                f"pcid={self.pcid}")

    def to_json(self) -> dict:
        return {"pcid": self.pcid, "cache": self.name, "base": hex(self.base), "span": self.span,
                "table": hex(self.table), "rw": self.writable, "us": self.user, "xd": self.xd}


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
    leaf_addr: int | None
    psc: tuple[tuple[int, int, int, bool, bool, bool], ...]   # (level, base, table, rw, us, xd)
    rsvd: bool = False


def _sx(state: PagingState, va: int) -> int:
    return state.sign_extend(va & U64)


def _walk_from(state: PagingState, memory, va: int, below: int, table: int,
               rw: bool, us: bool, xd: bool) -> _Path:
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
            raw = 0            # an entry outside memory gives no translation to cache
        if not raw & 1:
            return _Path(False, n, 0, 0, None, False, False, None, tuple(psc))
        leaf = n == 1 or (leaf_kind is not None and bool(raw & BIT_PS))
        if raw & (rsvd_leaf if leaf and n > 1 else rsvd_table):
            return _Path(False, n, 0, 0, None, False, False, None, tuple(psc), True)
        rw = rw and bool(raw & 2)
        us = us and bool(raw & 4)
        xd = xd or bool(raw >> 63)
        if leaf:
            size = 1 << level.shift
            rights = Rights(rw, us, not (state.nxe and xd), (raw >> 59) & 0xF)
            return _Path(True, n, size, raw & phys & ~(size - 1), rights, bool(raw & BIT_D),
                         bool(raw & BIT_G) and bool(state.cr4 & CR4_PGE), e_addr, tuple(psc))
        base = _sx(state, va & ~((1 << level.shift) - 1))
        table = raw & phys
        psc.append((n, base, table, rw, us, xd))
    raise AssertionError("walk ended without a leaf")     # pragma: no cover - level 1 is a leaf


def _error_bits(state: PagingState, access: Access) -> int:
    return ((PF_W if access.kind == "write" else 0) | (PF_U if access.user_access else 0)
            | (PF_ID if access.kind == "fetch" and (state.nxe or state.smep) else 0))


# -- one logical processor ----------------------------------------------------------------------
class Cpu:
    """One logical processor: its control registers (a PagingState) and the TLB and
    paging-structure-cache entries it may hold."""

    def __init__(self, index: int, state: PagingState) -> None:
        self.index = index
        self.state = state
        self.tlb: dict[tuple[int, int], set[TlbEntry]] = {}      # (size, page) -> entries
        self.psc: dict[tuple[int, int], set[PscEntry]] = {}      # (level, base) -> entries

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
        out = []
        for size in PAGE_SIZES:
            s = self.tlb.get((size, va & ~(size - 1)))
            if s:
                out.extend(e for e in s if self.usable(e))
        return out

    def psc_for(self, va: int) -> list[PscEntry]:
        out = []
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
            self._add_tlb(TlbEntry(self.pcid, page, path.size, path.frame, r.writable, r.user,
                                   r.executable, r.pkey, dirty, path.g))

    # -- invalidation primitives -----------------------------------------------------------
    def _drop_tlb(self, pred) -> int:
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

    def _drop_psc(self, pred) -> int:
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

    def _drop_tlb_at(self, va: int, pred) -> None:
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

    # -- the instructions of SDM §4.10.4.1 ---------------------------------------------------
    def invlpg(self, va: int) -> None:
        """INVLPG: TLB entries of the current PCID for the page number of va — of every page
        size, so the whole large page that holds va — and global entries for it regardless of
        PCID; and every paging-structure-cache entry of the current PCID, whatever its address.
        A non-canonical operand makes INVLPG a NOP (SDM Vol. 2A INVLPG)."""
        va &= U64
        if not self.state.canonical(va):
            return
        pcid = self.pcid
        self._drop_tlb_at(va, lambda e: e.pcid == pcid or e.global_)
        self._drop_psc(lambda p: p.pcid == pcid)

    def invpcid(self, kind: int, pcid: int = 0, va: int = 0) -> None:
        """INVPCID types 0-3 (SDM §4.10.4.1; Vol. 2A INVPCID). The model removes only what the
        SDM says is removed; that an implementation may remove more is inside the model's set.
        Type 0 removes the non-global TLB entries for va's page number and PCID and the
        paging-structure-cache entries of that PCID that would be used for va."""
        if kind not in (0, 1, 2, 3):
            raise GeneralProtection(f"#GP(0): INVPCID type {kind} is not defined")
        if not 0 <= pcid <= 0xFFF:
            raise GeneralProtection(f"#GP(0): INVPCID descriptor bits 63:12 must be 0 (pcid {pcid:#x})")
        pcide = bool(self.state.cr4 & CR4_PCIDE)
        if kind in (0, 1) and not pcide and pcid:
            raise GeneralProtection("#GP(0): INVPCID type 0/1 with a non-zero PCID while CR4.PCIDE=0")
        if kind == 0:
            va &= U64
            if not self.state.canonical(va):
                raise GeneralProtection(f"#GP(0): INVPCID type 0 with non-canonical address {va:#x}")
            self._drop_tlb_at(va, lambda e: e.pcid == pcid and not e.global_)
            self._drop_psc(lambda p: p.pcid == pcid and p.base <= _sx(self.state, va) < p.base + p.span)
        elif kind == 1:
            self._drop_tlb(lambda e: e.pcid == pcid and not e.global_)
            self._drop_psc(lambda p: p.pcid == pcid)
        elif kind == 2:
            self.flush_everything()
        else:
            self._drop_tlb(lambda e: not e.global_)
            self.psc.clear()

    def mov_cr3(self, value: int) -> None:
        """MOV to CR3 (SDM §4.10.4.1). PCIDE=0: all non-global entries of PCID 000H and all its
        paging-structure-cache entries. PCIDE=1, bit 63 clear: the same for the PCID in bits
        11:0 of the source. PCIDE=1, bit 63 set: nothing (and bit 63 is not stored)."""
        value &= U64
        pcide = bool(self.state.cr4 & CR4_PCIDE)
        noflush = pcide and bool(value & CR3_NOFLUSH)
        if pcide:
            value &= ~CR3_NOFLUSH
        if value & ~self.state.phys_mask & ~0xFFF:
            raise GeneralProtection(f"#GP(0): MOV to CR3 with reserved bits set ({value:#x})")
        self.state = self.state.replace(cr3=value)
        if noflush:
            return
        pcid = self.pcid
        self._drop_tlb(lambda e: e.pcid == pcid and not e.global_)
        self._drop_psc(lambda p: p.pcid == pcid)

    def mov_cr4(self, value: int) -> None:
        """MOV to CR4 (SDM §4.10.4.1): a change of PGE, or PCIDE 1->0, removes everything
        (global entries and all PCIDs); a change of PAE, or SMEP 0->1, removes every entry of
        the current PCID. PCIDE 0->1 removes nothing and needs CR3[11:0] = 0 (§4.10.1)."""
        old = self.state.cr4
        value &= U64
        if (value ^ old) & CR4_LA57:
            raise GeneralProtection("#GP(0): CR4.LA57 cannot change while IA-32e paging is on")
        if value & CR4_PCIDE and not old & CR4_PCIDE and self.state.cr3 & 0xFFF:
            raise GeneralProtection("#GP(0): CR4.PCIDE set while CR3[11:0] is not 0")
        cur = self.pcid
        self.state = self.state.replace(cr4=value)
        if (value ^ old) & CR4_PGE or (old & CR4_PCIDE and not value & CR4_PCIDE):
            self.flush_everything()
        elif (value ^ old) & CR4_PAE or (value & CR4_SMEP and not old & CR4_SMEP):
            self._drop_tlb(lambda e: e.pcid == cur)
            self._drop_psc(lambda p: p.pcid == cur)

    def mov_cr0(self, value: int) -> None:
        """MOV to CR0: clearing PG removes everything (SDM §4.10.4.1)."""
        old = self.state.cr0
        self.state = self.state.replace(cr0=value & U64)
        if old & CR0_PG and not value & CR0_PG:
            self.flush_everything()

    def toggle_pge(self) -> None:
        """What the kernel's __flush_tlb_global does without INVPCID: CR4.PGE off, then on."""
        cr4 = self.state.cr4
        self.mov_cr4(cr4 ^ CR4_PGE)
        self.mov_cr4(cr4)


# -- N processors over one memory ---------------------------------------------------------------
class TlbSystem:
    """N logical processors sharing one physical memory, each with its own control registers
    and caches. `memory` may be replaced between operations (a CPA model exports a new image
    after each op); the caches are never told: that is the point."""

    def __init__(self, memory, state: PagingState, ncpus: int = 2) -> None:
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
            ("tables", st.paging_levels + 1, st.root, True, True, False)]
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
        path = _walk_from(c.state, self.memory, _sx(c.state, va), c.state.paging_levels + 1,
                          c.state.root, True, True, False)
        if path.ok:
            return Use(path.frame + (va & (path.size - 1)), path.size, path.rights, False, path.dirty)
        return Use(None, None, None, path.rsvd)

    def outcomes(self, cpu: int, va: int, access: Access | None = None) -> frozenset[tuple]:
        """What an access may do now: ("ok", pa) or ("page_fault", error code) per Use, the
        rights decided by the walker's rules under the CPU's current CR0/CR4/PKRU."""
        access = access or Access()
        c = self.cpu(cpu)
        return frozenset(self._outcome(c.state, u, access) for u, _ in self._candidates(c, va, access))

    @staticmethod
    def _outcome(st: PagingState, u: Use, access: Access) -> tuple:
        base = _error_bits(st, access)
        if u.pa is None:
            return ("page_fault", base | ((PF_P | PF_RSVD) if u.rsvd else 0))
        denied, key, _ = check_rights(st, u.rights, access)
        if denied:
            return ("page_fault", base | PF_P | (PF_PK if key else 0))
        return ("ok", u.pa)

    # -- fills -------------------------------------------------------------------------------
    def touch(self, cpu: int, va: int, access: Access | None = None, *, update_ad: bool = False) -> frozenset[tuple]:
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
        outs = set()
        fills = []
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
                walk(c.state, self.memory, va, access, update_ad=True)
        return frozenset(outs)

    def speculate(self, cpu: int | None, start: int, end: int) -> int:
        """Cache on `cpu` (None: every CPU) every translation the tables give for [start, end),
        as prefetches and speculative accesses may (§4.10.2.3; no access is made, so no rights
        check and no fault), and every table-referencing entry above them (§4.10.3.1). One
        descent of the tables per CPU context, each entry read once; one TLB entry per leaf.
        Returns the number of TLB entries made per CPU."""
        groups: dict[tuple, list[Cpu]] = {}
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

    def to_json(self) -> dict:
        """What each CPU may hold, sorted by address: for a report or a golden file."""
        return {"cpus": [{"cpu": c.index, "cr3": hex(c.state.cr3), "cr4": hex(c.state.cr4),
                          "pcid": c.pcid,
                          "tlb": [e.to_json() for e in sorted(c.entries(), key=_tlb_key)],
                          "psc": [p.to_json() for p in sorted(c.psc_entries(), key=_psc_key)]}
                         for c in self.cpus]}

    # -- the difference report ----------------------------------------------------------------
    def differences(self, cpu: int | None = None, *, prune: bool = False) -> list["Difference"]:
        """Every range where a CPU may use a cached translation that differs from the current
        tables (see `cpu_differences()`). With `prune`, entries that match the tables are dropped
        afterwards: right for a replay that re-fills every range before changing it
        (TlbReplay with assume="speculate"), wrong for one that relies on `touch` fills."""
        out: list[Difference] = []
        memo: dict = {}
        for c in self.selected(cpu):
            out.extend(cpu_differences(c, self.memory, memo, prune=prune))
        return merge_differences(out)


def _tlb_key(e: TlbEntry) -> tuple:
    return (e.page & U64, e.size, e.pcid, e.frame, e.writable, e.user, e.executable, e.pkey, e.dirty, e.global_)


def _psc_key(p: PscEntry) -> tuple:
    return (p.base & U64, -p.level, p.pcid, p.table, p.writable, p.user, p.xd)


# -- differences ---------------------------------------------------------------------------------
KINDS = ("frame", "rw", "x", "us", "pkey", "present", "table", "dirty")


@dataclass(frozen=True)
class Difference:
    """[start, end) on CPU `cpu`: a cached entry gives a translation the tables do not.
    kind: frame (another physical page), rw / x / us (a right differs), pkey, present (the
    tables give no translation), table (a paging-structure-cache entry no longer matches its
    entry: walks may go through the old table), dirty (cached D=1, the leaf's D is 0: writes
    will not set it). severity: dangerous when the cached translation allows an access the
    tables deny (or reaches another frame or table); benign when it is only more restrictive —
    the access takes a spurious #PF, which removes the entry (§4.10.4.3)."""

    cpu: int
    start: int
    end: int
    kind: str
    severity: str
    cached: str
    current: str

    @property
    def dangerous(self) -> bool:
        return self.severity == "dangerous"

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "start": hex(self.start), "end": hex(self.end), "kind": self.kind,
                "severity": self.severity, "cached": self.cached, "current": self.current}


@dataclass(frozen=True)
class _Leaf:
    pa: int            # physical address of the run's first byte
    rw: bool
    us: bool
    x: bool
    pkey: int
    dirty: bool


def _descend(state: PagingState, memory, start: int, end: int) -> Iterator[tuple]:
    """Every leaf ("leaf", page, size, frame, rw, us, x, pkey, dirty, g) and every present
    table-referencing entry ("table", level, base, span, table, rw, us, xd) of the current tables
    over [start, end), top down, the rights accumulated. The canonical hole is skipped."""
    lo, hi = start & U64, min(end, 1 << 64)
    half = 1 << (state.va_bits - 1)
    top = (1 << 64) - half
    pieces = [(max(lo, 0), min(hi, half)), (max(lo, top), hi)]
    plan = state.walk_plan
    for a, z in pieces:
        if a < z:
            yield from _descend_level(state, memory, plan, 0, a, z, state.root, True, True, False)


def _descend_level(state, memory, plan, i, start, end, table, rw, us, xd):
    level, rsvd_table, leaf_kind, rsvd_leaf = plan[i]
    shift = level.shift
    span = 1 << shift
    phys = state.phys_mask
    nxe = state.nxe
    last = level.number == 1
    va = start
    while va < end:
        base = va & ~(span - 1)
        nxt = base + span
        try:
            raw = memory.read_u64(table | (((va >> shift) & 0x1FF) << 3))
        except PhysicalAddressError:
            raw = 0
        if raw & 1:
            leaf = last or (leaf_kind is not None and bool(raw & BIT_PS))
            if not raw & (rsvd_leaf if leaf and not last else rsvd_table):
                r = rw and bool(raw & 2)
                u = us and bool(raw & 4)
                x = xd or bool(raw >> 63)
                sbase = state.sign_extend(base)
                if leaf:
                    yield ("leaf", sbase, span, raw & phys & ~(span - 1), r, u, not (nxe and x),
                           (raw >> 59) & 0xF, bool(raw & BIT_D), bool(raw & BIT_G))
                else:
                    yield ("table", level.number, sbase, span, raw & phys, r, u, x)
                    yield from _descend_level(state, memory, plan, i + 1, va, min(end, nxt),
                                              raw & phys, r, u, x)
        va = nxt


def _runs(state: PagingState, memory, start: int, end: int, below: int | None = None,
          table: int | None = None, rw: bool = True, us: bool = True, xd: bool = False
          ) -> Iterator[tuple[int, int, _Leaf | None]]:
    """The current tables' translations over [start, end) as (start, end, leaf or None) runs, one
    per leaf or hole met, reading only the tables under the range. Addresses are canonical."""
    if below is None:
        below = state.paging_levels + 1
        table = state.root
    plan = [p for p in state.walk_plan if p[0].number < below]
    yield from _runs_level(state, memory, plan, 0, start, end, table, rw, us, xd)


def _runs_level(state, memory, plan, i, start, end, table, rw, us, xd):
    level, rsvd_table, leaf_kind, rsvd_leaf = plan[i]
    span = 1 << level.shift
    phys = state.phys_mask
    va = start
    while va < end:
        nxt = min(end, (va & ~(span - 1)) + span)
        try:
            raw = memory.read_u64(table | (((va >> level.shift) & 0x1FF) << 3))
        except PhysicalAddressError:
            raw = 0
        leaf = level.number == 1 or (leaf_kind is not None and bool(raw & BIT_PS))
        if not raw & 1 or raw & (rsvd_leaf if leaf and level.number > 1 else rsvd_table):
            yield va, nxt, None
        else:
            r = rw and bool(raw & 2)
            u = us and bool(raw & 4)
            x = xd or bool(raw >> 63)
            if leaf:
                frame = raw & phys & ~(span - 1)
                yield va, nxt, _Leaf(frame + (va & (span - 1)), r, u, not (state.nxe and x),
                                     (raw >> 59) & 0xF, bool(raw & BIT_D))
            else:
                yield from _runs_level(state, memory, plan, i + 1, va, nxt, raw & phys, r, u, x)
        va = nxt


def _compare(cached: _Leaf, cur: _Leaf | None) -> list[tuple[str, str]]:
    if cur is None:
        return [("present", "dangerous")]
    out = []
    if cached.pa != cur.pa:
        out.append(("frame", "dangerous"))
    for kind, a, b in (("rw", cached.rw, cur.rw), ("x", cached.x, cur.x), ("us", cached.us, cur.us)):
        if a != b:
            out.append((kind, "dangerous" if a else "benign"))
    if cached.pkey != cur.pkey:
        out.append(("pkey", "dangerous"))     # which key is more permissive depends on PKRU/PKRS
    if cached.dirty and cached.rw and not cur.dirty:
        out.append(("dirty", "benign"))
    return out


def _describe_leaf(l: _Leaf | None) -> str:
    if l is None:
        return "no translation"
    return (f"pa {l.pa:#x} " + ("u" if l.us else "-") + "r" + ("w" if l.rw else "-")
            + ("x" if l.x else "-") + (f" pkey {l.pkey}" if l.pkey else "") + (" D" if l.dirty else ""))


def _diff_ranges(c: Cpu, memory, start: int, end: int, cached_at, cached_desc: str,
                 runs: Iterable[tuple[int, int, _Leaf | None]]) -> list[Difference]:
    """Compare `cached_at(run start) -> _Leaf` with the current runs, merging neighbours."""
    out: list[Difference] = []
    open_: dict[str, Difference] = {}
    for s, e, cur in runs:
        cached = cached_at(s)
        if cached is None:
            continue
        found = {k: sev for k, sev in _compare(cached, cur)}
        for k in list(open_):
            d = open_[k]
            if k not in found or d.end != s or d.severity != found[k]:
                out.append(open_.pop(k))
        for k, sev in found.items():
            d = open_.get(k)
            if d is not None:
                open_[k] = Difference(d.cpu, d.start, e, k, sev, d.cached, d.current)
            else:
                open_[k] = Difference(c.index, s, e, k, sev, cached_desc, _describe_leaf(cur))
    out.extend(open_.values())
    return out


def _entry_runs(st: PagingState, memory, e: TlbEntry):
    """The current tables' runs under e's page: one walk when one leaf (or one hole) covers it."""
    path = _walk_from(st, memory, e.page, st.paging_levels + 1, st.root, True, True, False)
    if path.ok:
        if path.size >= e.size:
            r = path.rights
            return ((e.page, e.end, _Leaf(path.frame + (e.page & (path.size - 1)), r.writable, r.user,
                                          r.executable, r.pkey, path.dirty)),)
    elif (1 << st.levels[st.paging_levels - path.level].shift) >= e.size:
        return ((e.page, e.end, None),)
    return _runs(st, memory, e.page, e.end)


def _entry_diffs(st: PagingState, memory, e: TlbEntry) -> list[tuple]:
    """(start, end, kind, severity, current) for one cached entry, merged."""
    out: list[tuple] = []
    open_: dict[str, list] = {}
    for s, z, cur in _entry_runs(st, memory, e):
        cached = _Leaf(e.frame + (s - e.page), e.writable, e.user, e.executable, e.pkey, e.dirty)
        found = dict(_compare(cached, cur))
        for k in list(open_):
            d = open_[k]
            if k not in found or d[1] != s or d[3] != found[k]:
                out.append(tuple(open_.pop(k)))
        for k, sev in found.items():
            if k in open_:
                open_[k][1] = z
            else:
                open_[k] = [s, z, k, sev, _describe_leaf(cur)]
    out.extend(tuple(v) for v in open_.values())
    return out


def _bulk_4k(st: PagingState, memory, entries: list[TlbEntry]) -> dict[int, list[tuple]]:
    """_entry_diffs for many 4K entries at once: the current tables are read in one descent per
    run of consecutive cached pages (each table entry once), not one walk per entry."""
    by_page: dict[int, list[TlbEntry]] = {}
    for e in entries:
        by_page.setdefault(e.page, []).append(e)
    pages = sorted(by_page)
    runs: list[list[int]] = []
    for pg in pages:
        if runs and runs[-1][1] == pg:
            runs[-1][1] = pg + PAGE
        else:
            runs.append([pg, pg + PAGE])
    out: dict[int, list[tuple]] = {}      # id(entry) -> differences: the caller holds the entries
    for a, z in runs:
        seen: set[int] = set()
        for item in _descend(st, memory, a, z):
            if item[0] != "leaf":
                continue
            _, base, size, frame, rw, us, x, pkey, dirty, _g = item
            for pg in range(max(base, a), min(base + size, z), PAGE):
                seen.add(pg)
                pa = frame + (pg - base)
                for e in by_page.get(pg, ()):
                    if (e.frame == pa and e.writable == rw and e.user == us and e.executable == x
                            and e.pkey == pkey and not (e.dirty and e.writable and not dirty)):
                        out[id(e)] = []
                        continue
                    cur = _Leaf(pa, rw, us, x, pkey, dirty)
                    cached = _Leaf(e.frame, e.writable, e.user, e.executable, e.pkey, e.dirty)
                    out[id(e)] = [(pg, pg + PAGE, k, sev, _describe_leaf(cur)) for k, sev in _compare(cached, cur)]
        for pg in range(a, z, PAGE):
            if pg not in seen:
                for e in by_page.get(pg, ()):
                    out[id(e)] = [(pg, pg + PAGE, "present", "dangerous", _describe_leaf(None))]
    return out


def cpu_differences(c: Cpu, memory, memo: dict | None = None, *, prune: bool = False) -> list[Difference]:
    """Every range where CPU c may use a cached translation that differs from the tables in
    `memory`. Work is per cached entry, never per address: each usable TLB entry is compared with
    the leaves the current tables have under its page (one walk when one leaf covers it; a 1G
    entry over a region now mapped by 4K pages reads those 512 PTE tables once); `memo` shares
    the comparison of an entry object between CPUs of the same context (keyed by identity: valid
    while the entries are held, i.e. within one report). Each usable paging-structure-
    cache entry is compared with the entry at its level, and only a stale one is looked into (a
    stale PDE-cache entry: the translations through the old table, 512 PTEs; a stale
    PDPTE/PML4E/PML5E-cache entry: one `table` difference for its whole span)."""
    st = c.state
    memo = {} if memo is None else memo
    ctx = (st.root, st.cr4, st.efer, st.m)
    known = memo.setdefault(ctx, {})
    usable = [e for e in c.entries() if c.usable(e)]
    todo = [e for e in usable if e.size == PAGE and id(e) not in known]
    if todo:
        known.update(_bulk_4k(st, memory, todo))
    out: list[Difference] = []
    equal: set[int] = set()
    for e in usable:
        found = known.get(id(e))
        if found is None:
            found = known[id(e)] = _entry_diffs(st, memory, e)
        if found:
            desc = e.describe()
            out.extend(Difference(c.index, s, z, k, sev, desc, cur) for s, z, k, sev, cur in found)
        elif prune:
            equal.add(id(e))
    if equal:
        c._drop_tlb(lambda e: id(e) in equal)
    fresh: set[int] = set()
    for p in c.psc_entries():
        if p.pcid != c.pcid:
            continue
        cur = _walk_from(st, memory, p.base, st.paging_levels + 1, st.root, True, True, False)
        same = any(n == p.level and table == p.table and (rw, us, xd) == (p.writable, p.user, p.xd)
                   for n, base, table, rw, us, xd in cur.psc)
        if same:
            if prune:
                fresh.add(id(p))
            continue
        out.append(Difference(c.index, p.base, p.base + p.span, "table", "dangerous", p.describe(),
                              "the tables no longer reference that table here"))
        if p.level == 2:
            through = {s: leaf for s, e_, leaf in _runs(st, memory, p.base, p.base + p.span,
                                                        p.level, p.table, p.writable, p.user, p.xd)}
            # compare page by page through the old table against the current tables
            cur_runs = []
            for s, e_, leaf in _runs(st, memory, p.base, p.base + p.span):
                for v in range(s, e_, PAGE):
                    cur_runs.append((v, v + PAGE, None if leaf is None else
                                     _Leaf(leaf.pa + (v - s), leaf.rw, leaf.us, leaf.x, leaf.pkey, leaf.dirty)))
            out.extend(_diff_ranges(c, memory, p.base, p.base + p.span, lambda v: through.get(v),  # noqa: B023 (called in this iteration)
                                    p.describe() + " (walk through the old table)", cur_runs))
    if fresh:
        c._drop_psc(lambda p: id(p) in fresh)
    return out


def merge_differences(diffs: Iterable[Difference]) -> list[Difference]:
    """Sorted by address, CPU and kind; ranges of one (cpu, kind, severity) that overlap or touch
    are merged (the first one's descriptions kept)."""
    out: list[Difference] = []
    for d in sorted(diffs, key=lambda d: (d.cpu, d.kind, d.severity, d.start & U64, d.end)):
        p = out[-1] if out else None
        if p and (p.cpu, p.kind, p.severity) == (d.cpu, d.kind, d.severity) and d.start <= p.end:
            if d.end > p.end:
                out[-1] = Difference(p.cpu, p.start, d.end, p.kind, p.severity, p.cached, p.current)
        else:
            out.append(d)
    out.sort(key=lambda d: (d.start & U64, d.cpu, d.kind))
    return out


@dataclass(frozen=True)
class Window:
    """How long a difference lasts: it was first reported after op `opened` and was gone after
    op `closed` (None: still open), over [start, end) on CPU `cpu`."""

    cpu: int
    start: int
    end: int
    kind: str
    severity: str
    opened: int
    closed: int | None = None

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "start": hex(self.start), "end": hex(self.end), "kind": self.kind,
                "severity": self.severity, "opened": self.opened, "closed": self.closed}


class WindowTracker:
    """Turns the difference reports taken after successive ops into windows: which op opened
    each range and which later op's flush closed it. Ranges are tracked per (cpu, kind,
    severity) at their exact bounds, so a flush that removes part of a range closes that part
    only and the rest keeps its opening op."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, str, str], list[tuple[int, int, int]]] = {}
        self.closed: list[Window] = []

    def update(self, at: int, diffs: Iterable[Difference]) -> list[Window]:
        """Feed the differences seen after op `at`; returns the windows this op closed."""
        new: dict[tuple[int, str, str], list[tuple[int, int]]] = {}
        for d in diffs:
            new.setdefault((d.cpu, d.kind, d.severity), []).append((d.start & U64, d.end & U64 or 1 << 64))
        closed_now: list[Window] = []
        for key in set(self._open) | set(new):
            old = self._open.get(key, [])
            cur = _union(new.get(key, []))
            points = sorted({p for s, e, *_ in old for p in (s, e)} | {p for s, e in cur for p in (s, e)})
            keep: list[tuple[int, int, int]] = []
            gone: list[tuple[int, int, int]] = []
            for a, z in zip(points, points[1:]):
                o = next((op for s, e, op in old if s <= a < e), None)
                inside = any(s <= a < e for s, e in cur)
                if inside:
                    _append(keep, a, z, at if o is None else o)
                elif o is not None:
                    _append(gone, a, z, o)
            if keep:
                self._open[key] = keep
            else:
                self._open.pop(key, None)
            cpu, kind, sev = key
            closed_now += [Window(cpu, s, e, kind, sev, op, at) for s, e, op in gone]
        closed_now.sort(key=lambda w: (w.start, w.cpu, w.kind))
        self.closed += closed_now
        return closed_now

    def open_windows(self) -> list[Window]:
        out = [Window(cpu, s, e, kind, sev, op) for (cpu, kind, sev), runs in self._open.items()
               for s, e, op in runs]
        return sorted(out, key=lambda w: (w.start, w.cpu, w.kind))

    def dangerous_open(self) -> list[Window]:
        return [w for w in self.open_windows() if w.severity == "dangerous"]


def _union(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _append(runs: list[tuple[int, int, int]], s: int, e: int, op: int) -> None:
    if runs and runs[-1][1] == s and runs[-1][2] == op:
        runs[-1] = (runs[-1][0], e, op)
    else:
        runs.append((s, e, op))


# -- the kernel's flushes and the trace operations -----------------------------------------------
@dataclass(frozen=True)
class FlushDone:
    """What one flush operation did on the CPUs: `full` flushes (one per CPU set) or INVLPGs
    of `pages` addresses on each CPU; comparable with the CPA model's counters (flush_all,
    invlpg_pages)."""

    full: int = 0
    pages: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()


def kernel_range_plan(start: int, end: int, kernel: str = "6.15",
                      ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING) -> tuple[int, ...] | None:
    """What flush_tlb_kernel_range(start, end) does (arch/x86/mm/tlb.c): None for a full flush
    on every CPU (do_flush_tlb_all), else the addresses each CPU invalidates one by one
    (do_kernel_range_flush: from start in PAGE_SIZE steps while < end).
    Full flush when end is TLB_FLUSH_ALL or the range is over the ceiling: up to v6.14,
    `end - start > ceiling << PAGE_SHIFT` (bytes); from v6.15 (commit 4a02ed8e1cc3 "x86/mm:
    Consolidate full flush threshold decision", in get_flush_tlb_info) `(end - start) >>
    PAGE_SHIFT > ceiling` (whole pages). The two differ only when end - start is not a
    multiple of 4K. INVLPGB (AMD, v6.15+) broadcasts the same per-page or full invalidation."""
    start &= U64
    end &= U64
    if end == TLB_FLUSH_ALL:
        return None
    length = (end - start) & U64 if end >= start else 0
    if _version(kernel) >= (6, 15):
        full = (length >> 12) > ceiling
    else:
        full = length > ceiling << 12
    if full:
        return None
    return tuple(range(start, end, PAGE))


def _version(kernel: str) -> tuple[int, int]:
    s = str(kernel).strip().lstrip("v").rstrip("+")
    try:
        a, b = s.split(".")[:2]
        return int(a), int(b)
    except ValueError:
        raise BadInputError(f"bad kernel version {kernel!r} (e.g. 6.1, 6.15)") from None


TLB_OPS = ("flush_tlb_all", "flush_tlb_kernel_range", "flush_tlb_local", "invlpg", "touch",
           "speculate", "mov_cr3", "mov_cr4", "invpcid")
ACCESS_WORDS = {"read": Access("read"), "write": Access("write"), "fetch": Access("fetch")}


def _num(s: str, what: str, where: str) -> int:
    try:
        t = s.replace("_", "")
        v = int(t, 16) if t[:2].lower() == "0x" else int(t, 10)
    except ValueError:
        raise BadInputError(f"{where}: bad {what} {s!r} (expected decimal or 0x-hex)") from None
    if not 0 <= v <= U64:
        raise BadInputError(f"{where}: {what} {s!r} out of range")
    return v


def _cpu_word(w: str, where: str) -> int | None:
    if w == "all":
        return None
    if w.startswith("cpu="):
        w = w[4:]
    return _num(w, "CPU number", where)


def parse_tlb_line(line: str, where: str = "trace") -> tuple | None:
    """One trace line -> a TLB op tuple, or None when the line is blank, a comment, or not a TLB
    operation (so a trace parser can offer the line to this function first). Syntax:

        flush_tlb_all                          every CPU: full flush incl. globals
        flush_tlb_kernel_range START END       every CPU: the kernel's 33-page rule
        flush_tlb_local CPU                    one CPU: full flush (__flush_tlb_all)
        invlpg ADDR [CPU|all]                  INVLPG; default every CPU (on_each_cpu)
        touch CPU ADDR [NPAGES] [read|write|fetch] [user]
        speculate CPU|all START END            prefetch/speculative fills of a range
        mov_cr3 CPU VALUE   /   mov_cr4 CPU VALUE
        invpcid CPU TYPE [PCID [ADDR]]
    """
    h = line.find("#")
    if h >= 0:
        line = line[:h]
    parts = line.split()
    if not parts or parts[0] not in TLB_OPS:
        return None
    name, args = parts[0], parts[1:]

    def need(lo: int, hi: int, usage: str) -> None:
        if not lo <= len(args) <= hi:
            raise BadInputError(f"{where}: {name} takes {usage}")

    if name == "flush_tlb_all":
        need(0, 0, "no arguments")
        return (name,)
    if name == "flush_tlb_kernel_range":
        need(2, 2, "START END")
        return (name, _num(args[0], "start", where), _num(args[1], "end", where))
    if name == "flush_tlb_local":
        need(1, 1, "CPU")
        return (name, _cpu_word(args[0], where))
    if name == "invlpg":
        need(1, 2, "ADDR [CPU|all]")
        return (name, _num(args[0], "address", where), _cpu_word(args[1], where) if len(args) > 1 else None)
    if name == "touch":
        need(2, 5, "CPU ADDR [NPAGES] [read|write|fetch] [user]")
        cpu = _cpu_word(args[0], where)
        addr = _num(args[1], "address", where)
        n, kind, user = 1, "read", False
        for w in args[2:]:
            if w in ACCESS_WORDS:
                kind = w
            elif w == "user":
                user = True
            else:
                n = _num(w, "page count", where)
        return (name, cpu, addr, n, kind, user)
    if name == "speculate":
        need(3, 3, "CPU|all START END")
        return (name, _cpu_word(args[0], where), _num(args[1], "start", where), _num(args[2], "end", where))
    if name in ("mov_cr3", "mov_cr4"):
        need(2, 2, "CPU VALUE")
        return (name, _cpu_word(args[0], where), _num(args[1], "value", where))
    need(2, 4, "CPU TYPE [PCID [ADDR]]")
    return (name, _cpu_word(args[0], where), _num(args[1], "type", where),
            _num(args[2], "pcid", where) if len(args) > 2 else 0,
            _num(args[3], "address", where) if len(args) > 3 else 0)


def format_tlb_op(op: tuple) -> str:
    name = op[0]
    cpu = lambda c: "all" if c is None else str(c)     # noqa: E731
    if name == "flush_tlb_all":
        return name
    if name == "flush_tlb_kernel_range":
        return f"{name} {op[1]:#x} {op[2]:#x}"
    if name == "flush_tlb_local":
        return f"{name} {cpu(op[1])}"
    if name == "invlpg":
        return f"{name} {op[1]:#x}" + ("" if op[2] is None else f" {op[2]}")
    if name == "touch":
        return f"touch {cpu(op[1])} {op[2]:#x} {op[3]} {op[4]}" + (" user" if op[5] else "")
    if name == "speculate":
        return f"speculate {cpu(op[1])} {op[2]:#x} {op[3]:#x}"
    if name in ("mov_cr3", "mov_cr4"):
        return f"{name} {cpu(op[1])} {op[2]:#x}"
    if name == "invpcid":
        return f"invpcid {cpu(op[1])} {op[2]} {op[3]:#x} {op[4]:#x}"
    raise BadInputError(f"not a TLB operation: {op!r}")


def flush_tlb_kernel_range(system: TlbSystem, start: int, end: int, *, kernel: str = "6.15",
                           ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING) -> FlushDone:
    """The kernel's flush_tlb_kernel_range on every CPU (on_each_cpu), by kernel_range_plan."""
    plan = kernel_range_plan(start, end, kernel, ceiling)
    cpus = tuple(c.index for c in system.cpus)
    if plan is None:
        system.flush_all()
        return FlushDone(full=1, cpus=cpus)
    for c in system.cpus:
        for a in plan:
            c.invlpg(a)
    return FlushDone(pages=plan, cpus=cpus)


def apply_tlb_op(system: TlbSystem, op: tuple, *, kernel: str = "6.15",
                 ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING) -> FlushDone | frozenset | int | None:
    """Run one TLB trace op (from parse_tlb_line) on `system`. Flushes return a FlushDone;
    `touch` the set of possible outcomes of its last access; `speculate` the entries added."""
    name = op[0]
    if name == "flush_tlb_all":
        system.flush_all()
        return FlushDone(full=1, cpus=tuple(c.index for c in system.cpus))
    if name == "flush_tlb_kernel_range":
        return flush_tlb_kernel_range(system, op[1], op[2], kernel=kernel, ceiling=ceiling)
    if name == "flush_tlb_local":
        system.flush_all(op[1])
        return FlushDone(full=1, cpus=tuple(c.index for c in system.selected(op[1])))
    if name == "invlpg":
        system.invlpg(op[1], op[2])
        return FlushDone(pages=(op[1],), cpus=tuple(c.index for c in system.selected(op[2])))
    if name == "touch":
        _, cpu, addr, n, kind, user = op
        res: frozenset = frozenset()
        for c in system.selected(cpu):
            for i in range(n):
                res = system.touch(c.index, addr + i * PAGE, Access(kind, user=user))
        return res
    if name == "speculate":
        return system.speculate(op[1], op[2], op[3])
    if name in ("mov_cr3", "mov_cr4"):
        for c in system.selected(op[1]):
            (c.mov_cr3 if name == "mov_cr3" else c.mov_cr4)(op[2])
        return None
    if name == "invpcid":
        for c in system.selected(op[1]):
            c.invpcid(op[2], op[3], op[4])
        return None
    raise BadInputError(f"unknown TLB operation {name!r} (known: {', '.join(TLB_OPS)})")


# -- the replay driver's side --------------------------------------------------------------------
FLUSH_OPS = ("flush_tlb_all", "flush_tlb_kernel_range", "flush_tlb_local", "invlpg")


class TlbReplay:
    """What `cpa replay --tlb` keeps between ops: a TlbSystem, the windows, and the rule of which
    flushes count. The CPA replay calls, per op:

        begin_op(memory, ranges)        tables before the op; the VA ranges it may change
        flush(memory, kind, ...)        at each flush the CPA model issues, tables at that moment
        trace_op(op)                    for a TLB op read from the trace (parse_tlb_line)
        end_op(index, memory)           tables after the op -> differences, closed windows

    `assume`: "speculate" (default) — every CPU may have cached every translation of the op's
    ranges before the op and again after each flush inside it (§4.10.2.3: prefetch and
    speculative fills need no access in the program; the direct map is everybody's); "touch" —
    only `touch`/`speculate` ops of the trace fill. `flushes`: "model" applies the flushes the
    CPA model issues; "trace" ignores them, so only the trace's flush ops invalidate (replay
    against the invalidations a real kernel recorded). The trace's flush ops always apply: they
    are the callers' own flushes (vm_reset_perms after the *_noflush calls) or recorded ones,
    and a flush applied twice at the same point changes nothing."""

    def __init__(self, memory, state: PagingState, ncpus: int = 2, *, kernel: str = "6.15",
                 assume: str = "speculate", flushes: str = "model",
                 ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING) -> None:
        if assume not in ("speculate", "touch"):
            raise BadInputError("assume must be 'speculate' or 'touch'")
        if flushes not in ("model", "trace"):
            raise BadInputError("flushes must be 'model' or 'trace'")
        self.system = TlbSystem(memory, state, ncpus)
        self.tracker = WindowTracker()
        self.kernel, self.assume, self.flushes, self.ceiling = kernel, assume, flushes, ceiling
        self._ranges: list[tuple[int, int]] = []
        self.flushes_done: list[FlushDone] = []

    def _fill(self) -> None:
        if self.assume == "speculate":
            for s, e in self._ranges:
                self.system.speculate(None, s, e)

    def begin_op(self, memory, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.system.memory = memory
        self._ranges = [(s, e) for s, e in ranges if e > s]
        self._fill()

    def flush(self, memory, kind: str, start: int = 0, end: int = TLB_FLUSH_ALL,
              cpu: int | None = None) -> FlushDone | None:
        """A flush the CPA model issues. kind: "all" (flush_tlb_all: split, collapse, cpa_flush
        over the ceiling, cpa_flush_all), "range" (cpa_flush / flush_tlb_kernel_range [start,
        end): the ceiling rule of the kernel version), "local" (this CPU's __flush_tlb_all:
        DEBUG_PAGEALLOC), "page" (one INVLPG of start on `cpu`, or on every CPU: kfence's local
        flush, flush_tlb_one_kernel). Ignored (None) when flushes come from the trace."""
        if self.flushes != "model":
            return None
        self.system.memory = memory
        if kind == "all":
            self.system.flush_all()
            done = FlushDone(full=1, cpus=tuple(range(len(self.system.cpus))))
        elif kind == "range":
            done = flush_tlb_kernel_range(self.system, start, end, kernel=self.kernel, ceiling=self.ceiling)
        elif kind == "local":
            self.system.flush_all(cpu)
            done = FlushDone(full=1, cpus=tuple(c.index for c in self.system.selected(cpu)))
        elif kind == "page":
            self.system.invlpg(start, cpu)
            done = FlushDone(pages=(start,), cpus=tuple(c.index for c in self.system.selected(cpu)))
        else:
            raise BadInputError(f"unknown flush kind {kind!r} (all, range, local, page)")
        self.flushes_done.append(done)
        self._fill()           # other CPUs may cache the tables as they are now, before the next write
        return done

    def trace_op(self, op: tuple, memory=None):
        """A TLB op from the trace (flushes, touches, speculative fills, CR writes)."""
        if memory is not None:
            self.system.memory = memory
        r = apply_tlb_op(self.system, op, kernel=self.kernel, ceiling=self.ceiling)
        if isinstance(r, FlushDone):
            self.flushes_done.append(r)
        return r

    def end_op(self, index: int, memory) -> tuple[list[Difference], list[Window]]:
        """Differences after op `index` and the windows this op closed."""
        self.system.memory = memory
        # Entries equal to the tables carry nothing the next begin_op's fill would not make
        # again before their range changes, so a speculating replay keeps only stale ones and
        # its cost stays with the size of each op, not of everything cached so far.
        diffs = self.system.differences(prune=self.assume == "speculate")
        return diffs, self.tracker.update(index, diffs)
