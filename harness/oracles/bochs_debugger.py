# SPDX-License-Identifier: GPL-2.0-or-later
"""Bochs 2.7 as the rig starts it: found on PATH with a VGA ROM, configured by a bochsrc of ours
(the rig's reset ROM bios.bin, headless, panics fatal), run in a private work directory, and its
built-in debugger driven through a pipe given as its -rc file (/dev/fd/N, inherited): we write
commands and read what it prints on stdout until an end marker (BochsSession.exchange).

    bochs -q -f <dir>/bochsrc -rc /dev/fd/N        (stdin /dev/null, own session, headless)

Bochs ignores SIGTERM: every start runs in its own session and its process group is killed with
SIGKILL on every path; the work directory is removed on every path. A triple fault is a Bochs
panic (`reset_on_triple_fault=0`, `panic: action=fatal`), so Bochs exits; that, a timeout, or
anything unexpected on the debugger's output is an OracleError with Bochs' output tail.

The oracle (harness/oracles/bochs.py) and DebuggerRun, a free-form guest under the debugger for
the TLB experiments, are built on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import time
from typing import Sequence

from x86pt.errors import BadInputError, OracleError, OracleUnavailable

from harness import guest
from harness.process_group import kill_group
from harness.scratch import ScratchDir

BOCHS_BINARY = "bochs"
ROM_PATH = os.path.join(os.path.dirname(guest.__file__), "bios.bin")
# Bochs refuses to start without a VGA ROM; Debian's vgabios package ships this one.
VGA_ROMS = ("/usr/share/vgabios/vgabios-stdvga.bin", "/usr/share/bochs/VGABIOS-lgpl-latest")
DEFAULT_CPU = "tigerlake"  # docs/oracles.md "Bochs": PKU, SMEP, SMAP, 1G pages, NX; no LA57
LOAD_BASE = guest.HARNESS_GPA  # optramimage1 address: the file holds [LOAD_BASE, end)
MARK = 0x5A17E0D  # `? MARK` prints "0x5a17e0d 94469645": the end of a reply
_MARK_LINE = f"{MARK:#x} {MARK}"

_XP_FIND = re.compile(r"^0x([0-9a-f]+) <[^>\n]*>:[ \t]+0x([0-9a-f]+)(?:[ \t]+0x([0-9a-f]+))?[ \t]*$", re.M)
_CPUID_RE = re.compile(r"CPUID\[0x([0-9a-f]+)\]: ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8})")


def bochs_binary() -> str | None:
    return shutil.which(BOCHS_BINARY)


def vga_rom() -> str | None:
    return next((p for p in VGA_ROMS if os.path.isfile(p)), None)


def available() -> tuple[bool, str]:
    """(usable here, why not): the binary on PATH, a VGA ROM and the shipped bios.bin."""
    if bochs_binary() is None:
        return False, f"{BOCHS_BINARY} not found on PATH (run tools/install_bochs.sh)"
    if vga_rom() is None:
        return False, f"no VGA ROM ({VGA_ROMS[0]}; run tools/install_bochs.sh)"
    if not os.path.isfile(ROM_PATH):
        return False, f"{ROM_PATH} is missing (run harness/guest/build_bios.sh)"
    return True, ""


def bochs_version(binary: str | None = None) -> str:
    """'Bochs x86 Emulator 2.7' (Bochs has no --version: its banner, printed by `-help`), plus the
    Debian package version when dpkg knows it."""
    binary = binary or bochs_binary()
    if binary is None:
        return ""
    try:
        out = subprocess.run(
            [binary, "-help", "cpu"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout + out.stderr).decode(errors="replace")
    m = re.search(r"Bochs x86 Emulator [0-9][^\s]*", text)
    ver = m.group(0) if m else "Bochs (version unknown)"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        d = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "bochs"], capture_output=True, timeout=10)
        if d.returncode == 0 and d.stdout.strip():
            ver += f" (Debian {d.stdout.decode().strip()})"
    return ver


def output_tail(text: str, n: int = 12) -> str:
    """Bochs' own reason when it gave one ("Bochs is exiting with the following message:"),
    else the last lines of its output without the ALSA noise and the banner."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("ALSA lib")]
    for i, ln in enumerate(lines):
        if "Bochs is exiting with the following message" in ln:
            why = [x.strip() for x in lines[i + 1 : i + 4] if not x.startswith("=")]
            return "Bochs is exiting: " + " ".join(why[:1])
    lines = [
        ln
        for ln in lines
        if not ln.startswith("=")
        and "Bochs x86 Emulator" not in ln
        and "Built from" not in ln
        and "Timestamp:" not in ln
    ]
    return "\n".join(lines[-n:])


def write_bochsrc(workdir: str, ram_mib: int, cpu: str, ram_image: str | None = None) -> str:
    """Write <workdir>/bochsrc: our reset ROM, headless, panics fatal, the log in <workdir>/bochs.log,
    `ram_image` (when given) loaded at LOAD_BASE with optramimage1. Returns its path."""
    text = "\n".join(
        [
            f"memory: guest={ram_mib}, host={ram_mib}",
            f"romimage: file={ROM_PATH}, address=0xffff0000",
            f"vgaromimage: file={vga_rom()}",
            *([f"optramimage1: file={ram_image}, address={LOAD_BASE:#x}"] if ram_image else []),
            f"cpu: model={cpu}, count=1, reset_on_triple_fault=0",
            "display_library: term",
            f"log: {os.path.join(workdir, 'bochs.log')}",
            "panic: action=fatal",
            "error: action=report",
            "info: action=report",
            "debug: action=ignore",
            "clock: sync=none",
            "",
        ]
    )
    path = os.path.join(workdir, "bochsrc")
    with open(path, "w", encoding="ascii") as f:
        f.write(text)
    return path


def checked_binary(binary: str | None, cpu: str) -> str:
    """The Bochs binary to run (`binary` or the one on PATH), after checking that Bochs can run
    here (available()) and that `cpu` is a plausible CPU model name."""
    binary = binary or bochs_binary()
    ok, why = available()
    if binary is None or not ok:
        raise OracleUnavailable(why or f"{BOCHS_BINARY} not found on PATH (run tools/install_bochs.sh)")
    if not re.fullmatch(r"[a-z0-9_]+", cpu):
        raise BadInputError(f"bad Bochs CPU model {cpu!r} (see `bochs -help cpu`)")
    return binary


class BochsWorkdir(ScratchDir):
    """Bochs' scratch directory in $TMPDIR (bochsrc, RAM image, dumps, log); `log` keeps the log
    Bochs wrote once close() has run."""

    def __init__(self, prefix: str) -> None:
        super().__init__(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-"))
        self.log: str | None = None

    def close(self) -> None:
        if self.dir is not None:
            self.log = self.read_text("bochs.log")
        super().close()


class BochsSession:
    """One Bochs process with its debugger on a pipe; the scratch directory it reads from.
    close() kills the process group and removes the directory, whatever happened."""

    def __init__(self, binary: str, bochsrc: str, workdir: str, deadline: float) -> None:
        self.deadline = deadline
        self.proc: subprocess.Popen | None = None
        self.out = bytearray()
        self.pos = 0  # how much of self.out the parser has consumed
        self.errpath = os.path.join(workdir, "stderr.txt")
        rfd, self.wfd = os.pipe()
        try:
            with open(self.errpath, "wb") as err:
                self.proc = subprocess.Popen(
                    [binary, "-q", "-f", bochsrc, "-rc", f"/dev/fd/{rfd}"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=workdir,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(rfd,),
                    env={**os.environ, "TERM": os.environ.get("TERM") or "dumb"},
                )
        except OSError as e:
            os.close(self.wfd)
            self.wfd = -1
            raise OracleUnavailable(f"cannot start {binary}: {e.strerror}") from None
        finally:
            os.close(rfd)
        os.set_blocking(self.wfd, False)

    def stderroutput_tail(self) -> str:
        try:
            with open(self.errpath, "rb") as f:
                err = f.read().decode(errors="replace")
        except OSError:
            err = ""
        return output_tail(err + "\n" + self.out.decode(errors="replace"))

    def exchange(self, commands: list[str], what: str) -> list[str]:
        """Send `commands` plus the end marker; the lines Bochs printed until the marker."""
        data = ("\n".join(commands + [f"? {MARK:#x}"]) + "\n").encode()
        fd = self.proc.stdout.fileno()
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise OracleError(
                    f"Bochs did not finish {what} in time (killed)"
                    + (f"; its output ends: {self.stderroutput_tail()}" if self.stderroutput_tail() else "")
                )
            wl = [self.wfd] if data else []
            r, w, _ = select.select([fd], wl, [], min(left, 1.0))
            if w:
                try:
                    n = os.write(self.wfd, data)
                    data = data[n:]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    data = b""
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise OracleError(f"Bochs exited during {what}: {self.stderroutput_tail()}")
                self.out += chunk
                end = self.out.find(_MARK_LINE.encode(), self.pos)
                if end >= 0:
                    nl = self.out.find(b"\n", end)
                    if nl >= 0:
                        text = self.out[self.pos : end].decode(errors="replace")
                        self.pos = nl + 1
                        return text.splitlines()

    def close(self, graceful: bool = False) -> None:
        """Kill Bochs; `graceful` first asks it to quit (`q`, ~0.1 s), which flushes its log."""
        if self.wfd >= 0:
            if graceful:
                with contextlib.suppress(OSError):
                    os.write(self.wfd, b"q\n")
            with contextlib.suppress(OSError):
                os.close(self.wfd)
            self.wfd = -1
        proc, self.proc = self.proc, None
        if proc is not None:
            if graceful:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
            kill_group(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def parse_xp(lines: Sequence[str]) -> dict[int, int]:
    """qwords printed by `xp /Ngx` (one or two per line): {physical address: value}."""
    out: dict[int, int] = {}
    for addr, v0, v1 in _XP_FIND.findall("\n".join(lines)):
        a = int(addr, 16)
        out[a] = int(v0, 16)
        if v1:
            out[a + 8] = int(v1, 16)
    return out


def cpuid_from_log(log: str) -> dict[int, tuple[int, int, int, int]]:
    """The CPUID leaves Bochs writes to its log at reset ("CPUID[0x00000007]: eax ebx ecx edx")."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for m in _CPUID_RE.finditer(log):
        out.setdefault(int(m.group(1), 16), tuple(int(x, 16) for x in m.groups()[1:]))
    return out


def vendor_of(cpuid: dict[int, tuple[int, int, int, int]]) -> str:
    if 0 not in cpuid:
        return "unknown"
    _, ebx, ecx, edx = cpuid[0]
    v = struct.pack("<III", ebx, edx, ecx).decode(errors="replace")
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(v, v)


# -- a free-form guest under the debugger (TLB experiments) ----------------------------------------------
class DebuggerRun:
    """Bochs at its reset vector with the rig's reset ROM (bios.bin: long mode from the boot block
    at guest.PARAMS_GPA + 0x100, then a jump to guest.ENTRY_VA), guest RAM written through the
    debugger (`setpmem`, 4 bytes at a time; no optramimage), and the debugger left to the caller:
    `exchange(commands)` returns what Bochs printed. A context manager: on exit Bochs is asked to
    quit (so its log, with the CPUID table, is complete in `log`), its process group is killed and
    the scratch directory removed, whatever happened."""

    def __init__(
        self,
        ram: dict[int, bytes],
        *,
        cpu: str = DEFAULT_CPU,
        ram_mib: int = 32,
        timeout: float = 60.0,
        binary: str | None = None,
    ) -> None:
        self.binary = checked_binary(binary, cpu)
        self.ram, self.cpu, self.ram_mib, self.timeout = ram, cpu, ram_mib, timeout
        self.log = ""
        self.workdir: str | None = None
        self.session: BochsSession | None = None

    def __enter__(self) -> "DebuggerRun":
        self._wd = BochsWorkdir("x86pt-bochs-dbg")
        self.workdir = self._wd.dir
        try:
            rc = write_bochsrc(self.workdir, self.ram_mib, self.cpu)
            self.session = BochsSession(self.binary, rc, self.workdir, time.monotonic() + self.timeout)
            cmds = []
            for pa, data in sorted(self.ram.items()):
                data = bytes(data) + bytes(-len(data) % 4)
                for off in range(0, len(data), 4):
                    v = struct.unpack_from("<I", data, off)[0]
                    if v:
                        cmds.append(f"setpmem {pa + off:#x} 4 {v:#x}")
            self.exchange(cmds, "loading guest RAM")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def exchange(self, commands: list[str], what: str = "a debugger command") -> list[str]:
        return self.session.exchange(commands, what)

    def read_qwords(self, pa: int, n: int) -> list[int]:
        """n qwords of physical memory from pa (`xp`); OracleError if Bochs printed fewer."""
        got = parse_xp(self.exchange([f"xp /{n}gx {pa:#x}"], "reading memory"))
        try:
            return [got[pa + 8 * i] for i in range(n)]
        except KeyError:
            raise OracleError(f"Bochs' debugger did not print {n} qwords at {pa:#x}") from None

    def __exit__(self, *exc) -> None:
        try:
            if self.session is not None:
                self.session.close(graceful=True)
        finally:
            self.session = None
            if self.workdir is not None:
                self._wd.close()
                self.log = self._wd.log or ""
                self.workdir = None
