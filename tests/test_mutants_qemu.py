# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests that kill the surviving mutants of x86pt/formats/qemu.py (tools/mutate.py
x86pt/formats/qemu.py).

Every expected line is written by hand from QEMU 7.2's monitor formats as docs/paging.md §13.3
states them (and the fixtures/dump goldens captured from QEMU 7.2 show them):
  info tlb  "%016x: %016x XGPDACTUW" per present leaf, the frame through QEMU's frame mask;
  info mem  "%016x-%016x %016x urw" per run of equal U/RW, each number through addr_canonical()
            (bit 47 with 4-level, bit 56 with LA57); 4-level runs continue across the hole
            because QEMU walks raw table indices;
  LA57      QEMU 7.2's mem_info_la57() inverted present tests below the PML4 (§13.3.2): present
            PDPTEs/PDEs are holes, non-present ones are followed (PS: a leaf whose prot is its
            U/RW/P bits ANDed with the PML5E's, PML4E's ... bits), PTEs are tested the right way;
            the last range is flushed at 2^57.
The work budget of the LA57 walk is counted by hand from its contract (512 per table read,
RECORD_COST per prot change held or copied)."""

from __future__ import annotations

import io

import pytest

from x86pt.build import Builder
from x86pt.errors import BudgetError
from x86pt.formats import qemu
from x86pt.formats.qemu import (
    _record_blocks,
    mem_bytes,
    mem_bytes_la57,
    scan_kwargs,
    tlb_bytes,
    write_mem,
    write_tlb,
)
from x86pt.memory.sparse import SparseMemory
from x86pt.scan import EFF_P, EFF_RW, RECORD_COST, Chunk, Scanner

from records import chunk

G1, M2, K4 = 1 << 30, 1 << 21, 1 << 12
PS = 0x80


def text(blocks) -> str:
    return b"".join(bytes(b) for b in blocks).decode()


def chunks_of(b: Builder, st=None):
    return list(Scanner(st or b.state(), b.memory, **scan_kwargs()).chunks())


# -- info tlb ------------------------------------------------------------------------------------
PRW = EFF_P | EFF_RW


def test_tlb_count1_block_then_a_run_with_a_carry_into_bit_32():
    """Block 1: one 4K entry (P RW US A = 0x27: letters A U W). Block 2: a run of two 4K entries
    (P RW A) whose frames are 0xfffff000 and 0x100000000: the second PA carries into bit 32."""
    a = chunk((0x1000, 1, 1, 0x5000 | 0x27, 0x5000, PRW))
    b = chunk((0x40000000, 2, 1, 0xFFFFF000 | 0x23, 0xFFFFF000, PRW))
    assert text(tlb_bytes([a, b])) == (
        "0000000000001000: 0000000000005000 ----A--UW\n"
        "0000000040000000: 00000000fffff000 ----A---W\n"
        "0000000040001000: 0000000100000000 ----A---W\n"
    )


def test_tlb_every_record_a_run_of_two():
    c = chunk(
        (0x2000, 2, 1, 0x7000 | 0x25, 0x7000, EFF_P),  # P US A
        (0x600000, 2, 2, 0x400000 | 0xA3, 0x400000, PRW),  # 2M: P RW A PS
    )
    assert text(tlb_bytes([c])) == (
        "0000000000002000: 0000000000007000 ----A--U-\n"
        "0000000000003000: 0000000000008000 ----A--U-\n"
        "0000000000600000: 0000000000400000 --P-A---W\n"
        "0000000000800000: 0000000000600000 --P-A---W\n"
    )


def test_tlb_1g_run_crossing_4g_in_va_next_to_4k_entries():
    """4 x 1G from VA 0x8080000000 (PA 0): the VA's low 32 bits wrap at the third entry; the PA's
    do not. A 4K record without a carry shares the block."""
    c = chunk(
        (0x1000, 1, 1, 0x9000 | 0x27, 0x9000, PRW),
        (0x8080000000, 4, 3, 0xA7, 0, PRW),  # P RW US A PS
    )
    assert text(tlb_bytes([c])) == (
        "0000000000001000: 0000000000009000 ----A--UW\n"
        "0000008080000000: 0000000000000000 --P-A--UW\n"
        "00000080c0000000: 0000000040000000 --P-A--UW\n"
        "0000008100000000: 0000000080000000 --P-A--UW\n"
        "0000008140000000: 00000000c0000000 --P-A--UW\n"
    )


# -- _record_blocks: at most LINE_BLOCK entries per block, greedy, at least one record ------------
def blocks(chunks) -> list[list[int]]:
    return [[int(v) for v in ch.va] for ch in _record_blocks(chunks)]


def test_record_blocks_greedy(monkeypatch):
    monkeypatch.setattr(qemu, "LINE_BLOCK", 4)
    hole = chunk((0x1000, 3, 1, 0, 0, 0))  # no present record: nothing to emit
    # counts 2, 2 | 1, 3 | 6 (alone, larger than a block) | 2, 1, 1
    c = chunk(
        *[
            (va, n, 1, 0x27, 0, PRW)
            for va, n in ((1, 2), (2, 2), (3, 1), (4, 3), (5, 6), (6, 2), (7, 1), (8, 1))
        ]
    )
    assert blocks([hole, c]) == [[1, 2], [3, 4], [5], [6, 7, 8]]
    assert blocks([Chunk.empty(), c]) == [[1, 2], [3, 4], [5], [6, 7, 8]]  # an empty chunk: none
    d = chunk((1, 2, 1, 0x27, 0, PRW), (2, 3, 1, 0x27, 0, PRW))  # 2 | 3: 5 > 4
    assert blocks([d]) == [[1], [2]]
    e = chunk((1, 6, 1, 0x27, 0, PRW), (2, 1, 1, 0x27, 0, PRW))  # 6 alone, then 1
    assert blocks([e]) == [[1], [2]]


# -- info mem, 4-level ---------------------------------------------------------------------------
def test_mem_run_across_the_non_canonical_hole():
    """QEMU walks PML4 index 255 then 256 as adjacent: the last lower-half page and the first
    upper-half page with equal rights are one range; its end is sign-extended from bit 47."""
    b = Builder(table_base=0x100000, maxphyaddr=40)
    b.map(0x00007FFFFFFFF000, 0x5000, K4, flags="rw us a")
    b.map(0xFFFF800000000000, 0x6000, K4, flags="rw us a")
    assert text(mem_bytes(chunks_of(b), b.state())) == (
        "00007ffffffff000-ffff800000001000 0000000000002000 urw\n"
    )


def test_mem_length_of_the_whole_lower_half_is_sign_extended():
    """[0, 2^47) in 1G pages: end 2^47 and length 2^47 both have bit 47 set -> ffff800000000000."""
    b = Builder(table_base=0x100000)
    b.map(0, 0, 1 << 47, G1, flags="rw us a")
    assert text(mem_bytes(chunks_of(b), b.state())) == (
        "0000000000000000-ffff800000000000 ffff800000000000 urw\n"
    )


def test_scan_kwargs():
    assert scan_kwargs() == {"addr_mask": 0x3FFFFFFFFF000, "holes": False}


# -- write_tlb / write_mem -----------------------------------------------------------------------
def small4() -> Builder:
    b = Builder(table_base=0x100000, maxphyaddr=40)
    b.map(0x1000, 0x5000, 2 * K4, flags="rw us a")
    return b


def test_write_tlb_and_mem_4level():
    b = small4()
    st = b.state()
    out = io.BytesIO()
    write_tlb(out, chunks_of(b), st)
    assert out.getvalue() == (
        b"0000000000001000: 0000000000005000 ----A--UW\n0000000000002000: 0000000000006000 ----A--UW\n"
    )
    for memory in (None, b.memory):  # 4-level: the memory is not walked again
        out = io.BytesIO()
        write_mem(out, chunks_of(b), st, memory)
        assert out.getvalue() == b"0000000000001000-0000000000003000 0000000000002000 urw\n"


def test_write_pg_disabled():
    b = small4()
    st = b.state()
    off = st.replace(cr0=st.cr0 & ~(1 << 31))
    for w in (write_tlb, write_mem):
        out = io.BytesIO()
        w(out, chunks_of(b), off)
        assert out.getvalue() == b"PG disabled\n"
    assert text(mem_bytes_la57(b.memory, off)) == "PG disabled\n"


def test_write_mem_la57_walks_memory_with_the_quirk():
    """A 4K page mapped the ordinary way (present PML5E..PDE): the normal walk shows it; QEMU
    7.2's LA57 walk sees the present PDPTE as a hole and prints nothing."""
    b = Builder(table_base=0x100000, maxphyaddr=40, levels=5)
    b.map(0x1000, 0x5000, K4, flags="rw us a")
    st = b.state()
    out = io.BytesIO()
    write_mem(out, chunks_of(b, st), st)
    assert out.getvalue() == b"0000000000001000-0000000000002000 0000000000001000 urw\n"
    out = io.BytesIO()
    write_mem(out, chunks_of(b, st), st, b.memory)
    assert out.getvalue() == b""


# -- info mem, LA57 (QEMU 7.2's mem_info_la57) --------------------------------------------------
def np_(raw: int) -> int:
    return raw & ~1


def la57_image() -> Builder:
    b = Builder(table_base=0x100000, maxphyaddr=40, levels=5)
    base = 1 << 39  # PML5[0], PML4[1]
    b.set_entry(base + 1 * G1, 3, 1 * G1 | PS | 0x6)  # P=0 PS U W
    b.set_entry(base + 2 * G1, 3, 2 * G1 | PS | 0x2)  # P=0 PS W
    b.set_entry(base + 3 * G1, 3, 3 * G1 | PS | 0x7)  # present 1G leaf: a hole here
    pd = base + 4 * G1
    b.set_entry(pd + 0 * M2, 2, 0x200000 | PS | 0x7)  # present 2M: a hole
    b.set_entry(pd + 1 * M2, 2, 0x400000 | PS | 0x4)  # P=0 PS U
    b.set_entry(pd + 2 * M2, 2, 0x600000 | PS | 0x6)  # P=0 PS U W
    pt = pd + 3 * M2
    b.set_entry(pt + 0 * K4, 1, 0x1000 | 0x7)  # present U W
    b.set_entry(pt + 1 * K4, 1, 0x2000 | 0x3)  # present W
    b.set_entry(pt + 2 * K4, 1, 0x3000 | 0x6)  # not present
    b.set_entry(pt, 2, np_(b.get_entry(pt, 2)))  # the PDE pointing at the PT: P=0
    b.set_entry(pd, 3, np_(b.get_entry(pd, 3)))  # the PDPTE pointing at the PD: P=0
    b.set_entry(base + 511 * G1, 3, 511 * G1 | PS | 0x6)  # open until PML4[2] (not present)
    # PML4[3] not present but pointing at a PDPT with a visible leaf: never walked
    b.set_entry(3 << 39, 3, PS | 0x6)
    b.set_entry(3 << 39, 4, np_(b.get_entry(3 << 39, 4)))
    # PML4[4]: present without U: the leaf under it loses U
    b.set_entry(4 << 39, 3, PS | 0x6)
    b.set_entry(4 << 39, 4, b.get_entry(4 << 39, 4) & ~0x4)
    # PML5[1], PML4[511], PDPTE 511: open until PML5[2] (not present)
    b.set_entry((1 << 48) + (511 << 39) + 511 * G1, 3, PS | 0x6)
    # PML5[2] not present, over a visible leaf: never walked
    b.set_entry(2 << 48, 3, PS | 0x6)
    b.set_entry(2 << 48, 5, np_(b.get_entry(2 << 48, 5)))
    # PML5[256]: bit 56 of the address set
    b.set_entry(0xFF00000000000000, 3, PS | 0x6)
    # PML5[511], PML4[511], PDPTE 511: open until the final flush at 2^57
    b.set_entry(0xFFFFFFFFC0000000, 3, PS | 0x6)
    return b


def test_la57_walk_by_hand():
    b = la57_image()
    assert text(mem_bytes_la57(b.memory, b.state())) == (
        # PDPT under PML5[0]/PML4[1] (base 0x8000000000)
        "0000008040000000-0000008080000000 0000000040000000 urw\n"
        "0000008080000000-00000080c0000000 0000000040000000 -rw\n"
        # its PDPTE 4 -> PD (base + 4G): PDE 1 U, PDE 2 U W, PDE 3 -> PT: PTE 0 U W, PTE 1 W
        "0000008100200000-0000008100400000 0000000000200000 ur-\n"
        "0000008100400000-0000008100601000 0000000000201000 urw\n"
        "0000008100601000-0000008100602000 0000000000001000 -rw\n"
        "000000ffc0000000-0000010000000000 0000000040000000 urw\n"
        # PML4[4] without U
        "0000020000000000-0000020040000000 0000000040000000 -rw\n"
        "0001ffffc0000000-0002000000000000 0000000040000000 urw\n"
        # bit 56 set: sign-extended
        "ff00000000000000-ff00000040000000 0000000040000000 urw\n"
        # the flush at 2^57: bit 56 clear, printed as is
        "ffffffffc0000000-0200000000000000 0000000040000000 urw\n"
    )


def test_la57_many_lines_come_in_blocks():
    """One PT with present U/W PTEs at even indices (the rest zero) shared by 20 non-present PDEs:
    256 ranges of one page each per PDE, 5120 lines under one PML5 entry."""
    b = Builder(table_base=0x100000, maxphyaddr=40, levels=5)
    for i in range(0, 512, 2):
        b.set_entry(i * K4, 1, (i + 1) * K4 | 0x7)
    pt = b.get_entry(0, 2) & 0xFFFFFFFFFF000
    for j in range(20):
        b.set_entry(j * M2, 2, pt | 0x6)  # P=0, U W -> the shared PT
    b.set_entry(0, 3, np_(b.get_entry(0, 3)))
    want = "".join(
        f"{j * M2 + i * K4:016x}-{j * M2 + (i + 1) * K4:016x} 0000000000001000 urw\n"
        for j in range(20)
        for i in range(0, 512, 2)
    )
    got = list(mem_bytes_la57(b.memory, b.state()))
    assert text(got) == want


def budget_image() -> tuple[Builder, int]:
    """PDPTE 0: P=0 PS U W; PDPTE 1..511 zero (followed to page 0: a zero PD whose zero PDEs
    lead to a zero PT at page 0); PDPTE 2: P=0 -> PD X with PDE 0 P=0 PS U W, the rest zero."""
    b = Builder(table_base=0x100000, maxphyaddr=40, levels=5)
    b.set_entry(0, 3, G1 | PS | 0x6)
    b.set_entry(2 * G1, 2, 0x400000 | PS | 0x6)
    b.set_entry(2 * G1, 3, np_(b.get_entry(2 * G1, 3)))
    R = RECORD_COST
    cost = (
        6 * 512  # tables read: PML5, PML4, the PDPT, PD X, the zero PD and PT at page 0 (once: memo)
        + 512 * R  # the zero PD: 512 PDEs each copy the zero PT's one change
        + R  # PDPTE 1 copies the zero PD's one change
        + 511 * R  # PD X: PDEs 1..511 copy the zero PT's one change
        + 2 * R  # PDPTE 2 copies PD X's two changes
        + 509 * R  # PDPTEs 3..511 copy the zero PD's one change
        + 4 * R  # PML4E 0 copies the PDPT's four changes: U W at 0, 0 at 1G, U W at 2G, 0 at 2G+2M
    )
    return b, cost


def test_la57_budget_is_counted_exactly():
    b, cost = budget_image()
    st = b.state()
    assert text(mem_bytes_la57(b.memory, st, cost)) == (
        "0000000000000000-0000000040000000 0000000040000000 urw\n"
        "0000000080000000-0000000080200000 0000000000200000 urw\n"
    )
    with pytest.raises(BudgetError) as e:
        text(mem_bytes_la57(b.memory, st, cost - 1))
    assert str(e.value) == (
        f"work limit reached: the tables expand to more than {cost - 1} page-table entries "
        "(shared or looping subtrees?); raise it with --max-entries N if the image really is "
        "this large"
    )


def test_la57_table_past_the_end_of_ram_reads_as_zeros():
    """PDPTE 0 (P=0) points at 32 GiB, past a 2 MiB memory: that PD reads as 512 zero PDEs, each
    followed to the zero PT at page 0 (as the zero PDPTEs 1..511 are, through the zero PD there)."""
    b = Builder(memory=SparseMemory(size=0x200000), table_base=0x100000, maxphyaddr=40, levels=5)
    b.set_entry(0, 3, (1 << 35) | 0x6)
    R = RECORD_COST
    cost = (
        6 * 512  # PML5, PML4, PDPT, the PD past RAM (charged, then zeros), PT and PD at page 0
        + 512 * R  # the PD past RAM: 512 zero PDEs copy the zero PT's one change
        + R  # PDPTE 0 copies it
        + 512 * R  # the zero PD at page 0 (PDPTE 1)
        + R  # PDPTE 1
        + 510 * R  # PDPTEs 2..511
        + R  # PML4E 0
    )
    assert text(mem_bytes_la57(b.memory, b.state(), cost)) == ""
    with pytest.raises(BudgetError):
        text(mem_bytes_la57(b.memory, b.state(), cost - 1))
