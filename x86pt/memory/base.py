"""Physical memory sources answer `read(pa, n)` and list their segments (cf. volatility3's layers).

A source is one of: SparseMemory (pages in RAM, writable), RawFile (file offset = physical
address, mmap'd read-only), ElfCore (QEMU dump-guest-memory layout, PT_LOAD keyed by p_paddr),
LiME. Reading outside every segment raises PhysicalAddressError.
"""

from __future__ import annotations

import struct
import types
from collections import namedtuple
from typing import Iterable, Mapping, NamedTuple, Protocol, Self, runtime_checkable

import numpy as np

from x86pt.errors import PhysicalAddressError

_Q = struct.Struct("<Q")
PAGE = 4096


# Segment is a named tuple, not a dataclass: @dataclass generates (exec) its methods at import, on
# the start-up of every `x86pt dump` (docs/startup.md). It is a plain record, never mutated and never
# compared with or unpacked as a tuple. mypy reads the typed declaration under TYPE_CHECKING;
# tests/test_startup.py checks that it names the same fields as the base built at run time.
TYPE_CHECKING = False  # mypy reads any name TYPE_CHECKING as true
if TYPE_CHECKING:

    class _Segment(NamedTuple):
        start: int  # physical address of the first byte
        end: int  # one past the last byte

else:
    _Segment = namedtuple("_Segment", "start end")


class Segment(_Segment):
    """A physical range [start, end) a source holds."""

    __slots__ = ()

    @property
    def size(self) -> int:
        return self.end - self.start


@runtime_checkable
class PhysicalMemory(Protocol):
    def read(self, pa: int, n: int) -> bytes: ...

    def read_u64(self, pa: int) -> int: ...

    def segments(self) -> list[Segment]: ...

    def table(self, pa: int) -> np.ndarray: ...


class MemoryBase:
    """Shared helpers; subclasses implement `read` and `segments` (and may speed up the rest)."""

    writable = False
    # Sources with registers (ELF cores) set their own dict in __init__; this default is read-only.
    control_registers: Mapping[str, int] = types.MappingProxyType({})

    def segments(self) -> list[Segment]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, pa: int, n: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_u64(self, pa: int) -> int:
        value: int = _Q.unpack(self.read(pa, 8))[0]
        return value

    def table(self, pa: int) -> np.ndarray:
        """The 512 entries of the 4 KiB table at `pa` (page-aligned) as uint64."""
        return np.frombuffer(self.read(pa & ~0xFFF, PAGE), dtype="<u8")

    def contains(self, pa: int, n: int = 1) -> bool:
        return any(s.start <= pa and pa + n <= s.end for s in self.segments())

    def gather_u64(self, pas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised read of the qwords at 8-aligned physical addresses `pas` (uint64 array).
        Returns (values, valid): valid is False where the qword is outside the image (value 0)."""
        vals = np.zeros(len(pas), dtype=np.uint64)
        valid = np.zeros(len(pas), dtype=bool)
        for i, pa in enumerate(pas.tolist()):
            if self.contains(pa, 8):
                vals[i] = self.read_u64(pa)
                valid[i] = True
        return vals, valid

    @property
    def end(self) -> int:
        segs = self.segments()
        return max((s.end for s in segs), default=0)

    def write(self, pa: int, data: bytes) -> None:
        raise PhysicalAddressError(f"{type(self).__name__} is read-only (write at {pa:#x})", pa)

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, _Q.pack(value))

    def _outside(self, pa: int, n: int) -> PhysicalAddressError:
        segs = self.segments()
        where = f"image holds {len(segs)} segment(s) up to {self.end:#x}" if segs else "image is empty"
        return PhysicalAddressError(
            f"physical read of {n} bytes at {pa:#x} is outside the image ({where})", pa
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_segments(segs: Iterable[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in sorted(segs, key=lambda s: s.start):
        if out and s.start <= out[-1].end:
            out[-1] = Segment(out[-1].start, max(out[-1].end, s.end))
        else:
            out.append(s)
    return out
