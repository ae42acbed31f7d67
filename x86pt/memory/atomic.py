"""The one output writer every command uses.

A regular output file is written atomically: a temporary file in the target's own directory,
fsync, then rename over the target, so a reader never sees half a file and a failed command
leaves nothing behind. Before anything is written the target is checked:

* it must not be the same file (st_dev + st_ino) as any input of the command: `dump IMG -o IMG`
  would otherwise replace the image it is reading (hard links and symlinks to an input are the
  same file, so they are refused too);
* a symlink is followed and its target is replaced; the link itself stays a link;
* a directory, FIFO, socket or device node is refused: renaming over it would destroy it (as
  root, `-o /dev/full` replaced the device node), and writing into it is not atomic. Standard
  output is `-` where a command streams.

Every refusal is a BadInputError (one line, exit 2) naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Iterable, Iterator, Literal, TextIO, overload

from x86pt.errors import BadInputError

_KIND = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _same_file_as_input(target: str, inputs: Iterable[str | os.PathLike[str] | None]) -> str | None:
    try:
        st = os.stat(target)
    except OSError:
        return None
    for p in inputs:
        if p is None or str(p) == "-":
            continue
        try:
            si = os.stat(p)
        except (OSError, ValueError):
            continue
        if (si.st_dev, si.st_ino) == (st.st_dev, st.st_ino):
            return str(p)
    return None


def check_output(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = ()) -> str:
    """Refuse `path` as an output (BadInputError) if it is an input, a directory or a special
    file; return the real path to replace (the symlink's target when `path` is a symlink)."""
    path = os.fspath(path)
    if not path:
        raise BadInputError("empty output path")
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BadInputError(f"cannot write {path}: {e.strerror}") from None
    if st is not None:
        for test, what in _KIND:
            if test(st.st_mode):
                raise BadInputError(
                    f"cannot write {path}: it is {what}, not a regular file"
                    + (" (give a file name inside it)" if what == "a directory" else "")
                )
        same = _same_file_as_input(target, list(inputs))
        if same is not None:
            raise BadInputError(
                f"refusing to write {path}: it is the input {same} (same file); choose another output"
            )
    return target


@overload
def atomic_writer(
    path: str | os.PathLike[str],
    mode: Literal["wb"] = "wb",
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> AbstractContextManager[BinaryIO]: ...


@overload
def atomic_writer(
    path: str | os.PathLike[str], mode: Literal["w"], *, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> AbstractContextManager[TextIO]: ...


@contextlib.contextmanager  # (callers see the overloads above: a binary or a text file by `mode`)
def atomic_writer(
    path: str | os.PathLike[str], mode: str = "wb", *, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Iterator[Any]:
    """Yield a file object; on success the data replaces `path` (or a symlink's target) at once.
    On any error the temporary file is removed and the target is untouched."""
    path = os.fspath(path)
    target = check_output(path, inputs)
    directory = os.path.dirname(target) or "."
    try:
        old_mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        old_mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(prefix=".x86pt-", dir=directory)
    except OSError as e:
        raise BadInputError(f"cannot write {path}: {e.strerror}") from None
    try:
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, old_mode)
            check_output(path, inputs)  # nothing became an input or a device meanwhile
            os.replace(tmp, target)
        except OSError as e:
            raise BadInputError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes, *, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> None:
    with atomic_writer(path, inputs=inputs) as f:
        f.write(data)


def write_text_atomic(
    path: str | os.PathLike[str], text: str, *, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> None:
    with atomic_writer(path, "w", inputs=inputs) as f:
        f.write(text)
