# SPDX-License-Identifier: GPL-2.0-or-later
"""The page tables out of guest RAM: what the guest's registers say (guest_state), the table pages
reachable from the root (collect_tables), the capture of one pause (capture) or of the guest's own
dump (capture_from_dump), and the compact image written for it (write_capture).

The image is an ELF core (x86pt.memory.write_elf_core) holding only the table pages reachable
from `init_top_pgt`, with CR0/CR3/CR4/EFER of the guest and CR3 pointing at init_top_pgt, so
every x86pt command reads it. CR3 as QEMU reports it is the current task's PGD; its kernel half is
the same tables, and init_top_pgt is what the kernel's own ptdump of init_mm walks.
"""

from __future__ import annotations

from dataclasses import dataclass

from x86pt.errors import OracleError
from x86pt.fields import ADDR_MASK_52 as ADDR_MASK  # bits 51:12
from x86pt.fields import BIT_PS as PS
from x86pt.memory.base import PAGE, MemoryBase
from x86pt.memory import write_image
from x86pt.memory.sparse import SparseMemory
from x86pt.state import CR4_LA57, PagingState, profile_named
from x86pt.walk import Translation, walk


def guest_state(regs: dict[str, int]) -> PagingState:
    """The guest's paging state (QEMU TCG -cpu max: the `qemu` profile, 40 physical bits)."""
    return PagingState(
        cr3=regs["cr3"] & ADDR_MASK,
        cr0=regs["cr0"],
        cr4=regs["cr4"],
        efer=regs["efer"],
        profile=profile_named("qemu"),
    )


def read_kernel_u64(state: PagingState, ram: MemoryBase, va: int) -> int:
    r = walk(state, ram, va)
    if not isinstance(r, Translation):
        raise OracleError(f"guest VA {va:#x} does not translate through CR3 {state.cr3:#x}")
    return ram.read_u64(r.pa)


def kernel_pa(state: PagingState, ram: MemoryBase, va: int) -> int:
    r = walk(state, ram, va)
    if not isinstance(r, Translation):
        raise OracleError(f"guest VA {va:#x} does not translate through CR3 {state.cr3:#x}")
    return r.pa


def collect_tables(ram: MemoryBase, root: int, levels: int) -> SparseMemory:
    """Copy every table page reachable from `root` (present non-leaf entries only) into a sparse
    memory. A table seen twice is copied once (ESPfix maps one PUD page many times)."""
    mem = SparseMemory()
    seen: set[int] = set()
    todo = [(root, levels)]
    while todo:
        pa, level = todo.pop()
        if pa in seen:
            continue
        if not ram.contains(pa, PAGE):
            raise OracleError(f"level-{level} table at {pa:#x} is outside guest RAM")
        seen.add(pa)
        t = ram.table(pa)
        mem.write(pa, t.tobytes())
        if level == 1:
            continue
        for e in t.tolist():
            if not e & 1 or (level in (2, 3) and e & PS):
                continue
            todo.append((e & ADDR_MASK, level - 1))
    return mem


@dataclass(frozen=True)
class Capture:
    memory: SparseMemory
    state: PagingState  # CR3 = init_top_pgt's PA
    layout: dict


def capture(ram: MemoryBase, regs: dict[str, int], kallsyms: dict[str, int]) -> Capture:
    """The table pages of init_mm plus what the guest's memory says about the layout."""
    st = guest_state(regs)
    for need in ("init_top_pgt", "page_offset_base"):
        if need not in kallsyms:
            raise OracleError(f"kallsyms output has no {need}")
    root = kernel_pa(st, ram, kallsyms["init_top_pgt"])
    levels = 5 if regs["cr4"] & CR4_LA57 else 4
    mem = collect_tables(ram, root, levels)
    layout = {
        "levels": levels,
        "init_top_pgt_pa": hex(root),
        "cr3_task": hex(regs["cr3"]),
        "table_pages": len(mem.pages),
    }
    # variables, not symbols: their values are in guest memory (_brk_end is where brk use ended)
    for var in ("page_offset_base", "vmalloc_base", "vmemmap_base", "phys_base", "_brk_end"):
        if var in kallsyms:
            layout[var.lstrip("_") + ("_value" if var == "_brk_end" else "")] = hex(
                read_kernel_u64(st, ram, kallsyms[var])
            )
    return Capture(mem, st.replace(cr3=root), layout)


def parse_tables(lines: list[str]) -> tuple[int, int, SparseMemory]:
    """The in-guest dump of init_mm's tables (build.py, <debugfs>/x86pt/tables): returns the root
    table's PA, its level and the table pages. Each page is "T pa level" followed by runs
    "index count entry stride" (entry[index + k] = entry + k * stride, mod 2^64)."""
    mem = SparseMemory()
    root = level0 = None
    page: list[int] | None = None
    pa = 0
    ended = False

    def flush() -> None:
        if page is not None:
            mem.write(pa, b"".join(v.to_bytes(8, "little") for v in page))

    for line in lines:
        w = line.split()
        if not w:
            continue
        if w[0] == "T":
            flush()
            pa, lvl = int(w[1], 16), int(w[2])
            if root is None:
                root, level0 = pa, lvl
            page = [0] * 512
        elif w[0] == "E":
            if int(w[2]):
                raise OracleError(f"the guest's table dump overflowed ({w[1]} tables)")
            ended = True
        elif page is not None and len(w) == 4:
            i, n, e, stride = (int(x, 16) for x in w)
            if i + n > 512:
                raise OracleError(f"table dump: run {line!r} passes the end of table {pa:#x}")
            for k in range(n):
                page[i + k] = (e + k * stride) & 0xFFFF_FFFF_FFFF_FFFF
        else:
            raise OracleError(f"table dump: unexpected line {line!r}")
    flush()
    if root is None or not ended:
        raise OracleError("the guest's table dump is empty or cut short")
    return root, level0, mem


def capture_from_dump(lines: list[str], regs: dict[str, int], layout: dict) -> Capture:
    """A Capture from the guest's own table dump of one step; control registers from QEMU (they
    do not change after boot) and the layout values from the run's RAM capture."""
    root, levels, mem = parse_tables(lines)
    st = guest_state(regs).replace(cr3=root)
    if levels != (5 if regs["cr4"] & CR4_LA57 else 4):
        raise OracleError(f"table dump has a level-{levels} root, CR4 says otherwise")
    lay = dict(layout)
    lay.update({"levels": levels, "init_top_pgt_pa": hex(root), "table_pages": len(mem.pages)})
    return Capture(mem, st, lay)


def write_capture(path: str, cap: Capture) -> None:
    """The capture as an ELF core with the guest's control registers (x86pt.memory.write_image)."""
    write_image(cap.memory, cap.state, path, fmt="elf")
