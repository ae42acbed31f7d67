"""Read QEMU 7.2's `info tlb` and `info mem` text back into records: the reverse of the writers in
x86pt/formats/qemu.py, for text that QEMU itself printed (docs/paging.md §13.3 has the format).

Lines end in LF or CR LF (QEMU's monitor sends CR LF); a line in neither shape is an OracleError
naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from x86pt.errors import OracleError


@dataclass(frozen=True)
class TlbLine:
    """One `info tlb` line: a present leaf (flags of the leaf entry only, docs/paging.md §13.3)."""

    va: int
    pa: int
    flags: str  # 9 letters XGPDACTUW, '-' when clear

    @property
    def nx(self) -> bool:
        return self.flags[0] == "X"

    @property
    def large(self) -> bool:
        return self.flags[2] == "P"


@dataclass(frozen=True)
class MemRange:
    """One `info mem` line: [start, end) with rights folded over all levels."""

    start: int
    end: int
    size: int
    rights: str  # 'urw' with '-' for clear bits


_TLB_RE = re.compile(r"^([0-9a-f]{16}): ([0-9a-f]{16}) ([-XGPDACTUW]{9})$")
_MEM_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16}) ([0-9a-f]{16}) ([-u][-r][-w])$")


def parse_info_tlb(text: str) -> list[TlbLine]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _TLB_RE.match(line)
        if not m:
            raise OracleError(f"unexpected 'info tlb' line: {line[:80]!r}")
        out.append(TlbLine(int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


def parse_info_mem(text: str) -> list[MemRange]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _MEM_RE.match(line)
        if not m:
            raise OracleError(f"unexpected 'info mem' line: {line[:80]!r}")
        out.append(MemRange(int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16), m.group(4)))
    return out
