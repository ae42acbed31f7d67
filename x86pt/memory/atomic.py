"""Output files are written atomically: a temporary file in the same directory, then rename."""
from __future__ import annotations

import contextlib
import os
import tempfile

from x86pt.errors import BadInputError


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "wb"):
    directory = os.path.dirname(os.path.abspath(path)) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=".x86pt-", dir=directory)
    except OSError as e:
        raise BadInputError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)
