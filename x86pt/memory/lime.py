"""LiME: repeated [header, data]; header <IIQQQ = magic 0x4C694D45, version 1, start, end
(inclusive), reserved. Ranges ascend and do not overlap (docs/formats.md §4)."""

from __future__ import annotations

import bisect
import os
import struct
from typing import Iterable

import numpy as np

from x86pt.errors import ImageError
from x86pt.memory.base import PAGE, MemoryBase, Segment
from x86pt.memory.raw import MappedFile

LIME_MAGIC = 0x4C694D45
_HDR = struct.Struct("<IIQQQ")


class LimeFile(MemoryBase):
    def __init__(self, path: str) -> None:
        self.file = MappedFile(path)
        self.path = path
        self.control_registers: dict[str, int] = {}
        self._segs: list[tuple[int, int, int]] = []  # (start, end, file offset)
        off = 0
        size = self.file.size
        while off < size:
            if off + _HDR.size > size:
                raise ImageError(f"{path}: truncated LiME header at file offset {off:#x}")
            magic, version, start, end, _ = _HDR.unpack_from(self.file.data, off)
            if magic != LIME_MAGIC:
                raise ImageError(f"{path}: bad LiME magic {magic:#x} at file offset {off:#x}")
            if version != 1:
                raise ImageError(f"{path}: unsupported LiME version {version}")
            if end < start:
                raise ImageError(f"{path}: LiME range {start:#x}-{end:#x} ends before it starts")
            n = end - start + 1
            data = off + _HDR.size
            if data + n > size:
                raise ImageError(
                    f"{path}: LiME range {start:#x}-{end:#x} is truncated "
                    f"({size - data:#x} of {n:#x} bytes present)"
                )
            if self._segs and start < self._segs[-1][1]:
                raise ImageError(f"{path}: LiME range {start:#x} overlaps or is not ascending")
            self._segs.append((start, start + n, data))
            off = data + n
        self._starts = [s for s, _, _ in self._segs]

    def segments(self) -> list[Segment]:
        return [Segment(s, e) for s, e, _ in self._segs]

    def _find(self, pa: int, n: int) -> int:
        i = bisect.bisect_right(self._starts, pa) - 1
        if i >= 0:
            s, e, off = self._segs[i]
            if pa + n <= e:
                return off + (pa - s)
        raise self._outside(pa, n)

    def read(self, pa: int, n: int) -> bytes:
        off = self._find(pa, n)
        return self.file.data[off : off + n]

    def table(self, pa: int) -> np.ndarray:
        off = self._find(pa & ~0xFFF, PAGE)
        if off % 8 == 0:
            return self.file.u64[off // 8 : off // 8 + 512]
        return np.frombuffer(self.file.data[off : off + PAGE], dtype="<u8")

    def contains(self, pa: int, n: int = 1) -> bool:
        try:
            self._find(pa, n)
            return True
        except Exception:
            return False

    def close(self) -> None:
        self.file.close()


def write_lime(path: str, memory: MemoryBase, inputs: Iterable[str | os.PathLike[str] | None] = ()) -> None:
    from x86pt.memory.atomic import atomic_writer

    with atomic_writer(path, inputs=inputs) as f:
        for seg in memory.segments():
            f.write(_HDR.pack(LIME_MAGIC, 1, seg.start, seg.end - 1, 0))
            f.write(memory.read(seg.start, seg.size))
