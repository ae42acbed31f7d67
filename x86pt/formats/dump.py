# SPDX-License-Identifier: GPL-2.0-or-later
"""One image rendered in one output format: the scan with the format's options, the filter, and the
renderer (x86pt.formats.ptdump / qemu / tabular), streamed to a binary stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from x86pt.errors import BadInputError
from x86pt.limits import DEFAULT_MAX_ENTRIES

if TYPE_CHECKING:
    from x86pt.scan import Filter, Scanner


def dump_to(
    out: BinaryIO,
    img,
    fmt: str,
    *,
    markers: str = "none",
    page_offset: int | None = None,
    vmalloc: int | None = None,
    vmemmap: int | None = None,
    filt: Filter | None = None,
    va_range: tuple[int, int] | None = None,
    coalesce_mode: str = "phys",
    crlf: bool = False,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Scanner:
    """Render one image in `fmt` to the binary stream `out`; returns the scanner (stats, issues)."""
    # only the renderer `fmt` needs is imported (docs/startup.md)
    state, memory = img.state, img.memory
    from x86pt.scan import Filter

    filt = filt or Filter(nxe=state.nxe)
    kw = {"va_range": va_range, "max_entries": max_entries}
    if fmt in ("qemu-mem", "qemu-tlb"):
        from x86pt.formats import qemu

        kw.update(qemu.scan_kwargs())
    elif fmt == "ptdump":
        from x86pt.formats import ptdump

        kw.update(ptdump.scan_kwargs())
    from x86pt.scan import Scanner

    sc = Scanner(state, memory, **kw)
    chunks = filt.apply(sc.chunks())

    def put(blocks):
        for b in blocks:
            if isinstance(b, str):
                b = b.encode()
            if crlf:
                b = bytes(b).replace(b"\n", b"\r\n")
            out.write(b)

    if fmt == "qemu-tlb":
        if not state.cr0 & qemu.CR0_PG:
            put([qemu.PG_DISABLED])
        else:
            put(qemu.tlb_bytes(chunks))
    elif fmt == "qemu-mem":
        if not state.cr0 & qemu.CR0_PG:
            put([qemu.PG_DISABLED])
        elif state.la57:
            if filt.active or va_range is not None:
                raise BadInputError(
                    "filters are not supported with --format qemu-mem under LA57 "
                    "(QEMU 7.2's 5-level info mem walk is emulated as a whole)"
                )
            put(qemu.mem_bytes_la57(memory, state, max_entries))
        else:
            put(qemu.mem_bytes(chunks, state))
    elif fmt == "ptdump":
        mk = None
        if markers == "linux":
            mk = ptdump.linux_markers(
                state.paging_levels, page_offset=page_offset, vmalloc=vmalloc, vmemmap=vmemmap
            )
        put(ptdump.ptdump_lines(chunks, state, mk))
    elif fmt == "json":
        from x86pt.formats import tabular

        put(tabular.json_lines(chunks, lambda: sc.stats.issues, coalesce_mode=coalesce_mode, nxe=state.nxe))
    elif fmt == "csv":
        from x86pt.formats import tabular

        put(tabular.csv_lines(chunks, coalesce_mode=coalesce_mode, nxe=state.nxe))
    else:
        raise BadInputError(f"unknown format {fmt!r}")
    return sc
