# SPDX-License-Identifier: GPL-2.0-or-later
"""A private scratch directory an emulator run works in (QEMU's sockets and RAM file, Bochs'
configuration, RAM image and log): removed on close(), at interpreter exit and on leaving a `with`
block, whatever happened. Subclasses release what else they hold in close() and then call this
one's."""

from __future__ import annotations

import atexit
import os
import shutil
from typing import Self

from x86pt.errors import OracleError


class ScratchDir:
    def __init__(self, directory: str) -> None:
        self.dir: str | None = directory
        atexit.register(self.close)

    def path(self, name: str) -> str:
        """A name in the scratch directory."""
        if self.dir is None:
            raise OracleError("the scratch directory is gone")
        return os.path.join(self.dir, name)

    def read_text(self, name: str) -> str | None:
        """The file `name` of the directory as text, None when it cannot be read."""
        try:
            with open(self.path(name), encoding="utf-8", errors="replace") as f:
                return f.read()
        except (OSError, OracleError):
            return None

    def forget_dir(self) -> None:
        """Remove the directory now (what a process opened stays open; a SIGKILL then leaves no
        name behind)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def close(self) -> None:
        self.forget_dir()
        atexit.unregister(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
