"""A raw physical-memory file: file offset = physical address. Opened read-only and mmap'd."""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from x86pt.errors import ImageError
from x86pt.memory.base import PAGE, MemoryBase, Segment

_Q = struct.Struct("<Q")


class MappedFile:
    """A read-only mmap of a whole file (empty files have no mapping)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000) == 0o100000:
                raise ImageError(f"{path} is not a regular file")
            self.size = st.st_size
            self.map: mmap.mmap | None = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if self.size else None
        except OSError as e:
            raise ImageError(f"cannot map {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        # what reads index: the mapping (closed by close(): a later read raises), or no bytes for
        # an empty file
        self.data: mmap.mmap | bytes = self.map if self.map is not None else b""
        self.u64 = (
            np.frombuffer(self.map, dtype="<u8", count=self.size // 8)
            if self.map is not None
            else np.zeros(0, dtype="<u8")
        )

    def close(self) -> None:
        self.u64 = np.zeros(0, dtype="<u8")
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # numpy views still alive; the OS frees it with the process
                pass
            self.map = None


class RawFile(MemoryBase):
    def __init__(self, path: str) -> None:
        self.file = MappedFile(path)
        self.path = path
        self.control_registers: dict[str, int] = {}

    def segments(self) -> list[Segment]:
        return [Segment(0, self.file.size)] if self.file.size else []

    def read(self, pa: int, n: int) -> bytes:
        if pa < 0 or pa + n > self.file.size:
            raise self._outside(pa, n)
        return self.file.data[pa : pa + n] if n else b""

    def read_u64(self, pa: int) -> int:
        if pa < 0 or pa + 8 > self.file.size:
            raise self._outside(pa, 8)
        value: int = _Q.unpack_from(self.file.data, pa)[0]
        return value

    def table(self, pa: int) -> np.ndarray:
        pa &= ~0xFFF
        if pa < 0 or pa + PAGE > self.file.size:
            raise self._outside(pa, PAGE)
        return self.file.u64[pa // 8 : pa // 8 + 512]

    def contains(self, pa: int, n: int = 1) -> bool:
        return 0 <= pa and pa + n <= self.file.size

    def gather_u64(self, pas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pas = np.asarray(pas, dtype=np.uint64)
        valid = pas + np.uint64(8) <= np.uint64(self.file.size)
        idx = np.where(valid, pas >> np.uint64(3), 0).astype(np.int64)
        vals = self.file.u64[idx] if len(self.file.u64) else np.zeros(len(pas), dtype=np.uint64)
        return np.where(valid, vals, np.uint64(0)).astype(np.uint64), valid

    @property
    def end(self) -> int:
        return self.file.size

    def close(self) -> None:
        self.file.close()
