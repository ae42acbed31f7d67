"""The QEMU backend of the comparison rig: QEMU TCG runs the probe guest (harness/guest) on the
test image and reports, per probe, what the emulated CPU did (docs/oracles.md §4).

One launch per batch of at most MAX_PROBES (8192) probes:

    qemu-system-x86_64 -nographic -nodefaults -no-reboot -accel tcg -cpu max -m 32M
        -object memory-backend-file,...,share=on -machine pc,memory-backend=ram
        -bios harness/guest/bios.bin -device isa-debug-exit,iobase=0xf4,iosize=4

The RAM is a tmpfs file we create, mmap and fill with `prepare_ram` (guest, tables, params,
probes, image). It is unlinked *before* QEMU starts: QEMU opens it as /proc/self/fd/N through an
inherited descriptor, so no file can outlive us. bios.bin (bios.S) goes from reset to long mode
and jumps into the guest; the guest ends with `out 0xf4`, so QEMU exits with status 33
((0x10 << 1) | 1). Results are then read from the RAM we still map. Every launch has a timeout
after which QEMU's process group is killed; `-no-reboot` turns a triple fault into an exit.

Batches larger than MAX_PROBES are split into consecutive launches, each starting from the image
the previous one left (A/D bits carry over, as the rig's conventions ask).
"""

from __future__ import annotations

import functools
import mmap
import os
import subprocess
import tempfile
import time
from typing import Callable, Sequence

from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.sparse import SparseMemory
from x86pt.state import PagingState, profile_named

from harness import guest
from x86pt.oracle import RIG_IMAGE_BASE, RIG_RAM_SIZE, Capabilities, Probe, ProbeResult
from harness.oracles.base import ProbeGuestOracle
from harness.oracles.capability import capability_image, measured
from harness.qemu.monitor import QemuMonitor
from harness.qemu.process import (
    QEMU_BINARY,
    kill_group,
    qemu_binary,
    qemu_version,
    read_stderr,
    scratch_dir,
    spawn_qemu,
    wait_exit,
)
from harness.qemu.ram import BELOW_4G, RamFile, round_ram_size
from harness.scratch import ScratchDir

BIOS_PATH = os.path.join(os.path.dirname(guest.__file__), "bios.bin")
MAX_PROBES = guest.MAX_PROBES
EXIT_DONE = guest.QEMU_EXIT_DONE  # isa-debug-exit with 0x10
EXIT_SETUP = guest.QEMU_EXIT_SETUP  # the guest faulted while loading the test state


def available() -> tuple[bool, str]:
    """(usable here, why not): the binary on PATH and the shipped bios.bin."""
    if qemu_binary() is None:
        return False, f"{QEMU_BINARY} not found on PATH (run tools/install_qemu.sh)"
    if not os.path.isfile(BIOS_PATH):
        return False, f"{BIOS_PATH} is missing (run harness/guest/build_bios.sh)"
    return True, ""


class QemuOracle(ProbeGuestOracle):
    """Oracle "qemu" (profile "qemu"): QEMU TCG with the probe guest."""

    available = staticmethod(available)

    name = "qemu"
    profile = "qemu"
    label = "QEMU"
    max_probes = MAX_PROBES  # per launch; run() splits bigger batches

    def __init__(
        self,
        *,
        binary: str | None = None,
        cpu: str = "max",
        ram_size: int = RIG_RAM_SIZE,
        timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary or qemu_binary()
        if self.binary is None:
            raise OracleUnavailable(f"{QEMU_BINARY} not found on PATH (run tools/install_qemu.sh)")
        if not os.path.isfile(BIOS_PATH):
            raise OracleUnavailable(f"{BIOS_PATH} is missing (run harness/guest/build_bios.sh)")
        self.cpu = cpu
        self.ram_size = round_ram_size(ram_size)
        if self.ram_size > BELOW_4G:
            raise BadInputError("the QEMU oracle's RAM must stay below 3 GiB (one RAM range)")
        self.timeout = timeout
        self.extra_args = tuple(extra_args)

    @functools.cached_property
    def version(self) -> str:
        return qemu_version(self.binary)

    def capabilities(self) -> Capabilities:
        return discover_capabilities(self.binary, self.cpu)

    # -- running -----------------------------------------------------------------------------------
    def _scope(self) -> "_Scratch":
        return _Scratch(self.ram_size)

    def _launch(
        self,
        scratch: "_Scratch",
        n: int,
        memory: SparseMemory,
        state: PagingState,
        probes: Sequence[Probe],
        ram_hook: Callable[[mmap.mmap], None] | None = None,
    ) -> tuple[list[ProbeResult], SparseMemory]:
        """Launch n of a run(): QEMU on the RAM file of the run (emptied after launch 0)."""
        ram = scratch.ram
        if n:
            ram.clear()
        # A fresh (or cleared) tmpfs file reads as zeros: no need to write 32 MiB of them.
        guest.prepare_ram(ram.map, memory, state, probes, clear=False, ram_size=ram.size)
        if ram_hook is not None:
            ram_hook(ram.map)
        args = [
            self.binary,
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-accel",
            "tcg",
            "-cpu",
            self.cpu,
            "-m",
            f"{ram.size >> 20}M",
            "-object",
            f"memory-backend-file,id=ram,size={ram.size >> 20}M,mem-path=/proc/self/fd/{ram.fd},share=on",
            "-machine",
            "pc,memory-backend=ram",
            "-bios",
            BIOS_PATH,
            "-device",
            f"isa-debug-exit,iobase={guest.DEBUG_EXIT_PORT:#x},iosize=4",
            *self.extra_args,
        ]
        t0 = time.monotonic()
        stderr = tempfile.TemporaryFile(prefix="x86pt-qemu-")
        proc = None
        try:
            proc = spawn_qemu(args, stderr, pass_fds=(ram.fd,))
            try:
                rc = wait_exit(proc, self.timeout)
            except subprocess.TimeoutExpired:
                raise OracleError(
                    f"QEMU did not finish {len(probes)} probes within {self.timeout:g} s (killed)"
                ) from None
            message = read_stderr(stderr)
        finally:
            kill_group(proc)
            stderr.close()
        self.launches += 1
        self.last_launch_seconds = time.monotonic() - t0
        if rc not in (EXIT_DONE, EXIT_SETUP):
            st = guest.status(ram.map)
            why = (
                "the guest triple-faulted or never started (QEMU exits 0 on a reset with -no-reboot)"
                if rc == 0
                else f"QEMU exited with status {rc}"
            )
            raise OracleError(f"{why}; guest status {st:#x}" + (f": {message}" if message else ""))
        guest.check_status(ram.map, "QEMU")
        results = guest.read_results(ram.map, len(probes), probes)
        after = guest.image_after(ram.map, memory, state, scan_new=False, ram_size=ram.size)
        _add_new_pages(ram, memory, after)
        return results, after


def _data_extents(fd: int, start: int, end: int):
    """[a, b) ranges of the tmpfs file that hold pages (SEEK_DATA/SEEK_HOLE): never-touched RAM
    is a hole, so this finds what the guest or we wrote without reading 32 MiB."""
    pos = start
    while pos < end:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if a >= end:
            return
        b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
        yield a, b
        pos = b


def _add_new_pages(ram: RamFile, memory: SparseMemory, after: SparseMemory) -> None:
    """Like image_after(scan_new=True): image-area pages the caller did not have but that are
    non-zero now (a write probe into a frame the caller left unbacked)."""
    page = guest.PAGE
    limit = min(ram.size, memory.size)
    for a, b in _data_extents(ram.fd, RIG_IMAGE_BASE, limit):
        for pa in range(a - a % page, b, page):
            pn = pa // page
            if pn in after.pages:
                continue
            data = ram.map[pa : pa + page]
            if any(data):
                after.pages[pn] = bytearray(data)


class _Scratch(ScratchDir):
    """A private tmpfs directory and the RAM file for one run() call; removed on every path."""

    def __init__(self, ram_size: int) -> None:
        self.ram: RamFile | None = None
        super().__init__(scratch_dir())
        try:
            self.ram = RamFile(self.dir, ram_size)
            # QEMU opens /proc/self/fd/N (our descriptor, inherited), so the name can go now:
            # from here on nothing of ours has a name in the file system.
            self.ram.unlink()
            self.forget_dir()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        super().close()


# -- capabilities, measured -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def discover_capabilities(binary: str | None = None, cpu: str = "max") -> Capabilities:
    """Run the capability batch (harness/oracles/capability.py; 4-level and 5-level) once per
    process and QEMU/CPU model."""
    oracle = QemuOracle(binary=binary, cpu=cpu)
    mem, st, probes = capability_image(False, "amd", "qemu")
    r = oracle.run(mem, st, probes).results
    try:
        mem5, st5, probes5 = capability_image(True, "amd", "qemu")
        r5 = oracle.run(mem5, st5, probes5).results
    except OracleError:
        r5 = None
    notes = [
        "measured by a capability batch (harness/oracles/capability.py)",
        "vendor from the vCPU's QOM property (qom-get vendor)",
        "RSVD #PF error code lacks P on QEMU >= 7.2 (docs/paging.md §12.1)",
    ]
    return Capabilities(
        name="qemu",
        vendor=_vendor(binary, cpu),
        **measured("qemu", r, r5),
        ram_size=oracle.ram_size,
        version=oracle.version,
        notes=tuple(notes),
    )


def _vendor(binary: str | None, cpu: str) -> str:
    """'amd' or 'intel', as the vCPU reports it (a paused VM, QOM property 'vendor')."""
    try:
        with QemuMonitor(
            SparseMemory(RIG_RAM_SIZE),
            PagingState(cr3=RIG_IMAGE_BASE, profile=profile_named("qemu")),
            binary=binary,
            cpu=cpu,
        ) as mon:
            v = str(mon.cpu_property("vendor"))
    except OracleError:
        return "unknown"
    return {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(v, v or "unknown")


if __name__ == "__main__":
    from harness.oracles.qemu_bench import main

    raise SystemExit(main())
