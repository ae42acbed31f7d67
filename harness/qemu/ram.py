"""The guest RAM of a pc machine as a file on tmpfs that we create, mmap MAP_SHARED and fill from
Python, and QEMU maps as its `memory-backend-file` (docs/oracles.md §5).

The pc machine maps RAM at [0, below_4g) and [4 GiB, ...); the rig pins `max-ram-below-4g=3G` so
the split is known. [0xc0000, 0x100000) is option-ROM and BIOS space, not RAM, in that machine.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass

from x86pt.errors import BadInputError, OracleError
from x86pt.memory.base import PAGE, MemoryBase
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import RIG_RAM_SIZE

MiB = 1 << 20
GiB = 1 << 30
FOUR_GIB = 1 << 32
# Pinned with -machine max-ram-below-4g so the low/high RAM split of the pc machine is known.
BELOW_4G = 3 * GiB
# pc machine after reset (PAM registers 0): 0xc0000-0xdffff reads as zeros and 0xe0000-0xfffff as
# the BIOS ROM, whatever the RAM file holds there (measured with `xp` on 7.2.22; 0xa0000-0xbffff
# is RAM because -nodefaults leaves no VGA).
LEGACY_HOLE = (0xC0000, 0x100000)
_Q = struct.Struct("<Q")


def round_ram_size(size: int) -> int:
    """QEMU wants whole MiB; we use 2 MiB multiples so large pages of the backend line up."""
    return max(2 * MiB, -(-size // (2 * MiB)) * (2 * MiB))


def ram_size_for(memory: MemoryBase, minimum: int = RIG_RAM_SIZE) -> int:
    """The smallest RAM that holds every byte of `memory` (above the pc machine's 3 GiB split the
    guest addresses jump to 4 GiB, so an image reaching past 4 GiB needs RAM = end - 1 GiB)."""
    end = memory.end
    need = end if end <= BELOW_4G else BELOW_4G + (end - FOUR_GIB if end > FOUR_GIB else 0)
    return round_ram_size(max(minimum, need))


@dataclass(frozen=True)
class RamLayout:
    """Where guest-physical addresses live in the RAM file of a pc machine of `size` bytes."""

    size: int

    @property
    def below_4g(self) -> int:
        return min(self.size, BELOW_4G)

    @property
    def above_4g(self) -> int:
        return self.size - self.below_4g

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Guest-physical [start, end) ranges that are RAM."""
        out = [(0, self.below_4g)]
        if self.above_4g:
            out.append((FOUR_GIB, FOUR_GIB + self.above_4g))
        return out

    def offset(self, pa: int, n: int = 1) -> int:
        """File offset of guest-physical `pa`; the n bytes must sit in one RAM range."""
        if 0 <= pa and pa + n <= self.below_4g:
            return pa
        if FOUR_GIB <= pa and pa + n <= FOUR_GIB + self.above_4g:
            return self.below_4g + pa - FOUR_GIB
        ranges = ", ".join(f"[{a:#x}, {b:#x})" for a, b in self.ranges)
        raise BadInputError(
            f"guest-physical {pa:#x}+{n:#x} is not RAM of the QEMU pc machine with "
            f"{self.size >> 20} MiB (RAM is at {ranges}); give a larger ram_size "
            "or move the data"
        )


class RamFile:
    """The guest RAM: a file on tmpfs, mmap'd MAP_SHARED here and by QEMU."""

    def __init__(self, directory: str, size: int, name: str = "ram") -> None:
        self.layout = RamLayout(round_ram_size(size))
        self.path: str | None = os.path.join(directory, name)
        self.fd = -1
        self.map: mmap.mmap | None = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, self.layout.size)
            self.map = mmap.mmap(self.fd, self.layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise OracleError(
                f"cannot create the {size >> 20} MiB RAM file in {directory}: {e.strerror}"
            ) from None

    @property
    def _mm(self) -> mmap.mmap:
        if self.map is None:
            raise OracleError("the RAM file is closed")
        return self.map

    @property
    def size(self) -> int:
        return self.layout.size

    def write(self, pa: int, data: bytes) -> None:
        off = self.layout.offset(pa, len(data))
        self._mm[off : off + len(data)] = data

    def read(self, pa: int, n: int) -> bytes:
        off = self.layout.offset(pa, n)
        return self._mm[off : off + n]

    def read_u64(self, pa: int) -> int:
        return _Q.unpack_from(self._mm, self.layout.offset(pa, 8))[0]

    def write_u64(self, pa: int, value: int) -> None:
        _Q.pack_into(self._mm, self.layout.offset(pa, 8), value)

    def zero(self, pa: int, n: int) -> None:
        off = self.layout.offset(pa, n)
        self._mm[off : off + n] = bytes(n)

    def load(self, memory: MemoryBase, *, strict: bool = True) -> list[tuple[int, int]]:
        """Copy every byte `memory` holds into RAM at its guest-physical address. Data in the
        legacy hole [0xc0000, 0x100000) is refused when strict (QEMU would not see it), else
        copied anyway and returned as a list of (start, end) ranges the guest cannot see."""
        hidden: list[tuple[int, int]] = []
        if isinstance(memory, SparseMemory):
            chunks = ((pn * PAGE, page) for pn, page in sorted(memory.pages.items()))
        else:
            chunks = _segment_chunks(memory)
        for pa, data in chunks:
            end = pa + len(data)
            if pa < LEGACY_HOLE[1] and end > LEGACY_HOLE[0] and any(data):
                if strict:
                    raise BadInputError(
                        f"the image holds data at {max(pa, LEGACY_HOLE[0]):#x}, inside "
                        f"[{LEGACY_HOLE[0]:#x}, {LEGACY_HOLE[1]:#x}) which a QEMU pc machine maps "
                        "to option-ROM space and the BIOS ROM, not RAM"
                    )
                hidden.append((max(pa, LEGACY_HOLE[0]), min(end, LEGACY_HOLE[1])))
            self.write(pa, bytes(data))
        return hidden

    def clear(self) -> None:
        """All RAM back to zero. MADV_REMOVE frees the tmpfs pages (cheap even for many GiB)."""
        try:
            self._mm.madvise(mmap.MADV_REMOVE)
        except (OSError, AttributeError):
            step = 64 * MiB
            for off in range(0, self.size, step):
                n = min(step, self.size - off)
                self._mm[off : off + n] = bytes(n)

    def unlink(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None

    def close(self) -> None:
        self.unlink()
        if self.map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.map.close()
            self.map = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _segment_chunks(memory: MemoryBase, chunk: int = 4 * MiB):
    for seg in memory.segments():
        pa = seg.start
        while pa < seg.end:
            n = min(chunk, seg.end - pa)
            yield pa, memory.read(pa, n)
            pa += n
