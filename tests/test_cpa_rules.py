"""Hand-derived cases for each rule of docs/cpa.md §4 and §7.2. Expected entry values are written
from the spec's constants (__PAGE_KERNEL = 0x8000000000000163, _RO = ...121, _KERNPG_TABLE = 0x63)
and the DirectMap arithmetic of §2, never computed by the model."""

from __future__ import annotations

import pytest

from x86pt.cpa.layout import PRESETS
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.trace import parse_trace, replay
from x86pt.errors import BadInputError

PO = 0xFFFF888000000000
L64 = PRESETS["server-64g"]
A1G = 0x500000000  # 20 GiB: inside a 1G leaf
A2M = 0x20000000  # 512 MiB: inside a 2M leaf (below 1G the boot map uses 2M)
VM = 0xFFFFFFFFC0400000  # module area


def pte(m, va):
    lvl, e = m.leaf(va)
    return lvl, e


def run(m, text, validate=True):
    r = replay(m, parse_trace(text.splitlines()), validate=validate, samples=0)
    assert r.violation is None, r.violation
    return r


@pytest.fixture
def m15():
    return CpaModel(L64, "6.15", "none")


def test_ro_one_page_in_1g_leaf(m15):
    c = m15.counters
    before = (c.dpc4k, c.dpc2m, c.dpc1g, c.flush_all, c.invlpg_pages)
    run(m15, f"set_memory_ro {PO + A1G + 0x5000:#x} 1")
    assert (c.dpc4k - before[0], c.dpc2m - before[1], c.dpc1g - before[2]) == (512, 511, -1)
    assert (c.split_1g, c.split_2m) == (1, 1)
    # two split flushes (flush_tlb_all each) + one INVLPG for the 1-page request (no alias)
    assert c.flush_all - before[3] == 2 and c.invlpg_pages - before[4] == 1
    assert pte(m15, PO + A1G + 0x5000) == (1, (A1G + 0x5000) | 0x8000000000000121)
    assert pte(m15, PO + A1G + 0x6000) == (1, (A1G + 0x6000) | 0x8000000000000163)
    assert pte(m15, PO + A1G + 0x200000) == (2, (A1G + 0x200000) | 0x80000000000001E3)
    # parents are _KERNPG_TABLE
    lvl, t, i = m15.lookup(PO + A1G)
    v = (PO + A1G) & ((1 << 48) - 1)
    assert m15.t2[v >> 30][(v >> 21) & 511] & 0xFFF == 0x63
    assert m15.t3[v >> 39][(v >> 30) & 511] & 0xFFF == 0x63
    meminfo = c.meminfo(True)
    assert meminfo["DirectMap1G"] == (before[2] - 1) * 1048576


def test_ro_keeps_dirty_on_6_1():
    m = CpaModel(L64, "6.1", "none")
    run(m, f"set_memory_ro {PO + A1G} 1")
    assert pte(m, PO + A1G) == (1, A1G | 0x8000000000000161)


def test_same_prot_keeps_large_page(m15):
    c = m15.counters
    s, f = c.all_splits, c.flush_all + c.flush_ranges
    run(m15, f"set_memory_nx {PO + A2M + 0x3000:#x} 3")
    assert c.all_splits == s and c.flush_all + c.flush_ranges == f  # nothing changed: no flush
    assert pte(m15, PO + A2M) == (2, A2M | 0x80000000000001E3)


def test_whole_aligned_2m_rewritten_in_place(m15):
    c = m15.counters
    s, p, fa = c.all_splits, c.preserved_2m, c.flush_all
    run(m15, f"set_memory_ro {PO + A2M:#x} 512")
    assert c.all_splits == s and c.preserved_2m == p + 1
    assert pte(m15, PO + A2M) == (2, A2M | 0x80000000000001A1)  # P|A|PSE|G|NX
    assert c.flush_all == fa + 1  # 512 > 33 pages


def test_whole_1g_rewritten_in_place(m15):
    run(m15, f"set_memory_ro {PO + A1G:#x} {1 << 18}")
    assert pte(m15, PO + A1G) == (3, A1G | 0x80000000000001A1)
    assert m15.counters.preserved_1g == 1


def test_pat_bit_moves_between_12_and_7(m15):
    run(m15, f"cpa {PO + A2M:#x} 512 set=0x80 clr=0x0")  # PAT in 4K format = bit 7
    assert pte(m15, PO + A2M) == (2, A2M | 0x80000000000011E3)  # ... is bit 12 in a 2M leaf
    run(m15, f"set_memory_ro {PO + A2M + 0x1000:#x} 1")
    assert pte(m15, PO + A2M) == (1, A2M | 0x80000000000001E3)  # PTE: bit 7 = PAT again
    assert pte(m15, PO + A2M + 0x1000) == (1, (A2M + 0x1000) | 0x80000000000001A1)


def test_global_lost_after_np_p(m15):
    """docs/cpa.md §7.3, patch 1: 0x8000000000000163 -> np -> ...062 -> p -> ...063."""
    va = PO + A2M + 0x7000
    run(m15, f"set_memory_4k {va:#x} 1")
    run(m15, f"cpa {va:#x} 1 set=0x0 clr=0x1")
    assert pte(m15, va)[1] & 0x80000000000007FF == 0x8000000000000062  # bit 11: _PAGE_KERNEL_4K
    run(m15, f"cpa {va:#x} 1 set=0x1 clr=0x0")
    assert pte(m15, va)[1] & 0x80000000000007FF == 0x8000000000000063


def test_set_memory_4k_marks_pages_on_6_15_only():
    for ver, bit in (("6.15", 0x800), ("6.1", 0)):
        m = CpaModel(L64, ver, "none")
        run(m, f"set_memory_4k {PO + A2M:#x} 1")
        assert pte(m, PO + A2M) == (1, A2M | 0x8000000000000163 | bit)


def test_alias_of_vmalloc_page(m15):
    c = m15.counters
    frame = 0x31234000
    run(m15, f"vmap {VM:#x} {frame:#x} 1\nset_memory_ro {VM:#x} 1")
    assert pte(m15, VM) == (1, frame | 0x8000000000000121)
    assert pte(m15, PO + frame) == (1, frame | 0x8000000000000121)  # alias RO, NX kept
    assert c.split_2m == 1
    fa = c.flush_all
    run(m15, f"set_memory_x {VM:#x} 1")
    assert pte(m15, VM) == (1, frame | 0x121)
    assert pte(m15, PO + frame) == (1, frame | 0x8000000000000121)  # NX stripped from alias mask
    assert c.flush_all == fa + 1  # alias => force_flush_all


def test_nx_only_change_skips_alias_on_6_1():
    m = CpaModel(L64, "6.1", "none")
    frame = 0x31234000
    run(m, f"vmap {VM:#x} {frame:#x} 1\nset_memory_x {VM:#x} 1")
    assert m.counters.split_2m == 0 and m.counters.flush_all_split == m.counters.all_splits
    assert pte(m, PO + frame)[0] == 2


def test_flush_ceiling_33_pages(m15):
    base = PO + A2M
    run(m15, f"set_memory_4k {base:#x} 64")
    c = m15.counters
    fa, inv = c.flush_all, c.invlpg_pages
    run(m15, f"set_memory_ro {base:#x} 33")
    assert (c.flush_all, c.invlpg_pages) == (fa, inv + 33)
    run(m15, f"set_memory_ro {base + 33 * 4096:#x} 31\nset_memory_rw {base:#x} 34")
    assert c.flush_all == fa + 1


def test_split_flush_and_vmstat_only_when_running():
    m = CpaModel(L64, "6.15", "none")
    # boot splits (mark_rodata_ro, free_initmem) moved DirectMap but no vmstat
    assert m.counters.all_splits > 0 and m.counters.split_2m == m.counters.split_1g == 0


def test_upstream_collapse_restores_vmalloc_pmd_not_direct_map():
    m = CpaModel(L64, "6.15", "upstream")
    frame = 0x40000000
    run(m, f"vmap {VM:#x} {frame:#x} 512 huge\nset_memory_rox {VM:#x} 512")
    assert pte(m, VM) == (2, frame | 0x1A1)  # P|A|PSE|G: rewritten in place
    run(m, f"set_memory_nx {VM + 0x3000:#x} 4\nset_memory_rw {VM + 0x3000:#x} 4")
    assert pte(m, VM)[0] == 1
    freed = m.counters.tables_freed
    run(m, f"set_memory_rox {VM + 0x3000:#x} 4")
    assert pte(m, VM) == (2, frame | 0x1A1)  # collapsed back
    assert m.counters.tables_freed == freed + 1
    assert m.counters.collapse_2m == 0  # vmalloc: not accounted
    assert pte(m, PO + frame + 0x3000)[0] == 1  # the direct-map alias stays split


def test_upstream_collapse_skips_kernel_4k_pages():
    m = CpaModel(L64, "6.15", "upstream")
    base = PO + A2M
    run(m, f"set_memory_4k {base:#x} 512\nset_memory_rox {base:#x} 512")
    assert pte(m, base)[0] == 1
    m2 = CpaModel(L64, "6.15", "upstream")
    run(m2, f"set_memory_ro {base:#x} 1\nset_memory_rox {base:#x} 512")
    assert pte(m2, base) == (2, A2M | 0x1A1) and m2.counters.collapse_2m == 1


def test_static_protections():
    m = CpaModel(L64, "6.15", "none")
    k = L64.kernel
    rodata_dm = PO + k.start_rodata
    run(m, f"set_memory_rw {rodata_dm:#x} 1")
    assert not m.translate(rodata_dm)[1] & 2  # protect_rodata binds every alias
    text = L64.start_kernel_map + k.text
    run(m, f"set_memory_nx {text:#x} 1")
    assert not m.translate(text)[1] >> 63  # protect_kernel_text


def test_census_matches_counters_for_every_preset():
    for name, lay in PRESETS.items():
        if name == "server-1t":
            continue
        m = CpaModel(lay, "6.15", "none")
        cen = m.census()
        c = m.counters
        assert (c.dpc4k, c.dpc2m, c.dpc1g) == (cen["4k"], cen["2m"], cen["1g"]), name
        # total mapped RAM is what the e820 list (+ the whole ISA range) says
        ram = sum(e - s for s, e in lay.ram if s >= 0x100000) + 0x100000
        assert (c.dpc4k - 512 * m.highmap_pte_tables()) * 4096 + (c.dpc2m + m.highmap_pte_tables()) * (
            1 << 21
        ) + c.dpc1g * (1 << 30) == ram


def test_export_walks_like_the_model():
    """The exported image, walked by the independent x86pt walker, gives the model's frames."""
    from x86pt.walk import Access, Translation, walk

    m = CpaModel(PRESETS["laptop-4g"], "6.15", "none")
    run(m, f"vmap {VM:#x} 0x31234000 2\nset_memory_ro {VM:#x} 2\nset_memory_np {PO + 0x20000000:#x} 1")
    mem, st = m.export(), m.paging_state()
    for va in (
        PO + 0x31234000,
        PO + 0x20001000,
        PO + 0x3000,
        VM,
        VM + 0x1000,
        L64.start_kernel_map + 0x1000000,
        PO + 0x100000000 + 0x1234000,
    ):
        r = walk(st, mem, va, Access("read"))
        got = m.translate(va)
        assert isinstance(r, Translation) and r.pa >> 12 == got[0], hex(va)
    r = walk(st, mem, PO + 0x20000000, Access("read"))
    assert r.outcome == "page_fault"


def test_validator_can_fail():
    """Corrupt a PTE behind the model's back: (a) must fire on the next op touching it."""
    m = CpaModel(L64, "6.15", "none")
    ops = parse_trace([f"set_memory_ro {PO + A2M:#x} 1", f"set_memory_rw {PO + A2M:#x} 1"])
    from x86pt.cpa.validate import Validator

    val = Validator(m)
    m.touched = set()
    res = m.set_memory_ro(PO + A2M, 1)
    assert val.check(0, ops[0], res, m.touched) is None
    lvl, t, i = m.lookup(PO + A2M)
    t[i] += 0x1000  # wrong frame
    m.touched = set()
    res = m.set_memory_rw(PO + A2M, 1)
    v = val.check(1, ops[1], res, m.touched)
    assert v is not None and v.invariant == "a"


@pytest.mark.parametrize(
    "line",
    [
        "set_memory_ro 0x10",
        "set_memory_ro zz 1",
        "cpa 0x1000 1 set=1",
        "frobnicate 1 2",
        "oob 0x1000 set=1 clr=0 flags=2",
        "cpa 0x1000 1 set=0 clr=1 flags=2",
    ],
)
def test_bad_trace_lines(line):
    with pytest.raises(BadInputError):
        parse_trace([line])


def test_cli_bad_trace_is_one_line(tmp_path, capsys):
    from x86pt.cli import main

    p = tmp_path / "bad.trace"
    p.write_text("set_memory_ro 0xffff888000000000 1\nset_memory_ro nope 1\n")
    assert main(["cpa", "replay", str(p), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.trace:2" in err[0]
