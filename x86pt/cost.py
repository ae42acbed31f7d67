# SPDX-License-Identifier: GPL-2.0-or-later
"""What a direct-map state costs in translations: dTLB reach and page-walk memory references.

Input: the direct map's leaves (`Leaves`, from a CpaModel or from an image through the scanner)
and an access pattern over physical memory (`Pattern`: uniform over the mapped RAM, a hot set of
2M regions, a trace of physical addresses, or the pages a CPA workload touched). Addresses are
offsets into the direct map (va - PAGE_OFFSET), which equal physical addresses there.

Output (`Cost`): the distinct translations the pattern needs per page size (the TLB reach it
asks for), and per access: L1 dTLB misses, STLB misses (= page walks) and page-walk memory
references, counting the paging-structure caches (SDM Vol. 3A §4.10.3) that shorten a walk: a
walk for a 4K leaf that hits the PDE cache reads 1 entry (the PTE), a PDPTE-cache hit reads 2,
a PML4E-cache hit 3, a cold walk 4 (5 with LA57); a 2M leaf 1/2/3 (PDPTE/PML4E/none), a 1G
leaf 1/2.

Two estimators, so that each checks the other:
  * `analytic()`: steady state under the independent reference model (each access draws a page
    from the pattern's distribution), every TLB and paging-structure cache approximated by a
    fully-associative LRU cache of the same capacity, whose hit probabilities come from Che's
    approximation (a characteristic time T with sum_i (1 - exp(-p_i T)) = C; item i hits with
    1 - exp(-p_i T)). For n equally likely translations and C < n it gives the exact LRU /
    random-replacement answer, miss rate 1 - C/n; for n <= C, no misses. Associativity is
    ignored (no conflict misses). Each TLB level is priced as if it saw the whole access
    stream, and a reference walks when it misses both (inclusive hierarchy under LRU: the
    larger level's miss; per translation, the smaller of the two miss probabilities). The
    paging-structure caches see the walk stream; their levels are treated as independent.
    Compulsory (first-touch) misses are not counted: it is a steady state.
  * `simulate()`: a seeded address stream through set-associative LRU TLBs of the given geometry
    (set = virtual page number mod sets) and fully-associative LRU paging-structure caches,
    after a warm-up, counting the same quantities. The second level is filled by walks and
    looked up after a first-level miss; it is not a victim cache of the first level.

`Geometry.splinter` makes every TLB entry a 4K piece of its leaf (QEMU's softmmu TLB; the walk
still reads down to the leaf): the `QEMU` geometry, used to check the model against unicorn.

Default geometry (`SKYLAKE`): Intel 64 and IA-32 Architectures Optimization Reference Manual
(order no. 248966-045, February 2022), Table 2-15 (the TLB parameters of the Skylake client
microarchitecture, which Skylake server shares): DTLB 4K 64 entries 4-way, 2M/4M 32 entries 4-way, 1G 4 entries 4-way; STLB
4K+2M/4M shared 1536 entries 12-way, 1G 16 entries 4-way. The manual gives no paging-structure
cache sizes (the SDM §4.10.3 leaves them implementation-specific): the defaults below (PDE 32,
PDPTE 4, PML4E 2) are assumptions, configurable.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from x86pt.errors import BadInputError

if TYPE_CHECKING:  # only for annotations: cost imports no CPA or scan code at start-up
    import argparse

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


# -- the result -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    mode: str  # "analytic" | "simulated"
    pattern: str
    geometry: str
    translations: dict[str, int]  # distinct translations the pattern needs, per page size
    l1_miss: float  # per access
    walks: float  # STLB misses (page walks) per access
    refs: float  # page-walk memory references per access
    accesses: int = 0  # simulated: accesses counted (after warm-up)

    @property
    def refs_per_walk(self) -> float:
        return self.refs / self.walks if self.walks else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "pattern": self.pattern,
            "geometry": self.geometry,
            "translations": self.translations,
            "l1_miss_per_access": self.l1_miss,
            "walks_per_access": self.walks,
            "walk_refs_per_access": self.refs,
            "refs_per_walk": self.refs_per_walk,
            "accesses": self.accesses,
        }

    def render(self) -> str:
        t = "  ".join(f"{k} {v}" for k, v in self.translations.items())
        n = f" over {self.accesses} accesses" if self.accesses else ""
        return (
            f"cost ({self.mode}{n}, pattern {self.pattern}, TLB {self.geometry}):\n"
            f"  translations needed: {t}\n"
            f"  per 1000 accesses: L1 dTLB misses {1000 * self.l1_miss:.2f}, page walks "
            f"{1000 * self.walks:.2f}, walk memory references {1000 * self.refs:.2f} "
            f"({self.refs_per_walk:.2f} per walk)\n"
        )


# -- analytic -------------------------------------------------------------------------------------
def che_hits(p: np.ndarray, capacity: int, count: np.ndarray | None = None) -> np.ndarray:
    """Hit probability of each item of a fully-associative LRU cache of `capacity` entries under
    independent references with probabilities p (Che's approximation): T solves
    sum_i count_i (1 - exp(-p_i T)) = capacity, item i hits with 1 - exp(-p_i T). `count` makes
    entry i stand for count_i items of probability p_i each. Items with p == 0 get 0."""
    p = np.asarray(p, np.float64)
    cnt = np.ones_like(p) if count is None else np.asarray(count, np.float64)
    live = p > 0
    n = float(cnt[live].sum())
    h = np.zeros_like(p)
    if capacity <= 0 or n == 0:
        return h
    if n <= capacity:
        h[live] = 1.0
        return h
    q, c = p[live], cnt[live]

    def filled(t: float) -> float:
        return float(np.dot(c, -np.expm1(-q * t)))

    # filled(T) increases from 0 to n > capacity: bracket, then bisect
    lo, hi = 0.0, 1.0
    while filled(hi) < capacity:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if filled(mid) < capacity:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    h[live] = -np.expm1(-q * (lo + hi) / 2)
    return h


def _translations(leaves: Leaves, mass: np.ndarray) -> dict[str, int]:
    used = mass > 0
    return {SIZE_NAME[s]: int((used & (leaves.shift == s)).sum()) for s in SIZES}


@dataclass(frozen=True)
class _Runs:
    """Leaves grouped into runs of equal page size and equal probability that share every
    paging-structure region above their level (a 4K run stays inside one 2M region, a 2M run
    inside one 1G region): the analytic estimate treats a run's leaves alike, so a 64 GiB map
    split to 4K is ~32768 runs, not 16.7M leaves."""

    start: np.ndarray
    shift: np.ndarray
    count: np.ndarray
    p: np.ndarray  # probability of each leaf of the run
    x: np.ndarray  # a second per-leaf value runs must agree on (splintered walk rates)

    @classmethod
    def of(cls, leaves: Leaves, p: np.ndarray, x: np.ndarray | None = None) -> "_Runs":
        if not len(leaves):
            z = np.zeros(0)
            return cls(z.astype(np.uint64), z.astype(np.uint8), z, z, z)
        x = np.zeros_like(p) if x is None else x
        sh = leaves.shift
        region = leaves.start >> (sh.astype(np.uint64) + np.uint64(9))
        brk = (
            np.flatnonzero(
                (sh[1:] != sh[:-1]) | (p[1:] != p[:-1]) | (x[1:] != x[:-1]) | (region[1:] != region[:-1])
            )
            + 1
        )
        first = np.concatenate([[0], brk])
        count = np.diff(np.concatenate([first, [len(sh)]])).astype(np.float64)
        return cls(leaves.start[first], sh[first], count, p[first], x[first])


def _walk_refs_analytic(runs: _Runs, rate: np.ndarray, psc: dict[int, int], levels: int) -> float:
    """Expected memory references per access for walks occurring at `rate` (per access, per leaf
    of each run), with PSC hit probabilities from Che's approximation over the walk stream (a
    PSC entry of level k covers a 2^(12+9(k-1))-byte region; a walk fills every level it reads)
    and the levels treated as independent."""
    total = float((rate * runs.count).sum())
    if total <= 0:
        return 0.0
    leaf_level = np.where(runs.shift == K4, 1, np.where(runs.shift == M2, 2, 3))
    refs = np.zeros(len(runs.p))
    miss_below = np.ones(len(runs.p))  # no lower-level PSC hit so far
    for k in range(2, levels + 1):
        entries = psc.get(k, 0)
        applies = leaf_level < k
        if entries > 0 and applies.any():
            region = runs.start >> np.uint64(12 + 9 * (k - 1))
            # runs are sorted by start: each region's runs are consecutive
            inv = np.concatenate([[0], np.cumsum(region[1:] != region[:-1])])
            qr = np.bincount(inv, weights=np.where(applies, rate * runs.count, 0.0) / total)
            h = np.where(applies, che_hits(qr, entries)[inv], 0.0)
        else:
            h = np.zeros(len(runs.p))
        refs += miss_below * h * (k - leaf_level)
        miss_below *= 1 - h
    refs += miss_below * (levels + 1 - leaf_level)
    return float((rate * runs.count * refs).sum())


def _tlb_miss(
    tsh: np.ndarray, tp: np.ndarray, tcount: np.ndarray, geometry: Geometry
) -> tuple[np.ndarray, np.ndarray]:
    """(L1 miss, walk probability) of TLB items of page size tsh, probability tp each, tcount
    alike: Che per structure; a reference walks when it misses both levels, which under LRU in
    an inclusive hierarchy is the larger one's miss (per item: the smaller probability)."""
    miss_l1 = np.ones(len(tp))
    for sh, (entries, _ways) in geometry.l1.items():
        sel = tsh == sh
        miss_l1[sel] = 1 - che_hits(tp[sel], entries, tcount[sel])
    miss = np.ones(len(tp))
    shared = np.isin(tsh, np.array(geometry.stlb[0], np.uint8))
    miss[shared] = 1 - che_hits(tp[shared], geometry.stlb[1], tcount[shared])
    big = (tsh == G1) & ~shared
    if big.any() and geometry.stlb_1g:
        miss[big] = 1 - che_hits(tp[big], geometry.stlb_1g[0], tcount[big])
    return miss_l1, np.minimum(miss, miss_l1)


def analytic(leaves: Leaves, pattern: Pattern, geometry: Geometry = SKYLAKE) -> Cost:
    """Steady-state expected misses and walk references per access (see the module docstring)."""
    p = pattern.leaf_mass(leaves)
    if not geometry.splinter:
        r = _Runs.of(leaves, p)
        miss_l1, miss = _tlb_miss(r.shift, r.p, r.count, geometry)
        l1_miss = float((r.count * r.p * miss_l1).sum())
        rate = r.p * miss
    else:
        # the TLB items are the pattern's own 4K pages: interval i has (hi - lo) / 4K of them,
        # w_i / pages each; the walk rate of a leaf is the pattern re-weighted by each page's
        # walk probability, integrated over the leaf
        pages = ((pattern.hi - pattern.lo) >> np.uint64(12)).astype(np.float64)
        tp = pattern.w / pages
        miss_l1, miss = _tlb_miss(np.full(len(tp), K4, np.uint8), tp, pages, geometry)
        l1_miss = float((pattern.w * miss_l1).sum())
        walk = replace(pattern, w=pattern.w * miss, stream=None).leaf_mass(leaves)
        r = _Runs.of(leaves, p, walk)
        rate = r.x
    return Cost(
        "analytic",
        pattern.name,
        geometry.name,
        _translations(leaves, p),
        l1_miss,
        float((rate * r.count).sum()),
        _walk_refs_analytic(r, rate, geometry.psc, leaves.levels),
    )


# -- simulated ------------------------------------------------------------------------------------
class _SetAssoc:
    """Set-associative LRU: set = key's page number mod sets."""

    __slots__ = ("sets", "ways", "nsets")

    def __init__(self, entries: int, ways: int) -> None:
        self.nsets = max(entries // ways, 1) if entries else 0
        self.ways = ways
        self.sets: list[OrderedDict[tuple[int, int], None]] = [OrderedDict() for _ in range(self.nsets)]

    def access(self, vpn: int, key: tuple[int, int]) -> bool:
        """Look up and fill: True on a hit."""
        if not self.nsets:
            return False
        s = self.sets[vpn % self.nsets]
        if key in s:
            s.move_to_end(key)
            return True
        s[key] = None
        if len(s) > self.ways:
            s.popitem(last=False)
        return False


def simulate(
    leaves: Leaves,
    pattern: Pattern,
    geometry: Geometry = SKYLAKE,
    *,
    accesses: int = 200_000,
    warmup: int | None = None,
    seed: int = 1,
) -> Cost:
    """A seeded stream of `warmup + accesses` page accesses through the TLBs and PSCs of
    `geometry`; counts after the warm-up (default: as many accesses as the TLBs have entries x 8,
    at least 10000)."""
    if warmup is None:
        warmup = max(10_000, 8 * (geometry.stlb[1] + sum(e for e, _ in geometry.l1.values())))
    addrs = pattern.sample(warmup + accesses, seed)
    idx = leaves.find(addrs)
    if (idx < 0).any():
        bad = int(addrs[np.argmax(idx < 0)])
        raise BadInputError(f"access pattern {pattern.name}: offset {bad:#x} is not mapped by the direct map")
    shifts = leaves.shift[idx].tolist()
    starts = leaves.start[idx].tolist()
    pieces = addrs.tolist() if geometry.splinter else starts
    L = leaves.levels
    l1 = {sh: _SetAssoc(e, w) for sh, (e, w) in geometry.l1.items()}
    stlb = _SetAssoc(geometry.stlb[1], geometry.stlb[2])
    stlb_sizes = set(geometry.stlb[0])
    stlb1g = _SetAssoc(*geometry.stlb_1g) if geometry.stlb_1g and G1 not in stlb_sizes else None
    psc: dict[int, tuple[OrderedDict[int, None], int]] = {
        k: (OrderedDict(), n) for k, n in geometry.psc.items() if k <= L and n > 0
    }
    leaf_level = LEVEL_OF
    l1m = walks = refs = 0
    splinter = geometry.splinter
    for i, (sh, st, pc) in enumerate(zip(shifts, starts, pieces)):
        count = i >= warmup
        tsh = K4 if splinter else sh  # the size of the TLB entry
        vpn = pc >> tsh
        key = (tsh, vpn)
        t = l1.get(tsh)
        if t is not None and t.access(vpn, key):
            continue
        if count:
            l1m += 1
        if tsh in stlb_sizes:
            hit = stlb.access(vpn, key)
        elif tsh == G1 and stlb1g is not None:
            hit = stlb1g.access(vpn, key)
        else:
            hit = False
        if hit:
            continue
        # walk: start below the lowest PSC entry that hits (SDM §4.10.3.2), fill the PSCs with
        # the entries the walk used (§4.10.3.1)
        ll = leaf_level[sh]
        top = L  # highest level whose entry the walk reads from memory
        for k in range(ll + 1, L + 1):
            c = psc.get(k)
            if c is not None and (st >> (12 + 9 * (k - 1))) in c[0]:
                top = k - 1
                c[0].move_to_end(st >> (12 + 9 * (k - 1)))
                break
        cost = top + 1 - ll
        for k in range(ll + 1, top + 1):  # entries read now cached (§4.10.3.1)
            c = psc.get(k)
            if c is None:
                continue
            cache, cap = c
            region = st >> (12 + 9 * (k - 1))
            cache[region] = None
            if len(cache) > cap:
                cache.popitem(last=False)
        if count:
            walks += 1
            refs += cost
    n = accesses
    return Cost(
        "simulated",
        pattern.name,
        geometry.name,
        _translations(leaves, pattern.leaf_mass(leaves)),
        l1m / n,
        walks / n,
        refs / n,
        n,
    )


def cost_of(
    leaves: Leaves, pattern: Pattern, geometry: Geometry = SKYLAKE, mode: str = "analytic", **kw: int
) -> Cost:
    if mode == "analytic":
        return analytic(leaves, pattern, geometry)
    if mode == "simulated":
        return simulate(leaves, pattern, geometry, **kw)
    raise BadInputError(f"unknown cost mode {mode!r} (analytic, simulated)")


# -- CLI glue (x86pt census --cost, x86pt cpa compare --cost) ---------------------------------------
from x86pt.cliargs import add_cost_args  # noqa: E402,F401  (re-exported)


def image_cost(
    state: PagingState, memory: PhysicalMemory, page_offset: int, args: argparse.Namespace, **scan_kw: Any
) -> Cost:
    """`x86pt census --cost`: the image's direct map priced for args.cost."""
    lv = Leaves.from_image(state, memory, page_offset, **scan_kw)
    pat = pattern_named(args.cost, lv, seed=args.cost_seed, page_offset=page_offset)
    return cost_of(
        lv,
        pat,
        geometry_named(args.tlb_geometry),
        args.cost_mode,
        **({"seed": args.cost_seed} if args.cost_mode == "simulated" else {}),
    )


def model_cost(m: CpaModel, args: argparse.Namespace, ops: list[Op] | None = None) -> Cost:
    """`x86pt cpa compare --cost`: a CPA model's direct map priced for args.cost."""
    lv = Leaves.from_model(m)
    pat = pattern_named(args.cost, lv, seed=args.cost_seed, ops=ops, page_offset=m.page_offset)
    return cost_of(
        lv,
        pat,
        geometry_named(args.tlb_geometry),
        args.cost_mode,
        **({"seed": args.cost_seed} if args.cost_mode == "simulated" else {}),
    )


def render_costs(rows: list[tuple[str, Cost]]) -> str:
    """One line per policy: the cost columns of `cpa compare --cost`."""
    c0 = rows[0][1]
    head = ["policy", "4K", "2M", "1G", "L1 miss/1k", "walks/1k", "walk refs/1k", "refs/walk"]
    out = [head]
    for name, c in rows:
        t = c.translations
        out.append(
            [
                name,
                str(t["4K"]),
                str(t["2M"]),
                str(t["1G"]),
                f"{1000 * c.l1_miss:.2f}",
                f"{1000 * c.walks:.2f}",
                f"{1000 * c.refs:.2f}",
                f"{c.refs_per_walk:.2f}",
            ]
        )
    w = [max(len(r[i]) for r in out) for i in range(len(head))]
    lines = [" ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) for r in out]
    return (
        f"cost ({c0.mode}, pattern {c0.pattern}, TLB {c0.geometry}; translations needed per "
        f"page size, then per 1000 accesses):\n" + "\n".join(lines)
    )


def cost_series(
    m: CpaModel,
    ops: list[Op],
    spec: str,
    geometry: Geometry = SKYLAKE,
    *,
    points: int = 8,
    mode: str = "analytic",
    seed: int = 1,
) -> list[tuple[int, Cost]]:
    """Replay `ops` on model `m` in `points` equal chunks and price the direct map after each:
    [(ops done, Cost)]. `workload` prices the pages touched so far. The replay is the CPA
    model's own (validation off); each point costs about one analytic estimate (docs/cost.md:
    0.3-0.4 x a 100k-op replay on the 64 GiB preset), so keep `points` small."""
    from x86pt.cpa.trace import replay

    if points < 1:
        raise BadInputError("cost series: at least one point")
    n = len(ops)
    bounds = sorted({max(1, round(n * (i + 1) / points)) for i in range(points)}) if n else [0]
    out: list[tuple[int, Cost]] = []
    done = 0
    for b in bounds:
        if b > done:
            replay(m, ops[done:b], samples=0)
            done = b
        lv = Leaves.from_model(m)
        pat = pattern_named(spec, lv, seed=seed, ops=ops[:done], page_offset=m.page_offset)
        out.append(
            (done, cost_of(lv, pat, geometry, mode, **({"seed": seed} if mode == "simulated" else {})))
        )
    return out
