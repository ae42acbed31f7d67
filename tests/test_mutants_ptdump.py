# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests that kill surviving mutants of x86pt/formats/ptdump.py (tools/mutate.py x86pt/formats/ptdump.py).

Expectations by hand from the kernel: Documentation/arch/x86/x86_64/mm.rst (the address map),
arch/x86/mm/dump_pagetables.c (address_markers[], printk_prot()'s column order and widths,
note_wx(), ptdump_walk_pgd_level_core()'s ranges and the W+X summary) and
arch/x86/include/asm/pgtable_types.h (_PAGE_* bits); never from the code's output."""

from __future__ import annotations

import numpy as np

from x86pt.formats.ptdump import (
    LINUX_ADDR_MASK,
    _prot_text,
    linux_depth,
    linux_markers,
    scan_kwargs,
    size_text,
    walk_ranges,
    wx_report,
)
from x86pt.state import CR4_LA57, CR4_PAE, PagingState

MASK = (1 << 64) - 1


def test_linux_markers_4_level_nokaslr_map():
    m = [(x.start, x.name, x.max_lines) for x in linux_markers(4)]
    assert m == [
        (0, "User Space", 0),
        (1 << 63, "Kernel Space", 0),
        (0xFFFF880000000000, "LDT remap", 0),
        (0xFFFF888000000000, "Low Kernel Mapping", 0),
        (0xFFFFC90000000000, "vmalloc() Area", 0),
        (0xFFFFEA0000000000, "Vmemmap", 0),
        (0xFFFFFE0000000000, "CPU entry Area", 0),
        (0xFFFFFF0000000000, "ESPfix Area", 16),
        (0xFFFFFFEF00000000, "EFI Runtime Services", 0),
        (0xFFFFFFFF80000000, "High Kernel Mapping", 0),
        (0xFFFFFFFFC0000000, "Modules", 0),
        (0xFFFFFFFFFF000000, "End Modules", 0),
        (0xFFFFFFFFFF579000, "Fixmap Area", 0),
    ]


def test_linux_markers_5_level_and_options():
    m = {x.name: x.start for x in linux_markers(5)}
    assert m["LDT remap"] == 0xFF10000000000000
    assert m["Low Kernel Mapping"] == 0xFF11000000000000
    assert m["vmalloc() Area"] == 0xFFA0000000000000
    assert m["Vmemmap"] == 0xFFD4000000000000
    m = linux_markers(
        4,
        page_offset=0xFFFF9A0000000000,
        vmalloc=0xFFFFB00000000000,
        vmemmap=0xFFFFD00000000000,
        modules=0xFFFFFFFFC1000000,
        fixmap=0xFFFFFFFFFF500000,
        ldt=False,
        espfix=False,
        efi=False,
    )
    assert [(x.start, x.name) for x in m] == [
        (0, "User Space"),
        (1 << 63, "Kernel Space"),
        (0xFFFF9A0000000000, "Low Kernel Mapping"),
        (0xFFFFB00000000000, "vmalloc() Area"),
        (0xFFFFD00000000000, "Vmemmap"),
        (0xFFFFFE0000000000, "CPU entry Area"),
        (0xFFFFFFFF80000000, "High Kernel Mapping"),
        (0xFFFFFFFFC1000000, "Modules"),
        (0xFFFFFFFFFF000000, "End Modules"),
        (0xFFFFFFFFFF500000, "Fixmap Area"),
    ]


def test_walk_ranges_skip_the_hypervisor_guard_hole():
    # lower half, then from GUARD_HOLE_END_ADDR (pgd index 256 + 16) to the top
    assert walk_ranges(PagingState()) == ((0, 1 << 47), (0xFFFF880000000000, 1 << 64))
    assert walk_ranges(PagingState(cr4=CR4_PAE | CR4_LA57)) == ((0, 1 << 56), (0xFF10000000000000, 1 << 64))


def test_linux_depth_folds_p4d_with_4_levels():
    lv = np.array([4, 3, 2, 1], np.uint8)
    assert linux_depth(lv, 4).tolist() == [0, 2, 3, 4]
    assert linux_depth(np.array([5, 4, 3, 2, 1], np.uint8), 5).tolist() == [0, 1, 2, 3, 4]
    assert linux_depth(lv, 4).dtype == np.uint8


def test_size_text_units():
    assert size_text(4096) == "        4K "
    assert size_text(4097) == "     4097B "
    assert size_text(3 << 20) == "        3M "
    assert size_text(1 << 30) == "        1G "
    assert size_text(1 << 40) == "        1T "
    assert size_text(1 << 50) == "        1P "
    assert size_text(1 << 60) == "        1E "
    assert size_text(0) == "        0E "  # 0 divides by 1024 until E, the last unit
    assert size_text(1 << 70) == "        0E "  # a u64: 2**70 is 0
    assert size_text(-4096) == f"{(1 << 54) - 4:9d}K "  # end below start: the kernel's u64 wraps


def test_prot_text_columns():
    assert _prot_text(0, 4) == " " * 30 + "pte"
    assert _prot_text(0x80, 3) == " " * 30 + "pmd"  # not present: flags are not printed
    assert _prot_text(1 | 2 | 4 | 8 | 16 | 0x80 | (1 << 63), 4) == "USR RW PWT PCD     PAT     NX pte"
    assert _prot_text(1 | 0x80 | 0x1000 | 0x100, 3) == "    ro         PSE PAT GLB x  pmd"
    assert _prot_text(1 | 0x80 | 0x1000, 2) == "    ro         PSE PAT     x  pud"
    assert (
        _prot_text(1 | 0x80 | 0x1000, 1) == "    ro         PSE         x  p4d"
    )  # PAT_LARGE only at pud/pmd
    assert _prot_text(1 | 0x1000, 4) == "    ro                     x  pte"  # bit 12 of a PTE is the PFN
    assert _prot_text(1 | 0x80, 0) == "    ro         PSE         x  pgd"


def test_wx_report():
    assert wx_report([(0x1000, 0x3000), (0xFFFFFFFFFFFFF000, 0)]) == (
        [
            "x86/mm: Found insecure W+X mapping at address 0x1000\n",
            "x86/mm: Found insecure W+X mapping at address 0xfffffffffffff000\n",
            "x86/mm: Checked W+X mappings: FAILED, 3 W+X pages found.\n",
        ],
        3,
    )
    assert wx_report([]) == (["x86/mm: Checked W+X mappings: passed, no W+X pages found.\n"], 0)


def test_scan_kwargs():
    assert LINUX_ADDR_MASK == 0x000FFFFFFFFFF000
    assert scan_kwargs() == {"addr_mask": 0x000FFFFFFFFFF000, "holes": True, "top_breaks": (256, 272)}


def test_markers_default_to_4_levels_and_pse_only_when_set():
    assert linux_markers() == linux_markers(4)
    assert _prot_text(1 | 2, 3) == "    RW                     x  pmd"
    assert _prot_text(1 | 4, 1) == "USR ro                     x  p4d"


def test_long_dumps_come_in_blocks_that_join_to_whole_lines():
    """More than 4096 lines: the text is yielded in blocks; every line keeps the format
    `0x%016lx-0x%016lx   %9lu%c <prot> <level>`."""
    import io
    import re

    from x86pt.build import Builder
    from x86pt.formats.dump import dump_to
    from x86pt.image import Image

    b = Builder(levels=4, table_base=0x10000000)
    for i in range(4200):  # alternate RW and RO: one line per page
        b.map(0x400000 + i * 4096, 0x1000000 + i * 4096, 4096, 4096, "p rw nx" if i % 2 else "p nx")
    out = io.BytesIO()
    dump_to(out, Image(b.memory, b.state(), "<test>"), "ptdump", markers="none")
    lines = out.getvalue().decode().splitlines()
    assert len(lines) > 4200
    pat = re.compile(r"^0x[0-9a-f]{16}-0x[0-9a-f]{16} {3}[ 0-9]{9,}[BKMGTPE] .*(pgd|p4d|pud|pmd|pte)$")
    assert all(pat.match(ln) for ln in lines)


def _one_page_with_pde3(raw_pde3: int) -> str:
    """tests/test_formats_ptdump.py's one-user-page image (hand-derived there), plus PD[3]
    (0x600000-0x800000) set to `raw_pde3`."""
    import io

    from x86pt.build import Builder
    from x86pt.formats.dump import dump_to
    from x86pt.image import Image

    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw us nx")
    mem, st = b.memory, b.state()
    pdpt = mem.read_u64(st.root) & 0x000FFFFFFFFFF000
    pd = mem.read_u64(pdpt) & 0x000FFFFFFFFFF000
    mem.write_u64(pd + 3 * 8, raw_pde3)
    out = io.BytesIO()
    dump_to(out, Image(mem, st, "<test>"), "ptdump", markers="none")
    return out.getvalue().decode()


HEAD = (
    "0x0000000000000000-0x0000000000400000           4M                               pmd\n"
    "0x0000000000400000-0x0000000000401000           4K USR RW                     NX pte\n"
)
TAIL = (
    "0x0000000000800000-0x0000000040000000        1016M                               pmd\n"
    "0x0000000040000000-0x0000008000000000         511G                               pud\n"
    "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
)


def test_non_present_nonzero_pmd_without_pse_is_not_noted():
    # mm/pagewalk.c: a non-present, non-zero PMD without PSE gets no note_page() call, so the
    # pte-level hole that began at 0x401000 runs on to the next call, PD[4] at 0x800000.
    assert (
        _one_page_with_pde3(0x12345000)
        == HEAD
        + ("0x0000000000401000-0x0000000000800000        4092K                               pte\n")
        + TAIL
    )
    # A and D alone (_PAGE_KNL_ERRATUM_MASK) make the entry "none": a hole noted at pmd level
    assert _one_page_with_pde3(0x60) == HEAD + (
        "0x0000000000401000-0x0000000000600000        2044K                               pte\n"
        "0x0000000000600000-0x0000000040000000        1018M                               pmd\n"
        "0x0000000040000000-0x0000008000000000         511G                               pud\n"
        "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
    )


def test_non_present_pmd_with_pse_is_noted_like_a_leaf():
    # with PSE it is noted with its value: own flags 0x80 differ from a zero hole, so its own line
    assert (
        _one_page_with_pde3(0x12345080)
        == HEAD
        + (
            "0x0000000000401000-0x0000000000600000        2044K                               pte\n"
            "0x0000000000600000-0x0000000000800000           2M                               pmd\n"
        )
        + TAIL
    )


def _one_page_with(table_level: int, index: int, raw: int) -> str:
    """The one-user-page image with entry `index` of its PML4 (4), PDPT (3) or PD (2) set to `raw`."""
    import io

    from x86pt.build import Builder
    from x86pt.formats.dump import dump_to
    from x86pt.image import Image

    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw us nx")
    mem, st = b.memory, b.state()
    table = st.root
    for _ in range(4 - table_level):
        table = mem.read_u64(table) & 0x000FFFFFFFFFF000
    mem.write_u64(table + index * 8, raw)
    out = io.BytesIO()
    dump_to(out, Image(mem, st, "<test>"), "ptdump", markers="none")
    return out.getvalue().decode()


PLAIN = HEAD + (
    "0x0000000000401000-0x0000000000600000        2044K                               pte\n"
    "0x0000000000600000-0x0000000040000000        1018M                               pmd\n"
    "0x0000000040000000-0x0000008000000000         511G                               pud\n"
    "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
)


def test_non_present_pgd_entries_are_plain_holes():
    # a non-present PGD is a hole whatever its value (with or without bit 7): unchanged text
    assert _one_page_with(4, 1, 0x12345000) == PLAIN
    assert _one_page_with(4, 1, 0x12345080) == PLAIN


def test_non_present_pud_without_pse_is_skipped_with_pse_noted():
    # PDPT[1] (0x40000000-0x80000000) gets no note without PSE: the pmd hole runs to PDPT[2]
    assert _one_page_with(3, 1, 0x12345000) == HEAD + (
        "0x0000000000401000-0x0000000000600000        2044K                               pte\n"
        "0x0000000000600000-0x0000000080000000        2042M                               pmd\n"
        "0x0000000080000000-0x0000008000000000         510G                               pud\n"
        "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
    )
    assert _one_page_with(3, 1, 0x12345080) == HEAD + (
        "0x0000000000401000-0x0000000000600000        2044K                               pte\n"
        "0x0000000000600000-0x0000000040000000        1018M                               pmd\n"
        "0x0000000040000000-0x0000000080000000           1G                               pud\n"
        "0x0000000080000000-0x0000008000000000         510G                               pud\n"
        "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
    )


def test_non_present_pte_is_noted_with_its_value():
    # every PTE is noted with its value: own flags RW (bit 1) without P make a line of their own
    from x86pt.build import Builder  # noqa: F401  (same image as above, PT[1] set)
    import io

    from x86pt.formats.dump import dump_to
    from x86pt.image import Image

    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw us nx")
    mem, st = b.memory, b.state()
    t = st.root
    for _ in range(2):  # PML4[0] -> PDPT, PDPT[0] -> PD
        t = mem.read_u64(t) & 0x000FFFFFFFFFF000
    t = mem.read_u64(t + 2 * 8) & 0x000FFFFFFFFFF000  # PD[2] -> the PT of 0x400000
    mem.write_u64(t + 8, 0x12345002)
    out = io.BytesIO()
    dump_to(out, Image(mem, st, "<test>"), "ptdump", markers="none")
    assert out.getvalue().decode() == HEAD + (
        "0x0000000000401000-0x0000000000402000           4K                               pte\n"
        "0x0000000000402000-0x0000000000600000        2040K                               pte\n"
        "0x0000000000600000-0x0000000040000000        1018M                               pmd\n"
        "0x0000000040000000-0x0000008000000000         511G                               pud\n"
        "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
    )


def test_large_nx_page_shows_no_pat():
    import io

    from x86pt.build import Builder
    from x86pt.formats.dump import dump_to
    from x86pt.image import Image

    b = Builder(levels=4, table_base=0x100000)
    b.map(0x200000, 0x400000, 1 << 21, 1 << 21, "p rw nx")
    out = io.BytesIO()
    dump_to(out, Image(b.memory, b.state(), "<test>"), "ptdump", markers="none")
    assert (
        "0x0000000000200000-0x0000000000400000           2M     RW         PSE         NX pmd\n"
        in out.getvalue().decode()
    )


# -- marker logic, the skipped-entries line, the final flush, the effective-rights key -----------
# note_page() in arch/x86/mm/dump_pagetables.c: a line is printed while the marker's max_lines
# is 0 or not yet reached, every finished line counts; when the marker advances and more lines
# than max_lines were finished, "... %lu entr%s skipped ... \n" (y for one, ies otherwise).
def _line(start: int, end: int, size: str, prot: str) -> str:
    """One ptdump line by the kernel's format "0x%016lx-0x%016lx   %9lu%c " + printk_prot()."""
    num, unit = size[:-1], size[-1]
    return f"0x{start:016x}-0x{end:016x}   {int(num):9d}{unit} {prot}\n"


RW_PTE = "    RW                     x  pte"
RO_PTE = "    ro                     x  pte"


def _chunk(*rows):
    """rows: (va, count, level, raw, eff) -> one Chunk (pa = the raw's frame)."""
    from x86pt.scan import U64, Chunk

    va, cnt, lvl, raw, eff = zip(*rows)
    return Chunk(
        np.array(va, U64),
        np.array(cnt, U64),
        np.array(lvl, np.uint8),
        np.array(raw, U64),
        np.array([r & LINUX_ADDR_MASK for r in raw], U64),
        np.array(eff, np.uint8),
        np.zeros(len(va), U64),
    )


def test_marker_max_lines_and_the_skipped_entries_line():
    from x86pt.formats.ptdump import Marker, ptdump_lines
    from x86pt.scan import EFF_P, EFF_RW

    P, RW = EFF_P, EFF_P | EFF_RW
    runs = [  # (start, end, rights): A 1 line, B 2 lines, C 3 lines, D 4 lines, E 1 line
        (0x00000, 0x10000, RW),
        (0x10000, 0x18000, P),
        (0x18000, 0x20000, RW),
        (0x20000, 0x24000, P),
        (0x24000, 0x28000, RW),
        (0x28000, 0x30000, P),
        (0x30000, 0x34000, RW),
        (0x34000, 0x38000, P),
        (0x38000, 0x3C000, RW),
        (0x3C000, 0x40000, P),
        (0x40000, 0x41000, RW),
    ]
    ch = _chunk(*[(s, (e - s) >> 12, 1, s | (3 if r == RW else 1), r) for s, e, r in runs])
    markers = [
        Marker(0, "A"),
        Marker(0x10000, "B", 2),
        Marker(0x20000, "C", 2),
        Marker(0x30000, "D", 2),
        Marker(0x40000, "E"),
    ]
    text = "".join(ptdump_lines([ch], PagingState(), markers))
    assert text == (
        "---[ A ]---\n"
        + _line(0x00000, 0x10000, "64K", RW_PTE)
        + "---[ B ]---\n"  # exactly max_lines lines: nothing skipped
        + _line(0x10000, 0x18000, "32K", RO_PTE)
        + _line(0x18000, 0x20000, "32K", RW_PTE)
        + "---[ C ]---\n"
        + _line(0x20000, 0x24000, "16K", RO_PTE)
        + _line(0x24000, 0x28000, "16K", RW_PTE)
        + "... 1 entry skipped ... \n"
        + "---[ D ]---\n"
        + _line(0x30000, 0x34000, "16K", RW_PTE)
        + _line(0x34000, 0x38000, "16K", RO_PTE)
        + "... 2 entries skipped ... \n"
        + "---[ E ]---\n"
        + _line(0x40000, 0x41000, "4K", RW_PTE)
    )


def test_marker_inside_the_run_that_ends_at_the_top():
    """A run of two 2M pages ending at 2^64 (its end wraps to 0) with a marker between them:
    the marker still breaks it; the flush is at address 0."""
    from x86pt.formats.ptdump import Marker, ptdump_lines
    from x86pt.scan import EFF_P, EFF_RW

    ch = _chunk((0xFFFFFFFFFFC00000, 2, 2, 0xFFC00000 | 0x83, EFF_P | EFF_RW))
    markers = [Marker(0, "A"), Marker(0xFFFFFFFFFFE00000, "B")]
    prot = "    RW         PSE         x  pmd"
    assert "".join(ptdump_lines([ch], PagingState(), markers)) == (
        "---[ A ]---\n"
        + _line(0xFFFFFFFFFFC00000, 0xFFFFFFFFFFE00000, "2M", prot)
        + "---[ B ]---\n"
        + _line(0xFFFFFFFFFFE00000, 0, "2M", prot)
    )


def test_final_flush_after_a_p4d_level_hole():
    """5-level: the last note is a p4d hole (depth 1); the flush still prints it."""
    from x86pt.formats.ptdump import ptdump_lines

    st = PagingState(cr4=CR4_PAE | CR4_LA57)
    ch = _chunk((0xFFFF000000000000, 1, 4, 0, 0))
    assert "".join(ptdump_lines([ch], st, None)) == _line(
        0xFFFF000000000000, 0xFFFF008000000000, "512G", " " * 30 + "p4d"
    )


def _dump(b) -> str:
    import io

    from x86pt.formats.dump import dump_to
    from x86pt.image import Image

    out = io.BytesIO()
    dump_to(out, Image(b.memory, b.state(), "<test>"), "ptdump", markers="none")
    return out.getvalue().decode()


def test_effective_rights_of_an_entry_whose_value_is_1():
    """PTEs 0x1 and 0x5001 (P only; frames not adjacent, so two scan records) under an NX PDE:
    equal own flags and equal effective rights (NX), so one line; an entry value of 1 is still
    a noted, non-zero value."""
    from x86pt.build import Builder

    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0, 0x1000, 4096, "p")
    b.map(0x401000, 0x5000, 0x1000, 4096, "p")
    b.set_entry(0x400000, 2, b.get_entry(0x400000, 2) | (1 << 63))
    assert _dump(b) == (
        _line(0, 0x400000, "4M", " " * 30 + "pmd")
        + _line(0x400000, 0x402000, "8K", RO_PTE)
        + _line(0x402000, 0x600000, "2040K", " " * 30 + "pte")
        + _line(0x600000, 0x40000000, "1018M", " " * 30 + "pmd")
        + "".join(TAIL.splitlines(keepends=True)[1:])  # the pud and pgd holes
    )


def test_effective_user_bit_breaks_a_line():
    """Two PTs of P|RW|US PTEs; the second PT's PDE lacks US: equal own flags, different
    effective U -> two lines."""
    from x86pt.build import Builder

    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x1000000, 0x400000, 4096, "p rw us")
    b.set_entry(0x600000, 2, b.get_entry(0x600000, 2) & ~4)
    usr = "USR RW                     x  pte"
    assert _dump(b) == (
        _line(0, 0x400000, "4M", " " * 30 + "pmd")
        + _line(0x400000, 0x600000, "2M", usr)
        + _line(0x600000, 0x800000, "2M", usr)
        + TAIL
    )
