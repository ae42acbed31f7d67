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
* RAM is a `memory-backend-file` on tmpfs (/dev/shm) that we create, mmap MAP_SHARED and fill from
  Python; QEMU does not clear it. Both processes map it, so the path is unlinked as soon as QEMU has
  opened it, and nothing can leak on disk even if we are killed.
* QMP and the gdbstub listen on unique unix sockets in a private temp directory, also unlinked
  once connected. QEMU runs in its own process group with PR_SET_PDEATHSIG=SIGKILL, so it dies with
  us; close() (also via atexit) kills the group.
* The pc machine maps RAM at [0, below_4g) and [4 GiB, ...); we pin `max-ram-below-4g=3G` so the
  split is known. [0xc0000, 0x100000) is ROM space, not RAM, in that machine: refused (strict).
* gdbstub register writes to CRn/EFER take only the low 4 bytes while CS is not a 64-bit code
  segment (docs/oracles.md §5, gdb_write_reg_cs64). For a CR3 at or above 4 GiB we first make CS a 64-bit
  segment: with CR0.PE=1, PG=0 and EFER.LMA=1 the gdbstub loads CS from the reset GDT (base 0), so
  a long-mode code descriptor written for a moment at physical 8 gives CS.L=1, and later writes are
  8 bytes wide. Every register is read back and compared.

Also: QemuMonitorOracle, the Oracle-protocol wrapper "qemu-monitor" (translation only).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import json
import mmap
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.base import PAGE, MemoryBase
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (CR0_ET, CR0_PE, CR0_PG, EFER_LMA, EFER_LME, PagingState)

from x86pt.oracle import RIG_RAM_SIZE, BatchResult, Capabilities, Probe, ProbeResult

QEMU_BINARY = "qemu-system-x86_64"
MiB = 1 << 20
GiB = 1 << 30
FOUR_GIB = 1 << 32
# Pinned with -machine max-ram-below-4g so the low/high RAM split of the pc machine is known.
BELOW_4G = 3 * GiB
# pc machine after reset (PAM registers 0): 0xc0000-0xdffff reads as zeros and 0xe0000-0xfffff as
# the BIOS ROM, whatever the RAM file holds there (measured with `xp` on 7.2.22; 0xa0000-0xbffff
# is RAM because -nodefaults leaves no VGA).
LEGACY_HOLE = (0xC0000, 0x100000)
# Long-mode code descriptor (L=1, D=0, P, DPL0, type 0xb): the value every 64-bit GDT uses.
CODE64_DESCRIPTOR = 0x00AF9B000000FFFF
_Q = struct.Struct("<Q")
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


# -- process plumbing shared with harness/oracles/qemu.py --------------------------------------------
def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def qemu_available() -> bool:
    return qemu_binary() is not None


@functools.lru_cache(maxsize=4)
def qemu_version(binary: str | None = None) -> str:
    """First line of `qemu-system-x86_64 --version`, e.g. 'QEMU emulator version 7.2.22 (...)'."""
    binary = binary or qemu_binary()
    if binary is None:
        raise OracleUnavailable(f"{QEMU_BINARY} not found on PATH (run tools/install_qemu.sh)")
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise OracleUnavailable(f"{binary} --version failed: {e}") from None
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG: QEMU gets SIGKILL when the test process dies, so a killed pytest cannot
    # leave a VM behind. Linux ties it to the *thread* that forked: a QemuMonitor created in a
    # short-lived worker thread dies with that thread, so create monitors in long-lived threads.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_qemu(args: list[str], stderr, pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start QEMU in its own process group (so kill_group reaches every thread/child)."""
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                start_new_session=True, preexec_fn=_die_with_parent, close_fds=True,
                                pass_fds=tuple(pass_fds))
    except OSError as e:
        raise OracleUnavailable(f"cannot start {args[0]}: {e.strerror}") from None


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for QEMU to exit; subprocess.TimeoutExpired after `timeout` seconds. A pidfd wakes us
    the moment it exits (Popen.wait(timeout) polls with sleeps growing to 50 ms, which doubled
    the cost of a short QEMU run)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return proc.wait(timeout=timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            poller.poll(max(1, int(left * 1000)))
        return proc.returncode
    finally:
        os.close(pidfd)


def kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL QEMU's process group and reap it. Safe to call twice."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def read_stderr(f) -> str:
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
        return f.read().decode(errors="replace").strip()
    return ""


def scratch_dir() -> str:
    """A private directory on tmpfs (RAM files must not hit the disk), else in $TMPDIR."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=f"x86pt-qemu-{os.getpid()}-", dir=base)


def round_ram_size(size: int) -> int:
    """QEMU wants whole MiB; we use 2 MiB multiples so large pages of the backend line up."""
    return max(2 * MiB, -(-size // (2 * MiB)) * (2 * MiB))


def ram_size_for(memory: MemoryBase, minimum: int = RIG_RAM_SIZE) -> int:
    """The smallest RAM that holds every byte of `memory` (above the pc machine's 3 GiB split the
    guest addresses jump to 4 GiB, so an image reaching past 4 GiB needs RAM = end - 1 GiB)."""
    end = memory.end
    need = end if end <= BELOW_4G else BELOW_4G + (end - FOUR_GIB if end > FOUR_GIB else 0)
    return round_ram_size(max(minimum, need))


@dataclass(frozen=True)
class RamLayout:
    """Where guest-physical addresses live in the RAM file of a pc machine of `size` bytes."""

    size: int

    @property
    def below_4g(self) -> int:
        return min(self.size, BELOW_4G)

    @property
    def above_4g(self) -> int:
        return self.size - self.below_4g

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Guest-physical [start, end) ranges that are RAM."""
        out = [(0, self.below_4g)]
        if self.above_4g:
            out.append((FOUR_GIB, FOUR_GIB + self.above_4g))
        return out

    def offset(self, pa: int, n: int = 1) -> int:
        """File offset of guest-physical `pa`; the n bytes must sit in one RAM range."""
        if 0 <= pa and pa + n <= self.below_4g:
            return pa
        if FOUR_GIB <= pa and pa + n <= FOUR_GIB + self.above_4g:
            return self.below_4g + pa - FOUR_GIB
        ranges = ", ".join(f"[{a:#x}, {b:#x})" for a, b in self.ranges)
        raise BadInputError(f"guest-physical {pa:#x}+{n:#x} is not RAM of the QEMU pc machine with "
                            f"{self.size >> 20} MiB (RAM is at {ranges}); give a larger ram_size "
                            "or move the data")


class RamFile:
    """The guest RAM: a file on tmpfs, mmap'd MAP_SHARED here and by QEMU."""

    def __init__(self, directory: str, size: int, name: str = "ram") -> None:
        self.layout = RamLayout(round_ram_size(size))
        self.path: str | None = os.path.join(directory, name)
        self.fd = -1
        self.map: mmap.mmap | None = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, self.layout.size)
            self.map = mmap.mmap(self.fd, self.layout.size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise OracleError(f"cannot create the {size >> 20} MiB RAM file in {directory}: "
                              f"{e.strerror}") from None

    @property
    def size(self) -> int:
        return self.layout.size

    def write(self, pa: int, data: bytes) -> None:
        off = self.layout.offset(pa, len(data))
        self.map[off:off + len(data)] = data

    def read(self, pa: int, n: int) -> bytes:
        off = self.layout.offset(pa, n)
        return self.map[off:off + n]

    def read_u64(self, pa: int) -> int:
        return _Q.unpack_from(self.map, self.layout.offset(pa, 8))[0]

    def write_u64(self, pa: int, value: int) -> None:
        _Q.pack_into(self.map, self.layout.offset(pa, 8), value)

    def zero(self, pa: int, n: int) -> None:
        off = self.layout.offset(pa, n)
        self.map[off:off + n] = bytes(n)

    def load(self, memory: MemoryBase, *, strict: bool = True) -> list[tuple[int, int]]:
        """Copy every byte `memory` holds into RAM at its guest-physical address. Data in the
        legacy hole [0xc0000, 0x100000) is refused when strict (QEMU would not see it), else
        copied anyway and returned as a list of (start, end) ranges the guest cannot see."""
        hidden: list[tuple[int, int]] = []
        if isinstance(memory, SparseMemory):
            chunks = ((pn * PAGE, page) for pn, page in sorted(memory.pages.items()))
        else:
            chunks = _segment_chunks(memory)
        for pa, data in chunks:
            end = pa + len(data)
            if pa < LEGACY_HOLE[1] and end > LEGACY_HOLE[0] and any(data):
                if strict:
                    raise BadInputError(
                        f"the image holds data at {max(pa, LEGACY_HOLE[0]):#x}, inside "
                        f"[{LEGACY_HOLE[0]:#x}, {LEGACY_HOLE[1]:#x}) which a QEMU pc machine maps "
                        "to option-ROM space and the BIOS ROM, not RAM")
                hidden.append((max(pa, LEGACY_HOLE[0]), min(end, LEGACY_HOLE[1])))
            self.write(pa, bytes(data))
        return hidden

    def clear(self) -> None:
        """All RAM back to zero. MADV_REMOVE frees the tmpfs pages (cheap even for many GiB)."""
        try:
            self.map.madvise(mmap.MADV_REMOVE)
        except (OSError, AttributeError):
            step = 64 * MiB
            for off in range(0, self.size, step):
                n = min(step, self.size - off)
                self.map[off:off + n] = bytes(n)

    def unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None

    def close(self) -> None:
        self.unlink()
        if self.map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.map.close()
            self.map = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _segment_chunks(memory: MemoryBase, chunk: int = 4 * MiB):
    for seg in memory.segments():
        pa = seg.start
        while pa < seg.end:
            n = min(chunk, seg.end - pa)
            yield pa, memory.read(pa, n)
            pa += n


def connect_unix(path: str, proc: subprocess.Popen, deadline: float, what: str,
                 stderr) -> socket.socket:
    """Connect to a socket QEMU is about to create; fail early if QEMU exits."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if proc.poll() is not None:
            raise OracleError(f"QEMU exited with status {proc.returncode} before its {what} socket "
                              f"was ready: {read_stderr(stderr) or 'no message'}")
        if time.monotonic() > deadline:
            raise OracleError(f"QEMU's {what} socket did not appear in time")
        time.sleep(0.002)


# -- QMP -----------------------------------------------------------------------------------------------
class QmpClient:
    """QEMU Machine Protocol over a connected unix socket: one JSON object per line."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = b""
        self._next_id = 0
        self.greeting = self._read_message(time.monotonic() + timeout)
        if "QMP" not in self.greeting:
            raise OracleError(f"unexpected QMP greeting: {self.greeting!r:.200}")
        self.command("qmp_capabilities")

    @property
    def version(self) -> str:
        v = self.greeting["QMP"].get("version", {})
        q = v.get("qemu", {})
        pkg = v.get("package", "").strip()
        num = f"{q.get('major', '?')}.{q.get('minor', '?')}.{q.get('micro', '?')}"
        return f"QEMU {num}" + (f" {pkg}" if pkg else "")

    def _read_message(self, deadline: float) -> dict:
        # A reply can be tens of MB (`info tlb` of a big image): append to a bytearray and only
        # scan the bytes that arrived since the last look, or reading becomes quadratic.
        buf = self._buf if isinstance(self._buf, bytearray) else bytearray(self._buf)
        scanned = 0
        nl = buf.find(b"\n")
        while nl < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OracleError("QMP: no answer in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise OracleError("QMP: no answer in time") from None
            except OSError as e:
                raise OracleError(f"QMP: {e}") from None
            if not data:
                raise OracleError("QMP: QEMU closed the connection")
            scanned = len(buf)
            buf += data
            nl = buf.find(b"\n", scanned)
        line = bytes(buf[:nl])
        del buf[:nl + 1]
        self._buf = buf
        try:
            return json.loads(line)
        except ValueError:
            raise OracleError(f"QMP: not JSON: {line[:200]!r}") from None

    def command(self, name: str, arguments: dict | None = None, timeout: float | None = None):
        self._next_id += 1
        msg: dict = {"execute": name, "id": self._next_id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise OracleError(f"QMP {name}: {e}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if "event" in reply or reply.get("id") != self._next_id:
                continue     # asynchronous events (STOP, RESUME, DUMP_COMPLETED...) are not ours
            if "error" in reply:
                err = reply["error"]
                raise OracleError(f"QMP {name}: {err.get('class', 'Error')}: {err.get('desc', err)}")
            return reply.get("return")


# -- GDB remote serial protocol --------------------------------------------------------------------------
class GdbClient:
    """The few RSP packets we need: register read/write and memory-free queries."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = b""
        self.registers: dict[str, tuple[int, int]] = {}    # name -> (number, bytes)

    def _recv(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OracleError("gdbstub: no answer in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            raise OracleError("gdbstub: no answer in time") from None
        except OSError as e:
            raise OracleError(f"gdbstub: {e}") from None
        if not data:
            raise OracleError("gdbstub: QEMU closed the connection")
        self._buf += data

    def packet(self, data: str) -> str:
        body = data.encode()
        frame = b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF)
        deadline = time.monotonic() + self.timeout
        for _attempt in range(3):
            self.sock.sendall(frame)
            while True:
                # Skip acks and stray characters up to the reply frame.
                start = self._buf.find(b"$")
                nack = self._buf.find(b"-")
                if nack >= 0 and (start < 0 or nack < start):
                    self._buf = self._buf[nack + 1:]
                    break            # resend
                if start >= 0:
                    end = self._buf.find(b"#", start)
                    if end >= 0 and len(self._buf) >= end + 3:
                        payload = self._buf[start + 1:end]
                        self._buf = self._buf[end + 3:]
                        self.sock.sendall(b"+")
                        return _rsp_unescape(payload).decode(errors="replace")
                self._recv(deadline)
        raise OracleError(f"gdbstub: packet {data[:20]!r} was refused three times")

    def load_register_map(self) -> None:
        """Number the registers from the target description (comments stripped: QEMU's i386
        XML has commented-out *_base registers that would shift the numbering, docs/oracles.md §5)."""
        regs: list[tuple[str, int, int | None]] = []
        self._collect("target.xml", regs, depth=0)
        num = 0
        for name, bits, regnum in regs:
            if regnum is not None:
                num = regnum
            self.registers[name] = (num, bits // 8)
            num += 1
        missing = [r for r in ("cs", "cr0", "cr3", "cr4", "efer") if r not in self.registers]
        if missing:
            raise OracleError(f"gdbstub target description lacks {', '.join(missing)}")

    def _collect(self, annex: str, regs: list, depth: int) -> None:
        if depth > 4:
            raise OracleError("gdbstub: target description includes nest too deep")
        xml = self._xfer(annex)
        xml = re.sub(r"<!--.*?-->", "", xml, flags=re.S)
        for m in re.finditer(r"<xi:include\s+href=\"([^\"]+)\"\s*/>|<reg\s([^>]*)>", xml):
            if m.group(1):
                self._collect(m.group(1), regs, depth + 1)
                continue
            attrs = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))
            regs.append((attrs.get("name", "?"), int(attrs.get("bitsize", "0")),
                         int(attrs["regnum"]) if "regnum" in attrs else None))

    def _xfer(self, annex: str) -> str:
        out = ""
        while True:
            reply = self.packet(f"qXfer:features:read:{annex}:{len(out):x},ffb")
            if not reply or reply[0] not in "ml":
                raise OracleError(f"gdbstub: cannot read {annex}: {reply[:40]!r}")
            out += reply[1:]
            if reply[0] == "l":
                return out

    def read_register(self, name: str) -> int:
        num, _width = self.registers[name]
        reply = self.packet(f"p{num:x}")
        try:
            return int.from_bytes(bytes.fromhex(reply), "little")
        except ValueError:
            raise OracleError(f"gdbstub: bad register read of {name}: {reply[:40]!r}") from None

    def write_register(self, name: str, value: int) -> None:
        num, width = self.registers[name]
        reply = self.packet(f"P{num:x}={value.to_bytes(width, 'little').hex()}")
        if reply != "OK":
            raise OracleError(f"gdbstub: write of {name}={value:#x} answered {reply!r}")


def _rsp_unescape(payload: bytes) -> bytes:
    if b"}" not in payload:
        return payload
    out = bytearray()
    it = iter(payload)
    for b in it:
        out.append((next(it, 0) ^ 0x20) if b == 0x7D else b)
    return bytes(out)


# -- monitor output --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlbLine:
    """One `info tlb` line: a present leaf (flags of the leaf entry only, docs/paging.md §13.3)."""

    va: int
    pa: int
    flags: str            # 9 letters XGPDACTUW, '-' when clear

    @property
    def nx(self) -> bool:
        return self.flags[0] == "X"

    @property
    def large(self) -> bool:
        return self.flags[2] == "P"


@dataclass(frozen=True)
class MemRange:
    """One `info mem` line: [start, end) with rights folded over all levels."""

    start: int
    end: int
    size: int
    rights: str           # 'urw' with '-' for clear bits


_TLB_RE = re.compile(r"^([0-9a-f]{16}): ([0-9a-f]{16}) ([-XGPDACTUW]{9})$")
_MEM_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16}) ([0-9a-f]{16}) ([-u][-r][-w])$")


def parse_info_tlb(text: str) -> list[TlbLine]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _TLB_RE.match(line)
        if not m:
            raise OracleError(f"unexpected 'info tlb' line: {line[:80]!r}")
        out.append(TlbLine(int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


def parse_info_mem(text: str) -> list[MemRange]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _MEM_RE.match(line)
        if not m:
            raise OracleError(f"unexpected 'info mem' line: {line[:80]!r}")
        out.append(MemRange(int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16), m.group(4)))
    return out


# -- the monitor ----------------------------------------------------------------------------------------
class QemuMonitor:
    """A paused QEMU (TCG, -cpu max) whose RAM holds `memory` and whose CR0/CR3/CR4/EFER are
    `state`'s. Use as a context manager; close() is idempotent and also runs at exit."""

    def __init__(self, memory: MemoryBase, state: PagingState, ram_size: int | None = None, *,
                 cpu: str = "max", binary: str | None = None, timeout: float = 20.0,
                 strict: bool = True, extra_args: Sequence[str] = ()) -> None:
        self.proc: subprocess.Popen | None = None
        self.ram: RamFile | None = None
        self.qmp: QmpClient | None = None
        self.gdb: GdbClient | None = None
        self._dir: str | None = None
        self._stderr = None
        self._cs64 = False
        self.state: PagingState | None = None
        self.hidden: list[tuple[int, int]] = []      # image ranges QEMU cannot see (strict=False)
        self.version = ""
        self.timeout = timeout
        self.launch_seconds = 0.0
        binary = binary or qemu_binary()
        if binary is None:
            raise OracleUnavailable(f"{QEMU_BINARY} not found on PATH (run tools/install_qemu.sh)")
        size = round_ram_size(ram_size) if ram_size is not None else ram_size_for(memory)
        if size > 1 << 46:
            raise BadInputError(f"ram_size {size:#x} is too large")
        atexit.register(self.close)
        t0 = time.monotonic()
        try:
            self._dir = scratch_dir()
            self.ram = RamFile(self._dir, size)
            qmp_path = os.path.join(self._dir, "qmp.sock")
            gdb_path = os.path.join(self._dir, "gdb.sock")
            args = [binary, "-S", "-nographic", "-nodefaults", "-no-user-config",
                    "-accel", "tcg", "-cpu", cpu, "-m", f"{size >> 20}M",
                    "-object", f"memory-backend-file,id=ram,size={size >> 20}M,"
                               f"mem-path={self.ram.path},share=on",
                    "-machine", f"pc,memory-backend=ram,max-ram-below-4g={BELOW_4G >> 20}M",
                    "-qmp", f"unix:{qmp_path},server=on,wait=off",
                    "-chardev", f"socket,id=x86ptgdb,path={gdb_path},server=on,wait=off",
                    "-gdb", "chardev:x86ptgdb", *extra_args]
            self._stderr = tempfile.TemporaryFile(dir=self._dir)
            self.proc = spawn_qemu(args, self._stderr)
            # QEMU boots (~40 ms) while we copy the image: the file is shared, order is free.
            self.hidden = self.ram.load(memory, strict=strict)
            deadline = time.monotonic() + timeout
            self.qmp = QmpClient(connect_unix(qmp_path, self.proc, deadline, "QMP", self._stderr),
                                 timeout)
            self.gdb = GdbClient(connect_unix(gdb_path, self.proc, deadline, "gdbstub", self._stderr),
                                 timeout)
            # The backend is created before the monitor answers: QEMU holds the RAM file now,
            # and both sockets are connected. Drop every name, so a SIGKILL leaves nothing behind.
            self.ram.unlink()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self.gdb.load_register_map()
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
        kill_group(self.proc)
        for s in (self.qmp, self.gdb):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.sock.close()
        self.qmp = self.gdb = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        if self._stderr is not None:
            with contextlib.suppress(OSError):
                self._stderr.close()
            self._stderr = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.close)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.qmp is not None

    def _need(self) -> None:
        if not self.alive:
            raise OracleError("the QEMU monitor is closed or QEMU has exited"
                              + (f": {read_stderr(self._stderr)}" if self._stderr else ""))

    # -- state ---------------------------------------------------------------------------------------------
    def set_state(self, state: PagingState) -> None:
        """Load CR4, CR3, EFER, CR0 (that order, docs/oracles.md §5), then read them back."""
        self._need()
        g = self.gdb
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
        g = self.gdb
        saved = self.ram.read(8, 8)
        try:
            g.write_register("efer", EFER_LME | EFER_LMA)
            self.ram.write_u64(8, CODE64_DESCRIPTOR)
            # x86_cpu_gdb_load_seg only reloads when the selector changes.
            g.write_register("cs", 0)
            g.write_register("cs", 8)
        finally:
            self.ram.write(8, saved)
        probe = 0x123456789000
        g.write_register("cr3", probe)
        if g.read_register("cr3") != probe:
            raise OracleError("cannot make QEMU's gdbstub take 64-bit control-register writes; "
                              "keep CR3 below 4 GiB")
        self._cs64 = True

    def load(self, memory: MemoryBase, state: PagingState | None = None, *, clear: bool = True,
             strict: bool = True) -> None:
        """Replace the RAM contents (QEMU's debug walker reads RAM directly: no relaunch)."""
        self._need()
        if clear:
            self.ram.clear()
        self.hidden = self.ram.load(memory, strict=strict)
        if state is not None:
            self.set_state(state)

    def write_memory(self, pa: int, data: bytes) -> None:
        self._need()
        self.ram.write(pa, data)

    def read_memory(self, pa: int, n: int) -> bytes:
        self._need()
        return self.ram.read(pa, n)

    # -- queries --------------------------------------------------------------------------------------------
    def hmp(self, command: str, timeout: float | None = None) -> str:
        """A human-monitor command through QMP; returns its text output."""
        self._need()
        if "\n" in command:
            raise BadInputError("one HMP command per call")
        out = self.qmp.command("human-monitor-command", {"command-line": command}, timeout)
        return out if isinstance(out, str) else str(out)

    def gva2gpa(self, va: int) -> int | None:
        """QEMU's debug translation of `va`; None when it says 'Unmapped' (also non-canonical)."""
        if not 0 <= va < 1 << 64:
            raise BadInputError(f"virtual address {va:#x} is not a 64-bit value")
        out = self.hmp(f"gva2gpa {va:#x}").strip()
        if out == "Unmapped":
            return None
        m = re.fullmatch(r"gpa: (?:0x)?([0-9a-fA-F]+)", out)
        if not m:
            raise OracleError(f"unexpected gva2gpa answer for {va:#x}: {out[:80]!r}")
        return int(m.group(1), 16)

    def info_tlb(self) -> str:
        return self.hmp("info tlb", timeout=max(self.timeout, 120.0))

    def info_mem(self) -> str:
        return self.hmp("info mem", timeout=max(self.timeout, 120.0))

    def cpu_property(self, name: str):
        """A QOM property of the (only) vCPU, e.g. 'vendor', 'pdpe1gb', 'phys-bits': what the CPU
        model really became, after -cpu's +/- flags."""
        self._need()
        cpus = self.qmp.command("query-cpus-fast")
        if not cpus:
            raise OracleError("QMP query-cpus-fast returned no vCPU")
        return self.qmp.command("qom-get", {"path": cpus[0]["qom-path"], "property": name})

    def registers(self) -> dict[str, int]:
        self._need()
        return {r: self.gdb.read_register(r) for r in ("cr0", "cr2", "cr3", "cr4", "efer")}

    def dump_guest_memory(self, path: str, timeout: float = 600.0) -> None:
        """QMP dump-guest-memory (paging=false: physical RAM as ELF PT_LOADs + QEMU CPU notes),
        written to a temporary name next to `path` and renamed (atomic)."""
        self._need()
        directory = os.path.dirname(os.path.abspath(path)) or "."
        fd, tmp = tempfile.mkstemp(prefix=".x86pt-dump-", dir=directory)
        os.close(fd)
        try:
            self.qmp.command("dump-guest-memory", {"paging": False, "protocol": f"file:{tmp}"},
                             timeout=timeout)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# -- Oracle-protocol wrapper ------------------------------------------------------------------------------
MONITOR_NOTES = (
    "translation only: gva2gpa uses QEMU's debug walker (P, PS, canonical form)",
    "rights are not checked: NX, U/S, WP, SMEP, SMAP, PKU and reserved bits are ignored",
    "A/D bits are never set; memory_after is the input image",
    "'Unmapped' (not present, or non-canonical) is reported as page_fault with error_code None",
    "reserved address bits pass into the physical address (bit 51 -> gpa 0x8000000000000+...)",
)


class QemuMonitorOracle:
    """Oracle "qemu-monitor": one paused QEMU per batch, one `gva2gpa` per probe. The access kind,
    CPL and AC of a probe do not matter to it (see MONITOR_NOTES)."""

    available = staticmethod(qemu_available)
    in_all = False    # translation only: no error codes, no A/D

    name = "qemu-monitor"
    profile = "qemu"

    def __init__(self, *, binary: str | None = None, cpu: str = "max", timeout: float = 20.0) -> None:
        self.binary = binary or qemu_binary()
        self.cpu = cpu
        self.timeout = timeout
        if self.binary is None:
            raise OracleUnavailable(f"{QEMU_BINARY} not found on PATH (run tools/install_qemu.sh)")

    def capabilities(self) -> Capabilities:
        # Page sizes and LA57 are walked by the debug walker whatever CPUID says; nothing that
        # depends on rights is enforced, so those capabilities are reported as absent.
        return Capabilities(name=self.name, vendor="amd", maxphyaddr=40, gbpages=True, la57=True,
                            pku=False, smep=False, smap=False, nx=False, rsvd_sets_p=False,
                            ram_size=RIG_RAM_SIZE, version=qemu_version(self.binary),
                            notes=MONITOR_NOTES)

    def run(self, memory: SparseMemory, state: PagingState, probes: Sequence[Probe]) -> BatchResult:
        t0 = time.monotonic()
        results: list[ProbeResult] = []
        with QemuMonitor(memory, state, cpu=self.cpu, binary=self.binary,
                         timeout=self.timeout) as mon:
            for p in probes:
                pa = mon.gva2gpa(p.va)
                if pa is None:
                    results.append(ProbeResult("page_fault", detail="gva2gpa: Unmapped"))
                else:
                    results.append(ProbeResult("ok", pa=pa, detail="gva2gpa"))
        after = memory.copy() if isinstance(memory, SparseMemory) else SparseMemory()
        return BatchResult(results, after, time.monotonic() - t0)

    def close(self) -> None:
        pass
