"""The validator: after each operation, only over what the operation touched, prove
(a) every touched direct-map page still translates to its own frame (pa = va - PAGE_OFFSET),
(b) the effective entry (frame and flags, in 4K format) equals a flat per-page reference model
    that applies each operation's masks page by page — no large pages, no splits, no merges,
(c) direct_pages_count equals a census of the actual tables (the highmap PTE tables included,
    as the kernel accounts them),
(d) the nr-same-prot counters equal a recount of their tables,
(e) on sampled steps, the oracles of the comparison rig agree with the model and the reference on
    every page the op touched (x86pt/cpa/oracle_probe.py; checks "e" with the OracleCheck replay() is given).

The reference is written from the API's definition (docs/cpa.md §3, §4.6, §4.7 at page granularity),
not from the model's code path: that is what lets it catch a merge or split that changes a
translation.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Iterable

from x86pt.cpa.kernel import (
    CPA_NO_CHECK_ALIAS,
    DIRTY,
    GLOBAL,
    KERNEL_4K,
    NX,
    P,
    PMD_PFN_MASK,
    PSE,
    PTE_PFN_MASK,
    PUD_PFN_MASK,
    RW,
    U64,
    flags_of,
    large_2_4k,
)
from x86pt.cpa.tables import Table, entries, run_table, table_of, xor_table, zero_table

if TYPE_CHECKING:
    from typing import Callable, TypeAlias

    from x86pt.cpa.kernel import KernelVersion
    from x86pt.cpa.ops import CpaModel
    from typing import Protocol, Sequence

    Op: TypeAlias = tuple[Any, ...]  # a trace op (x86pt.cpa.trace.Op), fields by op name

    class OracleCheck(Protocol):
        """Invariant (e)'s checker, given by the caller (x86pt.cpa.oracle_probe.OracleCheck is
        one): which ops it samples, and its verdict on one."""

        def wants(self, idx: int) -> bool: ...

        def check(
            self, m: CpaModel, ref: Reference, idx: int, pages: Sequence[int], touched: set[int] | None
        ) -> Violation | None: ...

    # A 2M region's 4K entries: its PTE table, (frame of its first page, flags) for a large
    # leaf's run, or None when nothing maps it (the forms of Reference.base_2m)
    Entries: TypeAlias = "Table | tuple[int, int] | None"
    Masks: TypeAlias = "Callable[[KernelVersion, Reference], tuple[int, int, int, bool]]"

M48 = (1 << 48) - 1  # 4-level key space (oracle_probe.py); the validator uses m.vmask
HI = ~M48 & U64
_MISSING: Any = object()


class _Irregular(enum.Enum):
    IRREGULAR = 0


_IRREGULAR: Final = (
    _Irregular.IRREGULAR
)  # a 2M region the replay-start tables do not give as one table or run
_ZERO = zero_table()  # never written
_P_PSE = P | PSE
_FLAGS = ~PTE_PFN_MASK & U64


@dataclass(frozen=True)
class Violation:
    op_index: int
    invariant: str  # a | b | c | d | e
    message: str

    def __str__(self) -> str:
        return f"op {self.op_index}: invariant ({self.invariant}) violated: {self.message}"


class Reference:
    """Flat per-page model: base = the tables at replay start, plus per-page overrides."""

    def __init__(self, m: CpaModel) -> None:
        self.m = m
        self.v = m.version
        self.vmask = m.vmask  # 48-bit keys, or 57-bit with LA57 (as the model's)
        self.s3 = {k: t[:] for k, t in m.t3.items()}  # copies of the tables
        self.s2 = {k: t[:] for k, t in m.t2.items()}
        self.s1 = {k: t[:] for k, t in m.t1.items()}
        self.over: dict[int, tuple[int, int] | None] = {}  # vp (48-bit va >> 12) -> (pfn, flags)
        # The 512 PTEs the reference asks for in each 2M region with overrides (va >> 21 ->
        # table), built at the region's first override and kept up to date by put(); the 1G
        # regions holding one (va >> 30). After a hot-plug event the validator compares page
        # by page, and ov2m (va >> 21 -> pages with overrides) takes their place.
        self.exp: dict[int, Table] = {}
        self.ov1g: set[int] = set()
        self.ov2m: dict[int, set[int]] = {}
        self.changed: set[int] = set()  # 2M regions (va >> 21) put() wrote in since the validator looked
        self.l1tf = m.l1tf_invert
        self.events: list[tuple[int, int, bool]] = []  # hotplug (spfn, epfn, added)
        self.ram = list(m.ram)
        self.want4k: set[int] = set()
        lo = m.layout
        self.po = m.page_offset
        self.text_va, self.etext_va = m.text_va & self.vmask, m.etext_va & self.vmask
        self.brk_end_va = m.brk_end_va & self.vmask
        self.ro = m.kernel_set_to_readonly
        self.rodata = (m.rodata_spfn, m.rodata_epfn)
        self.rodata_s, self.rodata_e = self.rodata
        self.highmap = (m.highmap_spfn, m.highmap_epfn)
        self.skm = lo.start_kernel_map - lo.phys_base

    # -- base state ------------------------------------------------------------------------------
    def _pfn(self, e: int, mask: int) -> int:
        # L1TF (pgtable-invert.h): a non-present, non-empty entry stores its frame inverted.
        if not e & P and self.m.l1tf_invert:
            return (~e & mask) >> 12
        return (e & mask) >> 12

    def _snap(self, v: int) -> tuple[int, int] | None:
        t = self.s3.get(v >> 39)
        if t is None:
            return None
        e = t[(v >> 30) & 511]
        if not e:
            return None
        if not e & P or e & PSE:
            mask = PUD_PFN_MASK if e & PSE else PTE_PFN_MASK
            return self._pfn(e, mask) + ((v >> 12) & 0x3FFFF), large_2_4k(flags_of(e, 3))
        t = self.s2.get(v >> 30)
        e = t[(v >> 21) & 511] if t is not None else 0
        if not e:
            return None
        if not e & P or e & PSE:
            mask = PMD_PFN_MASK if e & PSE else PTE_PFN_MASK
            return self._pfn(e, mask) + ((v >> 12) & 511), large_2_4k(flags_of(e, 2))
        t = self.s1.get(v >> 21)
        e = t[(v >> 12) & 511] if t is not None else 0
        if not e:
            return None
        if not e & P and self.l1tf:
            return (~e & PTE_PFN_MASK) >> 12, e & _FLAGS
        return (e & PTE_PFN_MASK) >> 12, e & _FLAGS

    def _dm_pfn(self, v: int) -> int | None:
        lo = self.po & self.vmask
        if lo <= v < lo + (1 << 46):
            return (v - lo) >> 12
        return None

    def base(self, v: int) -> tuple[int, int] | None:
        if self.events:
            pfn = self._dm_pfn(v)
            if pfn is not None:
                for s, e, added in reversed(self.events):
                    if s <= pfn < e:
                        return (pfn, self.m.default_prot) if added else None
        return self._snap(v)

    def span_event(self, v: int, end: int) -> tuple[int, bool] | None:
        """For a direct-map span [v, end) the hot-plug history decides wholly: (index of the
        latest event overlapping it, added?) when that event covers the whole span, None when
        no event or only a partial one overlaps (then pages are compared one by one)."""
        s, e = self._dm_pfn(v), self._dm_pfn(end - 1)
        if s is None or e is None:
            return None
        for k in range(len(self.events) - 1, -1, -1):
            a, b, added = self.events[k]
            if a <= e and s < b:
                return (k, added) if a <= s and e < b else None
        return None

    def touched_by_events(self, v: int, end: int) -> bool:
        s, e = self._dm_pfn(v), self._dm_pfn(end - 1)
        if s is None or e is None:
            return False
        return any(a <= e and s < b for a, b, _ in self.events)

    def get(self, v: int) -> tuple[int, int] | None:
        r: tuple[int, int] | None = self.over.get(v >> 12, _MISSING)
        if r is _MISSING:
            return self.base(v)
        return r

    def put(self, v: int, val: tuple[int, int] | None) -> None:
        vp = v >> 12
        self.over[vp] = val
        self.changed.add(vp >> 9)
        k2 = vp >> 9
        t = self.exp.get(k2)
        if t is None:
            if self.events:
                st = self.ov2m.get(k2)
                if st is None:
                    st = self.ov2m[k2] = set()
                st.add(vp)
                return
            self.ov1g.add(k2 >> 9)
            base = self.base_2m(k2)
            if base is _IRREGULAR:
                return  # compared page by page
            t = self.exp[k2] = self.as_table(base)[:]
        if val is None:
            t[vp & 511] = 0
        else:
            pfn, fl = val  # enc(), inlined
            t[vp & 511] = (~(pfn << 12) & PTE_PFN_MASK) | fl if not fl & P and self.l1tf else (pfn << 12) | fl

    def base_2m(self, k2: int) -> Entries | _Irregular:
        """The replay-start tables' 4K entries for 2M region k2 (va >> 21): the PTE table, (frame
        of the region's first page, flags in 4K format) when a large leaf maps it, None when
        nothing does, or _IRREGULAR when none of these describes it."""
        v = k2 << 21
        if self.snap_is_table(v):
            t1 = self.s1.get(k2)
            if t1 is None:
                return _IRREGULAR
            return t1
        b = self._snap(v)
        if b is None:
            if any(self._snap(v + (j << 12)) for j in (1, 255, 511)):
                return _IRREGULAR
            return None
        return b

    def snap_is_table(self, v: int) -> bool:
        """Whether the replay-start tables map the 2M region at v by a PTE table."""
        t = self.s3.get(v >> 39)
        if t is None:
            return False
        e = t[(v >> 30) & 511]
        if not e or not e & P or e & PSE:
            return False
        t2 = self.s2.get(v >> 30)
        e = t2[(v >> 21) & 511] if t2 is not None else 0
        return bool(e) and bool(e & P) and not e & PSE

    def as_table(self, x: Entries) -> Table:
        """A region's entries (forms of base_2m, not _IRREGULAR) as one table (maybe shared)."""
        if x is None:
            return _ZERO
        if isinstance(x, tuple):
            return self.enc_run(x[0], x[1])
        return x

    def enc_run(self, pfn: int, flags: int) -> Table:
        """The 512 PTEs `enc(pfn + j, flags)` of one large leaf's frames, as one table."""
        if flags & PTE_PFN_MASK:  # reserved bits of a large leaf among the flags: one by one
            return table_of(self.enc(pfn + j, flags) for j in range(512))
        t = run_table((pfn << 12) | flags, 1 << 12)
        if not flags & P and self.l1tf:
            t = xor_table(t, PTE_PFN_MASK)  # flags hold no frame bit: the frame inverted
        return t

    def enc(self, pfn: int, flags: int) -> int:
        """A 4K entry as the kernel stores it (pfn_pte): the frame inverted when not present."""
        if not flags & P and self.l1tf:
            return (~(pfn << 12) & PTE_PFN_MASK) | flags
        return (pfn << 12) | flags

    # -- the operations, page by page ------------------------------------------------------------
    def _page(self, v: int, set_: int, clr: int) -> int | None:
        """One page of a CPA call: (flags & ~clr) | set, the static protections (§4.6,
        inlined), PROTNONE bits cleared. Returns the page's frame, None when it has no entry."""
        cur: tuple[int, int] | None = self.over.get(v >> 12, _MISSING)
        if cur is _MISSING:
            cur = self._snap(v) if not self.events else self.base(v)
        if cur is None:
            return None
        pfn, fl = cur
        new = ((fl & ~clr) | set_) & _FLAGS
        if new & P:
            if self.text_va <= v < self.etext_va:
                new &= ~NX
            if self.ro and self.rodata_s <= pfn <= self.rodata_e:
                new &= ~RW
        else:
            new &= ~GLOBAL
        if new != fl:
            self.put(v, (pfn, new))
        return pfn

    def cpa(
        self, addr: int, n: int, set_: int, clr: int, flags: int, primary: bool, touched: list[int]
    ) -> None:
        v0 = (addr & ~0xFFF) & self.vmask
        alias = primary and not flags & CPA_NO_CHECK_ALIAS
        aset, aclr = set_, clr
        if self.v.nx_alias_strip:
            aset &= ~NX
            aclr &= ~NX
        lo = self.po & self.vmask
        dm_end = lo + ((self.ram[-1][1] if self.ram else 0) << 12)
        page, vmask = self._page, self.vmask
        text_va, brk_end_va, skm = self.text_va, self.brk_end_va, self.skm
        h0, h1 = self.highmap
        # _page and put() inlined for the call's own pages (the hot loop of a validated replay);
        # the alias pages go through _page
        over, over_get, changed, exp = self.over, self.over.get, self.changed, self.exp
        snap = self._snap if not self.events else self.base
        keep = ~clr & _FLAGS
        set_ &= _FLAGS
        akeep, aset_f = ~aclr & _FLAGS, aset & _FLAGS
        r0 = r1 = 0  # the RAM range (pfn_mapped) of the last alias
        etext_va, ro, rs, re_ = self.etext_va, self.ro, self.rodata_s, self.rodata_e
        l1tf = self.l1tf
        for k in range(n):
            v = v0 + (k << 12)
            vp = v >> 12
            cur = over_get(vp, _MISSING)
            if cur is _MISSING:
                cur = snap(v)
            touched.append(v)
            if cur is None:
                if not primary:
                    continue
                if lo <= v < dm_end:
                    pfn = (v - lo) >> 12
                    if not alias:
                        continue
                else:
                    return  # -EFAULT stops the call
            else:
                pfn, fl = cur
                new = (fl & keep) | set_
                if new & P:
                    if text_va <= v < etext_va:
                        new &= ~NX
                    if ro and rs <= pfn <= re_:
                        new &= ~RW
                else:
                    new &= ~GLOBAL
                if new != fl:
                    t = exp.get(vp >> 9)
                    if t is None:
                        self.put(v, (pfn, new))  # the region's first override: put() sets it up
                    else:
                        over[vp] = (pfn, new)
                        changed.add(vp >> 9)
                        if not new & P and l1tf:
                            t[vp & 511] = (~(pfn << 12) & PTE_PFN_MASK) | new
                        else:
                            t[vp & 511] = (pfn << 12) | new
            if not alias:
                continue
            if not r0 <= pfn < r1:  # not in the RAM range of the last hit
                ram = self.ram
                i = bisect.bisect_right(ram, (pfn, U64 + 1)) - 1
                if i < 0 or pfn >= ram[i][1]:
                    continue
                r0, r1 = ram[i]
            if not lo <= v < dm_end:
                # the direct-map alias: _page(a, aset, aclr) inlined
                a = (lo + (pfn << 12)) & vmask
                ap = a >> 12
                cur = over_get(ap, _MISSING)
                if cur is _MISSING:
                    cur = snap(a)
                if cur is not None:
                    apfn, fl = cur
                    new = (fl & akeep) | aset_f
                    if new & P:
                        if text_va <= a < etext_va:
                            new &= ~NX
                        if ro and rs <= apfn <= re_:
                            new &= ~RW
                    else:
                        new &= ~GLOBAL
                    if new != fl:
                        t = exp.get(ap >> 9)
                        if t is None:
                            self.put(a, (apfn, new))
                        else:
                            over[ap] = (apfn, new)
                            changed.add(ap >> 9)
                            if not new & P and l1tf:
                                t[ap & 511] = (~(apfn << 12) & PTE_PFN_MASK) | new
                            else:
                                t[ap & 511] = (apfn << 12) | new
                touched.append(a)
            if not text_va <= v < brk_end_va and h0 <= pfn <= h1:
                a = (skm + (pfn << 12)) & vmask
                page(a, aset, aclr)
                touched.append(a)

    def apply(self, op: Op, accepted: object, touched: list[int]) -> str | None:
        """Apply one parsed trace op. Returns a message when the op itself contradicts the
        reference (an out-of-band write that found no 4K PTE for a page asked to be 4K)."""
        v = self.v
        name = op[0]
        enable = _DIRECT_MAP.get(name)
        if enable is not None:
            # set_direct_map_*_noflush (the commonest op): cpa() of one page with
            # CPA_NO_CHECK_ALIAS, i.e. that page's step alone (a page without an entry ends the
            # call either way)
            va = (op[1] & ~0xFFF) & self.vmask
            if enable:
                self._page(va, P | RW, 0)
            else:
                self._page(va, 0, v.set_pages_np_clr)
            touched.append(va)
        elif name in _API_MASKS:
            s, c, fl, fs = _API_MASKS[name](v, self)
            if name == "set_memory_rox" and not v.native_rox:
                self.cpa(op[1], op[2], 0, v.set_memory_ro_clr, 0, True, touched)
                self.cpa(
                    op[1], op[2], 0, NX, CPA_NO_CHECK_ALIAS if not v.nx_alias_strip else 0, True, touched
                )
                return None
            if name == "set_memory_4k":
                for k in range(op[2]):
                    self.want4k.add(((op[1] & self.vmask) >> 12) + k)
            if s or c or fs:  # force_split still runs every page (protnone G clearing)
                self.cpa(op[1], op[2], s, c, fl, True, touched)
        elif name == "kernel_map_pages":
            n = op[2]
            enable = op[3]
            s, c = (P | RW, 0) if enable else (0, v.set_pages_np_clr)
            self.cpa(op[1], n, s, c, CPA_NO_CHECK_ALIAS, v.set_pages_primary, touched)
        elif name == "cpa":
            _, addr, n, s, c, fl, primary, fs = op
            if fs and v.kernel_4k_bit and s & KERNEL_4K:
                for k in range(n):
                    self.want4k.add(((addr & self.vmask) >> 12) + k)
            if s or c or fs:
                self.cpa(addr, n, s, c, fl, primary, touched)
        elif name == "oob":
            va = op[1] & self.vmask & ~0xFFF
            touched.append(va)
            if accepted:
                cur = self.get(va)
                if cur is not None:
                    self.put(va, (cur[0], ((cur[1] & ~op[3]) | op[2]) & U64))
            elif (va >> 12) in self.want4k:
                return (
                    f"out-of-band write to {op[1]:#x} found no 4K PTE although set_memory_4k "
                    "was asked for that page (a merge undid it)"
                )
        elif name == "vmap":
            _, addr, pa, n, huge = op
            for k in range(n):
                va = (addr & self.vmask) + (k << 12)
                self.put(va, ((pa >> 12) + k, self.m.default_prot))
                touched.append(va)
        elif name == "vunmap":
            for k in range(op[2]):
                va = (op[1] & self.vmask) + (k << 12)
                self.put(va, None)
                touched.append(va)
        elif name in ("memory_add", "memory_remove"):
            s, e = op[1] >> 12, (op[1] + op[2]) >> 12
            added = name == "memory_add"
            if not self.events:  # from now on page by page: the overrides by 2M
                self.exp.clear()
                self.ov1g.clear()
                for vp in self.over:
                    self.ov2m.setdefault(vp >> 9, set()).add(vp)
            self.events.append((s, e, added))
            lo = (self.po & self.vmask) >> 12
            for vp in [vp for vp in self.over if s <= vp - lo < e]:
                del self.over[vp]
                self.ov2m.get(vp >> 9, set()).discard(vp)
            if added:
                self.ram.append((s, e))
                self.ram.sort()
            else:
                out = []
                for a, b in self.ram:
                    if b <= s or a >= e:
                        out.append((a, b))
                    else:
                        out += [(a, s)] if a < s else []
                        out += [(e, b)] if b > e else []
                self.ram = out
        return None


def _masks(s: int, c: int, fl: int = 0, fs: bool = False) -> Masks:
    return lambda v, ref: (s, c, fl, fs)


_DIRECT_MAP = {"set_direct_map_invalid_noflush": False, "set_direct_map_default_noflush": True}
_API_MASKS: dict[str, Masks] = {
    "set_memory_ro": lambda v, r: (0, v.set_memory_ro_clr, 0, False),
    "set_memory_rw": _masks(RW, 0),
    "set_memory_x": lambda v, r: (0, NX, 0 if v.nx_alias_strip else CPA_NO_CHECK_ALIAS, False),
    "set_memory_nx": lambda v, r: (NX, 0, 0 if v.nx_alias_strip else CPA_NO_CHECK_ALIAS, False),
    "set_memory_rox": lambda v, r: (0, RW | NX | (DIRTY if v.ro_clears_dirty else 0), 0, False),
    "set_memory_np": _masks(0, P),
    "set_memory_np_noalias": _masks(0, P, CPA_NO_CHECK_ALIAS),
    "set_memory_p": _masks(P, 0),
    "set_memory_4k": lambda v, r: (KERNEL_4K if v.kernel_4k_bit else 0, 0, 0, True),
    "set_memory_global": _masks(GLOBAL, 0),
    "set_memory_nonglobal": _masks(0, GLOBAL),
}


class Validator:
    """Incremental checks over the entries an op touched (CpaModel.touched) and the pages the
    reference changed."""

    def __init__(self, m: CpaModel, checks: str = "abcd", oracle_check: OracleCheck | None = None) -> None:
        import numpy

        self._np = numpy
        self.m = m
        self.checks = checks
        self.vmask = m.vmask
        self.hi = ~m.vmask & U64
        self.ref = Reference(m)
        lo, hi = m.dm_bounds()
        self.dm = (lo, hi)
        hs = m.start_kernel_map & self.vmask
        self.hm = (hs, hs + m.layout.kernel_image_size)
        self.cnt: dict[tuple[int, int], int] = {}
        self.tot = {1: 0, 2: 0, 3: 0}
        self.hm_tables: set[int] = set()
        for k in m.t1:
            self._recount(1, k)
            if self.hm[0] <= k << 21 < self.hm[1]:
                self.hm_tables.add(k)
        for k in m.t2:
            self._recount(2, k)
        for k in m.t3:
            self._recount(3, k)
        self.pages_checked = 0
        self._hm_counted: tuple[object, int] | None = None  # (m.ram, highmap tables counted)
        # Invariant (e): the caller's OracleCheck (x86pt/cpa/oracle_probe.py), when checks hold "e".
        self.oracle = oracle_check if "e" in checks else None

    def _recount(self, tl: int, key: int) -> None:
        shift = 12 + 9 * tl
        if not self.dm[0] <= key << shift < self.dm[1]:
            return
        m = self.m
        t = (m.t1 if tl == 1 else m.t2 if tl == 2 else m.t3).get(key)
        np = self._np
        if t is None:
            n = 0
        elif tl == 1:
            n = int(np.count_nonzero(np.frombuffer(t, np.uint64)))
        else:
            # leaves and non-present entries: every non-zero entry but the table pointers
            a = np.frombuffer(t, np.uint64)
            n = int(np.count_nonzero(a)) - int(np.count_nonzero((a & _P_PSE) == P))
        old = self.cnt.pop((tl, key), 0)
        if n:
            self.cnt[(tl, key)] = n
        self.tot[tl] += n - old

    def initial(self) -> Violation | None:
        return self._check_counters(-1)

    def _canon(self, v: int) -> int:
        """A key-space VA (masked to the paging width) in canonical form."""
        return v | self.hi if v >> (self.vmask.bit_length() - 1) else v

    def _check_counters(self, idx: int) -> Violation | None:
        if "c" not in self.checks:
            return None
        c = self.m.counters
        h = self._highmap_counted()
        tot = self.tot
        if c.dpc4k != tot[1] + 512 * h or c.dpc2m != tot[2] - h or c.dpc1g != tot[3]:
            want = (tot[1] + 512 * h, tot[2] - h, tot[3])
            have = (c.dpc4k, c.dpc2m, c.dpc1g)
            return Violation(
                idx,
                "c",
                f"direct_pages_count 4k/2M/1G = {have} but the tables hold "
                f"{want} (census incl. {h} highmap PTE tables)",
            )
        return None

    def _highmap_counted(self) -> int:
        """The highmap PTE tables the kernel accounts as direct-map splits: recounted when the
        set of those tables or the RAM list changed since the last time."""
        hc = self._hm_counted
        if hc is None or hc[0] is not self.m.ram:
            h = sum(1 for k in self.hm_tables if self.m.virt_addr_counted(self._canon(k << 21)))
            hc = self._hm_counted = (self.m.ram, h)
        return hc[1]

    def check(self, idx: int, op: Op, accepted: object, touched: set[int] | None) -> Violation | None:
        m = self.m
        pages: list[int] = []
        self.ref.changed.clear()
        msg = self.ref.apply(op, accepted, pages)
        if msg:
            return Violation(idx, "b", msg)
        # the tables the op wrote in (an entry key's table) or below (a pointer's child), as
        # ints key << 2 | level (no tuple per entry)
        small: set[int] = set()  # the 2M regions (va >> 21) of the 4K entries the op wrote
        upper: list[int] = []  # the op's other entry keys
        for ek in touched or ():
            if ek & 3 == 1:
                small.add(ek >> 11)
            else:
                upper.append(ek)
        tables = {(k2 << 2) | 1 for k2 in small}
        pointers = False
        for ek in upper:
            tl = ek & 3
            tables.add(((ek >> 11) << 2) | tl)
            if tl > 1:
                tables.add((ek & ~3) | (tl - 1))
                pointers = True
        # (c) census, incrementally
        if "c" in self.checks:
            dlo, dhi = self.dm
            hlo, hhi = self.hm
            for tk in tables:
                tl, key = tk & 3, tk >> 2
                if dlo <= key << (12 + 9 * tl) < dhi:  # _recount counts direct-map tables only
                    self._recount(tl, key)
                if tl == 1 and hlo <= key << 21 < hhi:
                    if key in m.t1:
                        if key not in self.hm_tables:
                            self.hm_tables.add(key)
                            self._hm_counted = None
                    elif key in self.hm_tables:
                        self.hm_tables.discard(key)
                        self._hm_counted = None
            v = self._check_counters(idx)
            if v:
                return v
        # (d) nr-same-prot counters
        if "d" in self.checks and m.nsp is not None:
            for tk in tables:
                tl, key = tk & 3, tk >> 2
                if tl in (1, 2):
                    r = m.nsp.recount(tl, key)
                    if r is not None and r[0] != r[1]:
                        return Violation(
                            idx,
                            "d",
                            f"nr_same_prot of the {'PTE' if tl == 1 else 'PMD'} "
                            f"table for {self._canon(key << (12 + 9 * tl)):#x} is "
                            f"{r[0]} but a recount gives {r[1]}",
                        )
        # (b) a table entry an op wrote must not restrict its table: the kernel installs
        # _KERNPG_TABLE (P|RW|A|D) and leaves protections to the leaves; RW=0 or NX=1 there
        # would change all 512 translations below without any leaf differing
        if pointers and "b" in self.checks:
            for ek in touched or ():
                tl, k = ek & 3, ek >> 2
                if tl < 2:
                    continue
                t = (m.t2 if tl == 2 else m.t3).get(k >> 9)
                e = t[k & 511] if t is not None else 0
                if e & P and not e & PSE and (not e & RW or e & NX):
                    va = k << (12 + 9 * (tl - 1))
                    # name the first page the restriction changes, when one is
                    hit = self._first_restricted(va, 1 << (12 + 9 * (tl - 1)), e)
                    at = f"page {self._canon(hit):#x}: the " if hit is not None else ""
                    return Violation(
                        idx,
                        "b",
                        f"{at}{'PMD' if tl == 2 else 'PUD'} entry for "
                        f"{self._canon(va):#x} points to a table with "
                        f"RW={int(bool(e & RW))} NX={int(bool(e & NX))} "
                        f"({e:#x}): it restricts every page below it",
                    )
        # (a), (b) over the touched regions
        if "a" in self.checks or "b" in self.checks:
            v = (
                self._check_regions(idx, upper, small)
                if not self.ref.events
                else self._check_regions_by_page(idx, touched, pages)
            )
            if v:
                return v
        # (e) the oracles, on sampled steps only
        if self.oracle is not None and self.oracle.wants(idx):
            return self.oracle.check(m, self.ref, idx, pages, touched)
        return None

    def _first_restricted(self, va: int, span: int, ptr: int) -> int | None:
        """The first page in [va, va + span) whose translation the restricting table pointer
        `ptr` changes: a present leaf that is writable (ptr RW=0) or executable (ptr NX=1)."""
        m = self.m
        v, end = va, va + span
        while v < end:
            try:
                lvl, t, i = m.lookup(v)
            except KeyError:  # a present pointer to no table (a corrupted entry): all of it
                return v
            e = t[i] if t is not None else 0
            size = 1 << (12 + 9 * (lvl - 1)) if lvl <= 3 else 1 << 39
            if e & P and (lvl == 1 or e & PSE) and ((ptr & NX and not e & NX) or (not ptr & RW and e & RW)):
                return v
            v = (v & ~(size - 1)) + size
        return None

    # -- (a), (b): 2M regions compared as whole tables ---------------------------------------------
    def _check_regions(self, idx: int, upper: list[int], small: set[int]) -> Violation | None:
        """Every 2M region where the op changed something (an entry the model wrote, a page
        whose translation the reference changed), larger spans first: the model's 512
        effective 4K entries against the reference's, as two tables compared at once; pages
        that differ are then compared one by one (_page_check), which decides whether the
        difference is a violation. A page neither side changed needs no look: both sides
        agreed on it before the op (they start equal, and every op is checked so)."""
        big: list[int] = []
        mid: list[int] = []
        for ek in upper:
            tl = ek & 3
            if tl == 3:
                k = ek >> 2
                if not self._check_1g(k):
                    big.extend(range(k << 9, (k + 1) << 9))
            elif tl == 2:
                mid.append(ek >> 2)
            else:
                small.add(ek >> 11)
        small |= self.ref.changed
        if not big and not mid:  # the common case: 4K entries and pages only
            check_2m = self._check_2m
            for k2 in small:
                r = check_2m(idx, k2)
                if r:
                    return r
            return None
        done: set[int] = set()
        for group in (big, mid, small):
            for k2 in group:
                if k2 not in done:
                    done.add(k2)
                    r = self._check_2m(idx, k2)
                    if r:
                        return r
        return None

    def _check_2m(self, idx: int, k2: int) -> Violation | None:
        v = k2 << 21
        exp = self.ref.exp.get(k2)
        if exp is not None:  # the common case, inlined: a PTE table against its expectation
            m = self.m
            t = m.t3.get(v >> 39)
            if t is not None:
                e = t[(v >> 30) & 511]
                if e & P and not e & PSE:
                    e = m.t2[v >> 30][(v >> 21) & 511]
                    if e & P and not e & PSE and m.t1[v >> 21] == exp:
                        self.pages_checked += 512
                        return None
        want = self._expected_2m(k2)
        if want is _IRREGULAR:
            return self._pages(idx, v, range(512))
        got = self._actual_2m(v)
        self.pages_checked += 512
        if got == want:
            return None
        diff: Iterable[int]
        if type(got) is tuple and type(want) is tuple:
            diff = range(512)  # two different runs: the first page tells
        else:
            gt, wt = self._as_table(got), self._as_table(want)
            if gt == wt:
                return None
            diff = self._np.flatnonzero(entries(gt) != entries(wt)).tolist()
        return self._pages(idx, v, diff)

    def _pages(self, idx: int, v: int, js: Iterable[int]) -> Violation | None:
        for j in js:
            r = self._page_check(idx, v + (j << 12))
            if r:
                return r
        return None

    def _page_check(self, idx: int, v: int) -> Violation | None:
        """One page: the model's translation of v (frame, flags in 4K format) against the
        reference's."""
        lvl, t, i = self.m.lookup(v)
        e = t[i] if t is not None else 0
        if lvl == 1:
            return self._cmp(idx, v, self._pte(e), self.ref.get(v))
        got = None
        if e:
            pfn0, fl = self._large(lvl, e)
            got = (pfn0 + ((v & ((1 << (12 + 9 * (lvl - 1))) - 1)) >> 12), fl)
        return self._cmp(idx, v, got, self.ref.get(v))

    def _large(self, lvl: int, e: int) -> tuple[int, int]:
        """(first frame, flags in 4K format) of a non-zero PMD/PUD entry that is a leaf or not
        present; a non-present one holds its frame inverted (L1TF)."""
        raw = ~e & U64 if not e & P and self.m.l1tf_invert else e
        mask = (PMD_PFN_MASK if lvl == 2 else PUD_PFN_MASK) if e & PSE else PTE_PFN_MASK
        return (raw & mask) >> 12, large_2_4k(flags_of(e, lvl))

    def _actual_2m(self, v: int) -> Table | tuple[int, int] | None:
        """The model's 4K entries for the 2M region at v: its PTE table, (frame of the region's
        first page, flags) when a large leaf maps it, None when nothing does."""
        lvl, t, i = self.m.lookup(v)
        if lvl == 1:
            return t
        e = t[i] if t is not None else 0
        if not e:
            return None
        pfn0, fl = self._large(lvl, e)
        return pfn0 + ((v & ((1 << (12 + 9 * (lvl - 1))) - 1)) >> 12), fl

    def _expected_2m(self, k2: int) -> Entries | _Irregular:
        """The reference's 4K entries for 2M region k2 in the forms of _actual_2m, or
        _IRREGULAR when the replay-start tables do not make it one table or one run."""
        t = self.ref.exp.get(k2)
        if t is not None:
            return t
        return self.ref.base_2m(k2)  # no override in the region (or an irregular one)

    def _as_table(self, x: Entries) -> Table:
        return self.ref.as_table(x)

    def _check_1g(self, k3: int) -> bool:
        """Whether the 1G region k3 (va >> 30) is, as a whole, what the reference asks for: no
        override in it, a 1G leaf at replay start, and the model's PUD entry that leaf still, or
        a PMD table of its 512 2M pieces (a 1G split). False: compare it 2M by 2M."""
        ref = self.ref
        if ref.events or k3 in ref.ov1g:
            return False
        t = ref.s3.get(k3 >> 9)
        e = t[k3 & 511] if t is not None else 0
        if not e & P or not e & PSE or e & 0x3FE00000:
            return False
        mt = self.m.t3.get(k3 >> 9)
        me = mt[k3 & 511] if mt is not None else 0
        if me != e:
            t2 = self.m.t2.get(k3)
            if not me & P or me & PSE or t2 is None or t2 != run_table(e, 1 << 21):
                return False
        self.pages_checked += 1 << 18
        return True

    def expected_pte_table(self, k2: int) -> Table | None:
        """The 512 PTE values the reference asks for in 2M region k2 (va >> 21), or None when
        the hot-plug history makes it irregular (then pages are compared one by one)."""
        if self.ref.events:
            return None
        exp = self._expected_2m(k2)
        return None if exp is _IRREGULAR else self._as_table(exp)[:]

    # -- (a), (b) with a hot-plug history: region by region, page by page --------------------------
    def _check_regions_by_page(
        self, idx: int, touched: set[int] | None, pages: list[int]
    ) -> Violation | None:
        regions: set[tuple[int, int]] = set()
        for ek in touched or ():
            regions.add((ek & 3, ek >> 2))
        for v in pages:
            regions.add((1, v >> 12))
        done: set[tuple[int, int]] = set()
        for tl, k in sorted(regions, key=lambda r: -r[0]):
            r = self._region(idx, tl, k, done)
            if r:
                return r
        return None

    def _region(self, idx: int, tl: int, k: int, done: set[tuple[int, int]]) -> Violation | None:
        """Check the span of one entry key (tl=1: a page, 2: 2M, 3: 1G) against the reference."""
        m = self.m
        if tl == 3:
            for j in range(512):
                r = self._region(idx, 2, (k << 9) | j, done)
                if r:
                    return r
            return None
        if tl == 2:
            if (2, k) in done:
                return None
            done.add((2, k))
            v = k << 21
            lvl, t, i = m.lookup(v)
            if lvl == 1:
                exp = self.expected_pte_table(k)
                if exp is not None:
                    assert t is not None  # a PTE table (lvl 1)
                    self.pages_checked += 512
                    if t == exp:
                        return None
                    for j in range(512):
                        if t[j] != exp[j]:
                            e, x = t[j], exp[j]
                            return self._cmp(idx, v + (j << 12), self._pte(e), self._pte(x))
                    return None
        start = k << (12 + 9 * (tl - 1))
        end = start + (1 << (12 + 9 * (tl - 1)))
        v = start
        while v < end:
            lvl, t, i = m.lookup(v)
            span = 1 << (12 + 9 * (lvl - 1)) if lvl <= 3 else 1 << 39
            lstart = v & ~(span - 1)
            key = (lvl, lstart)
            if lvl == 1:
                if (1, v) not in done:
                    done.add((1, v))
                    assert t is not None  # a PTE table (lvl 1)
                    e = t[i]
                    r = self._cmp(idx, v, self._pte(e), self.ref.get(v))
                    if r:
                        return r
                v += 4096
                continue
            if key in done:
                v = lstart + span
                continue
            done.add(key)
            e = t[i] if t is not None else 0
            r = self._leaf(idx, lvl, lstart, max(lstart, start), min(lstart + span, end), e)
            if r:
                return r
            v = lstart + span
        return None

    def _pte(self, e: int) -> tuple[int, int] | None:
        """(frame, flags) of a 4K entry; a non-present one holds its frame inverted (L1TF)."""
        if not e:
            return None
        raw = ~e & U64 if not e & P and self.m.l1tf_invert else e
        return (raw & PTE_PFN_MASK) >> 12, e & ~PTE_PFN_MASK & U64

    def _leaf(self, idx: int, lvl: int, lstart: int, s: int, e_: int, e: int) -> Violation | None:
        ref = self.ref
        if e:
            raw = ~e & U64 if not e & P and self.m.l1tf_invert else e  # L1TF: np frames inverted
            if lvl == 1:
                pfn0, fl = (raw & PTE_PFN_MASK) >> 12, e & ~PTE_PFN_MASK & U64
            else:
                mask = (PMD_PFN_MASK if lvl == 2 else PUD_PFN_MASK) if e & PSE else PTE_PFN_MASK
                pfn0, fl = (raw & mask) >> 12, large_2_4k(flags_of(e, lvl))
        v = s
        while v < e_:
            if ref.events and not v & 0x1FFFFF and v + 0x200000 <= e_ and not ref.ov2m.get(v >> 21):
                # a 2M span one hot-plug event decides wholly: one comparison (removed: the
                # kernel may keep a partly covered leaf, nothing to compare)
                ev = ref.span_event(v, v + 0x200000)
                if ev is not None:
                    if ev[1]:
                        got = (pfn0 + ((v - lstart) >> 12), fl) if e else None
                        r = self._cmp(idx, v, got, ((v - (self.dm[0])) >> 12, self.m.default_prot))
                        if r:
                            return r
                    v += 0x200000
                    continue
            # a 2M span without overrides whose base is one large leaf: one comparison
            if (
                not v & 0x1FFFFF
                and v + 0x200000 <= e_
                and not ref.ov2m.get(v >> 21)
                and not ref.touched_by_events(v, v + 0x200000)
            ):
                b = ref._snap(v)
                b2 = ref._snap(v + 0x1FF000)
                if (
                    b is not None
                    and b2 is not None
                    and b2[0] == b[0] + 511
                    and b2[1] == b[1]
                    and self._uniform_snap(v)
                ):
                    got = (pfn0 + ((v - lstart) >> 12), fl) if e else None
                    r = self._cmp(idx, v, got, b)
                    if r:
                        return r
                    v += 0x200000
                    continue
            want = ref.get(v)
            got = (pfn0 + ((v - lstart) >> 12), fl) if e else None
            r = self._cmp(idx, v, got, want)
            if r:
                return r
            v += 4096
        return None

    def _uniform_snap(self, v: int) -> bool:
        t = self.ref.s3.get(v >> 39)
        if t is None:
            return False
        e = t[(v >> 30) & 511]
        if e and (not e & P or e & PSE):
            return True
        t2 = self.ref.s2.get(v >> 30)
        if t2 is None:
            return False
        e = t2[(v >> 21) & 511]
        return bool(e) and (not e & P or bool(e & PSE))

    def _cmp(
        self, idx: int, v: int, got: tuple[int, int] | None, want: tuple[int, int] | None
    ) -> Violation | None:
        self.pages_checked += 1
        va = self._canon(v)
        lo, hi = self.dm
        if "a" in self.checks and lo <= v < hi and got is not None and got[0] != (v - lo) >> 12:
            return Violation(
                idx, "a", f"direct-map page {va:#x} now maps frame {got[0] << 12:#x}, not {v - lo:#x}"
            )
        if "b" not in self.checks:
            return None
        if want is None and lo <= v < hi:
            return None  # hot-removed: the kernel may leave a partly covered large leaf
        if want is None and got is not None and not got[1] & P:
            return None
        if got != want:

            def show(x: tuple[int, int] | None) -> str:
                if x is None:
                    return "no entry"
                from x86pt.cpa.kernel import flag_names

                return f"frame {x[0] << 12:#x} flags {x[1]:#x} ({flag_names(x[1])})"

            what = "present bit" if (got and got[1] & P) != (want and want[1] & P) else "translation"
            return Violation(
                idx, "b", f"{what} of {va:#x}: tables give {show(got)}, the op sequence asks for {show(want)}"
            )
        return None
