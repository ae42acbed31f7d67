"""`x86pt dump --format ptdump`: expected text is either lines a real Linux 6.1 kernel printed
(docs/oracles.md §7.3, the debugfs ptdump of a Debian guest) or lines derived by hand from the
kernel's format rules (docs/paging.md §13.1: note_page()/printk_prot() in dump_pagetables.c, the
generic walk in mm/ptdump.c and mm/pagewalk.c). Never from x86pt's own output."""

from __future__ import annotations

import io

from x86pt.build import Builder
from x86pt.formats.dump import dump_to
from x86pt.formats.wx import wx_ranges
from x86pt.formats.ptdump import size_text, wx_report
from x86pt.image import Image

K, M, G = 1 << 10, 1 << 20, 1 << 30
# Linux's protections (arch/x86/include/asm/pgtable_types.h): __PAGE_KERNEL has A|D, _RO not D.
KERNEL = "p rw a d g nx"
KERNEL_RO = "p a g nx"
KERNEL_ROX = "p a g"


def _dump(b: Builder, markers: str = "none", **kw) -> str:
    out = io.BytesIO()
    dump_to(out, Image(b.memory, b.state(), "<test>"), "ptdump", markers=markers, **kw)
    return out.getvalue().decode()


def test_size_units():
    # "%9lu%c ": divide by 1024 while divisible, units BKMGTPE
    assert size_text(4096) == "        4K "
    assert size_text(14 << 20) == "       14M "
    assert size_text(1428 << 10) == "     1428K "
    assert size_text(1 << 30) == "        1G "
    assert size_text(3) == "        3B "


def test_one_user_page_hand_derived():
    """PML4[0] -> PDPT[0] -> PD[2] -> PT[0]: one 4K user RW NX page at 0x400000. The kernel walks
    the lower half, then from the guard hole's end (0xffff880000000000); holes are noted at the
    level where they occur; the final flush is at address 0."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw us nx")
    want = (
        "0x0000000000000000-0x0000000000400000           4M                               pmd\n"
        "0x0000000000400000-0x0000000000401000           4K USR RW                     NX pte\n"
        "0x0000000000401000-0x0000000000600000        2044K                               pte\n"
        "0x0000000000600000-0x0000000040000000        1018M                               pmd\n"
        "0x0000000040000000-0x0000008000000000         511G                               pud\n"
        "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
    )
    assert _dump(b) == want


def test_low_kernel_mapping_as_a_real_kernel_printed_it():
    """The first six lines under 'Low Kernel Mapping' of a Debian 6.1 guest (docs/oracles.md §7.3),
    rebuilt: PA 0 unmapped, then 4K pages (RW, one RO, two ROX, RW), then 2M pages."""
    b = Builder(levels=4, table_base=0x7000000)
    po = 0xFFFF888000000000
    b.map(po + 0x1000, 0x1000, 0x97000, 4096, KERNEL)
    b.map(po + 0x98000, 0x98000, 0x1000, 4096, KERNEL_RO)
    b.map(po + 0x99000, 0x99000, 0x2000, 4096, KERNEL_ROX)
    b.map(po + 0x9B000, 0x9B000, 0x165000, 4096, KERNEL)
    b.map(po + 0x200000, 0x200000, 0xE00000, 2 * M, KERNEL)
    b.map(po + 0x1000000, 0x1000000, 0xE00000, 2 * M, KERNEL_RO)
    text = _dump(b, "linux")
    real = (
        "---[ Low Kernel Mapping ]---\n"
        "0xffff888000001000-0xffff888000098000         604K     RW                 GLB NX pte\n"
        "0xffff888000098000-0xffff888000099000           4K     ro                 GLB NX pte\n"
        "0xffff888000099000-0xffff88800009b000           8K     ro                 GLB x  pte\n"
        "0xffff88800009b000-0xffff888000200000        1428K     RW                 GLB NX pte\n"
        "0xffff888000200000-0xffff888001000000          14M     RW         PSE     GLB NX pmd\n"
        "0xffff888001000000-0xffff888001e00000          14M     ro         PSE     GLB NX pmd\n"
    )
    assert real in text
    # The marker lags one note_page() call (one marker per break): PA 0's hole line is printed
    # under "LDT remap" (docs/oracles.md §7.3: "the first direct-map page is printed under LDT remap").
    assert (
        "---[ LDT remap ]---\n"
        "0xffff888000000000-0xffff888000001000           4K                               pte\n"
        "---[ Low Kernel Mapping ]---\n"
    ) in text
    assert text.startswith(
        "---[ User Space ]---\n"
        "0x0000000000000000-0xffff880000000000    16777096T                               pgd\n"
        "---[ Kernel Space ]---\n"
        "0xffff880000000000-0xffff888000000000         512G                               pgd\n"
    )


def test_flags_break_lines_even_when_printed_the_same():
    """A/D are part of PTE_FLAGS_MASK: two RW pages differing only in D are two lines; PWT,
    PCD, PAT (bit 7 of a PTE) and GLB print in their columns."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw a d")
    b.map(0x401000, 0x5001000, 4096, 4096, "p rw a")
    b.map(0x402000, 0x5002000, 4096, 4096, "p pwt pcd pat g")
    text = _dump(b)
    assert (
        "0x0000000000400000-0x0000000000401000           4K     RW                     x  pte\n"
        "0x0000000000401000-0x0000000000402000           4K     RW                     x  pte\n"
        "0x0000000000402000-0x0000000000403000           4K     ro PWT PCD     PAT GLB x  pte\n"
    ) in text


def test_effective_rights_break_lines_but_own_flags_are_printed():
    """Two PTs with identical RW user PTEs; the second PT sits under a read-only PDE. Own flags
    print the same (USR RW), the effective RW differs, so the kernel starts a new line."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x3FF000, 0x5000000, 4096, 4096, "p rw us nx")
    b.map(0x400000, 0x5001000, 4096, 4096, "p rw us nx")
    pde = b.entry_address(0x400000, 2)
    b.memory.write_u64(pde, b.memory.read_u64(pde) & ~2)
    text = _dump(b)
    assert (
        "0x00000000003ff000-0x0000000000400000           4K USR RW                     NX pte\n"
        "0x0000000000400000-0x0000000000401000           4K USR RW                     NX pte\n"
    ) in text


def test_espfix_area_prints_16_lines_then_the_skip_count():
    """20 PTEs alternating RW/ro at ESPFIX_BASE_ADDR, one page in each earlier region (markers
    advance one per break, so empty regions would lag), and a page in the high kernel map so the
    walk reaches the EFI marker. ESPfix lines: PTE0..19, the PT's hole, the PD's hole (pmd), the
    PUD holes up to EFI_VA_END = 23; printed 16, '... 7 entries skipped ... '."""
    b = Builder(levels=4, table_base=0x100000)
    esp = 0xFFFFFF0000000000
    for n, va in enumerate((0xFFFF888000000000, 0xFFFFC90000000000, 0xFFFFEA0000000000, 0xFFFFFE0000000000)):
        b.map(va, 0x4000000 + n * 4096, 4096, 4096, KERNEL)
    for i in range(20):
        b.map(esp + i * 4096, 0x5000000 + i * 4096, 4096, 4096, KERNEL if i % 2 == 0 else KERNEL_RO)
    b.map(0xFFFFFFFF81000000, 0x1000000, 2 * M, 2 * M, KERNEL_ROX)
    text = _dump(b, "linux")
    rw = "           4K     RW                 GLB NX pte\n"
    ro = "           4K     ro                 GLB NX pte\n"
    lines = "".join(
        f"0x{esp + i * 4096:016x}-0x{esp + (i + 1) * 4096:016x}{rw if i % 2 == 0 else ro}" for i in range(16)
    )
    want = (
        "---[ ESPfix Area ]---\n" + lines + "... 7 entries skipped ... \n"
        "---[ EFI Runtime Services ]---\n"
        "0xffffffef00000000-0xffffffff80000000          66G                               pud\n"
        "---[ High Kernel Mapping ]---\n"
        "0xffffffff80000000-0xffffffff81000000          16M                               pmd\n"
        "0xffffffff81000000-0xffffffff81200000           2M     ro         PSE     GLB x  pmd\n"
    )
    assert want in text
    # the region before: CPU entry Area's trailing PGD hole ends at ESPFIX_BASE_ADDR
    assert (
        "0xfffffe8000000000-0xffffff0000000000         512G                               pgd\n"
        "---[ ESPfix Area ]---\n"
    ) in text


def test_empty_regions_lag_one_marker_per_break():
    """Nothing mapped between Kernel Space and ESPfix. The generic walker calls note_page() for
    every PGD hole, and each call whose address is at or above marker[1] ends the line and
    advances exactly one marker. Hand derivation (4-level markers: LDT remap -240 << 39 =
    0xffff880000000000, PAGE_OFFSET 0xffff888000000000, VMALLOC_START 0xffffc90000000000 =
    PGD 402, VMEMMAP_START 0xffffea0000000000 = PGD 468, CPU_ENTRY_AREA 0xfffffe0000000000 =
    PGD 508, ESPfix 0xffffff0000000000 = PGD 510): PGD 272 starts Kernel Space, 273 LDT remap,
    274 Low Kernel Mapping, 402 vmalloc, 468 Vmemmap, 508 CPU entry Area, and the first PTE at
    PGD 510 ESPfix. The 6.1 KASLR fixture shows the same one-hole lines (Kernel Space
    0xffff880000000000-0xffff888000000000 512G pgd, then LDT remap)."""
    b = Builder(levels=4, table_base=0x100000)
    esp = 0xFFFFFF0000000000
    for i in range(3):
        b.map(esp + i * 4096, 0x5000000 + i * 4096, 4096, 4096, KERNEL if i % 2 == 0 else KERNEL_RO)
    text = _dump(b, "linux")
    hole = " " * 31
    assert text == (
        "---[ User Space ]---\n"
        f"0x0000000000000000-0xffff880000000000    16777096T{hole}pgd\n"
        "---[ Kernel Space ]---\n"
        f"0xffff880000000000-0xffff888000000000         512G{hole}pgd\n"
        "---[ LDT remap ]---\n"
        f"0xffff888000000000-0xffff890000000000         512G{hole}pgd\n"
        "---[ Low Kernel Mapping ]---\n"
        f"0xffff890000000000-0xffffc90000000000          64T{hole}pgd\n"
        "---[ vmalloc() Area ]---\n"
        f"0xffffc90000000000-0xffffea0000000000          33T{hole}pgd\n"
        "---[ Vmemmap ]---\n"
        f"0xffffea0000000000-0xfffffe0000000000          20T{hole}pgd\n"
        "---[ CPU entry Area ]---\n"
        f"0xfffffe0000000000-0xffffff0000000000           1T{hole}pgd\n"
        "---[ ESPfix Area ]---\n"
        "0xffffff0000000000-0xffffff0000001000           4K     RW                 GLB NX pte\n"
        "0xffffff0000001000-0xffffff0000002000           4K     ro                 GLB NX pte\n"
        "0xffffff0000002000-0xffffff0000003000           4K     RW                 GLB NX pte\n"
        f"0xffffff0000003000-0xffffff0000200000        2036K{hole}pte\n"
        f"0xffffff0000200000-0xffffff0040000000        1022M{hole}pmd\n"
        f"0xffffff0040000000-0xffffff8000000000         511G{hole}pud\n"
        f"0xffffff8000000000-0x0000000000000000         512G{hole}pgd\n"
    )


def test_five_level_names_and_pat_column_of_large_pages():
    """5-level: PML5 = pgd, PML4 = p4d. A 2M page with PAT (bit 12) shows no PAT: bit 12 lies in
    PTE_PFN_MASK, outside the flags note_page() keeps."""
    b = Builder(levels=5, table_base=0x100000)
    b.map(0x200000, 0x200000, 2 * M, 2 * M, "p rw us pat")
    text = _dump(b)
    assert text.startswith(
        "0x0000000000000000-0x0000000000200000           2M                               pmd\n"
        "0x0000000000200000-0x0000000000400000           2M USR RW         PSE         x  pmd\n"
        "0x0000000000400000-0x0000000040000000        1020M                               pmd\n"
        "0x0000000040000000-0x0000008000000000         511G                               pud\n"
        "0x0000008000000000-0x0001000000000000      261632G                               p4d\n"
        "0x0001000000000000-0x0000000000000000    16776960T                               pgd\n"
    )


def test_wx_check_counts_pages_like_note_wx():
    """Effective RW and not NX: a 2M RWX page and three 4K RWX pages (one range) = 515 pages;
    an RWX PTE under a read-only PDE is not W+X."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0xFFFFFFFF81000000, 0x1000000, 2 * M, 2 * M, "p rw a d g")
    b.map(0xFFFFFFFFA0000000, 0x3000000, 3 * 4096, 4096, "p rw a d g")
    b.map(0xFFFFFFFFA0200000, 0x3100000, 4096, 4096, "p rw a d g")
    pde = b.entry_address(0xFFFFFFFFA0200000, 2)
    b.memory.write_u64(pde, b.memory.read_u64(pde) & ~2)
    ranges, _ = wx_ranges(Image(b.memory, b.state(), "<t>"))
    lines, pages = wx_report(ranges)
    assert pages == 515
    assert lines == [
        "x86/mm: Found insecure W+X mapping at address 0xffffffff81000000\n",
        "x86/mm: Found insecure W+X mapping at address 0xffffffffa0000000\n",
        "x86/mm: Checked W+X mappings: FAILED, 515 W+X pages found.\n",
    ]


def test_wx_passed():
    b = Builder(levels=4, table_base=0x100000)
    b.map(0xFFFFFFFF81000000, 0x1000000, 2 * M, 2 * M, KERNEL_ROX)
    ranges, _ = wx_ranges(Image(b.memory, b.state(), "<t>"))
    assert wx_report(ranges) == (["x86/mm: Checked W+X mappings: passed, no W+X pages found.\n"], 0)


def test_range_dump_ends_where_the_range_ends():
    """`dump --range A-B`: the last line is flushed at B, not at address 0 (the wrap of a whole
    walk): the hole after the page is the pmd-level hole [0x600000, 0x800000), 2M."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x500000, 0x1234000, 4096, 4096, "p rw us")
    want = (
        "0x0000000000400000-0x0000000000500000           1M                               pte\n"
        "0x0000000000500000-0x0000000000501000           4K USR RW                     x  pte\n"
        "0x0000000000501000-0x0000000000600000        1020K                               pte\n"
        "0x0000000000600000-0x0000000000800000           2M                               pmd\n"
    )
    assert _dump(b, va_range=(0x400000, 0x800000)) == want
