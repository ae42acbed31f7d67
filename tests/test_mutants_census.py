# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests that kill the surviving mutants of x86pt/census.py (tools/mutate.py x86pt/census.py).

The expected numbers are counted by hand from how the Builder images below are made (which leaves
sit inside [PAGE_OFFSET, PAGE_OFFSET + 2^46), which PTEs are non-present but keep a frame, which
2M blocks of the kernel-image mapping hold a page table), following the module's stated contract
(docs/cpa.md §5, arch_report_meminfo()'s "DirectMap4k:    %8lu kB" lines); render()/to_json()
are checked against text and JSON written out by hand for a Census whose fields all differ."""

from __future__ import annotations

import pytest

from x86pt.build import Builder
from x86pt.census import KERNEL_MAP, Census, _offset_weights, _pick, census, meminfo_text
from x86pt.errors import BadInputError

import numpy as np

from x86pt.scan import U64

GiB = 1 << 30
MiB2 = 1 << 21
PO = 0xFFFF888000000000  # PAGE_OFFSET (4-level, no KASLR)
END = 0xFFFFC88000000000  # PO + 2^46 (64 TiB)
BELOW = 0xFFFF880000000000  # kernel half, below PAGE_OFFSET (the LDT remap slot)
VMALLOC = 0xFFFFC90000000000  # 1 GiB-aligned VA - PA, more records than the direct map, fewer bytes
VMEMMAP = 0xFFFFEA0000000000  # 2M pages at a VA - PA that is not 1 GiB-aligned, more bytes


def image(user: bool = True) -> Builder:
    """The census image. By hand:

    direct map (VA - PA = PO): 5 x 4K at PO (one run), 3 x 2M at PO+2M, 1 x 1G at PO+1G
      -> leaves 4K 5, 2M 3, 1G 1; bytes 20K + 6M + 1G
    invalidated 4K (P=0, frame kept) inside it: PO+0x5000, PO+0x7000 -> 2
    a non-present PDE with a frame at PO+8M: not a 4K entry, not counted
    outside: a 4K page at BELOW (< PO) and one at END (== PO + 2^46), 5 scattered 4K pages at
      VMALLOC (offset VMALLOC, 1 GiB-aligned, 5 records), 520 x 2M at VMEMMAP (offset not aligned,
      1040 MiB > the direct map's 1030 MiB), user: 2 x 1G at 2G -> PA 0 (offset 2 GiB, aligned,
      2 GiB: more than the direct map, but user half)
    kernel image [KERNEL_MAP, +1G): 4K at KERNEL_MAP (2M block 0), two 4K pages in block 3, a 2M
      leaf in block 5 -> 2 blocks hold a page table
    """
    b = Builder(table_base=0x100000, maxphyaddr=40)
    if user:
        b.map(2 * GiB, 0, 2 * GiB, GiB, flags="rw us a")
    b.map(PO, 0, 5 * 0x1000, flags="rw a")
    b.set_entry(PO + 0x5000, 1, 0x5000 | 0x2)  # RW, P=0
    b.set_entry(PO + 0x7000, 1, 0x7000 | 0x2)
    b.map(PO + MiB2, MiB2, 3 * MiB2, MiB2, flags="rw a")
    b.set_entry(PO + 4 * MiB2, 2, 4 * MiB2 | 0x80 | 0x2)  # PS, RW, P=0
    b.map(PO + GiB, GiB, GiB, GiB, flags="rw a")
    b.map(BELOW, 0x10000, 0x1000, flags="rw a")
    b.map(END, 0x20000, 0x1000, flags="rw a")
    for i in range(5):
        b.map(VMALLOC + 0x2000 * i, 0x2000 * i, 0x1000, flags="rw a")
    b.map(VMEMMAP, GiB + MiB2, 520 * MiB2, MiB2, flags="rw a")
    b.map(KERNEL_MAP, 0x1000000, 0x1000, flags="rw a")
    b.map(KERNEL_MAP + 3 * MiB2 + 0x1000, 0x1001000, 0x1000, flags="rw a")
    b.map(KERNEL_MAP + 3 * MiB2 + 0x3000, 0x1003000, 0x1000, flags="rw a")
    b.map(KERNEL_MAP + 5 * MiB2, 0x1200000, MiB2, MiB2, flags="rw a")
    return b


@pytest.mark.parametrize("batch", [1024, 1])
def test_census_hand_counted(batch):
    """batch=1 makes the first chunk user-only (the scan cuts its stream per table batch)."""
    b = image()
    c = census(b.state(), b.memory, batch=batch)
    assert c.page_offset == PO and c.detected is True
    assert c.direct_end == END
    assert c.direct == {1: 5, 2: 3, 3: 1}
    assert c.invalidated_4k == 2
    assert c.highmap_splits == 2
    # leaves anywhere: 4K 5 + 1 + 1 + 5 + 3; 2M 3 + 520 + 1; 1G 2 (user) + 1
    assert c.leaves == {1: 15, 2: 524, 3: 3, 4: 0, 5: 0}
    # PML4 1; PDPTs for PML4 slots 0, 272, 273, 401, 402, 468, 511; PDs: 272, 273 (PO's first
    # GiB), 401, 402, 468 x 2 (520 2M pages), 511 (KERNEL_MAP); PTs: 272, 273, 401, 402, blocks
    # 0 and 3 of the kernel image
    assert c.tables == {5: 0, 4: 1, 3: 7, 2: 7, 1: 6}
    assert c.distinct_tables == 21
    assert c.issues == 0 and c.levels == 4
    # direct_pages_count[]: 4K 5 + 2 + 512 x 2, 2M 3 - 2, 1G 1
    assert c.counts == {1: 1031, 2: 1, 3: 1}
    assert c.meminfo() == (
        "DirectMap4k:        4124 kB\nDirectMap2M:        2048 kB\nDirectMap1G:     1048576 kB\n"
    )


def test_census_given_offset_and_no_kernel_map():
    b = image(user=False)
    c = census(b.state(), b.memory, PO, kernel_map=None)
    assert c.detected is False and c.page_offset == PO
    assert c.direct == {1: 5, 2: 3, 3: 1} and c.invalidated_4k == 2 and c.highmap_splits == 0
    assert c.counts == {1: 7, 2: 3, 3: 1}


def test_census_scan_kw_reach_the_scanner():
    """va_range = the first 2M of the direct map: only the 4K run and the invalidated PTEs."""
    b = image()
    c = census(b.state(), b.memory, PO, va_range=(PO, PO + MiB2 - 1))
    assert c.direct == {1: 5, 2: 0, 3: 0} and c.invalidated_4k == 2
    assert c.leaves[1] == 5 and c.leaves[2] == 0 and c.leaves[3] == 0


def test_census_kernel_image_block_zero_and_range():
    """A PT at exactly __START_KERNEL_map counts; one at KERNEL_MAP + 1G (outside) does not."""
    b = Builder(table_base=0x100000, maxphyaddr=40)
    b.map(PO, 0, MiB2, MiB2, flags="rw a")
    b.map(KERNEL_MAP, 0x1000000, 0x1000, flags="rw a")
    b.map(KERNEL_MAP + GiB, 0x1001000, 0x1000, flags="rw a")
    c = census(b.state(), b.memory, PO)
    assert c.highmap_splits == 1
    c = census(b.state(), b.memory, PO, kernel_map=(KERNEL_MAP, KERNEL_MAP + GiB + MiB2))
    assert c.highmap_splits == 2


def test_census_nothing_in_the_direct_map():
    b = Builder(table_base=0x100000, maxphyaddr=40)
    b.map(0x1000, 0x1000, 0x1000, flags="rw us a")
    c = census(b.state(), b.memory, PO)
    assert c.direct == {1: 0, 2: 0, 3: 0}
    assert (c.invalidated_4k, c.highmap_splits, c.issues) == (0, 0, 0)
    with pytest.raises(BadInputError) as e:
        census(b.state(), b.memory)
    assert str(e.value) == (
        "cannot detect PAGE_OFFSET: nothing is mapped in the kernel half; pass --page-offset"
    )


def test_census_la57_direct_map_is_2_to_the_52():
    po = 0xFF11000000000000
    b = Builder(table_base=0x100000, maxphyaddr=40, levels=5)
    b.map(po, 0, MiB2, MiB2, flags="rw a")
    b.map(po + (1 << 46), 0x400000, 0x1000, flags="rw a")  # inside with 5-level (2^52)
    b.map(po + (1 << 52), 0x401000, 0x1000, flags="rw a")  # the first byte past the end
    c = census(b.state(), b.memory, po)
    assert c.direct_end == po + (1 << 52) == 0xFF21000000000000
    assert c.direct == {1: 1, 2: 1, 3: 0} and c.levels == 5


def test_census_direct_map_end_wraps_past_2_to_the_64():
    """PAGE_OFFSET + 2^46 above 2^64 wraps (end & (2^64 - 1)); the range is then [po, 2^64).
    An odd PAGE_OFFSET (a user's --page-offset) keeps its low bit in the end."""
    po = 0xFFFFE00000000001
    b = Builder(table_base=0x100000, maxphyaddr=40)
    b.map(0x1000, 0x1000, 0x1000, flags="rw us a")
    b.map(0xFFFFFF0000000000, 0x2000, 0x1000, flags="rw a")
    c = census(b.state(), b.memory, po, kernel_map=None)
    assert c.direct_end == 0x0000200000000001
    assert c.direct == {1: 1, 2: 0, 3: 0}


def test_offset_weights_adds_span_per_offset():
    w = {5: 100}
    va = np.array([10, 20, 9, 0x3000], U64)
    pa = np.array([5, 15, 4, 0x1000], U64)
    span = np.array([4096, 8192, 1, 7], U64)
    _offset_weights(va, pa, span, w)
    assert w == {5: 100 + 4096 + 8192 + 1, 0x2000: 7}


def test_pick_rules():
    assert _pick({2 * GiB: 5, GiB: 5}) == GiB  # tie: the lower offset
    assert _pick({GiB + 0x1000: 10, 2 * GiB: 3}) == 2 * GiB  # 1 GiB-aligned ones first
    assert _pick({0x2000: 3, 0x1000: 5}) == 0x1000  # none aligned: all of them
    assert _pick({0: 1, 3 * GiB: 2}) == 3 * GiB
    with pytest.raises(
        BadInputError,
        match="^cannot detect PAGE_OFFSET: nothing is mapped in the kernel half; pass --page-offset$",
    ):
        _pick({})


# -- render / to_json: every field a distinct value --------------------------------------------
FULL = Census(
    page_offset=PO,
    detected=True,
    direct_end=END,
    direct={1: 7, 2: 11, 3: 2},
    leaves={1: 13, 2: 17, 3: 5},
    tables={5: 19, 4: 1, 3: 3, 2: 4, 1: 6},
    distinct_tables=9,
    issues=8,
    levels=4,
    invalidated_4k=3,
    highmap_splits=1,
)
# counts: 4K 7 + 3 + 512 = 522 (2088 kB), 2M 11 - 1 = 10 (20480 kB), 1G 2 (2097152 kB)
FULL_MEMINFO = "DirectMap4k:        2088 kB\nDirectMap2M:       20480 kB\nDirectMap1G:     2097152 kB\n"


def test_render_every_field():
    assert FULL.meminfo() == FULL_MEMINFO
    assert FULL.render() == (
        FULL_MEMINFO + "\n"
        "direct map: 0xffff888000000000-0xffffc88000000000 (PAGE_OFFSET detected): "
        "leaves 4K 7  2M 11  1G 2\n"
        "also counted as the kernel does: 3 invalidated 4K entries, 1 kernel-image 2M splits\n"
        "leaves (whole tree): 4K 13  2M 17  1G 5\n"
        "table pages: PML4 1  PDPT 3  PD 4  PT 6  (distinct 9, 36 KiB)\n"
        "issues: 8 (see x86pt dump --format json)\n"
    )
    assert FULL.render(False) == FULL.render().replace("DirectMap1G:     2097152 kB\n", "")


def test_to_json_every_field():
    assert FULL.to_json() == {
        "page_offset": "0xffff888000000000",
        "page_offset_detected": True,
        "direct_map_end": "0xffffc88000000000",
        "DirectMap4k_kB": 2088,
        "DirectMap2M_kB": 20480,
        "DirectMap1G_kB": 2097152,
        "direct_map_leaves": {"4K": 7, "2M": 11, "1G": 2},
        "invalidated_4k": 3,
        "kernel_image_splits": 1,
        "leaves": {"4K": 13, "2M": 17, "1G": 5},
        "table_visits": {"4": 1, "3": 3, "2": 4, "1": 6},
        "table_pages": 9,
        "issues": 8,
    }


EMPTY = Census(
    page_offset=0xFF11000000000000,
    detected=False,
    direct_end=0xFF21000000000000,
    direct={},
    leaves={},
    tables={},
    distinct_tables=0,
    issues=0,
    levels=5,
)


def test_render_missing_levels_are_zero():
    assert EMPTY.meminfo(gbpages=False) == "DirectMap4k:           0 kB\nDirectMap2M:           0 kB\n"
    assert EMPTY.render(gbpages=False) == (
        "DirectMap4k:           0 kB\nDirectMap2M:           0 kB\n\n"
        "direct map: 0xff11000000000000-0xff21000000000000 (PAGE_OFFSET given): "
        "leaves 4K 0  2M 0  1G 0\n"
        "also counted as the kernel does: 0 invalidated 4K entries, 0 kernel-image 2M splits\n"
        "leaves (whole tree): 4K 0  2M 0  1G 0\n"
        "table pages: PML5 0  PML4 0  PDPT 0  PD 0  PT 0  (distinct 0, 0 KiB)\n"
    )
    d = EMPTY.to_json()
    assert d["direct_map_leaves"] == {"4K": 0, "2M": 0, "1G": 0}
    assert d["leaves"] == {"4K": 0, "2M": 0, "1G": 0}
    assert d["table_visits"] == {}
    assert d["page_offset_detected"] is False
    assert (d["DirectMap4k_kB"], d["DirectMap2M_kB"], d["DirectMap1G_kB"]) == (0, 0, 0)
    five = Census(0, True, 1 << 52, {}, {}, {5: 2, 4: 3}, 5, 0, 5)
    assert five.to_json()["table_visits"] == {"5": 2, "4": 3}


def test_meminfo_text_prints_the_1g_line_by_default():
    """arch_report_meminfo(): pages << 2 / << 11 / << 20 kB, "%8lu" after 4 spaces."""
    assert meminfo_text(1, 2, 3) == (
        "DirectMap4k:           4 kB\nDirectMap2M:        4096 kB\nDirectMap1G:     3145728 kB\n"
    )


def test_census_kernel_map_bounds_are_a_half_open_va_range():
    """A 2M block counts when a PTE record of it starts inside [lo, hi). One page at KERNEL_MAP:
    its PT holds the page's record at KERNEL_MAP and the hole record from KERNEL_MAP + 4K on."""
    b = Builder(table_base=0x100000, maxphyaddr=40)
    b.map(PO, 0, MiB2, MiB2, flags="rw a")
    b.map(KERNEL_MAP, 0x1000000, 0x1000, flags="rw a")
    b.map(KERNEL_MAP + MiB2, 0x1200000, 0x1000, flags="rw a")
    # lo = KERNEL_MAP + 4K: only the hole record (starting exactly at lo) puts block 0 in
    assert (
        census(b.state(), b.memory, PO, kernel_map=(KERNEL_MAP + 0x1000, KERNEL_MAP + MiB2)).highmap_splits
        == 1
    )
    # hi = KERNEL_MAP + 2M + 1: block 1's first record starts at hi - 1, inside
    assert (
        census(b.state(), b.memory, PO, kernel_map=(KERNEL_MAP + MiB2, KERNEL_MAP + MiB2 + 1)).highmap_splits
        == 1
    )
    assert (
        census(b.state(), b.memory, PO, kernel_map=(KERNEL_MAP + MiB2, KERNEL_MAP + MiB2)).highmap_splits == 0
    )


def test_census_scan_of_the_user_half_only():
    """va_range limited to the lower half: no kernel-half record at all, every count is zero."""
    b = image()
    c = census(b.state(), b.memory, PO, va_range=(0, (1 << 47) - 1))
    assert c.direct == {1: 0, 2: 0, 3: 0}
    assert (c.invalidated_4k, c.highmap_splits) == (0, 0)
    assert c.leaves[3] == 2  # the user 1G pages were scanned
