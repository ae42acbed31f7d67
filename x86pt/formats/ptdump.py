"""Linux x86 ptdump text (arch/x86/mm/dump_pagetables.c note_page()/printk_prot() on top of the
generic mm/ptdump.c walk; docs/paging.md §13.1), reproduced from the format rules:

* the kernel walks [0, half of the PGD) and [GUARD_HOLE_END_ADDR, ~0UL), calling note_page() for
  every entry start (leaves, holes at the level they occur, every PTE) and once more at address 0
  with level -1 to flush, which is why the last line ends at 0x0000000000000000;
* a line ends when the entry's own flags (value & PTE_FLAGS_MASK: bits 11:0 and 63:52, so A/D
  and software bits break lines too), its effective flags (RW/USR ANDed, NX ORed — zero for an
  all-zero entry), its level, or the address marker change; one marker advances per break;
* the printed flags are the *first* entry's own bits; PSE is shown above pte level, PAT only
  for a PTE's bit 7 (bit 12 of a large leaf lies inside PTE_PFN_MASK, so it never shows);
* the size is end-start divided by 1024 while divisible, with a unit from "BKMGTPE".
Entries the generic walker treats specially (code-read of mm/pagewalk.c, novma walk): a
non-present, non-zero PMD/PUD without PSE is skipped (no note_page call), with PSE it is noted
like a leaf; a non-present PGD/P4D is treated here as a hole (the kernel would follow it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from x86pt.coalesce import coalesce
from x86pt.fields import (
    ADDR_MASK_52,
    BIT_A,
    BIT_D,
    BIT_G,
    BIT_P,
    BIT_PAT_4K,
    BIT_PAT_LARGE,
    BIT_PCD,
    BIT_PS,
    BIT_PWT,
    BIT_RW,
    BIT_US,
    BIT_XD,
)
from x86pt.scan import EFF_NX, EFF_P, EFF_RW, EFF_US, SHIFT, U64, Chunk
from x86pt.state import PagingState

PTE_FLAGS_MASK = ((1 << 64) - 1) & ~ADDR_MASK_52
LINUX_ADDR_MASK = ADDR_MASK_52  # PTE_PFN_MASK without SME: bits 51:12
LEVEL_NAMES = ("pgd", "p4d", "pud", "pmd", "pte")
UNITS = "BKMGTPE"
_NONE_IGNORED = BIT_A | BIT_D  # _PAGE_KNL_ERRATUM_MASK: A|D


@dataclass(frozen=True)
class Marker:
    start: int
    name: str
    max_lines: int = 0


def linux_markers(
    levels: int = 4,
    *,
    page_offset: int | None = None,
    vmalloc: int | None = None,
    vmemmap: int | None = None,
    modules: int = 0xFFFFFFFFC0000000,
    fixmap: int = 0xFFFFFFFFFF579000,
    ldt: bool = True,
    espfix: bool = True,
    efi: bool = True,
) -> list[Marker]:
    """The x86_64 address_markers[] in enum order (not sorted: with 5-level paging LDT remap
    lies above PAGE_OFFSET, and the kernel prints what that order gives). Defaults are a
    nokaslr layout (Documentation/arch/x86/x86_64/mm.rst); MODULES_VADDR is
    __START_KERNEL_map + 1 GiB (CONFIG_RANDOMIZE_BASE) and FIXADDR_START depends on the
    config, so both are parameters."""
    five = levels == 5
    m = [Marker(0, "User Space"), Marker(1 << 63, "Kernel Space")]
    if ldt:
        # LDT_BASE_ADDR = LDT_PGD_ENTRY << PGDIR_SHIFT with LDT_PGD_ENTRY = -240 for 4 and 5
        # levels alike (mm.rst: ffff880000000000 / ff10000000000000); the 6.1 5-level fixture
        # prints "LDT remap" at the first note from ff11000000000000 on, which only this fits
        m.append(Marker(((-240 << (48 if five else 39)) & ((1 << 64) - 1)), "LDT remap"))
    m += [
        Marker(
            page_offset if page_offset is not None else (0xFF11000000000000 if five else 0xFFFF888000000000),
            "Low Kernel Mapping",
        ),
        Marker(
            vmalloc if vmalloc is not None else (0xFFA0000000000000 if five else 0xFFFFC90000000000),
            "vmalloc() Area",
        ),
        Marker(
            vmemmap if vmemmap is not None else (0xFFD4000000000000 if five else 0xFFFFEA0000000000),
            "Vmemmap",
        ),
        Marker(0xFFFFFE0000000000, "CPU entry Area"),
    ]
    if espfix:
        m.append(Marker(0xFFFFFF0000000000, "ESPfix Area", 16))
    if efi:
        m.append(Marker(0xFFFFFFEF00000000, "EFI Runtime Services"))
    m += [
        Marker(0xFFFFFFFF80000000, "High Kernel Mapping"),
        Marker(modules, "Modules"),
        Marker(0xFFFFFFFFFF000000, "End Modules"),
        Marker(fixmap, "Fixmap Area"),
    ]
    return m


def walk_ranges(state: PagingState) -> tuple[tuple[int, int], ...]:
    """ptdump_walk_pgd_level_core()'s ranges: the lower half, then from the end of the
    hypervisor guard hole (16 PGD entries from -256) to the top."""
    pgdir_shift = 48 if state.la57 else 39
    half = 1 << (state.va_bits - 1)
    # below 2^64 by construction: no mask needed
    guard_end = (1 << 64) - (256 << pgdir_shift) + (16 << pgdir_shift)
    return ((0, half), (guard_end, 1 << 64))


def linux_depth(level: np.ndarray, levels: int) -> np.ndarray:
    """SDM level -> the generic walker's depth (0 pgd .. 4 pte), after real_depth() folding."""
    d = np.uint8(5) - level.astype(np.uint8)
    if levels == 4:
        d = np.where(level == 4, np.uint8(0), d)
    return d.astype(np.uint8)


def _calls(chunks: Iterable[Chunk], state: PagingState) -> Iterator[Chunk]:
    """Keep the records that are note_page() calls inside the walked ranges."""
    (_, hi0), (lo1, _) = walk_ranges(state)
    for ch in chunks:
        va = ch.va
        keep = (va < U64(hi0)) | (va >= U64(lo1))
        present = (ch.eff & np.uint8(EFF_P)) != 0
        nonzero = (ch.raw & ~U64(_NONE_IGNORED)) != 0
        upper_np = ~present & nonzero & (ch.level >= 2) & (ch.level <= 3)
        keep &= ~(upper_np & ((ch.raw & U64(BIT_PS)) == 0))
        if not keep.all():
            ch = ch.take(keep)
        yield ch


def _key(ch: Chunk, levels: int) -> np.ndarray:
    """(own flags, effective flags, depth) packed in a uint64 key... via a 3-column view:
    own flags use bits 11:0 and 63:52; bits 51:12 are free for eff (3 bits) and depth (3 bits)."""
    present = (ch.eff & np.uint8(EFF_P)) != 0
    pte = ch.level == 1
    # holes at pmd level and above note val=0 unless their value is a leaf (PSE) or a PTE
    noted_val = np.where(present | pte | ((ch.raw & U64(BIT_PS)) != 0) & (ch.level <= 3), ch.raw, U64(0))
    own = noted_val & U64(PTE_FLAGS_MASK)
    eff = np.where(noted_val != 0, ch.eff & np.uint8(EFF_RW | EFF_US | EFF_NX), 0).astype(U64)
    depth = linux_depth(ch.level, levels).astype(U64)
    key: np.ndarray = own | (eff << U64(12)) | (depth << U64(16))
    return key


def _prot_text(own: int, depth: int) -> str:
    if not own & BIT_P:
        return " " * 30 + LEVEL_NAMES[depth]
    return (
        ("USR " if own & BIT_US else "    ")
        + ("RW " if own & BIT_RW else "ro ")
        + ("PWT " if own & BIT_PWT else "    ")
        + ("PCD " if own & BIT_PCD else "    ")
        + ("PSE " if depth <= 3 and own & BIT_PS else "    ")
        + ("PAT " if depth == 4 and own & BIT_PAT_4K or depth in (2, 3) and own & BIT_PAT_LARGE else "    ")
        + ("GLB " if own & BIT_G else "    ")
        + ("NX " if own & BIT_XD else "x  ")
        + LEVEL_NAMES[depth]
    )


def size_text(delta: int) -> str:
    delta &= (1 << 64) - 1
    u = 0
    while not delta & 1023 and u < len(UNITS) - 1:
        delta >>= 10
        u += 1
    return f"{delta:9d}{UNITS[u]} "


@dataclass
class _State:
    markers: list[Marker]
    show_markers: bool
    out: list[str]
    level: int = -1
    cur: int = 0
    start: int = 0
    mi: int = 0
    lines: int = 0
    wx: list[tuple[int, int]] | None = None  # (start, end) of W+X ranges (note_wx)

    def next_marker(self) -> int:
        return self.markers[self.mi + 1].start if self.mi + 1 < len(self.markers) else (1 << 64)

    def note(self, addr: int, key: int, level: int) -> None:
        if self.level == -1:
            self.cur, self.level, self.mi, self.lines = key, level, 0, 0
            self.start = addr
            if self.show_markers:
                self.out.append(f"---[ {self.markers[0].name} ]---\n")
            return
        nm = self.next_marker()
        if key == self.cur and level == self.level and addr < nm:
            return
        eff = (self.cur >> 12) & 0xF
        if self.wx is not None and eff & EFF_RW and not eff & EFF_NX:
            self.wx.append((self.start, addr))
        mk = self.markers[self.mi]
        if not mk.max_lines or self.lines < mk.max_lines:
            # PTE_FLAGS_MASK clears bits 51:12, where the key keeps eff and depth
            own = self.cur & PTE_FLAGS_MASK
            self.out.append(
                f"0x{self.start:016x}-0x{addr:016x}   {size_text(addr - self.start)}"
                f"{_prot_text(own, self.level)}\n"
            )
        self.lines += 1
        if addr >= nm:
            if mk.max_lines and self.lines > mk.max_lines:
                skip = self.lines - mk.max_lines
                self.out.append(f"... {skip} entr{'y' if skip == 1 else 'ies'} skipped ... \n")
            self.mi += 1
            self.lines = 0
            if self.show_markers:
                self.out.append(f"---[ {self.markers[self.mi].name} ]---\n")
        self.start, self.cur, self.level = addr, key, level


def ptdump_lines(
    chunks: Iterable[Chunk],
    state: PagingState,
    markers: list[Marker] | None,
    wx: list[tuple[int, int]] | None = None,
) -> Iterator[str]:
    """ptdump text, in blocks of lines. `chunks` must come from a scan with holes=True (and
    addr_mask=LINUX_ADDR_MASK for byte identity on odd entries). `markers=None`: no marker
    lines, no marker breaks. `wx` collects note_wx() ranges when given."""
    levels = state.paging_levels
    st = _State(markers or [Marker(0, "")], markers is not None, [], wx=wx)
    last_end = 0
    for runs in coalesce(_calls(chunks, state), key=lambda c: _key(c, levels)):
        starts = runs.start.tolist()
        ends = runs.end.tolist()
        keys = runs.key.tolist()
        sizes = (U64(1) << SHIFT[runs.level]).tolist()
        for s, e, k, z in zip(starts, ends, keys, sizes):
            depth = (k >> 16) & 7
            st.note(s, k, depth)
            last_end = e
            # Marker breaks inside a run. note_page() advances at most one marker per call, and
            # only when the call's address is at or above the next marker's start, so the break
            # comes at the first entry start *after* the last noted one that lies at or above
            # the next marker: one entry late when a marker starts exactly on a noted address
            # (6.1 4-level: "LDT remap" holds the 4K PTE at PAGE_OFFSET).
            e_lin = e if e > s else 1 << 64
            while True:
                nm = st.next_marker()
                if nm >= e_lin:
                    break
                c = s + max(1, -(-(nm - s) // z)) * z
                if c >= e_lin:
                    break
                st.note(c, k, depth)
                s = c
        if len(st.out) > 4096:
            yield "".join(st.out)
            st.out.clear()
    if st.level != -1:
        # ptdump_walk_pgd(): "Flush out the last page" at the walk's end: 0 after the top of the
        # address space (the kernel's address wraps: last_end is a uint64 run end, already 0
        # there), else where a --range walk stopped.
        st.note(last_end, -1, -1)
    yield "".join(st.out)


def scan_kwargs() -> dict[str, Any]:
    """Linux's PFN mask, holes, and runs cut where the second walk range starts (the guard
    hole's end: root index 272 with 4 and 5 levels alike, 256 + 16 entries)."""
    return {"addr_mask": LINUX_ADDR_MASK, "holes": True, "top_breaks": (256, 272)}


def wx_report(ranges: list[tuple[int, int]]) -> tuple[list[str], int]:
    """note_wx()'s messages for every W+X range (the kernel WARNs once; we list them all) and
    the summary line of ptdump_walk_pgd_level_core()."""
    lines = []
    pages = 0
    for s, e in ranges:
        n = ((e - s) & ((1 << 64) - 1)) // 4096
        pages += n
        lines.append(f"x86/mm: Found insecure W+X mapping at address {s:#x}\n")
    if pages:
        lines.append(f"x86/mm: Checked W+X mappings: FAILED, {pages} W+X pages found.\n")
    else:
        lines.append("x86/mm: Checked W+X mappings: passed, no W+X pages found.\n")
    return lines, pages
