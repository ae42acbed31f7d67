# SPDX-License-Identifier: GPL-2.0-or-later
"""Where cached translations differ from the tables: every range a CPU may use a stale translation
for, benign or dangerous (`cpu_differences`), and the windows over a replay in which a dangerous
difference stays open (`WindowTracker`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

from x86pt.errors import PhysicalAddressError
from x86pt.state import PagingState, WalkStep
from x86pt.walk import rights_letters
from x86pt.fields import BIT_D, BIT_G, BIT_PS, PK_MASK, PK_SHIFT
from x86pt.tlb.cache import Caches
from x86pt.tlb.entries import PAGE, U64, TableReader, TlbEntry, _walk_from


# -- differences ---------------------------------------------------------------------------------
# what _descend yields: a leaf ("leaf", page, size, frame, rw, us, x, pkey, dirty, g) or a present
# table-referencing entry ("table", level, base, span, table, rw, us, xd)
LeafItem = tuple[Literal["leaf"], int, int, int, bool, bool, bool, int, bool, bool]
TableItem = tuple[Literal["table"], int, int, int, int, bool, bool, bool]
# one difference of a cached entry before it gets its CPU: (start, end, kind, severity, current)
DiffRow = tuple[int, int, str, str, str]

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

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "start": hex(self.start),
            "end": hex(self.end),
            "kind": self.kind,
            "severity": self.severity,
            "cached": self.cached,
            "current": self.current,
        }


@dataclass(frozen=True)
class _Leaf:
    pa: int  # physical address of the run's first byte
    rw: bool
    us: bool
    x: bool
    pkey: int
    dirty: bool


def _descend(state: PagingState, memory: TableReader, start: int, end: int) -> Iterator[LeafItem | TableItem]:
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


def _descend_level(
    state: PagingState,
    memory: TableReader,
    plan: tuple[WalkStep, ...],
    i: int,
    start: int,
    end: int,
    table: int,
    rw: bool,
    us: bool,
    xd: bool,
) -> Iterator[LeafItem | TableItem]:
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
                    yield (
                        "leaf",
                        sbase,
                        span,
                        raw & phys & ~(span - 1),
                        r,
                        u,
                        not (nxe and x),
                        (raw & PK_MASK) >> PK_SHIFT,
                        bool(raw & BIT_D),
                        bool(raw & BIT_G),
                    )
                else:
                    yield ("table", level.number, sbase, span, raw & phys, r, u, x)
                    yield from _descend_level(
                        state, memory, plan, i + 1, va, min(end, nxt), raw & phys, r, u, x
                    )
        va = nxt


def _runs(
    state: PagingState,
    memory: TableReader,
    start: int,
    end: int,
    below: int | None = None,
    table: int | None = None,
    rw: bool = True,
    us: bool = True,
    xd: bool = False,
) -> Iterator[tuple[int, int, _Leaf | None]]:
    """The current tables' translations over [start, end) as (start, end, leaf or None) runs, one
    per leaf or hole met, reading only the tables under the range. Addresses are canonical."""
    if below is None:
        below = state.paging_levels + 1
        table = state.root
    plan = [p for p in state.walk_plan if p[0].number < below]
    assert table is not None  # the root, or given with `below`
    yield from _runs_level(state, memory, plan, 0, start, end, table, rw, us, xd)


def _runs_level(
    state: PagingState,
    memory: TableReader,
    plan: list[WalkStep],
    i: int,
    start: int,
    end: int,
    table: int,
    rw: bool,
    us: bool,
    xd: bool,
) -> Iterator[tuple[int, int, _Leaf | None]]:
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
                yield (
                    va,
                    nxt,
                    _Leaf(
                        frame + (va & (span - 1)),
                        r,
                        u,
                        not (state.nxe and x),
                        (raw & PK_MASK) >> PK_SHIFT,
                        bool(raw & BIT_D),
                    ),
                )
            else:
                yield from _runs_level(state, memory, plan, i + 1, va, nxt, raw & phys, r, u, x)
        va = nxt


def _compare(cached: _Leaf, cur: _Leaf | None) -> list[tuple[str, str]]:
    if cur is None:
        return [("present", "dangerous")]
    out: list[tuple[str, str]] = []
    if cached.pa != cur.pa:
        out.append(("frame", "dangerous"))
    for kind, a, b in (("rw", cached.rw, cur.rw), ("x", cached.x, cur.x), ("us", cached.us, cur.us)):
        if a != b:
            out.append((kind, "dangerous" if a else "benign"))
    if cached.pkey != cur.pkey:
        out.append(("pkey", "dangerous"))  # which key is more permissive depends on PKRU/PKRS
    if cached.dirty and cached.rw and not cur.dirty:
        out.append(("dirty", "benign"))
    return out


def _describe_leaf(l: _Leaf | None) -> str:
    if l is None:
        return "no translation"
    return (
        f"pa {l.pa:#x} "
        + rights_letters(l.us, l.rw, l.x)
        + (f" pkey {l.pkey}" if l.pkey else "")
        + (" D" if l.dirty else "")
    )


def _diff_ranges(
    c: Caches,
    memory: TableReader,
    start: int,
    end: int,
    cached_at: Callable[[int], _Leaf | None],
    cached_desc: str,
    runs: Iterable[tuple[int, int, _Leaf | None]],
) -> list[Difference]:
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
            prev = open_.get(k)
            if prev is not None:
                open_[k] = Difference(prev.cpu, prev.start, e, k, sev, prev.cached, prev.current)
            else:
                open_[k] = Difference(c.index, s, e, k, sev, cached_desc, _describe_leaf(cur))
    out.extend(open_.values())
    return out


def _entry_runs(st: PagingState, memory: TableReader, e: TlbEntry) -> Iterable[tuple[int, int, _Leaf | None]]:
    """The current tables' runs under e's page: one walk when one leaf (or one hole) covers it."""
    path = _walk_from(st, memory, e.page, st.paging_levels + 1, st.root, True, True, False)
    if path.ok:
        if path.size >= e.size:
            r = path.rights
            assert r is not None  # path.ok: the walk reached a leaf, whose rights it holds
            return (
                (
                    e.page,
                    e.end,
                    _Leaf(
                        path.frame + (e.page & (path.size - 1)),
                        r.writable,
                        r.user,
                        r.executable,
                        r.pkey,
                        path.dirty,
                    ),
                ),
            )
    elif (1 << st.levels[st.paging_levels - path.level].shift) >= e.size:
        return ((e.page, e.end, None),)
    return _runs(st, memory, e.page, e.end)


def _entry_diffs(st: PagingState, memory: TableReader, e: TlbEntry) -> list[DiffRow]:
    """(start, end, kind, severity, current) for one cached entry, merged."""
    out: list[DiffRow] = []
    open_: dict[str, DiffRow] = {}
    for s, z, cur in _entry_runs(st, memory, e):
        cached = _Leaf(e.frame + (s - e.page), e.writable, e.user, e.executable, e.pkey, e.dirty)
        found = dict(_compare(cached, cur))
        for k in list(open_):
            d = open_[k]
            if k not in found or d[1] != s or d[3] != found[k]:
                out.append(open_.pop(k))
        for k, sev in found.items():
            o = open_.get(k)
            if o is not None:
                open_[k] = (o[0], z, o[2], o[3], o[4])
            else:
                open_[k] = (s, z, k, sev, _describe_leaf(cur))
    out.extend(open_.values())
    return out


def _bulk_4k(st: PagingState, memory: TableReader, entries: list[TlbEntry]) -> dict[int, list[DiffRow]]:
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
    out: dict[int, list[DiffRow]] = {}  # id(entry) -> differences: the caller holds the entries
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
                    if (
                        e.frame == pa
                        and e.writable == rw
                        and e.user == us
                        and e.executable == x
                        and e.pkey == pkey
                        and not (e.dirty and e.writable and not dirty)
                    ):
                        out[id(e)] = []
                        continue
                    cur = _Leaf(pa, rw, us, x, pkey, dirty)
                    cached = _Leaf(e.frame, e.writable, e.user, e.executable, e.pkey, e.dirty)
                    out[id(e)] = [
                        (pg, pg + PAGE, k, sev, _describe_leaf(cur)) for k, sev in _compare(cached, cur)
                    ]
        for pg in range(a, z, PAGE):
            if pg not in seen:
                for e in by_page.get(pg, ()):
                    out[id(e)] = [(pg, pg + PAGE, "present", "dangerous", _describe_leaf(None))]
    return out


# cpu_differences' memo: per CPU context (root, CR4, EFER, M), id(TLB entry) -> its differences
DiffMemo = dict[tuple[int, int, int, int], dict[int, list[DiffRow]]]


def cpu_differences(
    c: Caches, memory: TableReader, memo: DiffMemo | None = None, *, prune: bool = False
) -> list[Difference]:
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
        same = any(
            n == p.level and table == p.table and (rw, us, xd) == (p.writable, p.user, p.xd)
            for n, base, table, rw, us, xd in cur.psc
        )
        if same:
            if prune:
                fresh.add(id(p))
            continue
        out.append(
            Difference(
                c.index,
                p.base,
                p.base + p.span,
                "table",
                "dangerous",
                p.describe(),
                "the tables no longer reference that table here",
            )
        )
        if p.level == 2:
            through = {
                s: leaf
                for s, e_, leaf in _runs(
                    st, memory, p.base, p.base + p.span, p.level, p.table, p.writable, p.user, p.xd
                )
            }
            # compare page by page through the old table against the current tables
            cur_runs = []
            for s, e_, leaf in _runs(st, memory, p.base, p.base + p.span):
                for v in range(s, e_, PAGE):
                    cur_runs.append(
                        (
                            v,
                            v + PAGE,
                            None
                            if leaf is None
                            else _Leaf(leaf.pa + (v - s), leaf.rw, leaf.us, leaf.x, leaf.pkey, leaf.dirty),
                        )
                    )
            out.extend(
                _diff_ranges(
                    c,
                    memory,
                    p.base,
                    p.base + p.span,
                    lambda v: through.get(v),  # noqa: B023 (called in this iteration)
                    p.describe() + " (walk through the old table)",
                    cur_runs,
                )
            )
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

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "start": hex(self.start),
            "end": hex(self.end),
            "kind": self.kind,
            "severity": self.severity,
            "opened": self.opened,
            "closed": self.closed,
        }


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
        out = [
            Window(cpu, s, e, kind, sev, op)
            for (cpu, kind, sev), runs in self._open.items()
            for s, e, op in runs
        ]
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
