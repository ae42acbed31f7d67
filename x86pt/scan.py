"""Every leaf mapping of a paging tree, level by level, whole 4 KiB tables at a time.

The scan reads tables in batches as (n, 512) uint64 arrays (zero-copy views of a raw image when
the tables are consecutive) and classifies all entries at once with masks derived from the field
table (fields.masks_for / walk.rsvd_mask), so a 64 GiB all-4K direct map (16.7M PTEs) is a few
dozen numpy passes, not 16.7M Python steps.

Output is a stream of `Chunk`s: columnar records in ascending (canonical) VA order. A record is a
*run* of `count` consecutive entries of one level with identical non-address bits and
consecutive frames (a whole table like that is one record: the "uniform table" shortcut); holes
(non-present entries) are records too when asked for (ptdump needs their level). Effective
rights follow SDM §4.6.1 and Linux's effective_prot(): RW and US ANDed down the walk, XD ORed.

Hostile tables are data, not crashes (docs/design.md §2.5):
* a table that is its own ancestor (a recursive PML4 slot) is walked like the CPU would, which
  is bounded by the number of levels, and reported as an Issue 'loop';
* a table pointer past the end of the image is an Issue 'past-end' and walks as an empty table
  (QEMU reads unassigned memory as zeros too);
* reserved bits are an Issue 'reserved' and flag the records below them (EFF_RSVD);
* one work budget bounds every scan: each table the walk is about to read costs its 512
  entries, charged *before* the child tables are listed or read, and a scan that would visit
  more than `max_entries` entries stops with a BudgetError naming the limit and --max-entries
  (a 64 KiB image whose 512 entries all point at one table describes 2^36 pages; it stops
  after two levels, in milliseconds). The default, 2^26 entries (131072 tables, 512 MiB of
  tables), holds a 64 GiB all-4K direct map (32,834 tables) with room to spare. Each record
  emitted costs RECORD_COST entries more, since every consumer (JSON rows, find's hits, diff's
  runs) spends far more per record than the scan spends per entry: tables whose 512 entries
  never coalesce exhaust the budget after ~1,900 tables (1M records), not 131,072.

Coalescing lives in x86pt/coalesce.py; renderers in x86pt/formats/.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from x86pt.errors import BadInputError, BudgetError, PhysicalAddressError
from x86pt.fields import (
    BIT_A,
    BIT_D,
    BIT_G,
    BIT_P,
    BIT_PAT_4K,
    BIT_PAT_LARGE,
    BIT_PCD,
    BIT_PS,
    BIT_PWT,
    BIT_RW,
    BIT_US,
    BIT_XD,
    LEVELS,
    Kind,
    Level,
)
from x86pt.state import PagingState, rsvd_mask

# Bits of Chunk.eff. RW/US sit at their entry positions (bits 1, 2) so combining is an AND.
EFF_NX = 1  # XD set in some entry of the walk (ORed)
EFF_RW = 2  # R/W set in every entry (ANDed)
EFF_US = 4  # U/S set in every entry (ANDed)
EFF_RSVD = 8  # a reserved bit is set in the leaf or an entry above it: the CPU would #PF
EFF_P = 16  # a present leaf (clear: a hole record)
EFF_LOOP = 32  # the walk went through a table that is its own ancestor
EFF_ROOT = EFF_RW | EFF_US

U64 = np.uint64
SHIFT = np.array([0, 12, 21, 30, 39, 48], dtype=np.uint64)  # index shift by SDM level number
PS_BIT = BIT_PS
_XD_SHIFT = BIT_XD.bit_length() - 1
from x86pt.limits import DEFAULT_MAX_ENTRIES  # noqa: E402  (one definition)

RECORD_COST = 64  # budget charged per record emitted
MAX_ISSUES = 1000
_COLS = ("va", "count", "level", "raw", "pa", "eff", "entry_addr")


# Issue, Chunk, Mapping and Filter are named tuples, not dataclasses: @dataclass generates (exec)
# 5-6 methods a class at import, about 0.3 ms each class, on the start-up of every `x86pt dump`
# (docs/startup.md). They are plain records, never mutated, never handed to dataclasses.replace
# and never compared with or unpacked as tuples. mypy reads the typed declarations under
# TYPE_CHECKING; tests/test_startup.py checks that they name the same fields in the same order
# with the same defaults as the bases built at run time.
TYPE_CHECKING = False  # mypy reads any name TYPE_CHECKING as true
if TYPE_CHECKING:

    class _Issue(NamedTuple):
        what: str  # 'loop' | 'past-end' | 'reserved'
        va: int  # canonical VA of the entry
        level: int  # SDM level of the entry
        entry_addr: int
        raw: int
        cr3: bool = False  # the pointer is CR3, not an entry (level is then the paging levels + 1)

    class _Chunk(NamedTuple):
        va: np.ndarray  # uint64, canonical
        count: np.ndarray  # type: ignore[assignment]  # uint64, entries in the run (not tuple.count)
        level: np.ndarray  # uint8, SDM level of the entries (1 = PTE)
        raw: np.ndarray  # uint64, first entry's value
        pa: np.ndarray  # uint64, first frame (0 for holes)
        eff: np.ndarray  # uint8, EFF_* bits
        entry_addr: np.ndarray  # uint64, physical address of the first entry

    class _Mapping(NamedTuple):
        va: int
        size: int
        pa: int
        level: int
        raw: int  # the leaf entry
        writable: bool  # effective (ANDed)
        user: bool  # effective (ANDed)
        nx: bool  # XD set somewhere on the walk (ORed); executable = not (NXE and nx)
        reserved: bool  # a reserved bit on the walk: the CPU would fault
        entry_addr: int

    class _Filter(NamedTuple):
        user: bool | None = None
        writable: bool | None = None
        executable: bool | None = None
        levels: tuple[int, ...] | None = None
        has: str | None = None
        nxe: bool = True

else:
    _Issue = namedtuple("_Issue", "what va level entry_addr raw cr3", defaults=(False,))
    _Chunk = namedtuple("_Chunk", _COLS)
    _Mapping = namedtuple("_Mapping", "va size pa level raw writable user nx reserved entry_addr")
    _Filter = namedtuple("_Filter", "user writable executable levels has nxe", defaults=(None,) * 5 + (True,))


class Issue(_Issue):
    """Something about the tables worth telling the user; never fatal."""

    __slots__ = ()

    def describe(self) -> str:
        name = "CR3" if self.cr3 else LEVELS[self.level].table + "E"  # PT + E = PTE
        if self.what == "loop":
            why = "points at one of its own ancestor tables (recursive mapping); walked as the CPU would"
        elif self.what == "past-end":
            why = "points at a table past the end of the image; walked as an empty table"
        else:
            why = "has reserved bits set: an access through it would #PF(RSVD)"
        if name == "CR3":
            return f"CR3 = {self.raw:#x} {why}"
        return f"{name} at {self.entry_addr:#x} (va {self.va:#018x}) = {self.raw:#018x} {why}"

    def to_json(self) -> dict:
        return {
            "issue": self.what,
            "va": hex(self.va),
            "level": self.level,
            "entry_addr": hex(self.entry_addr),
            "raw": f"{self.raw:#018x}",
        }


@dataclass
class ScanStats:
    tables: dict[int, int] = field(default_factory=lambda: {n: 0 for n in range(1, 6)})
    entries: dict[int, int] = field(default_factory=lambda: {n: 0 for n in range(1, 6)})  # leaves
    table_pas: list[np.ndarray] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    issue_count: int = 0

    def add_issue(self, issue: Issue) -> None:
        self.issue_count += 1
        if len(self.issues) < MAX_ISSUES:
            self.issues.append(issue)

    def distinct_tables(self) -> int:
        if not self.table_pas:
            return 0
        return int(len(np.unique(np.concatenate(self.table_pas))))


class Chunk(_Chunk):
    """Columnar records, ascending VA. Entry i of a record: va + i*size, pa + i*size, raw with
    the frame advanced by i*size, entry at entry_addr + 8*i; size = 1 << SHIFT[level]."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self.va)

    @property
    def size(self) -> np.ndarray:
        return U64(1) << SHIFT[self.level]

    @property
    def span(self) -> np.ndarray:
        return self.count * self.size

    def take(self, sel) -> "Chunk":
        return Chunk(*(getattr(self, c)[sel] for c in _COLS))

    @staticmethod
    def empty() -> "Chunk":
        return Chunk(
            np.zeros(0, U64),
            np.zeros(0, U64),
            np.zeros(0, np.uint8),
            np.zeros(0, U64),
            np.zeros(0, U64),
            np.zeros(0, np.uint8),
            np.zeros(0, U64),
        )


def merge_sorted(a: Chunk, b: Chunk) -> Chunk:
    """Merge two VA-sorted chunks whose records do not overlap (O(n log n) searchsorted, no sort)."""
    if not len(a):
        return b
    if not len(b):
        return a
    n = len(a) + len(b)
    pos_b = np.searchsorted(a.va, b.va) + np.arange(len(b))
    is_b = np.zeros(n, dtype=bool)
    is_b[pos_b] = True
    out = []
    for col in _COLS:
        x, y = getattr(a, col), getattr(b, col)
        z = np.empty(n, dtype=x.dtype)
        z[is_b] = y
        z[~is_b] = x
        out.append(z)
    return Chunk(*out)


class Mapping(_Mapping):
    """One leaf mapping (the scalar view of a record entry)."""

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.va + self.size


def sign_extend(va: np.ndarray, bits: int) -> np.ndarray:
    top = U64(1 << (bits - 1))
    high = U64(((1 << 64) - 1) & ~((1 << bits) - 1))
    return np.where(va & top, va | high, va)


_BLOCK = 128  # rows per pass: two (128, 512) temporaries stay in the L2 cache


def _rows_arithmetic(E: np.ndarray, rows: np.ndarray, step: np.ndarray) -> np.ndarray:
    """For each row r in `rows`: E[r, i] == E[r, 0] + step[i] for all i (blocked, no big temps)."""
    out = np.zeros(len(rows), dtype=bool)
    if not len(rows):
        return out
    contiguous = len(rows) == len(E) and rows[0] == 0
    tmp = np.empty((min(_BLOCK, len(rows)), 512), dtype=U64)
    eq = np.empty((min(_BLOCK, len(rows)), 512), dtype=bool)
    for s in range(0, len(rows), _BLOCK):
        blk = E[s : s + _BLOCK] if contiguous else E[rows[s : s + _BLOCK]]
        k = len(blk)
        np.add(blk[:, :1], step, out=tmp[:k])
        np.equal(blk, tmp[:k], out=eq[:k])
        out[s : s + k] = eq[:k].all(axis=1)
    return out


class _Tables:
    """Batched table reads. Raw files are indexed directly (a slice when the tables are
    consecutive); other sources go through memory.table() one table at a time."""

    def __init__(self, memory) -> None:
        self.memory = memory
        f = getattr(memory, "file", None)
        self.flat = None
        if type(memory).__name__ == "RawFile" and f is not None:
            self.flat = f.u64
            self.limit = f.size

    def read(self, pas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(pas)
        if self.flat is not None:
            ok = pas + U64(4096) <= U64(self.limit)
            if n and ok.all():
                first = int(pas[0])
                if n == 1 or bool((np.diff(pas) == U64(4096)).all()):
                    return self.flat[first // 8 : first // 8 + 512 * n].reshape(n, 512), ok
            if not ok.any():
                return np.zeros((n, 512), dtype=U64), ok
            idx = (np.where(ok, pas, U64(0)) >> U64(3)).astype(np.int64)
            out = self.flat[idx[:, None] + np.arange(512)]
            out[~ok] = 0
            return out, ok
        out = np.zeros((n, 512), dtype=U64)
        ok = np.ones(n, dtype=bool)
        for i, pa in enumerate(pas.tolist()):
            try:
                out[i] = self.memory.table(pa)
            except PhysicalAddressError:
                ok[i] = False
        return out, ok


class _Runs(NamedTuple):
    """Runs of entries inside a batch of tables (one row per run, in VA order): the run's table
    row in the batch, its entry count, the first entry's raw value, VA and address, and the eff
    bits the table inherited."""

    r: np.ndarray
    cnt: np.ndarray
    raw: np.ndarray
    va: np.ndarray
    eaddr: np.ndarray
    peff: np.ndarray


class Scanner:
    """Scan a tree. `chunks()` streams records; `stats` fills in as it goes.

    addr_mask: which entry bits address the next table or frame (default: MAXPHYADDR's bits
    M-1:12, as the CPU; QEMU's monitor uses 0x3fffffffff000, Linux bits 51:12).
    holes: also emit non-present entries (level and raw kept) as records without EFF_P.
    va_range: (lo, hi) canonical VAs; entries wholly outside are not visited ("filter while
    walking", gdb-pt-dump issue #20).
    top_breaks: root-table indices where runs end (ptdump adds the end of the guard hole).
    """

    def __init__(
        self,
        state: PagingState,
        memory,
        *,
        addr_mask: int | None = None,
        holes: bool = False,
        va_range: tuple[int, int] | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        batch: int = 1024,
        top_breaks: tuple[int, ...] = (256,),
    ) -> None:
        self.state = state
        self.memory = memory
        self.addr_mask = state.phys_mask if addr_mask is None else addr_mask & ~0xFFF
        self.holes = holes
        self.va_range = va_range
        self.max_entries = max_entries
        self.batch = batch
        # root-table indices where a run of entries must end: 256 starts the upper (sign-
        # extended) half, so no record spans the non-canonical hole
        self.top_breaks = tuple(i for i in top_breaks if 0 < i < 512)
        self.stats = ScanStats()
        self.bits = state.va_bits
        self.levels = {lv.number: lv for lv in state.levels}
        self.emitted = 0
        self.visited = 0  # entries of the tables read or about to be read (the budget)
        self._tables = _Tables(memory)
        self._rsvd = {}
        for lv in state.levels:
            tab = rsvd_mask(state, lv, lv.table_kind)
            leaf = rsvd_mask(state, lv, lv.leaf_kind) if lv.leaf_kind is not None else tab
            self._rsvd[lv.number] = (tab, leaf)

    # -- public ----------------------------------------------------------------------------------
    def chunks(self) -> Iterator[Chunk]:
        top = self.state.paging_levels
        root = np.array([self.state.root], dtype=U64)
        self._charge(1)
        yield from self._level(
            top,
            root,
            np.zeros(1, U64),
            np.array([EFF_ROOT], np.uint8),
            root[:, None],
            np.array([self.state.cr3], U64),
            np.zeros(1, U64),
        )

    def mappings(self) -> Iterator[Mapping]:
        """Every present leaf entry, one at a time (slow path; for small trees and tests)."""
        for ch in self.chunks():
            for i in np.nonzero(ch.eff & EFF_P)[0].tolist():
                lvl = int(ch.level[i])
                size = 1 << int(SHIFT[lvl])
                e = int(ch.eff[i])
                for k in range(int(ch.count[i])):
                    yield Mapping(
                        int(ch.va[i]) + k * size,
                        size,
                        int(ch.pa[i]) + k * size,
                        lvl,
                        int(ch.raw[i]) + k * size,
                        bool(e & EFF_RW),
                        bool(e & EFF_US),
                        bool(e & EFF_NX),
                        bool(e & EFF_RSVD),
                        int(ch.entry_addr[i]) + 8 * k,
                    )

    # -- the walk --------------------------------------------------------------------------------
    def _level(
        self,
        lnum: int,
        pas: np.ndarray,
        bases: np.ndarray,
        effs: np.ndarray,
        anc: np.ndarray,
        pent_raw: np.ndarray,
        pent_addr: np.ndarray,
    ) -> Iterator[Chunk]:
        """Tables `pas` at level `lnum` (VA-ordered), their raw base VAs, inherited eff bits,
        ancestor table addresses, and the parent entry that pointed at each (for issues)."""
        for s in range(0, len(pas), self.batch):
            sl = slice(s, s + self.batch)
            yield from self._batch(lnum, pas[sl], bases[sl], effs[sl], anc[sl], pent_raw[sl], pent_addr[sl])

    def _batch(self, lnum, pas, bases, effs, anc, pent_raw, pent_addr) -> Iterator[Chunk]:
        """One batch of tables of level `lnum`, in named steps: read them; emit the uniform ones
        as one record each; cut the others into runs; emit the runs that are leaves (and holes);
        list the child tables of the rest; then interleave this level's records with the
        children's in VA order."""
        lv: Level = self.levels[lnum]
        frame_mask = U64(self.addr_mask & ~((1 << lv.shift) - 1))
        E, ok = self._read_batch(lnum, pas, bases, pent_raw, pent_addr)
        uni = self._uniform_tables(lnum, E, ok, frame_mask)
        parts: list[Chunk] = []
        if uni.any():
            parts.append(self._uniform_records(lnum, E, np.nonzero(uni)[0], pas, bases, effs, frame_mask))
        nu = np.nonzero(~uni)[0]
        children = None
        if len(nu):
            runs = self._table_runs(lnum, E, nu, pas, bases, effs)
            present = (runs.raw & U64(BIT_P)) != 0
            if lnum == 1:
                leaf = present
            elif lv.leaf_kind is not None:
                leaf = present & ((runs.raw & U64(PS_BIT)) != 0)
            else:
                leaf = np.zeros_like(present)
            parts += self._leaf_records(lnum, runs, leaf, present, frame_mask)
            children = self._child_tables(lnum, runs, np.nonzero(present & ~leaf)[0], anc, nu)
        self._charge(0, sum(len(p) for p in parts))
        mine = Chunk.empty()
        for p in parts:  # each part is VA-sorted and disjoint from the others
            mine = merge_sorted(mine, p)
        if children is None:
            if len(mine):
                yield mine
            return
        yield from self._with_children(lnum, mine, children)

    def _read_batch(self, lnum, pas, bases, pent_raw, pent_addr) -> tuple[np.ndarray, np.ndarray]:
        """The tables as an (n, 512) array, counted in the stats; a table past the end of the
        image is an issue and reads as zeros."""
        st = self.stats
        st.tables[lnum] += len(pas)
        st.table_pas.append(pas.copy())
        E, ok = self._tables.read(pas)
        if not ok.all():
            for i in np.nonzero(~ok)[0].tolist():
                st.add_issue(
                    Issue(
                        "past-end",
                        int(sign_extend(bases[i : i + 1], self.bits)[0]),
                        lnum + 1,
                        int(pent_addr[i]),
                        int(pent_raw[i]),
                        lnum == self.state.paging_levels,
                    )
                )
        return E, ok

    def _uniform_tables(self, lnum, E, ok, frame_mask) -> np.ndarray:
        """Which tables are uniform: 512 present leaves, same non-frame bits, consecutive frames."""
        lv: Level = self.levels[lnum]
        uni = np.zeros(len(E), dtype=bool)
        if not ((lnum == 1 or lv.leaf_kind is not None) and self.va_range is None):
            return uni
        size = 1 << lv.shift
        first = E[:, 0]
        cand = ok & ((first & U64(BIT_P)) != 0)
        if lnum > 1:
            cand &= (first & U64(PS_BIT)) != 0
        if cand.any():
            ci = np.nonzero(cand)[0]
            # Equal non-frame bits and consecutive frames <=> entry i == entry 0 + i*size,
            # as long as the last frame does not carry out of the frame field.
            last = (first[ci] & frame_mask) + U64(511 * size)
            ci = ci[(last <= frame_mask) & (last >= (first[ci] & frame_mask))]
            uni[ci[_rows_arithmetic(E, ci, np.arange(512, dtype=U64) * U64(size))]] = True
        return uni

    def _uniform_records(self, lnum, E, ui, pas, bases, effs, frame_mask) -> Chunk:
        """One record of 512 entries per uniform table `ui`."""
        rs_leaf = self._rsvd[lnum][1]
        raw = E[ui, 0]
        eff = self._combine(effs[ui], raw) | np.uint8(EFF_P)
        bad = (raw & U64(rs_leaf)) != 0
        if bad.any():
            eff[bad] |= np.uint8(EFF_RSVD)
            self._issues_reserved(lnum, bases[ui][bad], pas[ui][bad], raw[bad])
        chunk = Chunk(
            sign_extend(bases[ui], self.bits),
            np.full(len(ui), 512, U64),
            np.full(len(ui), lnum, np.uint8),
            raw,
            raw & frame_mask,
            eff,
            pas[ui].copy(),
        )
        self._count(lnum, 512 * len(ui))
        return chunk

    def _table_runs(self, lnum, E, nu, pas, bases, effs) -> _Runs:
        """The runs inside tables `nu`: an entry continues the previous one when its value steps
        by one page (same bits, next frame, no carry out of the frame field) or both are zero.
        Only run starts are decoded, so a split 2M page (511 RW PTEs and one RO) costs three
        records, not 512. With a va_range, runs end at its edges and the runs outside it are
        dropped."""
        lv: Level = self.levels[lnum]
        shift = U64(lv.shift)
        size = 1 << lv.shift
        Eu = E if len(nu) == len(E) else E[nu]
        m = len(nu)
        cont = np.zeros((m, 512), dtype=bool)
        np.equal(Eu[:, 1:], Eu[:, :-1] + U64(size), out=cont[:, 1:])
        # ... and the step stays inside the frame field: a frame that carries out of it sets a
        # bit above (reserved or ignored), so that entry is not the next frame (as _uniform_tables)
        cont[:, 1:] &= ((Eu[:, 1:] ^ Eu[:, :-1]) & ~U64(self.addr_mask)) == 0
        zero = Eu == 0
        cont[:, 1:] |= zero[:, 1:] & zero[:, :-1]
        if lnum == self.state.paging_levels:
            cont[:, list(self.top_breaks)] = False
        inr = None
        if self.va_range is not None:
            lo, hi = self.va_range
            idx = np.arange(512, dtype=U64)
            cva = sign_extend(bases[nu][:, None] + (idx << shift)[None, :], self.bits)
            inr = (cva + U64(size - 1) >= U64(lo)) & (cva < U64(hi))
            cont[:, 1:] &= inr[:, 1:] == inr[:, :-1]
        r, c = np.nonzero(~cont)
        cnt = np.diff(np.append(r.astype(np.int64) * 512 + c, m * 512)).astype(U64)
        if inr is not None:
            keep = inr[r, c]
            r, c, cnt = r[keep], c[keep], cnt[keep]
        cu = c.astype(U64)
        return _Runs(r, cnt, Eu[r, c], bases[nu][r] + (cu << shift), pas[nu][r] + cu * U64(8), effs[nu][r])

    def _leaf_records(self, lnum, runs: _Runs, leaf, present, frame_mask) -> list[Chunk]:
        """The records of the runs that are leaves, and of the holes when asked for."""
        out = []
        li = np.nonzero(leaf)[0]
        if len(li):
            lraw = runs.raw[li]
            eff = self._combine(runs.peff[li], lraw) | np.uint8(EFF_P)
            bad = (lraw & U64(self._rsvd[lnum][1])) != 0
            if bad.any():
                eff[bad] |= np.uint8(EFF_RSVD)
                self._issues_reserved(lnum, runs.va[li][bad], runs.eaddr[li][bad], lraw[bad])
            self._count(lnum, int(runs.cnt[li].sum()))
            out.append(
                Chunk(
                    sign_extend(runs.va[li], self.bits),
                    runs.cnt[li],
                    np.full(len(li), lnum, np.uint8),
                    lraw,
                    lraw & frame_mask,
                    eff,
                    runs.eaddr[li],
                )
            )
        if self.holes:
            hi_ = np.nonzero(~present)[0]  # a past-end table reads as zeros (QEMU does too)
            if len(hi_):
                hraw = runs.raw[hi_]
                # eff of a hole: what Linux's effective_prot() would carry for it (ptdump
                # breaks runs on it for non-zero, non-present PTEs); never EFF_P.
                out.append(
                    Chunk(
                        sign_extend(runs.va[hi_], self.bits),
                        runs.cnt[hi_],
                        np.full(len(hi_), lnum, np.uint8),
                        hraw,
                        np.zeros(len(hi_), U64),
                        self._combine(runs.peff[hi_], hraw),
                        runs.eaddr[hi_],
                    )
                )
        return out

    def _child_tables(self, lnum, runs: _Runs, ti, anc, nu) -> tuple | None:
        """The tables the runs `ti` point at, one per entry (a run's entries step by one page),
        charged to the budget before they are listed; reserved bits and loops (a table that is
        its own ancestor) are issues. None when there are none."""
        if not len(ti):
            return None
        size = 1 << self.levels[lnum].shift
        tcnt = runs.cnt[ti].astype(np.int64)
        self._charge(int(tcnt.sum()))  # before the child lists are allocated
        rep = np.repeat(ti, tcnt)
        k = (np.arange(len(rep), dtype=np.int64) - np.repeat(np.cumsum(tcnt) - tcnt, tcnt)).astype(U64)
        traw = runs.raw[rep] + k * U64(size)  # a run's entries step by one page
        tva = runs.va[rep] + (k << U64(self.levels[lnum].shift))
        teaddr = runs.eaddr[rep] + k * U64(8)
        ceff = self._combine(runs.peff[rep], traw)
        bad = (traw & U64(self._rsvd[lnum][0])) != 0
        if bad.any():
            ceff[bad] |= np.uint8(EFF_RSVD)
            self._issues_reserved(lnum, tva[bad], teaddr[bad], traw[bad])
        cpa = traw & U64(self.addr_mask)
        canc = anc[nu][runs.r[rep]]
        loop = (canc == cpa[:, None]).any(axis=1)
        if loop.any():
            ceff[loop] |= np.uint8(EFF_LOOP)
            for j in np.nonzero(loop)[0][:64].tolist():
                self.stats.add_issue(
                    Issue(
                        "loop",
                        int(sign_extend(tva[j : j + 1], self.bits)[0]),
                        lnum,
                        int(teaddr[j]),
                        int(traw[j]),
                    )
                )
        return (cpa, tva, ceff, np.concatenate([canc, cpa[:, None]], axis=1), traw, teaddr)

    def _with_children(self, lnum, mine: Chunk, children: tuple) -> Iterator[Chunk]:
        """This level's records merged into the children's stream in VA order."""
        pending = mine
        for ch in self._level(lnum - 1, *children):
            if len(pending):
                last = ch.va[-1]
                k = int(np.searchsorted(pending.va, last))
                if k:
                    ch = merge_sorted(pending.take(slice(0, k)), ch)
                    pending = pending.take(slice(k, None))
            yield ch
        if len(pending):
            yield pending

    @staticmethod
    def _combine(parent: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """Linux effective_prot() / SDM §4.6.1: RW, US ANDed; XD ORed; other flags inherited."""
        low = (raw & U64(EFF_RW | EFF_US)).astype(np.uint8)
        nx = (raw >> U64(_XD_SHIFT)).astype(np.uint8)
        return (parent & np.uint8(~(EFF_RW | EFF_US) & 0xFF)) | (parent & low) | nx

    def _issues_reserved(self, lnum, vas, addrs, raws) -> None:
        for j in range(min(len(vas), 16)):
            self.stats.add_issue(
                Issue(
                    "reserved",
                    int(sign_extend(vas[j : j + 1], self.bits)[0]),
                    lnum,
                    int(addrs[j]),
                    int(raws[j]),
                )
            )
        self.stats.issue_count += max(0, len(vas) - 16)

    def _count(self, lnum: int, n: int) -> None:
        self.stats.entries[lnum] += n
        self.emitted += n

    def _charge(self, tables: int, records: int = 0) -> None:
        """Charge `tables` tables (512 entries each) to the work budget before reading them, and
        `records` records before emitting them."""
        self.visited += 512 * tables + RECORD_COST * records
        if self.visited > self.max_entries:
            raise BudgetError(
                f"work limit reached: the tables expand to more than {self.max_entries} page-table "
                f"entries (shared or looping subtrees?); raise it with --max-entries N if the image "
                f"really is this large"
            )


def scan_reference(state: PagingState, memory, *, addr_mask: int | None = None) -> list[Mapping]:
    """The scalar reference: one Python step per entry, recursion per table. Used by the property
    test against the vectorised path; only for small trees."""
    amask = state.phys_mask if addr_mask is None else addr_mask & ~0xFFF
    out: list[Mapping] = []
    levels = {lv.number: lv for lv in state.levels}

    def rec(lnum: int, table: int, base: int, rw: int, us: int, nx: int, rsvd: bool) -> None:
        lv = levels[lnum]
        try:
            entries = [memory.read_u64(table + 8 * i) for i in range(512)]
        except PhysicalAddressError:
            return
        for i, e in enumerate(entries):
            if not e & 1:
                continue
            va = base + (i << lv.shift)
            kind = lv.kind_of(e)
            if lnum == 1:
                kind = Kind.PTE
            r = rw & (e >> 1) & 1
            u = us & (e >> 2) & 1
            x = nx | (e >> 63)
            bad = rsvd or bool(e & rsvd_mask(state, lv, kind))
            if kind.is_leaf:
                size = 1 << lv.shift
                out.append(
                    Mapping(
                        state.sign_extend(va),
                        size,
                        e & amask & ~(size - 1),
                        lnum,
                        e,
                        bool(r),
                        bool(u),
                        bool(x),
                        bad,
                        table + 8 * i,
                    )
                )
            else:
                rec(lnum - 1, e & amask, va, r, u, x, bad)

    rec(state.paging_levels, state.root, 0, 1, 1, 0, False)
    return out


# -- filters (gdb-pt-dump's -filter/-range/-has, applied while streaming) ------------------------------
# --has words -> bit numbers, from the field table
FLAG_BITS = {
    name: mask.bit_length() - 1
    for name, mask in (
        ("p", BIT_P),
        ("rw", BIT_RW),
        ("us", BIT_US),
        ("pwt", BIT_PWT),
        ("pcd", BIT_PCD),
        ("a", BIT_A),
        ("d", BIT_D),
        ("ps", BIT_PS),
        ("g", BIT_G),
        ("xd", BIT_XD),
        ("nx", BIT_XD),
    )
}


def parse_has(words: str) -> tuple[int, int, bool]:
    """'g d !a pat' -> (bits that must be set, bits that must be clear, pat wanted?). PAT is
    bit 7 in a PTE and bit 12 in a large leaf, so it is matched per level."""
    need = clear = 0
    pat: bool | None = None
    for w in words.replace(",", " ").split():
        neg = w.startswith(("!", "-", "_"))
        name = (w[1:] if neg else w).lower()
        if name == "pat":
            if pat is not None and pat == neg:
                raise BadInputError(f"--has {words!r}: pat is asked both set and clear")
            pat = not neg
            continue
        if name not in FLAG_BITS:
            raise BadInputError(
                f"unknown flag {w!r} for --has (one flag per word, '!' once to ask "
                f"for it clear; known: {', '.join(FLAG_BITS)}, pat)"
            )
        if neg:
            clear |= 1 << FLAG_BITS[name]
        else:
            need |= 1 << FLAG_BITS[name]
    if need & clear:
        raise BadInputError(f"--has {words!r}: a flag is asked both set and clear")
    if not words.replace(",", " ").split():
        raise BadInputError("--has '': name at least one flag")
    return need, clear, pat


class Filter(_Filter):
    """Keep present leaves that pass every given test (None: no test). Holes are kept so
    renderers that need them (ptdump) still see the shape."""

    __slots__ = ()

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.user, self.writable, self.executable, self.levels, self.has))

    def mask(self, ch: Chunk) -> np.ndarray:
        eff = ch.eff
        keep = np.ones(len(ch), dtype=bool)
        if self.user is not None:
            keep &= ((eff & np.uint8(EFF_US)) != 0) == self.user
        if self.writable is not None:
            keep &= ((eff & np.uint8(EFF_RW)) != 0) == self.writable
        if self.executable is not None:
            ex = (eff & np.uint8(EFF_NX)) == 0 if self.nxe else np.ones(len(ch), dtype=bool)
            keep &= ex == self.executable
        if self.levels is not None:
            keep &= np.isin(ch.level, np.array(self.levels, dtype=np.uint8))
        if self.has:
            need, clear, pat = parse_has(self.has)
            keep &= (ch.raw & U64(need)) == U64(need)
            keep &= (ch.raw & U64(clear)) == 0
            if pat is not None:
                bit = np.where(ch.level == 1, U64(BIT_PAT_4K), U64(BIT_PAT_LARGE))
                keep &= ((ch.raw & bit) != 0) == pat
        present = (eff & np.uint8(EFF_P)) != 0
        return keep | ~present

    def apply(self, chunks) -> Iterator[Chunk]:
        if not self.active:
            yield from chunks
            return
        if self.has:
            parse_has(self.has)  # bad words fail before any output
        for ch in chunks:
            m = self.mask(ch)
            yield ch if m.all() else ch.take(m)
