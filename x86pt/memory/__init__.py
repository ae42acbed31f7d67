"""Physical memory sources and image files."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Iterable

from x86pt.errors import BadInputError, ImageError
from x86pt.memory.base import PAGE, MemoryBase, PhysicalMemory, Segment
from x86pt.memory.elfcore import ElfCore, write_elf_core
from x86pt.memory.lime import LIME_MAGIC, LimeFile, write_lime
from x86pt.memory.raw import RawFile
from x86pt.memory.sparse import SparseMemory

if TYPE_CHECKING:  # the state layer sits above memory: no import at run time
    from x86pt.state import PagingState

__all__ = [
    "PAGE",
    "MemoryBase",
    "PhysicalMemory",
    "Segment",
    "ElfCore",
    "LimeFile",
    "RawFile",
    "SparseMemory",
    "open_memory",
    "write_elf_core",
    "write_lime",
    "write_image",
    "image_format",
]


def image_format(path: str) -> str:
    """'elf', 'lime' or 'raw', from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ImageError(f"cannot open {path}: {e.strerror}") from None
    if head == b"\x7fELF":
        return "elf"
    if len(head) == 4 and int.from_bytes(head, "little") == LIME_MAGIC:
        return "lime"
    return "raw"


def open_memory(path: str, fmt: str | None = None) -> MemoryBase:
    """Open an image read-only: ELF core, LiME or raw (auto-detected unless `fmt` is given)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"no such image: {path}") from None
    except OSError as e:
        raise ImageError(f"cannot open {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"cannot open {path}: Is a directory")
    if not stat.S_ISREG(st.st_mode):
        # before the first read: a FIFO would block it forever; images are mapped, and only a
        # regular file can be
        raise ImageError(f"{path} is not a regular file")
    fmt = fmt or image_format(path)
    if fmt == "elf":
        return ElfCore(path)
    if fmt == "lime":
        return LimeFile(path)
    if fmt == "raw":
        return RawFile(path)
    raise ImageError(f"unknown image format {fmt!r} (elf, lime or raw)")


def write_image(
    memory: SparseMemory,
    state: PagingState,
    path: str,
    fmt: str | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> str:
    """Write an image as an ELF core (default for .elf/.core/.vmcore names) or raw, through the
    one output writer (x86pt.memory.atomic): never over one of `inputs`, a directory or a device."""
    from x86pt.memory.atomic import check_output, write_bytes_atomic

    check_output(path, inputs)
    if fmt is None:
        fmt = "raw" if path.endswith((".raw", ".bin", ".img", ".mem")) else "elf"
    if fmt == "elf":
        write_elf_core(
            path,
            memory,
            cr0=state.cr0,
            cr3=state.cr3,
            cr4=state.cr4,
            efer=state.efer,
            pkru=state.pkru,
            pkrs=state.pkrs,
            maxphyaddr=state.m,
            vendor=state.vendor,
            profile=state.profile.name,
            inputs=inputs,
        )
    elif fmt == "raw":
        write_bytes_atomic(path, memory.to_bytes(), inputs=inputs)
    elif fmt == "lime":
        write_lime(path, memory, inputs)
    else:
        raise BadInputError(f"unknown output format {fmt!r} (elf, raw or lime)")
    return fmt
