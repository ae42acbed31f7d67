"""One QEMU process: found on PATH, started in its own process group with a parent-death signal,
waited for with a bound, killed as a group, its scratch files removed (docs/oracles.md §5.1).

The functions are the building blocks (the probe-guest oracle uses them directly); QemuProcess
puts them together for a QEMU that lives as long as a `with` block.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import IO, Any, Sequence

from harness.process_group import kill_group
from harness.scratch import ScratchDir
from x86pt.errors import OracleError, OracleUnavailable

QEMU_BINARY = "qemu-system-x86_64"
NOT_FOUND = f"{QEMU_BINARY} not found on PATH (run tools/install_qemu.sh)"

# Resolved here, in the parent: the child between fork and exec must not import or load anything
# (another thread may hold the import lock at fork time).
_PRCTL: Any
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def qemu_available() -> bool:
    return qemu_binary() is not None


@functools.lru_cache(maxsize=4)
def qemu_version(binary: str | None = None) -> str:
    """First line of `qemu-system-x86_64 --version`, e.g. 'QEMU emulator version 7.2.22 (...)'."""
    binary = binary or qemu_binary()
    if binary is None:
        raise OracleUnavailable(NOT_FOUND)
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise OracleUnavailable(f"{binary} --version failed: {e}") from None
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def qemu_release(binary: str | None = None) -> str:
    """The version and package of `qemu_version`, e.g. '7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)'."""
    line = qemu_version(binary)
    m = re.search(r"version (\S+)(?: \(([^)]*)\))?", line)
    return (m.group(1) + (f" ({m.group(2)})" if m.group(2) else "")) if m else line


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG: QEMU gets SIGKILL when the process that started it dies, so a killed test
    # run cannot leave a VM behind. Linux ties it to the *thread* that forked: a QEMU started in a
    # short-lived worker thread dies with that thread, so start QEMU from long-lived threads.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)


def spawn_qemu(args: Sequence[str], stderr: IO[bytes], pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start QEMU in its own process group (so kill_group reaches every thread and child), stdout
    and stderr into `stderr`, SIGKILLed if we die."""
    try:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
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


def read_stderr(f: IO[bytes] | None) -> str:
    """Everything QEMU wrote to `f` so far (stripped)."""
    if f is None:
        return ""
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
        return f.read().decode(errors="replace").strip()
    return ""


def one_line(text: str, limit: int = 300) -> str:
    """QEMU's messages joined into one line for an error (its last lines say why it stopped)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    joined = " | ".join(lines[-3:])
    return joined if len(joined) <= limit else "..." + joined[-limit:]


def exit_message(proc: subprocess.Popen, stderr: IO[bytes] | None) -> str:
    """'QEMU exited with status N: <its last message>' for an error, or '' while it runs."""
    if proc.poll() is None:
        return ""
    why = one_line(read_stderr(stderr)) or "no message"
    return f"QEMU exited with status {proc.returncode}: {why}"


def scratch_dir() -> str:
    """A private directory on tmpfs (RAM files must not hit the disk), else in $TMPDIR."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=f"x86pt-qemu-{os.getpid()}-", dir=base)


def connect_unix(
    path: str, proc: subprocess.Popen, deadline: float, what: str, stderr: IO[bytes] | None
) -> socket.socket:
    """Connect to a socket QEMU is about to create; fail at once if QEMU exits first."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if proc.poll() is not None:
            raise OracleError(f"{exit_message(proc, stderr)} (before its {what} socket was ready)")
        if time.monotonic() > deadline:
            raise OracleError(f"QEMU's {what} socket did not appear in time")
        time.sleep(0.002)


class QemuProcess(ScratchDir):
    """One QEMU and its scratch directory (QemuProcess.dir, on tmpfs, for its sockets and RAM
    file): create it, put what QEMU needs in the directory, then start(args). close() (also at exit
    and on leaving a `with` block) kills the process group and removes the directory."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stderr: IO[bytes] | None = None
        super().__init__(scratch_dir())

    def start(self, args: Sequence[str], pass_fds: Sequence[int] = ()) -> subprocess.Popen:
        """Start QEMU; its stdout and stderr go to an unnamed temp file (QemuProcess.stderr)."""
        if self.proc is not None:
            raise OracleError("this QEMU was already started")
        self.stderr = tempfile.TemporaryFile(dir=self.dir)
        self.proc = spawn_qemu(args, self.stderr, pass_fds)
        return self.proc

    def connect(self, name: str, what: str, deadline: float) -> socket.socket:
        """Connect to the unix socket `name` QEMU creates in the scratch directory (by the
        time.monotonic() `deadline`; at once an error if QEMU exits first)."""
        if self.proc is None:
            raise OracleError("QEMU was not started")
        return connect_unix(self.path(name), self.proc, deadline, what, self.stderr)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def why_dead(self) -> str:
        """Why QEMU is gone, in one line ('' while it runs)."""
        return exit_message(self.proc, self.stderr) if self.proc is not None else "QEMU was not started"

    def wait(self, timeout: float) -> int:
        """Its exit status; OracleError if it is still running after `timeout` seconds."""
        if self.proc is None:
            raise OracleError("QEMU was not started")
        try:
            return wait_exit(self.proc, timeout)
        except subprocess.TimeoutExpired:
            raise OracleError(f"QEMU did not exit within {timeout:g} s") from None

    def close(self) -> None:
        kill_group(self.proc)
        if self.stderr is not None:
            with contextlib.suppress(OSError):
                self.stderr.close()
            self.stderr = None
        super().close()
