# SPDX-License-Identifier: GPL-2.0-or-later
"""The QEMU machine one boot runs in (Guest): QEMU TCG with icount, a fixed seed and RTC, the
guest RAM in a shared file the host reads the page tables from, the workload's output on a file
chardev, pvpanic to pause when the guest asks.

One QEMU at a time; each is its own process group, and its RAM file and sockets are removed
whatever happens: the context manager and atexit on errors, SIGTERM turned into SystemExit while a
run is in progress (sigterm_exits), and for a SIGKILL of the host process, QEMU's parent-death
signal (SIGKILL) plus a RAM file unlinked as soon as QEMU has created it (kept open by the host
until the capture).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Callable

from harness.linux.config import ICOUNT, RTC, RunConfig
from harness.qemu.process import QemuProcess, read_stderr
from harness.qemu.qmp import Qmp
from x86pt.errors import OracleError


class Guest:
    """One QEMU process, started paused-free (the workload runs on its own), cleaned up always:
    its process group killed and its scratch directory (QMP socket, RAM file) removed
    (harness/qemu/process.py)."""

    def __init__(
        self, binary: str, kernel: str, initrd: str, append: str, cfg: RunConfig, workdir: str
    ) -> None:
        self.workdir = workdir
        self.out = os.path.join(workdir, "ttyS1.txt")
        self.console = os.path.join(workdir, "console.log")
        self.qemu: QemuProcess | None = None
        self.qmp: Qmp | None = None
        self.ram_fd: int | None = None
        self.binary, self.kernel, self.initrd, self.append, self.cfg = binary, kernel, initrd, append, cfg
        self.ram = ""

    def _args(self, qemu: QemuProcess) -> list[str]:
        cfg = self.cfg
        self.ram = qemu.path("ram")
        cpu = "max" if cfg.levels == 5 else "max,la57=off"
        return [
            self.binary,
            "-machine",
            "pc,memory-backend=ram0",
            "-m",
            f"{cfg.ram_mb}M",
            "-object",
            f"memory-backend-file,id=ram0,size={cfg.ram_mb}M,mem-path={self.ram},share=on",
            "-cpu",
            cpu,
            "-smp",
            "1",
            "-accel",
            "tcg",
            "-icount",
            ICOUNT,
            "-seed",
            str(cfg.seed),
            "-rtc",
            RTC,
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            self.kernel,
            "-initrd",
            self.initrd,
            "-append",
            self.append,
            "-serial",
            f"file:{self.console}",
            "-chardev",
            f"file,id=out,path={self.out}",
            "-serial",
            "chardev:out",
            "-device",
            "pvpanic",
            "-action",
            "panic=pause",
            "-qmp",
            f"unix:{qemu.path('qmp.sock')},server=on,wait=off",
        ]

    def __enter__(self) -> "Guest":
        self.qemu = QemuProcess()
        try:
            self.qemu.start(self._args(self.qemu))
        except BaseException:
            self.close()
            raise
        return self

    def _hold_ram(self) -> None:
        """Open the RAM file once QEMU has made it and unlink its name: it then goes away with the
        last of QEMU and us, however either ends."""
        if self.ram_fd is None and os.path.exists(self.ram):
            self.ram_fd = os.open(self.ram, os.O_RDONLY | os.O_CLOEXEC)
            os.unlink(self.ram)

    @property
    def ram_path(self) -> str:
        self._hold_ram()
        return f"/proc/self/fd/{self.ram_fd}" if self.ram_fd is not None else self.ram

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_pause(self, k: int, deadline: float, on_poll: Callable[[str], None] | None = None) -> str:
        """Wait until the guest printed `@@PAUSE k` and QEMU paused on its pvpanic. Until then the
        host only reads the output file: talking to QEMU while the guest runs perturbs icount."""
        marker = f"@@PAUSE {k}\n"
        while True:
            self._hold_ram()
            text = read_text(self.out)
            if on_poll is not None:
                on_poll(text)
            if text.startswith(marker) or "\n" + marker in text:
                break
            if not self.qemu.alive:
                raise OracleError(
                    f"QEMU exited ({self.qemu.proc.returncode}) before checkpoint {k}: "
                    + last_text_line(read_stderr(self.qemu.stderr), read_text(self.console))
                )
            if time.monotonic() > deadline:
                raise OracleError(f"guest did not reach checkpoint {k} in time: " + _last_line(self.console))
            time.sleep(0.1)
        if self.qmp is None:
            self.qmp = Qmp.connect_path(
                self.qemu.path("qmp.sock"), proc=self.qemu.proc, stderr=self.qemu.stderr, timeout=30.0
            )
        while True:
            st = self.qmp.command("query-status")
            if isinstance(st, dict) and st.get("status") in ("guest-panicked", "paused"):
                return read_text(self.out)
            if time.monotonic() > deadline:
                raise OracleError(f"guest printed @@PAUSE {k} but never paused (pvpanic)")
            time.sleep(0.05)

    def resume(self) -> None:
        self.qmp.command("cont")

    def close(self) -> None:
        """Ask QEMU to quit when we talk to it (it then ends on its own, within 5 s), else or
        after that kill its process group; then drop the RAM file and the scratch directory."""
        if self.qmp is not None and self.qemu is not None and self.qemu.alive:
            with contextlib.suppress(OracleError):
                self.qmp.command("quit", timeout=5.0)
                with contextlib.suppress(OracleError):
                    self.qemu.wait(5.0)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None


@contextlib.contextmanager
def sigterm_exits():
    """While a run is in progress, SIGTERM raises SystemExit so the context managers clean up
    (the default action would end the process with QEMU and its files left behind)."""
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _last_line(*paths: str) -> str:
    return last_text_line(*(read_text(p) for p in paths))


def last_text_line(*texts: str) -> str:
    """The last non-empty line of the first text that has one (QEMU's stderr, then the console)."""
    for text in texts:
        lines = [l for l in text.splitlines() if l.strip()]
        if lines:
            return lines[-1].strip()[:200]
    return "(no output)"
