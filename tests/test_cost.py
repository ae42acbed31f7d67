# SPDX-License-Identifier: GPL-2.0-or-later
"""x86pt/cost.py: dTLB reach and page-walk cost of a direct-map state.

Every expectation is derived by hand in the test's docstring from the geometry (Intel
Optimization Reference Manual 248966-045 Table 2-15, Skylake: L1 dTLB 4K 64/4-way, 2M 32/4-way,
1G 4/4-way; STLB 4K+2M 1536/12-way, 1G 16/4-way; assumed PSC PDE 32, PDPTE 4, PML4E 2) and two
facts: an LRU (or random) cache of C entries under uniform references to n > C items misses with
probability 1 - C/n, and with n <= C never misses in steady state; a walk for a 4K leaf reads
1 entry after a PDE-cache hit, 2 after a PDPTE-cache hit, 3 after a PML4E-cache hit, 4 cold
(SDM Vol. 3A §4.10.3.2); a 2M leaf 1/2/3, a 1G leaf 1/2."""

from __future__ import annotations

import numpy as np
import pytest

from x86pt.cost import analytic, che_hits, simulate
from x86pt.costinput import (
    SKYLAKE,
    Leaves,
    from_addresses,
    geometry_named,
    hot_set,
    mapped_2m_regions,
    pattern_named,
    uniform,
    workload_pages,
)
from x86pt.errors import BadInputError

K, M, G = 1 << 12, 1 << 21, 1 << 30


def all_2m(gib: int = 1) -> Leaves:
    return Leaves.from_runs([(0, M, 512 * gib)])


def all_4k(gib: int = 1) -> Leaves:
    return Leaves.from_runs([(0, K, 262144 * gib)])


def one_split() -> Leaves:
    return Leaves.from_runs([(0, M, 511), (511 * M, K, 512)])


def test_1g_all_2m_uniform():
    """1 GiB in 512 2M leaves, uniform: 512 2M translations. L1 2M holds 32 of 512 equally likely:
    miss 1 - 32/512 = 0.9375. The STLB (1536) holds all 512: no walks, no references."""
    c = analytic(all_2m(), uniform(all_2m()))
    assert c.translations == {"4K": 0, "2M": 512, "1G": 0}
    assert c.l1_miss == pytest.approx(0.9375, abs=1e-9)
    assert c.walks == 0 and c.refs == 0


def test_1g_all_4k_uniform():
    """1 GiB in 262144 4K leaves: 262144 translations. L1 4K: 1 - 64/262144. STLB: 1 - 1536/262144
    = 0.994140625 walks per access. Each walk: the PDE cache holds 32 of the 512 PT-referencing
    PDEs, all equally likely in the walk stream -> hit 1/16, 1 reference; otherwise the PDPTE cache
    holds the one 1G region -> 2 references: 1/16 + 2 * 15/16 = 1.9375 per walk."""
    lv = all_4k()
    c = analytic(lv, uniform(lv))
    assert c.translations == {"4K": 262144, "2M": 0, "1G": 0}
    assert c.l1_miss == pytest.approx(1 - 64 / 262144, abs=1e-9)
    assert c.walks == pytest.approx(0.994140625, abs=1e-9)
    assert c.refs_per_walk == pytest.approx(1.9375, abs=1e-9)


def test_511_2m_and_one_split():
    """511 2M leaves + one 2M split into 512 4K: 1023 translations <= 1536 STLB: no walks.
    L1: 2M array: 511 items of mass 1/512 each, 32 entries -> (511/512)(1 - 32/511) = 479/512;
    4K array: 512 items of mass 1/262144, 64 entries -> (1/512)(1 - 64/512) = 7/4096.
    Total 3839/4096."""
    lv = one_split()
    c = analytic(lv, uniform(lv))
    assert c.translations == {"4K": 512, "2M": 511, "1G": 0}
    assert c.l1_miss == pytest.approx(3839 / 4096, abs=1e-9)
    assert c.walks == 0


def test_hot_set_fits_stlb():
    """1 GiB all-4K, hot set of 3 2M regions = 1536 4K pages = the STLB exactly: no walks.
    (3 regions = 3/512 GiB.)"""
    lv = all_4k()
    c = analytic(lv, hot_set(lv, 3 / 512, seed=7))
    assert c.translations["4K"] == 1536
    assert c.walks == 0 and c.refs == 0


def test_hot_set_exceeds_stlb():
    """4 regions = 2048 4K pages: walks 1 - 1536/2048 = 0.25 per access; 4 PT-referencing PDEs
    fit the 32-entry PDE cache: 1 reference per walk -> 0.25 references per access."""
    lv = all_4k()
    c = analytic(lv, hot_set(lv, 4 / 512, seed=7))
    assert c.translations["4K"] == 2048
    assert c.walks == pytest.approx(0.25, abs=1e-9)
    assert c.refs == pytest.approx(0.25, abs=1e-9)


def test_2m_hot_set_exceeds_stlb():
    """4 GiB all-2M, hot set = all 4 GiB = 2048 2M translations: walks 1 - 1536/2048 = 0.25; a 2M
    walk after a PDPTE-cache hit reads 1 PDE, and the 4 1G regions fit its 4 entries: 0.25 refs."""
    lv = all_2m(4)
    c = analytic(lv, hot_set(lv, 4, seed=1))
    assert c.translations == {"4K": 0, "2M": 2048, "1G": 0}
    assert c.walks == pytest.approx(0.25, abs=1e-9)
    assert c.refs == pytest.approx(0.25, abs=1e-9)


def test_64g_all_1g():
    """64 1G leaves, uniform: L1 1G 4 entries -> 1 - 4/64 = 0.9375; STLB 1G 16 entries -> walks
    1 - 16/64 = 0.75; the PML4E cache holds the one 512G region: 1 reference (the PDPTE) per
    walk -> 0.75."""
    lv = Leaves.from_runs([(0, G, 64)])
    c = analytic(lv, uniform(lv))
    assert c.translations == {"4K": 0, "2M": 0, "1G": 64}
    assert c.l1_miss == pytest.approx(0.9375, abs=1e-9)
    assert c.walks == pytest.approx(0.75, abs=1e-9)
    assert c.refs == pytest.approx(0.75, abs=1e-9)


def test_no_psc_walk_lengths():
    """Without paging-structure caches a walk reads every level: 4 for a 4K leaf (1 GiB all-4K:
    0.994140625 * 4 = 3.9765625), 3 for 2M, 2 for 1G; with LA57 one more."""
    g = geometry_named("skylake,pde=0,pdpte=0,pml4e=0")
    lv = all_4k()
    assert analytic(lv, uniform(lv), g).refs == pytest.approx(3.9765625, abs=1e-9)
    lv2 = all_2m(4)
    assert analytic(lv2, uniform(lv2), g).refs_per_walk == pytest.approx(3.0)
    lv1 = Leaves.from_runs([(0, G, 64)])
    assert analytic(lv1, uniform(lv1), g).refs_per_walk == pytest.approx(2.0)
    lv5 = Leaves(lv.start, lv.shift, levels=5)
    assert analytic(lv5, uniform(lv5), g).refs_per_walk == pytest.approx(5.0)


def test_che_uniform_is_exact():
    """n equal items, capacity C < n: hit probability C/n each (sum of hits = C)."""
    h = che_hits(np.full(100, 0.01), 25)
    assert h == pytest.approx(np.full(100, 0.25), abs=1e-9)
    assert che_hits(np.full(10, 0.1), 10).tolist() == [1.0] * 10


def test_simulated_cyclic_trace_misses_every_access():
    """Fully associative LRU: l1-4k 4 entries, STLB 8. A trace cycling over 9 4K pages of one 2M
    region evicts each page just before its reuse: every access misses L1 and STLB -> 1 walk per
    access; the region's PDE is in the PDE cache: 1 reference. 8 pages fit the STLB: no walks
    after warm-up, but the L1 (4) still misses every access."""
    g = geometry_named("skylake,l1-4k=4/4,stlb=8/8")
    lv = all_4k()
    c = simulate(lv, from_addresses("c9", [i * K for i in range(9)] * 10), g, accesses=900, warmup=90)
    assert (c.l1_miss, c.walks, c.refs) == (1.0, 1.0, 1.0)
    c = simulate(lv, from_addresses("c8", [i * K for i in range(8)] * 10), g, accesses=800, warmup=80)
    assert (c.l1_miss, c.walks, c.refs) == (1.0, 0.0, 0.0)
    g0 = geometry_named("skylake,l1-4k=4/4,stlb=8/8,pde=0")
    c = simulate(lv, from_addresses("c9", [i * K for i in range(9)] * 10), g0, accesses=900, warmup=90)
    assert c.refs == 2.0  # PDPTE-cache hit: PDE + PTE


def test_simulated_set_conflicts():
    """STLB 8 entries 2-way = 4 sets, set = VPN mod 4. Pages 0, 4, 8 (VPNs = 0 mod 4) share one
    set of 2 ways: cycling over them misses every access though 3 < 8 entries; pages 0, 1, 2
    use three sets: no walks after warm-up. (L1 4K disabled: 0 entries.)"""
    g = geometry_named("skylake,l1-4k=0/1,stlb=8/2")
    lv = all_4k()
    c = simulate(lv, from_addresses("s", [0, 4 * K, 8 * K] * 100), g, accesses=270, warmup=30)
    assert c.walks == 1.0
    c = simulate(lv, from_addresses("s", [0, K, 2 * K] * 100), g, accesses=270, warmup=30)
    assert c.walks == 0.0


def test_simulated_agrees_with_analytic_uniform():
    """Uniform over 1 GiB all-4K: analytic walks 0.994140625 (above); a seeded 60000-access
    simulation lies within 1% of it, and within 2% on references per walk (1.9375)."""
    lv = all_4k()
    s = simulate(lv, uniform(lv), accesses=60000, seed=3)
    assert s.walks == pytest.approx(0.994140625, rel=0.01)
    assert s.refs_per_walk == pytest.approx(1.9375, rel=0.02)


def test_mapped_regions_and_hot_set_seeded():
    """one_split(): 511 2M leaves + 512 4K leaves covering region 511: all 512 regions are fully
    mapped. A hot set is the same for the same seed and lies in those regions."""
    assert len(mapped_2m_regions(one_split())) == 512
    lv = Leaves.from_runs([(0, M, 3), (3 * M, K, 100)])  # region 3 only partly mapped
    assert mapped_2m_regions(lv).tolist() == [0, M, 2 * M]
    a, b = hot_set(all_2m(), 0.25, seed=5), hot_set(all_2m(), 0.25, seed=5)
    assert a.lo.tolist() == b.lo.tolist() and len(a.lo) == 128
    with pytest.raises(BadInputError):
        hot_set(lv, 1)


def test_workload_pages():
    """A trace that set_memory_ro's 2 direct-map pages at PA 0x5000 and vmaps 3 frames at PA
    0x200000 touches exactly pages {0x5000, 0x6000, 0x200000, 0x201000, 0x202000}; a 4 GiB all-2M
    map needs 2 translations (2M leaves 0 and 1) for them."""
    po = 0xFFFF888000000000
    ops = [("set_memory_ro", po + 0x5000, 2), ("vmap", 0xFFFFC90000000000, 0x200000, 3, False)]
    p = workload_pages(ops, po)
    assert p.lo.tolist() == [0x5000, 0x6000, 0x200000, 0x201000, 0x202000]
    # an oob write touches its one page (its third field is a mask, not a count); hotplug
    # operands are physical ranges and vunmap a vmalloc range: neither adds direct-map pages
    more = ops + [
        ("oob", po + 0x9000, 1 << 63, 0),
        ("memory_add", 0x100000000, 1 << 27),
        ("vunmap", 0xFFFFC90000000000, 3),
    ]
    assert workload_pages(more, po).lo.tolist() == [0x5000, 0x6000, 0x9000, 0x200000, 0x201000, 0x202000]
    assert analytic(all_2m(4), p).translations == {"4K": 0, "2M": 2, "1G": 0}


def test_leaves_from_model_match_image_and_census():
    """server-64g at boot: the direct-map leaves read from the model's tables equal those the
    scanner finds in its exported image, and their counts are the model's census minus the 4
    kernel-image PTE tables it counts as 2M -> 4K splits (each 512 4K, -1 2M)."""
    from x86pt.cpa.layout import layout_named
    from x86pt.cpa.ops import CpaModel

    m = CpaModel(layout_named("server-64g"))
    a = Leaves.from_model(m)
    b = Leaves.from_image(m.paging_state(), m.export(), m.page_offset)
    assert a.start.tolist() == b.start.tolist() and a.shift.tolist() == b.shift.tolist()
    cen, h = m.census(), m.highmap_pte_tables()
    assert a.counts() == {"4K": cen["4k"] - 512 * h, "2M": cen["2m"] + h, "1G": cen["1g"]}


def test_pattern_named_errors(tmp_path):
    lv = all_2m()
    with pytest.raises(BadInputError):
        pattern_named("zipf", lv)
    with pytest.raises(BadInputError):
        pattern_named("workload", lv)
    f = tmp_path / "a.txt"
    f.write_text("# probe\n0x1000\n4096\n0x200000\n")
    p = pattern_named(f"trace:{f}", lv)
    assert analytic(lv, p).translations == {"4K": 0, "2M": 2, "1G": 0}
    f.write_text("zz\n")
    with pytest.raises(BadInputError):
        pattern_named(f"trace:{f}", lv)
    with pytest.raises(BadInputError):
        geometry_named("skylake,stlb=10/3")
    assert SKYLAKE.stlb == ((12, 21), 1536, 12)


# -- CLI ------------------------------------------------------------------------------------------
def _lines(out: str) -> list[dict]:
    import json

    return [json.loads(x) for x in out.splitlines() if x.strip()]


def test_census_cost_cli_on_a_real_kernel_dump(tmp_path, capsys):
    """`x86pt census --cost uniform` on the 6.12 modules fixture: the translations needed are the
    direct-map leaves the census counts (every present leaf is touched by a uniform pattern)."""
    import lzma
    import os
    from tests.conftest import FIXTURES
    from x86pt.cli import main

    src = os.path.join(FIXTURES, "linux", "6.12-4l-modules", "step-00", "tables.elf.xz")
    img = tmp_path / "t.elf"
    img.write_bytes(lzma.decompress(open(src, "rb").read()))
    assert main(["census", str(img), "--cost", "uniform", "--json"]) == 0
    d = _lines(capsys.readouterr().out)[0]
    leaves = d["direct_map_leaves"]
    assert d["cost"]["translations"] == leaves
    assert 1.0 <= d["cost"]["refs_per_walk"] <= 4.0
    assert main(["census", str(img), "--cost", "hot:0.25", "--cost-mode", "simulated"]) == 0
    assert "page walks" in capsys.readouterr().out
    assert main(["census", str(img), "--cost", "hot:x"]) == 2


def test_cpa_compare_cost_cli(tmp_path, capsys):
    """`cpa compare --cost workload`: a trace that set_memory_4k's one direct-map page inside a
    2M-mapped region of laptop-4g. The page is split off to 4K and marked _PAGE_KERNEL_4K, which
    no policy merges back: the workload's one page needs one 4K translation under each policy."""
    from x86pt.cli import main

    t = tmp_path / "w.trace"
    po = 0xFFFF888000000000
    t.write_text(f"set_memory_4k {po + 0x40200000:#x} 1\n")
    assert (
        main(
            [
                "cpa",
                "compare",
                str(t),
                "--layout",
                "laptop-4g",
                "--policies",
                "none,ideal",
                "--cost",
                "workload",
                "--json",
            ]
        )
        == 0
    )
    rows = {r["policy"]: r["cost"]["translations"] for r in _lines(capsys.readouterr().out)}
    assert rows == {p: {"4K": 1, "2M": 0, "1G": 0} for p in ("none", "ideal")}
    assert (
        main(["cpa", "compare", str(t), "--layout", "laptop-4g", "--policies", "none", "--cost", "uniform"])
        == 0
    )
    assert "walks/1k" in capsys.readouterr().out


def test_unmapped_pages_are_left_out():
    """A trace with 3 addresses, one of them (5 GiB) outside a 4 GiB all-2M map: the pattern keeps
    the 2 mapped pages, says it left 1 out, and both modes run on it."""
    import tempfile

    lv = all_2m(4)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("0x1000\n0x40000000\n0x140000000\n")
    p = pattern_named(f"trace:{f.name}", lv)
    assert p.lo.tolist() == [0x1000, 0x40000000] and "1 unmapped" in p.name
    assert analytic(lv, p).translations == {"4K": 0, "2M": 2, "1G": 0}
    assert simulate(lv, p, accesses=100, warmup=0).walks == 0.02  # 2 first touches


def test_cost_series_ends_at_the_final_state():
    """Three points over a 3-op trace on laptop-4g: set_memory_4k of one page in three different
    2M-mapped regions. With `workload`, point i needs i 4K translations (one per op so far; each
    page was split off to 4K), and the last point equals the cost of the model replayed whole."""
    from x86pt.cost import cost_series, model_cost
    from x86pt.cpa.layout import layout_named
    from x86pt.cpa.ops import CpaModel
    from x86pt.cpa.trace import replay

    po = 0xFFFF888000000000
    ops = [("set_memory_4k", po + 0x40200000 + (i << 21), 1) for i in range(3)]
    lay = layout_named("laptop-4g")
    s = cost_series(CpaModel(lay), ops, "workload", points=3)
    assert [(d, c.translations["4K"]) for d, c in s] == [(1, 1), (2, 2), (3, 3)]

    class A:
        cost, tlb_geometry, cost_mode, cost_seed = "workload", "skylake", "analytic", 1

    m = CpaModel(lay)
    replay(m, ops, samples=0)
    assert model_cost(m, A(), ops) == s[-1][1]


def test_compare_cost_over_time_json_and_plot(tmp_path):
    """`cpa compare --cost` prices every policy at 8 evenly spaced checkpoints; the last point is
    the policy's final cost, and the plot gets a cost row."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    env = {**__import__("os").environ, "PYTHONPATH": ROOT}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "x86pt", *a],
        cwd=tmp_path,
        env=env,  # noqa: E731
        capture_output=True,
        text=True,
        timeout=300,
    )
    r = run("cpa", "generate", "modules", "--ops", "400", "-o", "t.trace", "--layout", "laptop-4g")
    assert r.returncode == 0, r.stderr
    r = run(
        "cpa",
        "compare",
        "t.trace",
        "--layout",
        "laptop-4g",
        "--policies",
        "none,ideal",
        "--cost",
        "uniform",
        "--json",
        "--plot",
        "p.png",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    for row in rows:
        pts = row["cost_series"]
        assert [p["ops"] for p in pts] == [50, 100, 150, 200, 250, 300, 350, 400]
        assert pts[-1]["walks_per_access"] == row["cost"]["walks_per_access"]
    assert (tmp_path / "p.png").stat().st_size > 10_000
