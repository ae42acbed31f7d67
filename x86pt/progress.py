"""Progress bars and Ctrl-C for long commands: one implementation for the whole project.

The bar is tqdm's, drawn on stderr only when stderr is a terminal (or when asked), so a redirected
stderr gets no carriage-return updates; it never counts past its total. `Interrupt` turns SIGINT
into a flag the work loop polls between steps, so a Ctrl-C never lands inside a C callback (unicorn
prints a ctypes traceback when it does) and the command can print a partial summary and exit 130.
"""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, TextIO


class ProgressBar:
    """A bar over `total` steps. `enabled=None`: only on a TTY."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        unit: str = "it",
        enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.total = max(int(total), 0)
        self.done = 0
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # imported only when a bar is drawn (start-up time)

            # A terminal that reports a 0x0 size (a fresh pty, `script`) would get no bar at all:
            # tqdm hides bars below the screen's last row. Assume 80x24 there.
            try:
                size = os.get_terminal_size(self.stream.fileno())
            except (OSError, ValueError, AttributeError):
                size = os.terminal_size((0, 0))
            known = size.columns > 0 and size.lines > 0
            self._bar = tqdm(
                total=self.total,
                desc=label,
                unit=unit,
                file=self.stream,
                dynamic_ncols=known,
                ncols=None if known else 80,
                nrows=None if known else 24,
                leave=True,
                mininterval=0.25,
            )

    def update_to(self, done: int, **postfix: Any) -> None:
        """Move the bar to `done` steps (clamped to the total); postfix items are shown after it."""
        done = min(max(int(done), 0), self.total) if self.total else max(int(done), 0)
        if self._bar is not None and done != self.done:
            self._bar.update(done - self.done)
        self.done = done
        if self._bar is not None and postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        """Print a line to stdout without tearing the bar."""
        if self._bar is not None:
            self._bar.clear()
        print(text, flush=True)
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Interrupt:
    """While active, SIGINT sets `requested` instead of raising; a second Ctrl-C raises as usual.
    Outside the main thread (no signals there) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None
        self._active = False

    def _handler(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._old)
            self._active = False
