# SPDX-License-Identifier: GPL-2.0-or-later
"""The Bochs backend of the comparison rig: Bochs 2.7 (Debian's package) runs the probe guest
(harness/guest) on the test image and reports, per probe, what its emulated CPU did
(docs/oracles.md "Bochs"). Bochs has its own page walk (cpu/paging.cc), written independently
of QEMU's target/i386 walk that the unicorn and QEMU oracles share.

One Bochs start per batch of at most MAX_PROBES (8192) probes:

    bochs -q -f <dir>/bochsrc -rc /dev/fd/N        (stdin /dev/null, own session, headless)

* The RAM: `guest.prepare_ram` fills a buffer exactly as for QEMU; [0x100000, end) is written to
  <dir>/ram.img and loaded with `optramimage1:`. The reset ROM is the QEMU backend's bios.bin
  (`romimage:`), unchanged.
* Bochs' built-in debugger is driven through a pipe given as its -rc file (/dev/fd/N, inherited):
  we write commands and read what it prints on stdout. Before the first instruction we read one
  qword of every 128 KiB RAM block of the image in ascending order (see _touch_commands: Bochs 2.7
  places an optramimage contiguously in host memory and hands host blocks to guest blocks in the
  order they are first touched, so this order is what makes the image land where it belongs; the
  qwords read back are compared with the file, so a wrong layout is an OracleError, never a wrong
  answer). Then `lb` on the guest's `finish` label and `c`.
* At the breakpoint: `xp` (physical memory) of the params page, the result records and every
  image page; `page VA` for every write probe, so a write into a frame the caller left unbacked
  is read back too. `q` ends Bochs.

Starting Bochs, its work directory, its debugger on a pipe and how every start ends (killed as a
process group, the directory removed, Bochs' own words in the OracleError) are
harness/oracles/bochs_debugger.py's; its names stay importable from here.

Batches larger than MAX_PROBES are split into consecutive starts, each from the image the previous
one left (A/D bits carry over, as the rig's conventions ask).
"""

from __future__ import annotations

import functools
import os
import re
import struct
import time
from typing import Callable, Sequence

from x86pt.errors import BadInputError, OracleError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import RIG_IMAGE_BASE, RIG_RAM_SIZE, Capabilities, Probe, ProbeResult
from x86pt.state import PagingState

from harness import guest
from harness.oracles.capability import capability_image, measured
from harness.oracles.base import ProbeGuestOracle
from harness.oracles.bochs_debugger import (
    BOCHS_BINARY,
    DEFAULT_CPU,
    LOAD_BASE,
    MARK,
    ROM_PATH,
    VGA_ROMS,
    BochsSession,
    BochsWorkdir,
    DebuggerRun,
    available,
    bochs_binary,
    bochs_version,
    checked_binary,
    cpuid_from_log,
    output_tail,
    parse_xp,
    vendor_of,
    vga_rom,
    write_bochsrc,
)

__all__ = [
    "BOCHS_BINARY",
    "BLOCK",
    "CAP_UNBACKED",
    "DEFAULT_CPU",
    "LOAD_BASE",
    "MARK",
    "MAX_PROBES",
    "ROM_PATH",
    "VGA_ROMS",
    "BochsOracle",
    "DebuggerRun",
    "available",
    "bochs_binary",
    "bochs_version",
    "checked_binary",
    "cpuid_from_log",
    "discover_capabilities",
    "parse_xp",
    "vendor_of",
    "vga_rom",
    "write_bochsrc",
]

MAX_PROBES = guest.MAX_PROBES
BLOCK = 0x20000  # Bochs 2.7's RAM allocation block (its log: "mem block size")
_PAGE_RE = re.compile(r"^linear page 0x([0-9a-f]+) maps to physical page 0x([0-9a-f]+)")
_Q = struct.Struct("<Q")


def _xp_pages(pages: Sequence[int]) -> list[str]:
    return [f"xp /512gx {pn * guest.PAGE:#x}" for pn in pages]


class BochsOracle(ProbeGuestOracle):
    """Oracle "bochs" (profile "bochs"): Bochs 2.7 with the probe guest, CPU model tigerlake."""

    available = staticmethod(available)

    name = "bochs"
    profile = "bochs"
    label = "Bochs"
    max_probes = MAX_PROBES  # per start; run() splits bigger batches

    def __init__(
        self,
        *,
        binary: str | None = None,
        cpu: str = DEFAULT_CPU,
        ram_size: int = RIG_RAM_SIZE,
        timeout: float = 60.0,
    ) -> None:
        self.binary = checked_binary(binary, cpu)
        if ram_size % (1 << 20) or not 4 << 20 <= ram_size <= 2 << 30:
            raise BadInputError("the Bochs oracle's RAM must be whole MiB, 4 MiB .. 2 GiB")
        self.cpu = cpu
        self.ram_size = ram_size
        self.timeout = timeout
        self.keep_log = False  # quit Bochs gracefully so its log is complete (CPUID lines)
        self.last_log = ""  # Bochs' log of the last start
        self.last_pid: int | None = None
        self.last_workdir: str | None = None

    @functools.cached_property
    def version(self) -> str:
        return bochs_version(self.binary)

    def capabilities(self) -> Capabilities:
        return discover_capabilities(self.binary, self.cpu, self.ram_size)

    # -- running -----------------------------------------------------------------------------------
    def _launch(
        self,
        scope: None,
        n: int,
        memory: SparseMemory,
        state: PagingState,
        probes: Sequence[Probe],
        ram_hook: Callable[[bytearray], None] | None = None,
    ) -> tuple[list[ProbeResult], SparseMemory]:
        """One Bochs start in its own work directory (`scope` and `n` unused: starts share nothing)."""
        ram = bytearray(self.ram_size)
        # A fresh bytearray reads as zeros: prepare_ram need not clear 32 MiB.
        guest.prepare_ram(ram, memory, state, probes, clear=False, ram_size=self.ram_size)
        if ram_hook is not None:
            ram_hook(ram)
        image_end = max([guest.HARNESS_END] + [(pn + 1) * guest.PAGE for pn in memory.pages])
        end = min(self.ram_size, -(-image_end // BLOCK) * BLOCK)
        t0 = time.monotonic()
        wd = BochsWorkdir("x86pt-bochs")
        workdir = self.last_workdir = wd.dir
        session = None
        try:
            ram_image = os.path.join(workdir, "ram.img")
            with open(ram_image, "wb") as f:
                f.write(memoryview(ram)[LOAD_BASE:end])
            bochsrc = write_bochsrc(workdir, self.ram_size >> 20, self.cpu, ram_image)
            session = BochsSession(self.binary, bochsrc, workdir, time.monotonic() + self.timeout)
            self.last_pid = session.proc.pid
            what = f"{len(probes)} probes"
            # 1. Touch the image's RAM blocks in order (module docstring) and check what they hold.
            touch = list(range(LOAD_BASE + BLOCK, end, BLOCK))
            got = parse_xp(session.exchange([f"xp /1gx {a:#x}" for a in touch], "loading the image"))
            for a in touch:
                want = _Q.unpack_from(ram, a)[0]
                if got.get(a) != want:
                    raise OracleError(
                        f"Bochs did not load the RAM image where it belongs: qword "
                        f"{a:#x} reads {got.get(a)!r}, the image has {want:#x}"
                    )
            # 2. Run the guest to its `finish` label.
            finish = guest.symbols()["finish"]
            lines = session.exchange([f"lb {finish:#x}", "c"], what)
            if not any("Breakpoint 1," in ln for ln in lines):
                raise OracleError(
                    f"Bochs stopped before the guest finished {what}: {output_tail(chr(10).join(lines))}"
                )
            # 3. Read back params and results (binary, through the harness slot the test's root
            # table maps: `writemem` takes linear addresses), the image pages (`xp`, physical),
            # and where each write probe's VA maps now.
            nres = len(probes) * guest.RECORD
            dumps = [("params.bin", guest.PARAMS_GPA, guest.PAGE)] + (
                [("results.bin", guest.RESULTS_GPA, nres)] if nres else []
            )
            pages = sorted(memory.pages)
            writes = sorted({p.va & ~0xFFF for p in probes if p.access == "write"})
            lines = session.exchange(
                [
                    f'writemem "{os.path.join(workdir, name)}" {guest.KBASE + gpa:#x} {size}'
                    for name, gpa, size in dumps
                ]
                + _xp_pages(pages)
                + [f"page {va:#x}" for va in writes],
                "reading back",
            )
            for name, gpa, size in dumps:
                try:
                    with open(os.path.join(workdir, name), "rb") as f:
                        data = f.read()
                except OSError:
                    data = b""
                if len(data) != size:
                    raise OracleError(
                        f"Bochs' debugger did not dump {size} bytes at {gpa:#x} "
                        f"({len(data)}): {output_tail(chr(10).join(lines))}"
                    )
                ram[gpa : gpa + size] = data
            back = parse_xp(lines)
            new = set()
            for ln in lines:
                m = _PAGE_RE.match(ln)
                if m:
                    pn = int(m.group(2), 16) // guest.PAGE
                    if (
                        RIG_IMAGE_BASE // guest.PAGE <= pn < self.ram_size // guest.PAGE
                        and pn not in memory.pages
                    ):
                        new.add(pn)
            if new:
                back.update(parse_xp(session.exchange(_xp_pages(sorted(new)), "reading back")))
        finally:
            if session is not None:
                session.close(graceful=self.keep_log)
            wd.close()
            if wd.log is not None:
                self.last_log = wd.log
        self.launches += 1
        self.last_launch_seconds = time.monotonic() - t0
        for pn in pages + sorted(new):  # the image pages `xp` printed
            base = pn * guest.PAGE
            for off in range(0, guest.PAGE, 8):
                v = back.get(base + off)
                if v is None:
                    raise OracleError(f"Bochs' debugger did not print the qword at {base + off:#x}")
                _Q.pack_into(ram, base + off, v)
        guest.check_status(ram, "Bochs")
        results = guest.read_results(ram, len(probes), probes)
        after = guest.image_after(ram, memory, state, scan_new=False, ram_size=self.ram_size)
        for pn in sorted(new):
            data = ram[pn * guest.PAGE : (pn + 1) * guest.PAGE]
            if any(data):
                after.pages[pn] = bytearray(data)
        return results, after


# -- capabilities, measured -------------------------------------------------------------------------------
CAP_UNBACKED = 0x3000000  # 48 MiB: past the 32 MiB RAM, reached through the 1G leaf


@functools.lru_cache(maxsize=8)
def discover_capabilities(
    binary: str | None = None, cpu: str = DEFAULT_CPU, ram_size: int = RIG_RAM_SIZE
) -> Capabilities:
    """Run the capability batch (harness/oracles/capability.py; 4-level, then 5-level) once per
    process and CPU model."""
    oracle = BochsOracle(binary=binary, cpu=cpu, ram_size=ram_size)
    oracle.keep_log = True
    mem, st, probes = capability_image(False, "intel", "bochs", unbacked_pa=CAP_UNBACKED)
    r = oracle.run(mem, st, probes).results
    log = oracle.last_log
    try:
        mem5, st5, probes5 = capability_image(True, "intel", "bochs")
        r5 = oracle.run(mem5, st5, probes5).results
    except OracleError:
        r5 = None  # CR4.LA57 is not accepted: the boot ROM's mov to CR4 faults
    notes = [
        "measured by a capability batch (harness/oracles/capability.py)",
        f"vendor from the CPUID table Bochs logs at reset (CPU model {cpu})",
    ]
    return Capabilities(
        name="bochs",
        vendor=vendor_of(cpuid_from_log(log)),
        **measured("bochs", r, r5, unbacked=True),
        ram_size=oracle.ram_size,
        version=oracle.version,
        notes=tuple(notes),
    )
