# SPDX-License-Identifier: GPL-2.0-or-later
"""ptdump's line breaks on the G bit, hand-derived from the kernel's rules (arch/x86/mm/
dump_pagetables.c note_page(): a new line starts when the entry's own protection bits —
value & PTE_FLAGS_MASK, which holds bit 8 (_PAGE_GLOBAL) — differ from the current line's, even
when the effective rights are the same; printk_prot() prints "GLB " for bit 8).

Before these, a ptdump that merged ranges across a G difference passed every hand-written test
and was caught only by the real-kernel fixtures (issue 12)."""

from __future__ import annotations

import io

from x86pt.build import Builder
from x86pt.formats.dump import dump_to
from x86pt.image import Image


def _dump(b: Builder) -> str:
    out = io.BytesIO()
    dump_to(out, Image(b.memory, b.state(), "<test>"), "ptdump", markers="none")
    return out.getvalue().decode()


def test_ptdump_breaks_lines_where_only_g_differs_4k():
    """PT[0] and PT[1] under PD[2]: the same user RW NX page, the second global. Two lines, not
    one 8K line; the rest of the lower half as in a one-page dump (holes at their level, the
    final flush at address 0)."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw us nx")
    b.map(0x401000, 0x5001000, 4096, 4096, "p rw us nx g")
    want = (
        "0x0000000000000000-0x0000000000400000           4M                               pmd\n"
        "0x0000000000400000-0x0000000000401000           4K USR RW                     NX pte\n"
        "0x0000000000401000-0x0000000000402000           4K USR RW                 GLB NX pte\n"
        "0x0000000000402000-0x0000000000600000        2040K                               pte\n"
        "0x0000000000600000-0x0000000040000000        1018M                               pmd\n"
        "0x0000000040000000-0x0000008000000000         511G                               pud\n"
        "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
    )
    assert _dump(b) == want


def test_ptdump_breaks_lines_where_only_g_differs_2m():
    """Three 2M kernel-style leaves (PSE) in PD[0..2] of the first GiB: global, not global,
    global. Three lines; the PSE column shows, PAT (bit 12 of a large leaf) never does."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x0, 0x6000000, 2 << 20, 2 << 20, "p rw a d g nx")
    b.map(0x200000, 0x6200000, 2 << 20, 2 << 20, "p rw a d nx")
    b.map(0x400000, 0x6400000, 2 << 20, 2 << 20, "p rw a d g nx")
    want = (
        "0x0000000000000000-0x0000000000200000           2M     RW         PSE     GLB NX pmd\n"
        "0x0000000000200000-0x0000000000400000           2M     RW         PSE         NX pmd\n"
        "0x0000000000400000-0x0000000000600000           2M     RW         PSE     GLB NX pmd\n"
        "0x0000000000600000-0x0000000040000000        1018M                               pmd\n"
        "0x0000000040000000-0x0000008000000000         511G                               pud\n"
        "0x0000008000000000-0x0000000000000000   17179868672G                               pgd\n"
    )
    assert _dump(b) == want
