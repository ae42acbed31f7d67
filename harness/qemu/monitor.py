"""QEMU without guest code: a paused VM whose RAM is our image, whose control registers are set
through the gdbstub, queried through the monitor (docs/oracles.md §5).

    with QemuMonitor(memory, state) as mon:
        mon.gva2gpa(0x400123)      # -> 0x201123, or None for 'Unmapped'
        mon.info_tlb()             # text, one line per present leaf (docs/paging.md §13.3)
        mon.info_mem()             # text, ranges with folded u/w rights
        mon.dump_guest_memory("vm.elf")

What the answers mean: HMP's `gva2gpa`, `info tlb` and `info mem` use QEMU's *debug* walker. It
follows P and PS and checks the canonical form; it does not check NX, U/S, WP, SMEP, SMAP, PKU or
reserved bits and never sets A/D (docs/oracles.md §5). So this is an oracle for translation and page size only.

Mechanics, and why:
* RAM is a `memory-backend-file` on tmpfs (harness/qemu/ram.py); QEMU does not clear it. Both
  processes map it, so the path is unlinked as soon as QEMU has opened it, and nothing can leak on
  disk even if we are killed.
* QMP and the gdbstub listen on unix sockets in the process's private scratch directory, removed
  once both are connected. QEMU runs in its own process group with PR_SET_PDEATHSIG=SIGKILL, so
  it dies with us; close() (also via atexit) kills the group (harness/qemu/process.py).
* gdbstub register writes to CRn/EFER take only the low 4 bytes while CS is not a 64-bit code
  segment (docs/oracles.md §5, gdb_write_reg_cs64). For a CR3 at or above 4 GiB we first make CS a 64-bit
  segment: with CR0.PE=1, PG=0 and EFER.LMA=1 the gdbstub loads CS from the reset GDT (base 0), so
  a long-mode code descriptor written for a moment at physical 8 gives CS.L=1, and later writes are
  8 bytes wide. Every register is read back and compared.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from typing import Sequence

from harness.qemu.gdb import GdbClient
from harness.qemu.process import NOT_FOUND, QemuProcess, qemu_binary
from harness.qemu.qmp import Qmp
from harness.qemu.ram import BELOW_4G, FOUR_GIB, RamFile, ram_size_for, round_ram_size
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.base import MemoryBase
from x86pt.state import CR0_ET, CR0_PE, CR0_PG, EFER_LMA, EFER_LME, PagingState

# Long-mode code descriptor (L=1, D=0, P, DPL0, type 0xb): the value every 64-bit GDT uses.
CODE64_DESCRIPTOR = 0x00AF9B000000FFFF


class QemuMonitor:
    """A paused QEMU (TCG, -cpu max) whose RAM holds `memory` and whose CR0/CR3/CR4/EFER are
    `state`'s. Use as a context manager; close() is idempotent and also runs at exit."""

    def __init__(
        self,
        memory: MemoryBase,
        state: PagingState,
        ram_size: int | None = None,
        *,
        cpu: str = "max",
        binary: str | None = None,
        timeout: float = 20.0,
        strict: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.qemu: QemuProcess | None = None
        self.ram: RamFile | None = None
        self.qmp: Qmp | None = None
        self.gdb: GdbClient | None = None
        self._cs64 = False
        self.state: PagingState | None = None
        self.hidden: list[tuple[int, int]] = []  # image ranges QEMU cannot see (strict=False)
        self.version = ""
        self.timeout = timeout
        self.launch_seconds = 0.0
        binary = binary or qemu_binary()
        if binary is None:
            raise OracleUnavailable(NOT_FOUND)
        size = round_ram_size(ram_size) if ram_size is not None else ram_size_for(memory)
        if size > 1 << 46:
            raise BadInputError(f"ram_size {size:#x} is too large")
        t0 = time.monotonic()
        try:
            self.qemu = qemu = QemuProcess()
            self.ram = ram = RamFile(qemu.path(""), size)
            args = [
                binary,
                "-S",
                "-nographic",
                "-nodefaults",
                "-no-user-config",
                "-accel",
                "tcg",
                "-cpu",
                cpu,
                "-m",
                f"{size >> 20}M",
                "-object",
                f"memory-backend-file,id=ram,size={size >> 20}M,mem-path={self.ram.path},share=on",
                "-machine",
                f"pc,memory-backend=ram,max-ram-below-4g={BELOW_4G >> 20}M",
                "-qmp",
                f"unix:{qemu.path('qmp.sock')},server=on,wait=off",
                "-chardev",
                f"socket,id=x86ptgdb,path={qemu.path('gdb.sock')},server=on,wait=off",
                "-gdb",
                "chardev:x86ptgdb",
                *extra_args,
            ]
            proc = qemu.start(args)
            # QEMU boots (~40 ms) while we copy the image: the file is shared, order is free.
            self.hidden = ram.load(memory, strict=strict)
            deadline = time.monotonic() + timeout
            self.qmp = Qmp(
                qemu.connect("qmp.sock", "QMP", deadline), timeout=timeout, proc=proc, stderr=qemu.stderr
            )
            self.gdb = gdb = GdbClient(qemu.connect("gdb.sock", "gdbstub", deadline), timeout)
            # The backend is created before the monitor answers: QEMU holds the RAM file now,
            # and both sockets are connected. Drop every name, so a SIGKILL leaves nothing behind.
            ram.unlink()
            qemu.forget_dir()
            gdb.load_register_map()
            self.version = self.qmp.version
            self.set_state(state)
        except BaseException:
            self.close()
            raise
        self.launch_seconds = time.monotonic() - t0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "QemuMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.qemu is not None:
            self.qemu.close()  # kill first: a QMP goodbye to a live QEMU is not needed
        if self.qmp is not None:
            self.qmp.close()
        if self.gdb is not None:
            with contextlib.suppress(OSError):
                self.gdb.sock.close()
        self.qmp = self.gdb = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    @property
    def proc(self):
        """QEMU's Popen (None before the start)."""
        return self.qemu.proc if self.qemu is not None else None

    @property
    def alive(self) -> bool:
        return self.qemu is not None and self.qemu.alive and self.qmp is not None and not self.qmp.closed

    def _need(self) -> None:
        if not self.alive:
            raise OracleError(
                "the QEMU monitor is closed or QEMU has exited"
                + (f": {self.qemu.why_dead()}" if self.qemu is not None and self.qemu.stderr else "")
            )

    # The parts, for a caller that checked _need() (or gets a one-line error here).
    @property
    def _qmp(self) -> Qmp:
        if self.qmp is None:
            raise OracleError("the QEMU monitor is closed")
        return self.qmp

    @property
    def _gdb(self) -> GdbClient:
        if self.gdb is None:
            raise OracleError("the QEMU monitor is closed")
        return self.gdb

    @property
    def _ram(self) -> RamFile:
        if self.ram is None:
            raise OracleError("the QEMU monitor is closed")
        return self.ram

    # -- state ---------------------------------------------------------------------------------------------
    def set_state(self, state: PagingState) -> None:
        """Load CR4, CR3, EFER, CR0 (that order, docs/oracles.md §5), then read them back."""
        self._need()
        g = self._gdb
        wide = max(state.cr0, state.cr3, state.cr4, state.efer) >= FOUR_GIB
        # PG off first: LA57 may only change with paging off, and leaving long mode also drops
        # the 64-bit CS (cpu_x86_update_cr0), so the wide-write setup below comes after it.
        g.write_register("cr0", CR0_PE | CR0_ET)
        self._cs64 = False
        if wide:
            self._enter_cs64()
        g.write_register("cr4", state.cr4)
        g.write_register("cr3", state.cr3)
        g.write_register("efer", state.efer)
        g.write_register("cr0", state.cr0)
        got = {r: g.read_register(r) for r in ("cr0", "cr3", "cr4", "efer")}
        # CR0.ET reads as 1 on every CPU since the 486DX (SDM docs/oracles.md §5); QEMU forces it too.
        want = {"cr0": state.cr0 | CR0_ET, "cr3": state.cr3, "cr4": state.cr4, "efer": state.efer}
        # QEMU sets EFER.LMA itself when PG turns on with LME (cpu_x86_update_cr0).
        lma = EFER_LMA if state.cr0 & CR0_PG and state.efer & EFER_LME else 0
        want["efer"] = (state.efer & ~EFER_LMA) | lma
        bad = [f"{r}={got[r]:#x} (wanted {want[r]:#x})" for r in want if got[r] != want[r]]
        if bad:
            raise OracleError("QEMU did not take the control registers: " + ", ".join(bad))
        self.state = state

    def _enter_cs64(self) -> None:
        """Make CS a 64-bit code segment so the gdbstub takes 8-byte CR writes (see module doc)."""
        g = self._gdb
        saved = self._ram.read(8, 8)
        try:
            g.write_register("efer", EFER_LME | EFER_LMA)
            self._ram.write_u64(8, CODE64_DESCRIPTOR)
            # x86_cpu_gdb_load_seg only reloads when the selector changes.
            g.write_register("cs", 0)
            g.write_register("cs", 8)
        finally:
            self._ram.write(8, saved)
        probe = 0x123456789000
        g.write_register("cr3", probe)
        if g.read_register("cr3") != probe:
            raise OracleError(
                "cannot make QEMU's gdbstub take 64-bit control-register writes; keep CR3 below 4 GiB"
            )
        self._cs64 = True

    def load(
        self, memory: MemoryBase, state: PagingState | None = None, *, clear: bool = True, strict: bool = True
    ) -> None:
        """Replace the RAM contents (QEMU's debug walker reads RAM directly: no relaunch)."""
        self._need()
        if clear:
            self._ram.clear()
        self.hidden = self._ram.load(memory, strict=strict)
        if state is not None:
            self.set_state(state)

    def write_memory(self, pa: int, data: bytes) -> None:
        self._need()
        self._ram.write(pa, data)

    def read_memory(self, pa: int, n: int) -> bytes:
        self._need()
        return self._ram.read(pa, n)

    # -- queries --------------------------------------------------------------------------------------------
    def hmp(self, command: str, timeout: float | None = None) -> str:
        """A human-monitor command through QMP; returns its text output."""
        self._need()
        if "\n" in command:
            raise BadInputError("one HMP command per call")
        return self._qmp.hmp(command, timeout)

    def gva2gpa(self, va: int) -> int | None:
        """QEMU's debug translation of `va`; None when it says 'Unmapped' (also non-canonical)."""
        return self.gva2gpa_many([va])[0]

    def gva2gpa_many(self, vas: Sequence[int], batch: int = 64) -> list[int | None]:
        """gva2gpa of every address, `batch` commands in flight at a time (QMP answers in order;
        docs/oracles.md §5.1 has the speed-up)."""
        for va in vas:
            if not 0 <= va < 1 << 64:
                raise BadInputError(f"virtual address {va:#x} is not a 64-bit value")
        self._need()
        out: list[int | None] = []
        for i in range(0, len(vas), batch):
            chunk = vas[i : i + batch]
            texts = self._qmp.pipeline(
                [("human-monitor-command", {"command-line": f"gva2gpa {va:#x}"}) for va in chunk]
            )
            out.extend(_gpa(va, str(t)) for va, t in zip(chunk, texts))
        return out

    def info_tlb(self) -> str:
        return self.hmp("info tlb", timeout=max(self.timeout, 120.0))

    def info_mem(self) -> str:
        return self.hmp("info mem", timeout=max(self.timeout, 120.0))

    def cpu_property(self, name: str):
        """A QOM property of the (only) vCPU, e.g. 'vendor', 'pdpe1gb', 'phys-bits': what the CPU
        model really became, after -cpu's +/- flags."""
        self._need()
        cpus = self._qmp.command("query-cpus-fast")
        if not cpus:
            raise OracleError("QMP query-cpus-fast returned no vCPU")
        return self._qmp.command("qom-get", {"path": cpus[0]["qom-path"], "property": name})

    def registers(self) -> dict[str, int]:
        self._need()
        return {r: self._gdb.read_register(r) for r in ("cr0", "cr2", "cr3", "cr4", "efer")}

    def dump_guest_memory(self, path: str, timeout: float = 600.0) -> None:
        """QMP dump-guest-memory (paging=false: physical RAM as ELF PT_LOADs + QEMU CPU notes),
        written to a temporary name next to `path` and renamed (atomic)."""
        self._need()
        directory = os.path.dirname(os.path.abspath(path)) or "."
        fd, tmp = tempfile.mkstemp(prefix=".x86pt-dump-", dir=directory)
        os.close(fd)
        try:
            self._qmp.command(
                "dump-guest-memory", {"paging": False, "protocol": f"file:{tmp}"}, timeout=timeout
            )
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _gpa(va: int, text: str) -> int | None:
    out = text.strip()
    if out == "Unmapped":
        return None
    m = re.fullmatch(r"gpa: (?:0x)?([0-9a-fA-F]+)", out)
    if not m:
        raise OracleError(f"unexpected gva2gpa answer for {va:#x}: {out[:80]!r}")
    return int(m.group(1), 16)
