"""Sparse physical memory in RAM: 4 KiB pages created on first write. The builder, the CPA
model and the oracle rig build images here. Reads of pages never written return zeros inside
`size` (like fresh RAM) and raise PhysicalAddressError beyond it."""

from __future__ import annotations

import struct

import numpy as np

from x86pt.errors import PhysicalAddressError
from x86pt.memory.base import PAGE, MemoryBase, Segment, merge_segments

_Q = struct.Struct("<Q")
_ZERO = bytes(PAGE)


class SparseMemory(MemoryBase):
    writable = True

    def __init__(self, size: int = 1 << 52) -> None:
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self.control_registers: dict[str, int] = {}

    def _check(self, pa: int, n: int) -> None:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise PhysicalAddressError(
                f"physical access of {n} bytes at {pa:#x} is outside memory of {self.size:#x} bytes", pa
            )

    def read(self, pa: int, n: int) -> bytes:
        self._check(pa, n)
        pn, off = divmod(pa, PAGE)
        if off + n <= PAGE:
            page = self.pages.get(pn)
            return bytes(page[off : off + n]) if page is not None else bytes(n)
        out = bytearray()
        while n > 0:
            pn, off = divmod(pa, PAGE)
            take = min(n, PAGE - off)
            page = self.pages.get(pn)
            out += page[off : off + take] if page is not None else bytes(take)
            pa += take
            n -= take
        return bytes(out)

    def read_u64(self, pa: int) -> int:
        pn, off = divmod(pa, PAGE)
        if off <= PAGE - 8 and 0 <= pa and pa + 8 <= self.size:
            page = self.pages.get(pn)
            value: int = _Q.unpack_from(page, off)[0] if page is not None else 0
            return value
        value = _Q.unpack(self.read(pa, 8))[0]
        return value

    def write(self, pa: int, data: bytes) -> None:
        self._check(pa, len(data))
        mv = memoryview(data)
        while len(mv):
            pn, off = divmod(pa, PAGE)
            take = min(len(mv), PAGE - off)
            page = self.pages.get(pn)
            if page is None:
                page = self.pages[pn] = bytearray(PAGE)
            page[off : off + take] = mv[:take]
            mv = mv[take:]
            pa += take

    def write_u64(self, pa: int, value: int) -> None:
        pn, off = divmod(pa, PAGE)
        if off <= PAGE - 8 and 0 <= pa and pa + 8 <= self.size:
            page = self.pages.get(pn)
            if page is None:
                page = self.pages[pn] = bytearray(PAGE)
            _Q.pack_into(page, off, value)
        else:
            self.write(pa, _Q.pack(value))

    def table(self, pa: int) -> np.ndarray:
        page = self.pages.get((pa & ~0xFFF) // PAGE)
        if page is None:
            self._check(pa & ~0xFFF, PAGE)
            return np.zeros(512, dtype="<u8")
        return np.frombuffer(bytes(page), dtype="<u8")

    def gather_u64(self, pas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.gather_view().gather_u64(pas)

    def gather_view(self) -> "_StackedPages":
        """A snapshot of the pages, stacked once, for many vectorised gathers (a batch walk reads
        every level from it). Later writes are not seen by the snapshot."""
        return _StackedPages(self)

    def segments(self) -> list[Segment]:
        """The pages that hold data (written at least once), merged into runs."""
        return merge_segments(Segment(pn * PAGE, (pn + 1) * PAGE) for pn in self.pages)

    def contains(self, pa: int, n: int = 1) -> bool:
        return 0 <= pa and pa + n <= self.size

    @property
    def end(self) -> int:
        return max(((pn + 1) * PAGE for pn in self.pages), default=0)

    def copy(self) -> "SparseMemory":
        out = SparseMemory(self.size)
        out.pages = {pn: bytearray(p) for pn, p in self.pages.items()}
        out.control_registers = dict(self.control_registers)
        return out

    def to_bytes(self, end: int | None = None) -> bytes:
        """A flat raw image (file offset = physical address) up to `end` (default: last page)."""
        end = self.end if end is None else end
        out = bytearray(end)
        for pn, page in self.pages.items():
            start = pn * PAGE
            if start < end:
                out[start : min(end, start + PAGE)] = page[: max(0, min(PAGE, end - start))]
        return bytes(out)


class _StackedPages:
    def __init__(self, mem: SparseMemory) -> None:
        self.limit = np.uint64(min(mem.size, 1 << 63))
        keys = sorted(mem.pages)
        self.pns = np.array(keys, dtype=np.uint64)
        self.stacked = (
            np.frombuffer(b"".join(bytes(mem.pages[k]) for k in keys), dtype="<u8").reshape(-1, 512)
            if keys
            else np.zeros((0, 512), dtype=np.uint64)
        )

    def gather_u64(self, pas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pas = np.asarray(pas, dtype=np.uint64)
        valid = pas + np.uint64(8) <= self.limit
        if not len(self.pns):
            return np.zeros(len(pas), dtype=np.uint64), valid
        want = pas >> np.uint64(12)
        pos = np.minimum(np.searchsorted(self.pns, want), len(self.pns) - 1)
        hit = (self.pns[pos] == want) & valid
        slot = ((pas >> np.uint64(3)) & np.uint64(511)).astype(np.int64)
        vals = np.where(hit, self.stacked[pos.astype(np.int64), slot], np.uint64(0)).astype(np.uint64)
        return vals, valid
