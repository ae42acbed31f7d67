# SPDX-License-Identifier: GPL-2.0-or-later
"""What a direct-map state costs in translations: dTLB reach and page-walk memory references.

Input (x86pt/costinput.py): the direct map's leaves (`Leaves`), an access pattern over physical
memory (`Pattern`) and a TLB geometry (`Geometry`).

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

With `Geometry.splinter` (the `QEMU` geometry) every TLB entry is a 4K piece of its leaf; the
walk still reads down to the leaf. The default geometry is `SKYLAKE` (x86pt/costinput.py says
where its sizes come from).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from x86pt.costinput import (
    G1,
    K4,
    LEVEL_OF,
    M2,
    SIZE_NAME,
    SIZES,
    SKYLAKE,
    Geometry,
    Leaves,
    Op,
    Pattern,
    geometry_named,
    pattern_named,
)
from x86pt.errors import BadInputError

if TYPE_CHECKING:  # only for annotations: cost imports no CPA or scan code at start-up
    import argparse

    from x86pt.cpa.ops import CpaModel
    from x86pt.memory.base import PhysicalMemory
    from x86pt.state import PagingState


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
