"""Ending an emulator for good: every emulator the rig starts (QEMU, Bochs) runs in its own
process group, and this kills the whole group with SIGKILL (Bochs catches SIGTERM and keeps
running) and reaps the leader."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL the process group `proc` leads and reap it. Safe to call twice, and with None."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
