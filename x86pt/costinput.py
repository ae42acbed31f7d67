# SPDX-License-Identifier: GPL-2.0-or-later
"""The inputs of the walk-cost model (x86pt/cost.py, docs/cost.md): the TLB geometry, the direct
map's leaves and an access pattern over physical memory.

* `Geometry`: entries and ways of each TLB structure and the paging-structure cache sizes;
  `geometry_named` reads 'skylake' or 'qemu' with key=value overrides. `Geometry.splinter` makes
  every TLB entry a 4K piece of its leaf (QEMU's softmmu TLB; the walk still reads down to the
  leaf): the `QEMU` geometry, used to check the model against unicorn.
* `Leaves`: the direct map's present leaves (from a CpaModel or from an image through the
  scanner). Addresses are offsets into the direct map (va - PAGE_OFFSET), which equal physical
  addresses there.
* `Pattern`: a distribution over those offsets: uniform over the mapped RAM (`uniform`), a hot
  set of 2M regions (`hot_set`), a trace of physical addresses (`from_addresses`, `read_trace`),
  or the pages a CPA workload touched (`workload_pages`); `mapped_only` drops what the direct map
  does not map; `pattern_named` reads a command line's PATTERN.

Default geometry (`SKYLAKE`): Intel 64 and IA-32 Architectures Optimization Reference Manual
(order no. 248966-045, February 2022), Table 2-15 (the TLB parameters of the Skylake client
microarchitecture, which Skylake server shares): DTLB 4K 64 entries 4-way, 2M/4M 32 entries 4-way, 1G 4 entries 4-way; STLB
4K+2M/4M shared 1536 entries 12-way, 1G 16 entries 4-way. The manual gives no paging-structure
cache sizes (the SDM §4.10.3 leaves them implementation-specific): the defaults below (PDE 32,
PDPTE 4, PML4E 2) are assumptions, configurable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from x86pt.errors import BadInputError

if TYPE_CHECKING:  # only for annotations: no CPA or scan code at start-up
    from x86pt.cpa.ops import CpaModel
    from x86pt.memory.base import PhysicalMemory
    from x86pt.state import PagingState

# A CPA trace operation: (name, operands...) as x86pt.cpa.trace reads them
Op = tuple[Any, ...]

K4, M2, G1 = 12, 21, 30
SIZES = (K4, M2, G1)
SIZE_NAME = {K4: "4K", M2: "2M", G1: "1G"}
LEVEL_OF = {K4: 1, M2: 2, G1: 3}  # SDM level of the leaf entry
PAGE = 1 << 12


# -- geometry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Entries and ways of each TLB structure; ways == entries is fully associative."""

    name: str
    l1: dict[int, tuple[int, int]]  # page shift -> (entries, ways)
    stlb: tuple[tuple[int, ...], int, int]  # (page shifts sharing it, entries, ways)
    stlb_1g: tuple[int, int] | None  # 1G entries of the STLB (None: 1G misses walk)
    psc: dict[int, int] = field(default_factory=dict)  # PSC level (2 PDE, 3 PDPTE, 4 PML4E, 5) -> entries
    # TLB entries are 4K pieces of every leaf (QEMU's softmmu TLB does this); walks still read
    # the entries down to the leaf
    splinter: bool = False

    def describe(self) -> str:
        l1 = ", ".join(f"{SIZE_NAME[s]} {e}/{w}-way" for s, (e, w) in sorted(self.l1.items()))
        st = "+".join(SIZE_NAME[s] for s in self.stlb[0])
        g = f", 1G {self.stlb_1g[0]}/{self.stlb_1g[1]}-way" if self.stlb_1g else ""
        psc = ", ".join(f"{PSC_NAME[k]} {v}" for k, v in sorted(self.psc.items()))
        return (
            f"{self.name}: L1 dTLB {l1}; STLB {st} {self.stlb[1]}/{self.stlb[2]}-way{g}; PSC {psc or 'none'}"
        )


PSC_NAME = {2: "PDE", 3: "PDPTE", 4: "PML4E", 5: "PML5E"}

# Intel Optimization Reference Manual 248966-045 (Feb 2022) Table 2-15 (Skylake); PSC sizes
# are not documented there: assumed.
SKYLAKE = Geometry(
    "skylake", {K4: (64, 4), M2: (32, 4), G1: (4, 4)}, ((K4, M2), 1536, 12), (16, 4), {2: 32, 3: 4, 4: 2}
)
# QEMU's softmmu TLB as unicorn 2.1 (QEMU 5.0) builds it: a direct-mapped table of
# 2^CPU_TLB_DYN_DEFAULT_BITS = 256 entries, each a 4K piece of its leaf, and an 8-entry victim
# TLB (CPU_VTLB_SIZE) here taken as an 8-entry fully associative second level; no PSC.
QEMU = Geometry("qemu", {K4: (256, 1)}, ((K4,), 8, 8), None, {}, splinter=True)
GEOMETRIES = {"skylake": SKYLAKE, "qemu": QEMU}


def geometry_named(spec: str) -> Geometry:
    """'skylake', optionally followed by overrides: 'skylake,l1-4k=64/4,stlb=1536/12,stlb-1g=16/4,
    pde=32,pdpte=4,pml4e=2' (ENTRIES/WAYS; 'stlb-1g=0' sends 1G misses to the walker)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or parts[0] not in GEOMETRIES:
        raise BadInputError(
            f"unknown TLB geometry {spec!r} (known: {', '.join(GEOMETRIES)}, then key=value overrides)"
        )
    g = GEOMETRIES[parts[0]]
    l1, stlb, s1g, psc = dict(g.l1), g.stlb, g.stlb_1g, dict(g.psc)

    def ew(v: str) -> tuple[int, int]:
        try:
            e, _, w = v.partition("/")
            e_, w_ = int(e), int(w) if w else max(int(e), 1)
        except ValueError:
            raise BadInputError(f"TLB geometry: {v!r} is not ENTRIES/WAYS") from None
        if e_ < 0 or w_ <= 0 or (e_ and e_ % w_):
            raise BadInputError(f"TLB geometry: {v!r}: entries must be a multiple of ways")
        return e_, w_

    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k in ("l1-4k", "l1-2m", "l1-1g"):
            l1[{"l1-4k": K4, "l1-2m": M2, "l1-1g": G1}[k]] = ew(v)
        elif k == "stlb":
            stlb = (stlb[0], *ew(v))
        elif k == "stlb-1g":
            e, w = ew(v)
            s1g = (e, w) if e else None
        elif k in ("pde", "pdpte", "pml4e", "pml5e"):
            try:
                psc[{"pde": 2, "pdpte": 3, "pml4e": 4, "pml5e": 5}[k]] = int(v)
            except ValueError:
                raise BadInputError(f"TLB geometry: {p!r}: entries must be an integer") from None
        else:
            raise BadInputError(
                f"TLB geometry: unknown key {k!r} (l1-4k, l1-2m, l1-1g, stlb, stlb-1g, "
                "pde, pdpte, pml4e, pml5e)"
            )
    return Geometry(spec, l1, stlb, s1g, psc, g.splinter)


# -- leaves ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Leaves:
    """Present direct-map leaves, sorted: start offset (bytes from PAGE_OFFSET) and page shift."""

    start: np.ndarray  # uint64
    shift: np.ndarray  # uint8: 12, 21 or 30
    levels: int = 4  # paging levels (walk length of a 4K leaf)

    @classmethod
    def from_runs(cls, runs: Iterable[Sequence[int]], levels: int = 4) -> "Leaves":
        """From (start, size) pairs; a run longer than its page size is cut into pages of `size`
        when given as (start, size, count)."""
        st: list[np.ndarray] = []
        sh: list[np.ndarray] = []
        for r in runs:
            s, size = r[0], r[1]
            n = r[2] if len(r) > 2 else 1
            b = size.bit_length() - 1
            if size not in (1 << K4, 1 << M2, 1 << G1) or s % size:
                raise BadInputError(f"leaf {s:#x} size {size:#x}: sizes are 4K/2M/1G, aligned")
            st.append(s + np.arange(n, dtype=np.uint64) * np.uint64(size))
            sh.append(np.full(n, b, dtype=np.uint8))
        return cls._sorted(st, sh, levels)

    @classmethod
    def _sorted(cls, st: list[np.ndarray], sh: list[np.ndarray], levels: int) -> "Leaves":
        start = np.concatenate(st).astype(np.uint64) if st else np.zeros(0, np.uint64)
        shift = np.concatenate(sh).astype(np.uint8) if sh else np.zeros(0, np.uint8)
        o = np.argsort(start, kind="stable")
        return cls(start[o], shift[o], levels)

    @classmethod
    def from_model(cls, m: CpaModel) -> "Leaves":
        """The present leaves of a CpaModel's direct map (its t3/t2/t1 tables)."""
        from x86pt.cpa.kernel import P, PSE

        lo, hi = m.dm_bounds()
        st, sh = [], []
        for tables, tshift, lshift in ((m.t3, 39, G1), (m.t2, 30, M2)):
            for k, t in tables.items():
                base = k << tshift
                if not lo <= base < hi:
                    continue
                idx = [i for i, e in enumerate(t) if e & P and e & PSE]
                if idx:
                    st.append(np.uint64(base - lo) + (np.array(idx, np.uint64) << np.uint64(lshift)))
                    sh.append(np.full(len(idx), lshift, np.uint8))
        for k, t in m.t1.items():
            base = k << 21
            if not lo <= base < hi:
                continue
            a = np.array(t, dtype=np.uint64)
            present = np.nonzero(a & np.uint64(P))[0].astype(np.uint64)
            if len(present):
                st.append(np.uint64(base - lo) + (present << np.uint64(12)))
                sh.append(np.full(len(present), K4, np.uint8))
        return cls._sorted(st, sh, m.levels)

    @classmethod
    def from_image(
        cls, state: PagingState, memory: PhysicalMemory, page_offset: int | None = None, **scan_kw: Any
    ) -> "Leaves":
        """The present leaves in [PAGE_OFFSET, +2^46) (2^52 with LA57) of an image; PAGE_OFFSET
        detected as census() does when not given."""
        from x86pt.census import census
        from x86pt.scan import EFF_P, Scanner, U64

        if page_offset is None:
            page_offset = census(state, memory, **scan_kw).page_offset
        end = page_offset + (1 << (52 if state.la57 else 46))
        st, sh = [], []
        for ch in Scanner(state, memory, **scan_kw).chunks():
            sel = ((ch.eff & np.uint8(EFF_P)) != 0) & (ch.va >= U64(page_offset))
            if end < 1 << 64:
                sel &= ch.va < U64(end)
            if not sel.any():
                continue
            va, cnt, lvl = ch.va[sel], ch.count[sel].astype(np.int64), ch.level[sel].astype(np.int64)
            shift = np.array([0, 12, 21, 30, 39, 48], np.uint64)[lvl]
            rep = np.repeat(np.arange(len(va)), cnt)
            k = np.arange(len(rep)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            st.append(va[rep] - U64(page_offset) + (k.astype(np.uint64) << shift[rep]))
            sh.append(shift[rep].astype(np.uint8))
        return cls._sorted(st, sh, state.paging_levels)

    def __len__(self) -> int:
        return len(self.start)

    @property
    def end(self) -> np.ndarray:
        end: np.ndarray = self.start + (np.uint64(1) << self.shift.astype(np.uint64))
        return end

    def counts(self) -> dict[str, int]:
        return {SIZE_NAME[s]: int((self.shift == s).sum()) for s in SIZES}

    def find(self, pa: np.ndarray) -> np.ndarray:
        """Index of the leaf holding each offset, -1 where none does."""
        pa = np.asarray(pa, dtype=np.uint64)
        i = np.searchsorted(self.start, pa, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok[ok] &= pa[ok] < self.end[i[ok]]
        return np.where(ok, i, -1)


# -- access patterns ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    """A piecewise-uniform distribution over direct-map offsets: intervals [lo, hi) with weights
    (probability mass, summing to 1), plus, for a trace, the addresses in order."""

    name: str
    lo: np.ndarray
    hi: np.ndarray
    w: np.ndarray
    stream: np.ndarray | None = None

    @property
    def bytes(self) -> int:
        return int((self.hi - self.lo).sum())

    def leaf_mass(self, leaves: Leaves) -> np.ndarray:
        """Probability that an access falls in each leaf (exact for piecewise-uniform density)."""
        # density steps at lo (+d) and hi (-d); F(x) = integral of the density up to x
        d = self.w / (self.hi - self.lo).astype(np.float64)
        xs = np.concatenate([self.lo, self.hi]).astype(np.float64)
        ds = np.concatenate([d, -d])
        o = np.argsort(xs, kind="stable")
        xs, ds = xs[o], ds[o]
        dens = np.cumsum(ds)
        F = np.concatenate([[0.0], np.cumsum(dens[:-1] * np.diff(xs))])
        s = leaves.start.astype(np.float64)
        e = leaves.end.astype(np.float64)
        m: np.ndarray = np.maximum(np.interp(e, xs, F) - np.interp(s, xs, F), 0.0)
        # a leaf inside one constant-density piece: density x size, so that leaves of one size
        # under one density get exactly one probability (the difference above rounds)
        j = np.searchsorted(xs, s, side="right") - 1
        ok = j >= 0
        jj = np.where(ok, j, 0)
        nxt = np.where(jj + 1 < len(xs), xs[np.minimum(jj + 1, len(xs) - 1)], np.inf)
        inside = ok & (e <= nxt)
        m[inside] = np.maximum(dens[jj[inside]], 0.0) * (e - s)[inside]
        m[m < 1e-300] = 0.0
        return m

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n page-aligned offsets drawn from the distribution (a trace: its own addresses,
        repeated as needed)."""
        if self.stream is not None:
            reps = -(-n // max(len(self.stream), 1))
            trace: np.ndarray = np.tile(self.stream, reps)[:n] & ~np.uint64(PAGE - 1)
            return trace
        rng = np.random.default_rng(seed)
        k = rng.choice(len(self.w), size=n, p=self.w / self.w.sum())
        pages = ((self.hi - self.lo) >> np.uint64(12))[k]
        off = (rng.random(n) * pages.astype(np.float64)).astype(np.uint64)
        drawn: np.ndarray = self.lo[k] + (np.minimum(off, pages - np.uint64(1)) << np.uint64(12))
        return drawn


def _mk(
    name: str,
    ranges: list[tuple[int, int]],
    weights: np.ndarray | None = None,
    stream: np.ndarray | None = None,
) -> Pattern:
    if not ranges:
        raise BadInputError(f"access pattern {name}: no memory to access")
    lo = np.array([r[0] for r in ranges], np.uint64)
    hi = np.array([r[1] for r in ranges], np.uint64)
    w = (hi - lo).astype(np.float64) if weights is None else np.asarray(weights, np.float64)
    return Pattern(name, lo, hi, w / w.sum(), stream)


def _merged_leaf_ranges(leaves: Leaves) -> list[tuple[int, int]]:
    s, e = leaves.start, leaves.end
    if not len(s):
        return []
    brk = np.nonzero(s[1:] != e[:-1])[0]
    starts = np.concatenate([[s[0]], s[brk + 1]])
    ends = np.concatenate([e[brk], [e[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def uniform(leaves: Leaves) -> Pattern:
    """Every mapped byte of the direct map equally likely (a kernel model maps exactly the RAM)."""
    return _mk("uniform", _merged_leaf_ranges(leaves))


def mapped_2m_regions(leaves: Leaves) -> np.ndarray:
    """Start offsets of the 2M-aligned regions the direct map maps completely, sorted."""
    sh = leaves.shift.astype(np.uint64)
    big = leaves.shift >= M2
    parts = []
    for s, b in zip(leaves.start[big].tolist(), sh[big].tolist()):
        parts.append(np.uint64(s) + (np.arange(1 << (int(b) - M2), dtype=np.uint64) << np.uint64(M2)))
    small = leaves.start[~big] >> np.uint64(M2)
    u, c = np.unique(small, return_counts=True)
    parts.append(u[c == 512] << np.uint64(M2))
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


def hot_set(leaves: Leaves, gib: float, seed: int = 1) -> Pattern:
    """`gib` GiB of 2M-aligned, fully mapped regions chosen at random (seeded), uniform inside."""
    regions = mapped_2m_regions(leaves)
    n = int(round(gib * 512))
    if n <= 0:
        raise BadInputError(f"hot set of {gib} GiB: need at least one 2M region")
    if n > len(regions):
        raise BadInputError(
            f"hot set of {gib} GiB needs {n} 2M regions; the direct map maps {len(regions)} completely"
        )
    pick = np.sort(np.random.default_rng(seed).choice(regions, size=n, replace=False))
    return _mk(f"hot:{gib:g}G", [(int(p), int(p) + (1 << M2)) for p in pick.tolist()])


def from_addresses(name: str, addrs: Sequence[int] | np.ndarray, ordered: bool = True) -> Pattern:
    """A trace: the addresses in order (simulated mode replays them); the analytic mode uses
    their frequencies."""
    a = np.asarray(addrs, dtype=np.uint64)
    if not len(a):
        raise BadInputError(f"access pattern {name}: no addresses")
    pages, counts = np.unique(a >> np.uint64(12), return_counts=True)
    pages <<= np.uint64(12)
    return _mk(name, [(p, p + PAGE) for p in pages.tolist()], counts, stream=a if ordered else None)


def read_trace(path: str) -> Pattern:
    """One physical address per line (0x-hex or decimal); '#' starts a comment."""
    out = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                t = line.split("#", 1)[0].strip()
                if not t:
                    continue
                try:
                    v = int(t, 0)
                except ValueError:
                    raise BadInputError(f"{path}:{n}: not an address: {t!r}") from None
                if not 0 <= v < 1 << 64:
                    raise BadInputError(f"{path}:{n}: address out of range: {t!r}")
                out.append(v)
    except OSError as e:
        raise BadInputError(f"cannot read address trace {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"address trace {path} is not UTF-8 text") from None
    return from_addresses(f"trace:{path}", out)


def workload_pages(ops: Iterable[Op], page_offset: int, dm_size: int = 1 << 46) -> Pattern:
    """The 4K pages of the direct map a CPA workload touched: its direct-map operands and the
    frames it vmapped (whose direct-map alias CPA changes too); uniform over them."""
    from x86pt.cpa.ops import API

    pages: set[int] = set()
    for op in ops:
        name = op[0]
        if name == "vmap":  # (vmap, va, pa, n, huge)
            pages.update(range(op[2] >> 12, (op[2] >> 12) + op[3]))
            continue
        if name in API or name in ("cpa", "kernel_map_pages"):  # (name, addr, numpages, ...)
            n = op[2]
        elif name in ("set_direct_map_invalid_noflush", "set_direct_map_default_noflush", "oob"):
            n = 1  # one page at addr (oob: addr, set, clr)
        else:
            continue  # vunmap, hotplug (physical), TLB ops
        if page_offset <= op[1] < page_offset + dm_size and 0 < n <= 1 << 24:
            first = (op[1] - page_offset) >> 12
            pages.update(range(first, first + n))
    if not pages:
        raise BadInputError("access pattern workload: the trace touches no direct-map page")
    p = np.array(sorted(pages), np.uint64) << np.uint64(12)
    return _mk("workload", [(int(x), int(x) + PAGE) for x in p.tolist()])


def mapped_only(p: Pattern, leaves: Leaves) -> Pattern:
    """A page-granular pattern without the pages the direct map does not map now (a workload's
    pages left non-present, trace addresses outside RAM); the name says how many went."""
    keep = leaves.find(p.lo) >= 0
    if keep.all():
        return p
    if not keep.any():
        raise BadInputError(
            f"access pattern {p.name}: none of its {len(keep)} pages is mapped by the direct map"
        )
    stream = p.stream
    if stream is not None:
        stream = stream[leaves.find(stream) >= 0]
    w = p.w[keep]
    return Pattern(
        f"{p.name} ({int((~keep).sum())} unmapped pages left out)",
        p.lo[keep],
        p.hi[keep],
        w / w.sum(),
        stream,
    )


def pattern_named(
    spec: str, leaves: Leaves, *, seed: int = 1, ops: Iterable[Op] | None = None, page_offset: int = 0
) -> Pattern:
    """'uniform', 'hot:N' (N GiB), 'trace:FILE', 'workload' (needs ops)."""
    if spec == "uniform":
        return uniform(leaves)
    if spec.startswith("hot:"):
        try:
            g = float(spec[4:].rstrip("GgiB"))
        except ValueError:
            raise BadInputError(f"access pattern {spec!r}: hot:N with N in GiB") from None
        return hot_set(leaves, g, seed)
    if spec.startswith("trace:"):
        return mapped_only(read_trace(spec[6:]), leaves)
    if spec == "workload":
        if ops is None:
            raise BadInputError("access pattern workload needs a CPA trace")
        return mapped_only(workload_pages(ops, page_offset), leaves)
    raise BadInputError(f"unknown access pattern {spec!r} (uniform, hot:N, trace:FILE, workload)")
