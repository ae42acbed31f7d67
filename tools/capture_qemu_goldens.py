#!/usr/bin/env python3
"""Capture QEMU's own `info tlb` / `info mem` text for the dump fixtures (fixtures/dump/).

For each fixture image built here, QEMU (qemu-system-x86_64 -cpu max, TCG, paused, RAM = the
image, CR0/CR3/CR4/EFER set through the gdbstub; harness/oracles/qemu_monitor.py) is asked for
`info tlb` and `info mem` through QMP's human-monitor-command. The text is stored exactly as
QEMU sent it (its monitor ends lines with CR LF), next to the image (an ELF core with x86pt's
register note) and a NAME.meta.json naming the QEMU version. x86pt's output is never written
here: the tests compare x86pt against these files.

It also asks QEMU for `dump-guest-memory` of a small VM holding one of the images: that ELF core
(QEMU's PT_LOADs and its "QEMU" CPU note, CR0..CR4 included) is the real-image fixture.

    python3 tools/capture_qemu_goldens.py [--out fixtures/dump]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from x86pt.build import Builder  # noqa: E402
from x86pt.memory import write_image  # noqa: E402
from x86pt.memory.atomic import write_bytes_atomic, write_text_atomic  # noqa: E402
from x86pt.state import CR4_PGE  # noqa: E402

K, M, G = 1 << 10, 1 << 20, 1 << 30


def mixed(levels: int) -> tuple:
    """Every feature the formats show: 4K/2M/1G leaves, each flag letter, effective rights from
    parents (RO/supervisor tables over RW/user leaves), merges and breaks, non-contiguous
    frames with equal rights, a reserved bit (QEMU ignores it), non-present junk, the last page
    of the lower half and of the whole address space, and a user range crossing PT/PD edges."""
    b = Builder(levels=levels, maxphyaddr=46, table_base=0x200000, table_flags="p rw us a")
    top = 0xFF00000000000000 if levels == 5 else 0xFFFF800000000000
    # user text/data, crossing a PT boundary (0x5ff000 -> 0x600000) with equal rights
    b.map(0x5FE000, 0x1000000, 0x3000, 4 * K, "p us a")
    b.map(0x601000, 0x1003000, 0x2000, 4 * K, "p rw us a d nx")
    # frames out of order, same rights: info mem merges, info tlb shows each frame
    b.map(0x603000, 0x1100000, 4 * K, 4 * K, "p rw us a d nx")
    b.map(0x604000, 0x1080000, 4 * K, 4 * K, "p rw us a d nx")
    # every flag letter: G P D A C T U W X over 4K pages (P shows only for large pages)
    for i, fl in enumerate(
        (
            "p",
            "p rw",
            "p us",
            "p pwt",
            "p pcd",
            "p a",
            "p d",
            "p g",
            "p pat",
            "p nx",
            "p rw us pwt pcd a d g pat nx",
        )
    ):
        b.map(0x10000000 + i * 0x1000, 0x2000000 + i * 0x1000, 4 * K, 4 * K, fl)
    # 2M pages: RW, then RO, then user; one with PAT (bit 12) and PWT
    b.map(0x40000000, 0x40000000, 4 * M, 2 * M, "p rw a d g nx")
    b.map(0x40400000, 0x40400000, 2 * M, 2 * M, "p a g")
    b.map(0x40600000, 0x40600000, 2 * M, 2 * M, "p rw us a d pat pwt")
    # 1G pages, the second one under a PDPT whose PML4E is read-only
    b.map(0x8000000000, 0x80000000, G, G, "p rw a d g nx")
    b.map(0x10000000000, 0xC0000000, G, G, "p rw us a d")
    b.set_entry(0x10000000000, 4 if levels == 4 else 4, b.get_entry(0x10000000000, 4) & ~0x2)
    # a supervisor PDE over user PTEs: effective supervisor
    b.map(0x20000000000, 0x3000000, 0x2000, 4 * K, "p rw us a")
    b.set_entry(0x20000000000, 2, b.get_entry(0x20000000000, 2) & ~0x4)
    # a reserved bit (bit 51 with M=46) in a present PTE: QEMU prints it anyway
    b.map(0x30000000000, 0x4000000, 4 * K, 4 * K, "p rw a")
    addr = b.entry_address(0x30000000000, 1)
    b.memory.write_u64(addr, b.memory.read_u64(addr) | (1 << 51))
    # non-present entries with junk bits (swap-entry like): not shown
    addr = b.entry_address(0x30000001000, 1)
    b.memory.write_u64(addr, 0x123456780E2)
    # the last page of the lower half
    half = 1 << (56 if levels == 5 else 47)
    b.map(half - 0x2000, 0x5000000, 0x2000, 4 * K, "p rw us a d nx")
    # kernel half: direct-map-like 2M run, then 4K at the top of the address space
    b.map(top, 0, 8 * M, 2 * M, "p rw a d g nx")
    b.map((1 << 64) - 0x3000, 0x6000000, 0x3000, 4 * K, "p rw a d g")
    if levels == 5:
        # QEMU 7.2's 5-level `info mem` follows non-present entries (docs/paging.md §13.3.2): a
        # non-present PDPTE with PS|US|RW becomes a "urw" 1G range there; the CPU sees a hole.
        b.map(0x50000000000, 0x7000000, 4 * K, 4 * K, "p rw us a")
        b.memory.write_u64(b.entry_address(0x50040000000, 3), 0x86)
    st = b.state(cr4=CR4_PGE)
    return b.memory, st


def recursive4() -> tuple:
    """A recursive PML4 slot (510 -> the PML4 itself), as Windows and some hobby OSes use."""
    b = Builder(levels=4, maxphyaddr=46, table_base=0x200000, table_flags="p rw a")
    b.map(0x400000, 0x1000000, 0x2000, 4 * K, "p rw us a")
    b.map(0xFFFF888000000000, 0, 4 * M, 2 * M, "p rw a d g nx")
    b.memory.write_u64(b.root + 510 * 8, b.root | 0x63)
    return b.memory, b.state()


def linuxlike4() -> tuple:
    from x86pt.demo import linux_like_image

    mem, st, _ = linux_like_image(4)
    return mem, st


IMAGES = {
    "mixed4": lambda: mixed(4),
    "mixed5": lambda: mixed(5),
    "recursive4": recursive4,
    "linuxlike4": linuxlike4,
}


def small_guest() -> tuple:
    """The real-image fixture: a 2 MiB VM whose tables live at 1 MiB."""
    b = Builder(levels=4, maxphyaddr=46, table_base=0x100000, table_flags="p rw us a")
    b.map(0x400000, 0x180000, 0x4000, 4 * K, "p us a")
    b.map(0x600000, 0x184000, 0x1000, 4 * K, "p rw us a d nx")
    b.map(0xFFFF888000000000, 0, 2 * M, 2 * M, "p rw a d g nx")
    b.map(0xFFFFFFFF81000000, 0x1C0000, 0x10000, 4 * K, "p a g")
    return b.memory, b.state(cr4=CR4_PGE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "dump"))
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    args = ap.parse_args(argv)
    from harness.oracles.qemu_monitor import QemuMonitor, qemu_version

    os.makedirs(args.out, exist_ok=True)
    version = qemu_version()
    for name, make in IMAGES.items():
        if args.only and name not in args.only:
            continue
        memory, state = make()
        img = os.path.join(args.out, f"{name}.elf")
        write_image(memory, state, img, "elf")
        t0 = time.monotonic()
        with QemuMonitor(memory, state) as mon:
            tlb = mon.info_tlb()
            mem = mon.info_mem()
            qv = mon.version
        secs = time.monotonic() - t0
        write_bytes_atomic(os.path.join(args.out, f"{name}.qemu-tlb.txt"), tlb.encode())
        write_bytes_atomic(os.path.join(args.out, f"{name}.qemu-mem.txt"), mem.encode())
        meta = {
            "image": f"{name}.elf",
            "expected": [f"{name}.qemu-tlb.txt", f"{name}.qemu-mem.txt"],
            "source": "QEMU HMP 'info tlb' and 'info mem' (QMP human-monitor-command), text "
            "as sent (CR LF line ends)",
            "oracle": "qemu-system-x86_64 -cpu max -accel tcg, paused, RAM = image, CRs via gdbstub",
            "qemu_version": qv,
            "qemu_binary_version": version,
            "state": state.to_json(),
            "captured_by": "tools/capture_qemu_goldens.py",
            "seconds": round(secs, 3),
        }
        write_text_atomic(os.path.join(args.out, f"{name}.meta.json"), json.dumps(meta, indent=1) + "\n")
        print(f"{name}: {tlb.count(chr(10))} tlb lines, {mem.count(chr(10))} mem lines ({secs:.1f} s)")
    if not args.only or "qemu-guest" in args.only:
        memory, state = small_guest()
        path = os.path.join(args.out, "qemu-guest.elf")
        with QemuMonitor(memory, state, ram_size=2 * M) as mon:
            tlb = mon.info_tlb()
            mem = mon.info_mem()
            regs = mon.registers()
            mon.dump_guest_memory(path)
            qv = mon.version
        write_bytes_atomic(os.path.join(args.out, "qemu-guest.qemu-tlb.txt"), tlb.encode())
        write_bytes_atomic(os.path.join(args.out, "qemu-guest.qemu-mem.txt"), mem.encode())
        meta = {
            "image": "qemu-guest.elf",
            "expected": ["qemu-guest.qemu-tlb.txt", "qemu-guest.qemu-mem.txt"],
            "source": "QMP dump-guest-memory (paging=false) of a paused 2 MiB VM; 'info tlb'/'info mem' "
            "of the same VM; registers read back through the gdbstub",
            "qemu_version": qv,
            "qemu_binary_version": version,
            "registers": {k: hex(v) for k, v in regs.items()},
            "note": "QEMU's core has no EFER: pass --efer (LME|LMA|NXE = 0xd00)",
            "captured_by": "tools/capture_qemu_goldens.py",
        }
        write_text_atomic(os.path.join(args.out, "qemu-guest.meta.json"), json.dumps(meta, indent=1) + "\n")
        print(f"qemu-guest: {os.path.getsize(path)} bytes, regs {meta['registers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
