# SPDX-License-Identifier: GPL-2.0-or-later
"""Whole-result checks of the page-table scanner (x86pt/scan.py) on small hand-made images, written
so that each mutant mutmut plants in scan.py changes some checked value (issue 12).

Every expected record, counter and message below is derived by hand from the image's layout (the
Builder allocates tables bottom-up from table_base, one page each, in the order the maps need them)
and from the rules the module states: SDM Vol. 3A §4.5 (table walk, reserved bits with M = 46), §4.6.1
(R/W and U/S ANDed down the walk, XD ORed), the work budget (512 entries per table read, charged
before reading, RECORD_COST = 64 per record emitted) and the issue caps (16 reserved issues per
call, 64 loop issues per batch, 1000 kept in the stats). Never from the scanner's own output.
"""

from __future__ import annotations

import numpy as np
import pytest

from x86pt.build import Builder
from x86pt.errors import BadInputError, BudgetError
from x86pt.memory import open_memory, write_image
from x86pt.memory.sparse import SparseMemory
from x86pt.scan import (
    EFF_LOOP,
    EFF_NX,
    EFF_P,
    EFF_RSVD,
    EFF_RW,
    EFF_US,
    Chunk,
    Filter,
    Issue,
    Mapping,
    Scanner,
    ScanStats,
    _rows_arithmetic,
    merge_sorted,
    parse_has,
    scan_reference,
    sign_extend,
)
from x86pt.state import CR4_LA57, CR4_PAE, PagingState

XD = 1 << 63
TBL = 0x27  # Builder's table entries: P RW US A
P, RW, US, NX, RSVD, LOOP = EFF_P, EFF_RW, EFF_US, EFF_NX, EFF_RSVD, EFF_LOOP
DTYPES = {
    "va": np.uint64,
    "count": np.uint64,
    "level": np.uint8,
    "raw": np.uint64,
    "pa": np.uint64,
    "eff": np.uint8,
    "entry_addr": np.uint64,
}
COLS = tuple(DTYPES)


def records(chunks) -> list[tuple[int, ...]]:
    """(va, count, level, raw, pa, eff, entry_addr) of every record, checking the column dtypes."""
    out = []
    for ch in chunks:
        for col, dt in DTYPES.items():
            assert getattr(ch, col).dtype == dt, col
            assert len(getattr(ch, col)) == len(ch)
        for i in range(len(ch)):
            out.append(tuple(int(getattr(ch, c)[i]) for c in COLS))
    return out


# -- the main image ----------------------------------------------------------------------------------
# Tables, in allocation order: 0x100000 PML4; 0x101000 PDPT, 0x102000 PD, 0x103000 PT (for
# 0x400000); 0x104000 PDPT, 0x105000 PD, 0x106000 PT (for 0xffff888000000000); 0x107000 PDPT (for
# the 1G page at 0xffffffff80000000, its PML4E carrying XD).
ROOT, PDPT0, PD0, PT0, PDPT1, PD1, PT1, PDPT2 = (0x100000 + 0x1000 * i for i in range(8))


def main_image() -> Builder:
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x400000, 0x5000000, 0x3000, 0x1000, "p rw us")  # PT0[0..2] = 0x5000007 + i pages
    b.map(0x403000, 0x6000000, 0x1000, 0x1000, "p us nx")  # PT0[3] = 0x6000005 | XD
    b.map(0x600000, 0x7000000, 0x200000, 0x200000, "p rw")  # PD0[3] = 0x7000083
    b.map(0xFFFF888000000000, 0x40000000, 0x200000, 0x1000, "p rw a d g nx")  # PT1: uniform
    b.map(0xFFFFFFFF80000000, 0x80000000, 1 << 30, 1 << 30, "p rw g")  # PDPT2[510] = 0x80000183
    b.set_entry(0xFFFFFFFF80000000, 4, b.get_entry(0xFFFFFFFF80000000, 4) | XD)  # PML4[511]
    return b


LEAVES = [
    (0x400000, 3, 1, 0x5000007, 0x5000000, P | RW | US, PT0),
    (0x403000, 1, 1, 0x6000005 | XD, 0x6000000, P | US | NX, PT0 + 0x18),
    (0x600000, 1, 2, 0x7000083, 0x7000000, P | RW, PD0 + 0x18),
    (0xFFFF888000000000, 512, 1, 0x40000163 | XD, 0x40000000, P | RW | NX, PT1),
    (0xFFFFFFFF80000000, 1, 3, 0x80000183, 0x80000000, P | RW | NX, PDPT2 + 510 * 8),
]

# Holes: runs of zero entries (one record per run; PML4 runs also end at index 256). Their eff is
# the parent's with R/W and U/S ANDed with the zero entry (so cleared) and XD inherited.
WITH_HOLES = [
    (0x0, 2, 2, 0, 0, 0, PD0),  # PD0[0..1]
    LEAVES[0],
    LEAVES[1],
    (0x404000, 508, 1, 0, 0, 0, PT0 + 0x20),  # PT0[4..511]
    LEAVES[2],
    (0x800000, 508, 2, 0, 0, 0, PD0 + 0x20),  # PD0[4..511]
    (0x40000000, 511, 3, 0, 0, 0, PDPT0 + 8),  # PDPT0[1..511]
    (0x8000000000, 255, 4, 0, 0, 0, ROOT + 8),  # PML4[1..255]
    (0xFFFF800000000000, 17, 4, 0, 0, 0, ROOT + 256 * 8),  # PML4[256..272]
    LEAVES[3],
    (0xFFFF888000200000, 511, 2, 0, 0, 0, PD1 + 8),  # PD1[1..511]
    (0xFFFF888040000000, 511, 3, 0, 0, 0, PDPT1 + 8),  # PDPT1[1..511]
    (0xFFFF890000000000, 237, 4, 0, 0, 0, ROOT + 274 * 8),  # PML4[274..510]
    (0xFFFFFF8000000000, 510, 3, 0, 0, NX, PDPT2),  # PDPT2[0..509], below the XD PML4E
    LEAVES[4],
    (0xFFFFFFFFC0000000, 1, 3, 0, 0, NX, PDPT2 + 511 * 8),  # PDPT2[511]
]

# Budget: tables read 1 + 3 + 2 + 2 = 8 (512 entries each); records emitted per level
# 4: 0 (3 with holes), 3: 1 (5), 2: 1 (4), 1: 3 (4) -> 5 (16) records of 64 each.
VISITED = 8 * 512 + 5 * 64
VISITED_HOLES = 8 * 512 + 16 * 64
# the tables read, batch by batch: depth first, each batch's children before the next batch
TABLE_PAS = {
    1024: [[ROOT], [PDPT0, PDPT1, PDPT2], [PD0, PD1], [PT0, PT1]],
    2: [[ROOT], [PDPT0, PDPT1], [PD0, PD1], [PT0, PT1], [PDPT2]],
    1: [[ROOT], [PDPT0], [PD0], [PT0], [PDPT1], [PD1], [PT1], [PDPT2]],
}


def check_main_stats(sc: Scanner, visited: int, batch: int = 1024) -> None:
    st = sc.stats
    assert st.tables == {1: 2, 2: 2, 3: 3, 4: 1, 5: 0}
    assert st.entries == {1: 3 + 1 + 512, 2: 1, 3: 1, 4: 0, 5: 0}
    assert [t.tolist() for t in st.table_pas] == TABLE_PAS[batch]
    assert st.distinct_tables() == 8
    assert st.issues == [] and st.issue_count == 0
    assert sc.visited == visited
    assert sc.emitted == 3 + 1 + 512 + 1 + 1


@pytest.mark.parametrize("batch", [1, 2, 1024])
def test_main_image_records_and_counters(batch):
    b = main_image()
    sc = Scanner(b.state(), b.memory, batch=batch)
    assert records(sc.chunks()) == LEAVES
    check_main_stats(sc, VISITED, batch)


@pytest.mark.parametrize("batch", [1, 1024])
def test_main_image_with_holes(batch):
    b = main_image()
    sc = Scanner(b.state(), b.memory, holes=True, batch=batch)
    chunks = list(sc.chunks())
    assert records(chunks) == WITH_HOLES
    check_main_stats(sc, VISITED_HOLES, batch)
    # streamed in VA order: every chunk is sorted and starts after the previous one ends
    vas = [int(v) for c in chunks for v in c.va]
    assert vas == sorted(vas)


@pytest.mark.parametrize("fmt", ["raw", "elf"])
def test_main_image_from_a_file(tmp_path, fmt):
    b = main_image()
    st = b.state()
    path = str(tmp_path / ("img.raw" if fmt == "raw" else "img.elf"))
    write_image(b.memory, st, path, fmt)
    mem = open_memory(path)
    try:
        sc = Scanner(st, mem, holes=True)
        assert records(sc.chunks()) == WITH_HOLES
        check_main_stats(sc, VISITED_HOLES)
        assert records(Scanner(st, mem, batch=2).chunks()) == LEAVES
    finally:
        mem.close()


def test_budget_boundary_and_message():
    b = main_image()
    st = b.state()
    assert len(records(Scanner(st, b.memory, max_entries=VISITED).chunks())) == 5
    assert len(records(Scanner(st, b.memory, holes=True, max_entries=VISITED_HOLES).chunks())) == 16
    for holes, limit in ((False, VISITED - 1), (True, VISITED_HOLES - 1)):
        with pytest.raises(BudgetError) as ei:
            list(Scanner(st, b.memory, holes=holes, max_entries=limit).chunks())
        assert str(ei.value) == (
            f"work limit reached: the tables expand to more than {limit} page-table entries "
            "(shared or looping subtrees?); raise it with --max-entries N if the image really is "
            "this large"
        )
    # the root alone costs 512 before it is read: a limit of 511 stops before any read
    sc = Scanner(st, b.memory, max_entries=511)
    with pytest.raises(BudgetError):
        next(sc.chunks())
    assert sc.stats.tables[4] == 0 and sc.visited == 512
    # the three PDPTs are charged before any is read: 512 + 3 * 512 needed, one less stops there
    sc = Scanner(st, b.memory, max_entries=4 * 512 - 1)
    with pytest.raises(BudgetError):
        list(sc.chunks())
    assert sc.stats.tables == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0} and sc.visited == 4 * 512


def mapping_list(recs) -> list[Mapping]:
    """Every entry of the present records, expanded by hand (frame, raw and VA step one page)."""
    out = []
    for va, count, level, raw, pa, eff, ea in recs:
        if not eff & P:
            continue
        size = 1 << (12 + 9 * (level - 1))
        for k in range(count):
            out.append(
                Mapping(
                    va + k * size,
                    size,
                    pa + k * size,
                    level,
                    raw + k * size,
                    bool(eff & RW),
                    bool(eff & US),
                    bool(eff & NX),
                    bool(eff & RSVD),
                    ea + 8 * k,
                )
            )
    return out


def test_mappings_and_reference_list_every_page():
    b = main_image()
    st = b.state()
    want = mapping_list(LEAVES)
    assert len(want) == 518
    assert want[3] == Mapping(
        0x403000, 0x1000, 0x6000000, 1, 0x6000005 | XD, False, True, True, False, PT0 + 24
    )
    assert want[-1].end == 0xFFFFFFFFC0000000
    assert list(Scanner(st, b.memory, holes=True).mappings()) == want
    assert scan_reference(st, b.memory) == want


# -- hostile images: reserved bits, loops, pointers past the end --------------------------------------
def test_reserved_bits_flag_records_and_issues():
    """M = 46: bits 51:46 of every entry are reserved (SDM Table 4-14..4-19)."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x2000, 0x1000, "p rw")  # PT 0x103000 [0..1]
    b.set_entry(0x1000, 1, b.get_entry(0x1000, 1) | 1 << 46)  # PT[1]: a reserved leaf
    b.map(0x40000000, 0x6000000, 0x1000, 0x1000, "p rw us")  # PDPT[1] -> PD 0x104000 -> PT 0x105000
    b.set_entry(0x40000000, 3, b.get_entry(0x40000000, 3) | 1 << 47)  # reserved table entry
    b.map(0x80000000, 0x8000000, 0x200000, 0x200000, "p rw")  # PDPT[2] -> PD 0x106000, 2M leaf
    b.set_entry(0x80000000, 2, b.get_entry(0x80000000, 2) | 1 << 13)  # 2M frame bit 13: reserved
    st = b.state()
    sc = Scanner(st, b.memory)
    assert records(sc.chunks()) == [
        (0x0, 1, 1, 0x5000003, 0x5000000, P | RW, 0x103000),
        (0x1000, 1, 1, 0x5001003 | 1 << 46, 0x5001000, P | RW | RSVD, 0x103008),
        (0x40000000, 1, 1, 0x6000007, 0x6000000, P | RW | US | RSVD, 0x105000),
        (0x80000000, 1, 2, 0x8002083, 0x8000000, P | RW | RSVD, 0x106000),
    ]
    assert sc.stats.issues == [
        Issue("reserved", 0x40000000, 3, 0x101008, 0x104027 | 1 << 47),
        Issue("reserved", 0x80000000, 2, 0x106000, 0x8002083),
        Issue("reserved", 0x1000, 1, 0x103008, 0x5001003 | 1 << 46),
    ]
    assert sc.stats.issue_count == 3
    assert scan_reference(st, b.memory) == mapping_list(
        [(0x0, 1, 1, 0x5000003, 0x5000000, P | RW, 0x103000)]
        + [(0x1000, 1, 1, 0x5001003 | 1 << 46, 0x5001000, P | RW | RSVD, 0x103008)]
        + [(0x40000000, 1, 1, 0x6000007, 0x6000000, P | RW | US | RSVD, 0x105000)]
        + [(0x80000000, 1, 2, 0x8002083, 0x8000000, P | RW | RSVD, 0x106000)]
    )


def test_reserved_issues_are_capped_at_16_per_call_but_all_counted():
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x0, 0x1000, 0x1000, "p")  # PT at 0x103000
    for i in range(20):  # frames two pages apart: every entry is its own run
        b.memory.write_u64(0x103000 + 8 * i, (0x2000 * i) | 1 << 48 | 1)
    sc = Scanner(b.state(), b.memory)
    recs = records(sc.chunks())
    assert recs == [
        (0x1000 * i, 1, 1, 0x2000 * i | 1 << 48 | 1, 0x2000 * i, P | RSVD, 0x103000 + 8 * i)
        for i in range(20)
    ]
    assert sc.stats.issues == [
        Issue("reserved", 0x1000 * i, 1, 0x103000 + 8 * i, 0x2000 * i | 1 << 48 | 1) for i in range(16)
    ]
    assert sc.stats.issue_count == 20


def fill_pt(mem: SparseMemory, pt: int, first: int) -> None:
    mem.write(pt, (np.uint64(first) + np.arange(512, dtype=np.uint64) * np.uint64(0x1000)).tobytes())


def test_uniform_tables_with_reserved_bits():
    """18 PTs each of 512 consecutive frames with bit 46 set: 18 uniform records, all flagged,
    16 issues kept (one per table: va of the table, address of the table, first entry) and all 18
    counted (the count once stopped at the 16 kept)."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x0, 0x1000, 0x1000, "p")  # PML4 0x100000, PDPT 0x101000, PD 0x102000, PT 0x103000
    for t in range(18):
        pt = 0x103000 + 0x1000 * t
        b.memory.write_u64(0x102000 + 8 * t, pt | TBL)
        fill_pt(b.memory, pt, (0x10000000 + t * 0x200000) | 1 << 46 | 0x3)
    sc = Scanner(b.state(), b.memory)
    want = [
        (
            t << 21,
            512,
            1,
            (0x10000000 + t * 0x200000) | 1 << 46 | 3,
            0x10000000 + t * 0x200000,
            P | RW | RSVD,
            0x103000 + 0x1000 * t,
        )
        for t in range(18)
    ]
    assert records(sc.chunks()) == want
    assert sc.stats.issues == [
        Issue("reserved", t << 21, 1, 0x103000 + 0x1000 * t, w[3]) for t, w in enumerate(want[:16])
    ]
    assert sc.stats.issue_count == 18
    assert sc.stats.entries[1] == 18 * 512
    # one record per table: 4 levels of tables (1 + 1 + 1 + 18) and 18 records
    assert sc.visited == 21 * 512 + 18 * 64


def test_uniform_shortcut_conditions():
    """A table is one record only when it is a PT or a PD of 2M leaves whose 512 entries step by
    exactly one page from a present first entry, and the last frame stays inside the frame field
    (bits 45:12 with M = 46). Otherwise it is cut into runs, which may still cover all 512."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x0, 0x1000, 0x1000, "p")  # PDPT 0x101000, PD 0x102000, PT 0x103000
    mem = b.memory
    for t, first in enumerate([0x3FFFFFE00001, 0x3FFFFFE01001, 0x1]):
        pt = 0x103000 + 0x1000 * t
        mem.write_u64(0x102000 + 8 * t, pt | TBL)
        fill_pt(mem, pt, first)
    mem.write_u64(0x105000, 0)  # PT 2: entry 0 not present
    # PDPT[1] -> PD 0x110000 of 512 2M leaves, consecutive frames from 0 (uniform at level 2)
    mem.write_u64(0x101008, 0x110000 | TBL)
    mem.write(0x110000, (np.uint64(0x83) + np.arange(512, dtype=np.uint64) * np.uint64(0x200000)).tobytes())
    # PDPT[2] -> PD 0x111000 of 512 table entries stepping by 2M (PS clear): never one record
    mem.write_u64(0x101010, 0x111000 | TBL)
    mem.write(
        0x111000,
        (np.uint64(0x120000 | TBL) + np.arange(512, dtype=np.uint64) * np.uint64(0x200000)).tobytes(),
    )
    # PDPT[3] -> PD 0x112000 of 512 2M leaves with bit 13 set (reserved in a 2M leaf, an address
    # bit in a table entry): uniform, every entry reserved, one issue for the table
    mem.write_u64(0x101018, 0x112000 | TBL)
    mem.write(0x112000, (np.uint64(0x2083) + np.arange(512, dtype=np.uint64) * np.uint64(0x200000)).tobytes())
    sc = Scanner(b.state(), mem)
    assert records(sc.chunks()) == [
        # PT 0: last frame 0x3fffffff000 fits: one record
        (0x0, 512, 1, 0x3FFFFFE00001, 0x3FFFFFE00000, P, 0x103000),
        # PT 1: entry 511 is 0x400000000001, the frame carried into bit 46 (reserved; frame 0):
        # not uniform; entries 0..510 are a run, 511 its own (reserved) run
        (0x200000, 511, 1, 0x3FFFFFE01001, 0x3FFFFFE01000, P, 0x104000),
        (0x3FF000, 1, 1, 0x400000000001, 0x0, P | RSVD, 0x104000 + 511 * 8),
        # PT 2: entry 0 clear, 1..511 step: one run of 511
        (0x401000, 511, 1, 0x1001, 0x1000, P, 0x105008),
        (0x40000000, 512, 2, 0x83, 0x0, P | RW, 0x110000),  # 0x83: P RW PS
        (0xC0000000, 512, 2, 0x2083, 0x0, P | RW | RSVD, 0x112000),
    ]
    assert sc.stats.issues == [
        Issue("reserved", 0xC0000000, 2, 0x112000, 0x2083),  # level 2 is read first
        Issue("reserved", 0x3FF000, 1, 0x104000 + 511 * 8, 0x400000000001),
    ]
    assert sc.stats.issue_count == 2
    # tables: PML4, PDPT, 4 PDs, 3 PTs + 512 empty PTs below PD 0x111000
    assert sc.stats.tables == {1: 3 + 512, 2: 4, 3: 1, 4: 1, 5: 0}
    assert sc.stats.entries == {1: 512 + 511 + 1 + 511, 2: 1024, 3: 0, 4: 0, 5: 0}
    # records: the two uniform PDs and PT 0 (1 each); PT 1: 2; PT 2: 1 (its hole is not emitted)
    assert sc.visited == (1 + 1 + 4 + 3 + 512) * 512 + 6 * 64


def test_uniform_pt_with_a_va_range_is_cut_at_its_edges():
    """With a va_range the uniform shortcut is off: the 512-entry PT becomes the runs inside it."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x200000, 0x40000000, 0x200000, 0x1000, "p rw")  # PT 0x103000, uniform
    b.map(0x400000, 0x50000000, 0x3000, 0x1000, "p rw")  # PT 0x104000 [0..2]
    st = b.state()
    sc = Scanner(st, b.memory, va_range=(0x3FEFFF, 0x401000))
    # overlapping entries: PT 0x103000 [510] (its last byte is 0x3fefff) and [511]; PT 0x104000 [0]
    assert records(sc.chunks()) == [
        (0x3FE000, 2, 1, 0x401FE003, 0x401FE000, P | RW, 0x103000 + 510 * 8),
        (0x400000, 1, 1, 0x50000003, 0x50000000, P | RW, 0x104000),
    ]
    assert sc.stats.entries[1] == 3
    # the range ends inside the upper half: records in it, and none beyond
    sc = Scanner(st, b.memory, va_range=(0x401000, 0x403000), holes=True)
    assert records(sc.chunks()) == [(0x401000, 2, 1, 0x50001003, 0x50001000, P | RW, 0x104008)]


def test_loops_are_walked_flagged_and_reported():
    """PML4[1] points back at the PML4: through it the PML4 is read as a PDPT, PD and PT in turn
    (SDM §4.5: the CPU does not know a table's level), and every entry that points at one of its
    own ancestors is a loop issue and flags what lies below it."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x1000, 0x1000, "p rw us")  # PDPT0 0x101000, PD0 0x102000, PT0 0x103000
    b.memory.write_u64(ROOT + 8, ROOT | TBL)
    sc = Scanner(b.state(), b.memory)
    r = 1 << 39
    assert records(sc.chunks()) == [
        (0x0, 1, 1, 0x5000007, 0x5000000, P | RW | US, 0x103000),
        (r, 1, 1, 0x103027, 0x103000, P | RW | US | LOOP, 0x102000),  # PD0 read as a PT
        (r + (1 << 30), 1, 1, 0x102027, 0x102000, P | RW | US | LOOP, 0x101000),  # PDPT0 as a PT
        (r + (1 << 30) + (1 << 21), 1, 1, 0x101027, 0x101000, P | RW | US | LOOP, ROOT),  # the PML4
        (r + (1 << 30) + (1 << 21) + 0x1000, 1, 1, 0x100027, 0x100000, P | RW | US | LOOP, ROOT + 8),
    ]
    assert sc.stats.issues == [
        Issue("loop", r, 4, ROOT + 8, 0x100027),
        Issue("loop", r + (1 << 30), 3, ROOT + 8, 0x100027),
        Issue("loop", r + (1 << 30) + (1 << 21), 2, ROOT + 8, 0x100027),
    ]
    assert sc.stats.issue_count == 3
    assert sc.stats.tables == {1: 4, 2: 3, 3: 2, 4: 1, 5: 0}
    assert sc.stats.distinct_tables() == 4
    assert sc.visited == 10 * 512 + 5 * 64


def test_loop_issues_are_capped_at_64_per_batch_and_the_budget_stops_the_blow_up():
    """70 PML4 entries pointing at the PML4: 70 loops at level 4 (64 reported), then 70 PDPT reads
    whose 70 * 70 child tables exceed the budget before any of them is listed."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    for i in range(70):
        b.memory.write_u64(ROOT + 8 * i, ROOT | TBL)
    sc = Scanner(b.state(), b.memory, max_entries=71 * 512)
    with pytest.raises(BudgetError, match="more than 36352 page-table entries"):
        list(sc.chunks())
    assert sc.stats.issues == [Issue("loop", i << 39, 4, ROOT + 8 * i, ROOT | TBL) for i in range(64)]
    assert sc.stats.issue_count == 64
    assert sc.stats.tables == {1: 0, 2: 0, 3: 70, 4: 1, 5: 0}
    assert sc.visited == (1 + 70 + 70 * 70) * 512


def past_end_image() -> Builder:
    """Memory of 0x105000 bytes: tables 0x100000-0x104fff fit, PML4[2] -> 0x105000 and PD[2] ->
    0x7000000 do not."""
    b = Builder(memory=SparseMemory(0x105000), levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x1000, 0x1000, "p rw")  # PDPT 0x101000, PD 0x102000, PT 0x103000
    b.map(0x200000, 0x6000000, 0x1000, 0x1000, "p rw")  # PT 0x104000 (ends at the memory's end)
    b.memory.write_u64(ROOT + 16, 0x105000 | TBL)
    b.memory.write_u64(0x102010, 0x7000000 | TBL)
    return b


@pytest.mark.parametrize("source", ["sparse", "raw", "elf"])
@pytest.mark.parametrize("batch", [1, 2, 1024])
def test_tables_past_the_end_read_as_zeros_and_are_issues(tmp_path, source, batch):
    b = past_end_image()
    st = b.state()
    mem = b.memory
    if source != "sparse":
        path = str(tmp_path / f"img.{source}")
        write_image(b.memory, st, path, source)
        mem = open_memory(path)
    try:
        sc = Scanner(st, mem, holes=True, batch=batch)
        recs = records(sc.chunks())
        assert [x for x in recs if x[5] & P] == [
            (0x0, 1, 1, 0x5000003, 0x5000000, P | RW, 0x103000),
            (0x200000, 1, 1, 0x6000003, 0x6000000, P | RW, 0x104000),
        ]
        # the missing tables are walked as empty: one hole record each
        assert (2 << 39, 512, 3, 0, 0, 0, 0x105000) in recs
        assert (0x400000, 512, 1, 0, 0, 0, 0x7000000) in recs
        assert sorted(sc.stats.issues, key=lambda i: -i.level) == [
            Issue("past-end", 2 << 39, 4, ROOT + 16, 0x105027),
            Issue("past-end", 0x400000, 2, 0x102010, 0x7000027),
        ]
        assert sc.stats.tables == {1: 3, 2: 1, 3: 2, 4: 1, 5: 0}
    finally:
        if source != "sparse":
            mem.close()


def test_cr3_past_the_end_and_every_table_missing(tmp_path):
    b = Builder(memory=SparseMemory(0x2000), levels=5, table_base=0x1000)
    st = PagingState(cr3=0x4000, cr4=CR4_PAE | CR4_LA57)
    path = str(tmp_path / "img.raw")
    write_image(b.memory, st, path, "raw")
    for mem in (b.memory, open_memory(path)):
        sc = Scanner(st, mem, holes=True)
        recs = records(sc.chunks())
        # the empty root: a hole of 256 lower-half entries, one of 256 upper-half ones
        assert recs == [(0, 256, 5, 0, 0, 0, 0x4000), (0xFF00000000000000, 256, 5, 0, 0, 0, 0x4800)]
        assert sc.stats.issues == [Issue("past-end", 0, 6, 0, 0x4000, cr3=True)]
        assert sc.stats.issues[0].describe() == (
            "CR3 = 0x4000 points at a table past the end of the image; walked as an empty table"
        )
    # 4-level paging: the issue's level is 5, but it is still CR3 (it once read "PML5E at 0x0")
    st4 = PagingState(cr3=0x4000, cr4=CR4_PAE)
    sc = Scanner(st4, b.memory)
    assert records(sc.chunks()) == []
    assert sc.stats.issues == [Issue("past-end", 0, 5, 0, 0x4000, cr3=True)]
    assert sc.stats.issues[0].describe().startswith("CR3 = 0x4000 points at a table past the end")
    assert sc.stats.issues[0].to_json() == {
        "issue": "past-end",
        "va": "0x0",
        "level": 5,
        "entry_addr": "0x0",
        "raw": "0x0000000000004000",
    }


def test_issue_text_and_json():
    loop = Issue("loop", 0xFFFF800000000000, 4, 0x100800, 0x100027)
    assert loop.describe() == (
        "PML4E at 0x100800 (va 0xffff800000000000) = 0x0000000000100027 points at one of its own "
        "ancestor tables (recursive mapping); walked as the CPU would"
    )
    assert loop.to_json() == {
        "issue": "loop",
        "va": "0xffff800000000000",
        "level": 4,
        "entry_addr": "0x100800",
        "raw": "0x0000000000100027",
    }
    assert Issue("past-end", 0x40000000, 3, 0x101008, 0x7000027).describe() == (
        "PDPTE at 0x101008 (va 0x0000000040000000) = 0x0000000007000027 points at a table past the "
        "end of the image; walked as an empty table"
    )
    assert Issue("reserved", 0x1000, 1, 0x103008, 1 << 46 | 1).describe() == (
        "PTE at 0x103008 (va 0x0000000000001000) = 0x0000400000000001 has reserved bits set: an "
        "access through it would #PF(RSVD)"
    )
    assert Issue("reserved", 0x200000, 2, 0x102008, 0x83).describe().startswith("PDE at 0x102008 ")
    assert Issue("past-end", 0, 5, 0x100000, 0x27).describe().startswith("PML5E at 0x100000 ")
    assert Issue("past-end", 0, 5, 0, 0x5000, cr3=True).describe().startswith("CR3 = 0x5000 points at")


def test_stats_keep_1000_issues_and_count_all():
    st = ScanStats()
    assert st.tables == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0} and st.entries == st.tables
    assert st.distinct_tables() == 0 and st.issue_count == 0 and st.issues == []
    for i in range(1001):
        st.add_issue(Issue("loop", i, 4, 0, 0))
    assert len(st.issues) == 1000 and st.issue_count == 1001
    assert st.issues[-1].va == 999
    st.table_pas += [np.array([0x1000, 0x2000], np.uint64), np.array([0x2000, 0x3000], np.uint64)]
    assert st.distinct_tables() == 3


def chunk(rows) -> Chunk:
    cols = list(zip(*rows))
    return Chunk(*(np.array(c, dtype=DTYPES[name]) for name, c in zip(COLS, cols)))


def test_chunk_helpers_and_merge():
    a = chunk([(0x1000, 2, 1, 0x11, 0x10000, P, 0x100), (0x400000, 1, 2, 0x83, 0x200000, P, 0x208)])
    b = chunk([(0x3000, 3, 1, 0x21, 0x20000, P | RW, 0x118), (0x40000000, 2, 3, 0, 0, 0, 0x308)])
    assert a.size.tolist() == [0x1000, 0x200000] and a.size.dtype == np.uint64
    assert b.span.tolist() == [0x3000, 2 << 30]
    assert records([a.take(slice(1, None))]) == records([a])[1:]
    assert records([b.take(np.array([False, True]))]) == records([b])[1:]
    e = Chunk.empty()
    assert len(e) == 0 and records([e]) == []
    assert merge_sorted(e, a) is a and merge_sorted(a, e) is a
    assert records([merge_sorted(a, b)]) == sorted(records([a]) + records([b]))
    assert records([merge_sorted(b, a)]) == sorted(records([a]) + records([b]))
    m = Mapping(0x1000, 0x1000, 0, 1, 0, True, True, False, False, 0)
    assert m.end == 0x2000


def test_sign_extend():
    va = np.array([0x800000000000, 0x7FFFFFFFFFFF, 0x1000000000000, 0x0], dtype=np.uint64)
    assert sign_extend(va, 48).tolist() == [0xFFFF800000000000, 0x7FFFFFFFFFFF, 0x1000000000000, 0]
    va57 = np.array([1 << 56, (1 << 56) - 1, 0x800000000000], dtype=np.uint64)
    assert sign_extend(va57, 57).tolist() == [0xFF00000000000000, (1 << 56) - 1, 0x800000000000]


def test_rows_arithmetic_blocks_and_row_selections():
    """300 rows (more than two blocks of 128); a row is arithmetic when E[r, i] == E[r, 0] + step[i]."""
    step = np.arange(512, dtype=np.uint64) * np.uint64(0x1000)
    E = (np.arange(300, dtype=np.uint64)[:, None] * np.uint64(1 << 30)) + step[None, :]
    broken = {5: 0, 130: 511, 200: 1, 299: 256}  # row: column changed
    for r, c in broken.items():
        E[r, c] += np.uint64(8)
    want = [r not in broken for r in range(300)]
    assert _rows_arithmetic(E, np.arange(300), step).tolist() == want
    rev = np.arange(300)[::-1]
    assert _rows_arithmetic(E, rev, step).tolist() == want[::-1]
    some = np.array([1, 5, 130, 131, 200, 299])
    assert _rows_arithmetic(E, some, step).tolist() == [True, False, False, True, False, False]
    assert _rows_arithmetic(E, np.arange(0), step).tolist() == []
    sub = np.arange(150, 300)  # starts past 0: not the whole array
    assert _rows_arithmetic(E, sub, step).tolist() == want[150:]


def test_scanner_options():
    b = main_image()
    st = b.state()
    sc = Scanner(st, b.memory, addr_mask=0xFFFFF, top_breaks=(0, 1, 100, 256, 511, 512, 600))
    assert sc.addr_mask == 0xFF000 and sc.top_breaks == (1, 100, 256, 511)
    assert sc.memory is b.memory and sc.state is st
    assert Scanner(st, b.memory).addr_mask == (1 << 46) - 0x1000
    # PML4 holes end at every top break: [1..99], [100..255], [256..272], [274..510]
    sc = Scanner(st, b.memory, holes=True, top_breaks=(100, 256))
    assert [x for x in records(sc.chunks()) if x[2] == 4] == [
        (0x8000000000, 99, 4, 0, 0, 0, ROOT + 8),
        (100 << 39, 156, 4, 0, 0, 0, ROOT + 800),
        (0xFFFF800000000000, 17, 4, 0, 0, 0, ROOT + 256 * 8),
        (0xFFFF890000000000, 237, 4, 0, 0, 0, ROOT + 274 * 8),
    ]
    # no break: the lower-half hole runs on across the hole in the address space
    sc = Scanner(st, b.memory, holes=True, top_breaks=())
    assert [x for x in records(sc.chunks()) if x[2] == 4][0] == (0x8000000000, 272, 4, 0, 0, 0, ROOT + 8)


def test_addr_mask_selects_the_frame_bits():
    """Bit 44 is an address bit under M = 46; with addr_mask = bits 41:12 (QEMU-style narrower
    masks) it is not part of the frame."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x1000, 0x1000, "p rw")
    b.set_entry(0x0, 1, 0x5000003 | 1 << 44)
    st = b.state()
    assert records(Scanner(st, b.memory).chunks()) == [
        (0x0, 1, 1, 0x5000003 | 1 << 44, 0x5000000 | 1 << 44, P | RW, 0x103000)
    ]
    assert records(Scanner(st, b.memory, addr_mask=(1 << 42) - 1).chunks()) == [
        (0x0, 1, 1, 0x5000003 | 1 << 44, 0x5000000, P | RW, 0x103000)
    ]
    assert scan_reference(st, b.memory, addr_mask=(1 << 42) - 1)[0].pa == 0x5000000


def test_five_level_tree():
    b = Builder(levels=5, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x1000, 0x1000, "p rw")  # PML4 0x101000 .. PT 0x104000
    b.map(0xFF00000000000000, 0x6000000, 0x1000, 0x1000, "p rw")  # PML5[256]: PML4 0x105000 .. PT 0x108000
    st = b.state()
    sc = Scanner(st, b.memory, holes=True)
    recs = records(sc.chunks())
    assert [x for x in recs if x[5] & P] == [
        (0x0, 1, 1, 0x5000003, 0x5000000, P | RW, 0x104000),
        (0xFF00000000000000, 1, 1, 0x6000003, 0x6000000, P | RW, 0x108000),
    ]
    assert [x for x in recs if x[2] == 5] == [
        (1 << 48, 255, 5, 0, 0, 0, ROOT + 8),
        (0xFF01000000000000, 255, 5, 0, 0, 0, ROOT + 257 * 8),
    ]
    assert sc.stats.tables == {1: 2, 2: 2, 3: 2, 4: 2, 5: 1}
    assert scan_reference(st, b.memory) == mapping_list([x for x in recs if x[5] & P])


def test_reserved_ps_in_a_pml4e_flags_the_subtree():
    b = main_image()
    b.set_entry(0xFFFF888000000000, 4, b.get_entry(0xFFFF888000000000, 4) | 0x80)
    sc = Scanner(b.state(), b.memory)
    recs = records(sc.chunks())
    assert recs == LEAVES[:3] + [LEAVES[3][:5] + (P | RW | NX | RSVD, PT1), LEAVES[4]]
    assert sc.stats.issues == [Issue("reserved", 0xFFFF888000000000, 4, ROOT + 273 * 8, PDPT1 | 0xA7)]


# -- filters ------------------------------------------------------------------------------------------
FROWS = [
    (0x1000, 1, 1, 0x181, 0x0, P | RW | US, 0x100),  # PTE: PAT (bit 7), G
    (0x200000, 1, 2, 0x10A1, 0x0, P | NX, 0x200),  # 2M: PS, A, PAT (bit 12)
    (0x40000000, 1, 3, 0xC3, 0x0, P | RW, 0x300),  # 1G: PS, D, RW
    (0x80000000, 4, 1, 0x0, 0x0, 0, 0x400),  # a hole: always kept
]


@pytest.mark.parametrize(
    "kw,keep",
    [
        ({"user": True}, [1, 0, 0, 1]),
        ({"user": False}, [0, 1, 1, 1]),
        ({"writable": True}, [1, 0, 1, 1]),
        ({"writable": False}, [0, 1, 0, 1]),
        ({"executable": True}, [1, 0, 1, 1]),
        ({"executable": False}, [0, 1, 0, 1]),
        ({"executable": True, "nxe": False}, [1, 1, 1, 1]),
        ({"executable": False, "nxe": False}, [0, 0, 0, 1]),
        ({"levels": (2, 3)}, [0, 1, 1, 1]),
        ({"has": "pat"}, [1, 1, 0, 1]),
        ({"has": "!pat"}, [0, 0, 1, 1]),
        ({"has": "g"}, [1, 0, 0, 1]),
        ({"has": "!a"}, [1, 0, 1, 1]),
        ({"has": "ps,d"}, [0, 0, 1, 1]),
        ({"has": "rw pat"}, [0, 0, 0, 1]),
        ({"user": False, "writable": True}, [0, 0, 1, 1]),
    ],
)
def test_filter_mask(kw, keep):
    f = Filter(**kw)
    assert f.active
    ch = chunk(FROWS)
    assert f.mask(ch).tolist() == [bool(k) for k in keep]
    out = list(f.apply(iter([ch])))
    assert len(out) == 1 and records(out) == [r for r, k in zip(FROWS, keep) if k]


def test_filter_apply():
    ch = chunk(FROWS)
    assert not Filter().active and not Filter(nxe=False).active
    assert Filter(levels=()).active and Filter(has="").active
    assert [c is ch for c in Filter().apply([ch])] == [True]
    assert [c is ch for c in Filter(levels=(1, 2, 3)).apply([ch])] == [True]  # all kept: as is
    assert Filter(has="").mask(ch).all()
    consumed = []

    def source():
        consumed.append(1)
        yield ch

    with pytest.raises(BadInputError, match="unknown flag 'bogus'"):
        next(iter(Filter(has="g bogus").apply(source())))
    assert consumed == []


@pytest.mark.parametrize(
    "words,want",
    [
        ("g !a", (1 << 8, 1 << 5, None)),
        ("G,D -PWT _pcd", (1 << 8 | 1 << 6, 1 << 3 | 1 << 4, None)),
        ("p rw us ps xd", (1 | 2 | 4 | 1 << 7 | 1 << 63, 0, None)),
        ("nx pat", (1 << 63, 0, True)),
        ("!pat", (0, 0, False)),
        ("pat pat", (0, 0, True)),
        ("-pat _pat", (0, 0, False)),
    ],
)
def test_parse_has(words, want):
    assert parse_has(words) == want


@pytest.mark.parametrize(
    "words,msg",
    [
        ("pat !pat", "--has 'pat !pat': pat is asked both set and clear"),
        ("!pat pat", "--has '!pat pat': pat is asked both set and clear"),
        ("g !g", "--has 'g !g': a flag is asked both set and clear"),
        ("", "--has '': name at least one flag"),
        (" , ", "--has '': name at least one flag"),
        (
            "g !!a",
            "unknown flag '!!a' for --has (one flag per word, '!' once to ask for it clear; known: "
            "p, rw, us, pwt, pcd, a, d, ps, g, xd, nx, pat)",
        ),
    ],
)
def test_parse_has_refuses(words, msg):
    with pytest.raises(BadInputError) as ei:
        parse_has(words)
    assert str(ei.value) == msg


def test_mappings_carry_the_reserved_flag():
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x2000, 0x1000, "p rw")
    b.set_entry(0x1000, 1, b.get_entry(0x1000, 1) | 1 << 46)
    st = b.state()
    want = [
        Mapping(0x0, 0x1000, 0x5000000, 1, 0x5000003, True, False, False, False, 0x103000),
        Mapping(0x1000, 0x1000, 0x5001000, 1, 0x5001003 | 1 << 46, True, False, False, True, 0x103008),
    ]
    assert list(Scanner(st, b.memory).mappings()) == want
    assert scan_reference(st, b.memory) == want


def test_rows_arithmetic_is_exact_on_high_values():
    """Entries with XD (bit 63) set: a difference of 8 in the low bits must still count (a float
    comparison would round both to 2**63)."""
    step = np.arange(512, dtype=np.uint64) * np.uint64(0x1000)
    E = np.uint64(XD | 0x1000) + np.tile(step, (3, 1))
    E[1, 7] += np.uint64(8)
    assert _rows_arithmetic(E, np.arange(3), step).tolist() == [True, False, True]
    assert _rows_arithmetic(E, np.array([1, 2]), step).tolist() == [False, True]


def test_raw_tables_are_read_in_place(tmp_path):
    """A raw image's consecutive tables are a view of the mapped file (no copy); others are
    gathered, and tables past the end read as zeros."""
    from x86pt.scan import _Tables

    b = main_image()
    path = str(tmp_path / "img.raw")
    write_image(b.memory, b.state(), path, "raw")
    mem = open_memory(path)
    try:
        t = _Tables(mem)
        assert t.limit == 0x108000
        for pas in ([PD0], [PD0, PT0], [ROOT, PDPT0, PD0, PT0]):
            E, ok = t.read(np.array(pas, dtype=np.uint64))
            assert np.shares_memory(E, mem.file.u64) and ok.all()
            assert E.tolist() == [b.memory.table(pa).tolist() for pa in pas]
        E, ok = t.read(np.array([PT0, PD0, PDPT2, 0x108000], dtype=np.uint64))
        assert not np.shares_memory(E, mem.file.u64) and ok.tolist() == [True, True, True, False]
        assert E.tolist() == [b.memory.table(pa).tolist() for pa in (PT0, PD0, PDPT2)] + [[0] * 512]
        E, ok = t.read(np.array([0x108000, 0x109000], dtype=np.uint64))
        assert E.tolist() == [[0] * 512] * 2 and ok.tolist() == [False, False]
        assert E.dtype == np.uint64
    finally:
        mem.close()
    t = _Tables(b.memory)  # not a raw file: one table at a time
    assert t.flat is None
    E, ok = t.read(np.array([PD0, PT0], dtype=np.uint64))
    assert E.tolist() == [b.memory.table(pa).tolist() for pa in (PD0, PT0)] and ok.all()


def test_batches_hold_1024_tables_by_default():
    """1025 PD entries (three PDs) point at one empty PT: the PTs are read as batches of 1024 and 1."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x0, 0x1000, 0x1000, "p")  # PD 0x102000, PT 0x103000
    b.memory.write_u64(0x101008, 0x104000 | TBL)  # PDPT[1] -> PD 0x104000
    b.memory.write_u64(0x101010, 0x105000 | TBL)  # PDPT[2] -> PD 0x105000
    empty = 0x106000
    for pd, n in ((0x102000, 512), (0x104000, 512), (0x105000, 1)):
        for i in range(n):
            b.memory.write_u64(pd + 8 * i, empty | TBL)
    sc = Scanner(b.state(), b.memory)
    assert records(sc.chunks()) == []
    assert [len(t) for t in sc.stats.table_pas] == [1, 1, 3, 1024, 1]
    assert sc.stats.tables == {1: 1025, 2: 3, 3: 1, 4: 1, 5: 0}
    assert sc.stats.distinct_tables() == 1 + 1 + 3 + 1


def test_non_present_entries_are_never_one_record():
    """A PT whose entries step by one page but have P clear, and a PD whose entries step by 2M with
    PS set but P clear: holes (one run each), not leaves."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x0, 0x1000, 0x1000, "p")  # PD 0x102000, PT 0x103000 [0] = 0x1
    fill_pt(b.memory, 0x104000, 0x2)  # RW only
    b.memory.write_u64(0x102008, 0x104000 | TBL)  # PD[1] -> that PT
    b.memory.write_u64(0x101008, 0x105000 | TBL)  # PDPT[1] -> PD 0x105000
    b.memory.write(
        0x105000, (np.uint64(0x82) + np.arange(512, dtype=np.uint64) * np.uint64(0x200000)).tobytes()
    )
    sc = Scanner(b.state(), b.memory, holes=True)
    recs = records(sc.chunks())
    assert [x for x in recs if x[5] & P] == [(0x0, 1, 1, 0x1, 0x0, P, 0x103000)]
    # a hole carries the ANDed R/W of its own value too (effective_prot on a non-present entry)
    assert (0x200000, 512, 1, 0x2, 0, RW, 0x104000) in recs
    assert (0x40000000, 512, 2, 0x82, 0, RW, 0x105000) in recs
    assert sc.stats.entries == {1: 1, 2: 0, 3: 0, 4: 0, 5: 0}


def test_a_pml4_of_ps_entries_is_tables_not_a_leaf():
    """PS is reserved in a PML4E (SDM Table 4-15): 512 PML4Es stepping by 512G with PS set are
    table pointers (flagged), never one leaf record. M = 52 so the frames fit."""
    mem = SparseMemory()
    root = 0x1000
    mem.write(root, (np.uint64(0x81) + np.arange(512, dtype=np.uint64) * np.uint64(1 << 39)).tobytes())
    st = PagingState(cr3=root, cr4=CR4_PAE, efer=0xD00, maxphyaddr=52)
    sc = Scanner(st, mem, max_entries=1 << 20)
    assert records(sc.chunks()) == []
    assert sc.stats.tables == {1: 0, 2: 0, 3: 512, 4: 1, 5: 0}
    assert sc.stats.issues == [
        Issue(
            "reserved", sign_extend(np.array([i << 39], np.uint64), 48)[0], 4, root + 8 * i, 0x81 + (i << 39)
        )
        for i in range(16)
    ]
    assert sc.stats.issue_count == 512


def test_a_run_of_table_entries_points_at_consecutive_tables():
    """PD[0..2] step by 2M (one run) and point at PTs 0x200000, 0x400000, 0x600000; memory ends at
    0x500000, so the third is past the end."""
    b = Builder(memory=SparseMemory(0x500000), levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x0, 0x1000, 0x1000, "p")  # PD 0x102000
    for i in range(3):
        b.memory.write_u64(0x102000 + 8 * i, 0x200000 * (i + 1) | TBL)
    assert [b.memory.read_u64(0x102000 + 8 * i) for i in range(3)] == [0x200027, 0x400027, 0x600027]
    b.memory.write_u64(0x200000, 0x5000003)
    b.memory.write_u64(0x400008, 0x6000003)
    sc = Scanner(b.state(), b.memory)
    assert records(sc.chunks()) == [
        (0x0, 1, 1, 0x5000003, 0x5000000, P | RW, 0x200000),
        (0x201000, 1, 1, 0x6000003, 0x6000000, P | RW, 0x400008),
    ]
    assert [t.tolist() for t in sc.stats.table_pas] == [
        [ROOT],
        [PDPT0],
        [PD0],
        [0x200000, 0x400000, 0x600000],
    ]
    assert sc.stats.issues == [Issue("past-end", 0x400000, 2, 0x102010, 0x600027)]


def test_a_shared_table_is_not_a_loop():
    """PDPT B[1] points at PDPT A, which is on another path (PML4[0]), not an ancestor of B: the
    walk reads A as a PD and its PD as a PT, with no loop issue and no EFF_LOOP."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x1000, 0x1000, "p rw us")  # PDPT A 0x101000, PD 0x102000, PT 0x103000
    b.map(1 << 39, 0x6000000, 0x1000, 0x1000, "p rw us")  # PDPT B 0x104000, PD 0x105000, PT 0x106000
    b.memory.write_u64(0x104008, 0x101000 | TBL)
    sc = Scanner(b.state(), b.memory)
    assert records(sc.chunks()) == [
        (0x0, 1, 1, 0x5000007, 0x5000000, P | RW | US, 0x103000),
        (1 << 39, 1, 1, 0x6000007, 0x6000000, P | RW | US, 0x106000),
        ((1 << 39) + (1 << 30), 1, 1, 0x103027, 0x103000, P | RW | US, 0x102000),
    ]
    assert sc.stats.issues == []


@pytest.mark.parametrize(
    "kw,keep",
    [
        ({"writable": True, "executable": True}, [1, 0, 1, 1]),
        ({"user": True, "executable": False}, [0, 0, 0, 1]),
        ({"writable": False, "levels": (1, 3)}, [0, 0, 0, 1]),
        ({"levels": (1, 2), "has": "a"}, [0, 1, 0, 1]),
        ({"writable": True, "has": "!pat"}, [0, 0, 1, 1]),
        ({"writable": False, "has": "ps"}, [0, 1, 0, 1]),
    ],
)
def test_filter_tests_combine(kw, keep):
    assert Filter(**kw).mask(chunk(FROWS)).tolist() == [bool(k) for k in keep]


class _Spy(Scanner):
    """Records which tables were cut into runs (the others took the uniform-table shortcut)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cut: list[tuple[int, list[int]]] = []

    def _table_runs(self, lnum, E, nu, pas, bases, effs):
        self.cut.append((lnum, pas[nu].tolist()))
        return super()._table_runs(lnum, E, nu, pas, bases, effs)


def test_uniform_tables_skip_the_run_cutting():
    """The module's speed contract: a PT (or a PD of 2M leaves) of 512 present leaves with equal
    bits and consecutive frames is one record without being cut into runs; every other table is cut."""
    b = main_image()
    sc = _Spy(b.state(), b.memory)
    assert records(sc.chunks()) == LEAVES
    assert sc.cut == [(4, [ROOT]), (3, [PDPT0, PDPT1, PDPT2]), (2, [PD0, PD1]), (1, [PT0])]  # not PT1
    # the uniform-shortcut image: PT 0 (last frame exactly at the top of bits 45:12) and the PDs
    # 0x110000 and 0x112000 of 2M leaves are shortcuts; PT 1 (carry), PT 2 (entry 0 clear), the
    # PD of table pointers and the 512 empty PTs below it are cut
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x0, 0x1000, 0x1000, "p")
    mem = b.memory
    for t, first in enumerate([0x3FFFFFE00001, 0x3FFFFFE01001, 0x1]):
        mem.write_u64(0x102000 + 8 * t, (0x103000 + 0x1000 * t) | TBL)
        fill_pt(mem, 0x103000 + 0x1000 * t, first)
    mem.write_u64(0x105000, 0)
    for i, (pd, first, step) in enumerate(
        [(0x110000, 0x83, 0x200000), (0x111000, 0x120000 | TBL, 0x200000), (0x112000, 0x2083, 0x200000)]
    ):
        mem.write_u64(0x101008 + 8 * i, pd | TBL)
        mem.write(pd, (np.uint64(first) + np.arange(512, dtype=np.uint64) * np.uint64(step)).tobytes())
    sc = _Spy(b.state(), mem)
    list(sc.chunks())
    assert sc.cut == [
        (4, [ROOT]),
        (3, [PDPT0]),
        (2, [0x102000, 0x111000]),
        (1, [0x104000, 0x105000] + [0x120000 + 0x200000 * i for i in range(512)]),
    ]
    # with a va_range the shortcut is off: PT1 of the main image is cut too
    b = main_image()
    sc = _Spy(b.state(), b.memory, va_range=(0xFFFF888000000000, 0xFFFF888000200000))
    assert records(sc.chunks()) == [LEAVES[3]]
    assert sc.cut[-1] == (1, [PT1])


def test_a_loop_to_a_table_below_the_root():
    """PDPT0[1] points at PDPT0 itself: the ancestors checked are every table on the path, not
    only the root. Through it PDPT0 is read as a PD, then as a PT."""
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x0, 0x5000000, 0x1000, 0x1000, "p rw us")  # PDPT0 0x101000, PD0 0x102000, PT0 0x103000
    b.memory.write_u64(PDPT0 + 8, PDPT0 | TBL)
    sc = Scanner(b.state(), b.memory)
    g, m = 1 << 30, 1 << 21
    assert records(sc.chunks()) == [
        (0x0, 1, 1, 0x5000007, 0x5000000, P | RW | US, PT0),
        (g, 1, 1, 0x103027, 0x103000, P | RW | US | LOOP, PD0),  # PD0 read as a PT
        (g + m, 1, 1, 0x102027, 0x102000, P | RW | US | LOOP, PDPT0),  # PDPT0 read as a PT
        (g + m + 0x1000, 1, 1, 0x101027, 0x101000, P | RW | US | LOOP, PDPT0 + 8),
    ]
    assert sc.stats.issues == [
        Issue("loop", g, 3, PDPT0 + 8, 0x101027),
        Issue("loop", g + m, 2, PDPT0 + 8, 0x101027),
    ]
