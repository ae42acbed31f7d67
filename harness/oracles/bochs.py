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

Bochs ignores SIGTERM: every start runs in its own session and its process group is killed with
SIGKILL on every path; the scratch directory is removed on every path. A triple fault is a Bochs
panic (`reset_on_triple_fault=0`, `panic: action=fatal`), so Bochs exits; that, a timeout, or
anything unexpected on the debugger's output is an OracleError with Bochs' output tail.

Batches larger than MAX_PROBES are split into consecutive starts, each from the image the previous
one left (A/D bits carry over, as the rig's conventions ask).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import time
from typing import Callable, Sequence

from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import RIG_IMAGE_BASE, RIG_RAM_SIZE, Capabilities, Probe, ProbeResult
from x86pt.state import PagingState

from harness import guest
from harness.oracles.capability import capability_image, measured
from harness.oracles.base import ProbeGuestOracle
from harness.process_group import kill_group
from harness.scratch import ScratchDir

BOCHS_BINARY = "bochs"
ROM_PATH = os.path.join(os.path.dirname(guest.__file__), "bios.bin")
# Bochs refuses to start without a VGA ROM; Debian's vgabios package ships this one.
VGA_ROMS = ("/usr/share/vgabios/vgabios-stdvga.bin", "/usr/share/bochs/VGABIOS-lgpl-latest")
DEFAULT_CPU = "tigerlake"  # docs/oracles.md "Bochs": PKU, SMEP, SMAP, 1G pages, NX; no LA57
MAX_PROBES = guest.MAX_PROBES
BLOCK = 0x20000  # Bochs 2.7's RAM allocation block (its log: "mem block size")
LOAD_BASE = guest.HARNESS_GPA  # optramimage1 address: the file holds [LOAD_BASE, end)
MARK = 0x5A17E0D  # `? MARK` prints "0x5a17e0d 94469645": the end of a reply
_MARK_LINE = f"{MARK:#x} {MARK}"

_XP_FIND = re.compile(r"^0x([0-9a-f]+) <[^>\n]*>:[ \t]+0x([0-9a-f]+)(?:[ \t]+0x([0-9a-f]+))?[ \t]*$", re.M)
_PAGE_RE = re.compile(r"^linear page 0x([0-9a-f]+) maps to physical page 0x([0-9a-f]+)")
_CPUID_RE = re.compile(r"CPUID\[0x([0-9a-f]+)\]: ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8})")
_Q = struct.Struct("<Q")


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


def _tail(text: str, n: int = 12) -> str:
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


class _Workdir(ScratchDir):
    """Bochs' scratch directory in $TMPDIR (bochsrc, RAM image, dumps, log); `log` keeps the log
    Bochs wrote once close() has run."""

    def __init__(self, prefix: str) -> None:
        super().__init__(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-"))
        self.log: str | None = None

    def close(self) -> None:
        if self.dir is not None:
            self.log = self.read_text("bochs.log")
        super().close()


class _Session:
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

    def stderr_tail(self) -> str:
        try:
            with open(self.errpath, "rb") as f:
                err = f.read().decode(errors="replace")
        except OSError:
            err = ""
        return _tail(err + "\n" + self.out.decode(errors="replace"))

    def exchange(self, commands: list[str], what: str) -> list[str]:
        """Send `commands` plus the end marker; the lines Bochs printed until the marker."""
        data = ("\n".join(commands + [f"? {MARK:#x}"]) + "\n").encode()
        fd = self.proc.stdout.fileno()
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise OracleError(
                    f"Bochs did not finish {what} in time (killed)"
                    + (f"; its output ends: {self.stderr_tail()}" if self.stderr_tail() else "")
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
                    raise OracleError(f"Bochs exited during {what}: {self.stderr_tail()}")
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
        wd = _Workdir("x86pt-bochs")
        workdir = self.last_workdir = wd.dir
        session = None
        try:
            ram_image = os.path.join(workdir, "ram.img")
            with open(ram_image, "wb") as f:
                f.write(memoryview(ram)[LOAD_BASE:end])
            bochsrc = write_bochsrc(workdir, self.ram_size >> 20, self.cpu, ram_image)
            session = _Session(self.binary, bochsrc, workdir, time.monotonic() + self.timeout)
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
                    f"Bochs stopped before the guest finished {what}: {_tail(chr(10).join(lines))}"
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
                        f"({len(data)}): {_tail(chr(10).join(lines))}"
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
        self.session: _Session | None = None

    def __enter__(self) -> "DebuggerRun":
        self._wd = _Workdir("x86pt-bochs-dbg")
        self.workdir = self._wd.dir
        try:
            rc = write_bochsrc(self.workdir, self.ram_mib, self.cpu)
            self.session = _Session(self.binary, rc, self.workdir, time.monotonic() + self.timeout)
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
