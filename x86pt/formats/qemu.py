"""QEMU 7.2's monitor formats, byte for byte (target/i386/monitor.c; docs/paging.md §13.3).

`info tlb`: one line per present leaf entry, in table order, with the leaf's own flags:
    "%016x: %016x %c%c%c%c%c%c%c%c%c\\n"  VA (sign-extended), entry & frame mask,
    X(XD) G P(PS) D A C(PCD) T(PWT) U W. A 4K entry is printed with bit 7 cleared (PAT never
    shows as P). Frame masks are QEMU's (bits 49:12, 49:21, 49:30), not MAXPHYADDR's.
`info mem`: runs of equal effective (U, RW) over adjacent present leaves; any hole ends a run.
    "%016x-%016x %016x %c%c%c\\n" start, end, length (each through QEMU's sign extension, which
    tests bit 47 only: the last range of the lower half ends at "ffff800000000000" and a range
    ending at the top of the address space at "0001000000000000"); 'u' or '-', 'r', 'w' or '-'.
Both walk tables with QEMU's 0x3fffffffff000 pointer mask and ignore reserved bits; a table past
the end of RAM reads as zeros. CR0.PG=0 prints "PG disabled".

Lines are built in bulk: hex digits come from a 256-entry byte table indexed by the big-endian
bytes of whole uint64 arrays, so 16.7M `info tlb` lines are numpy work, not Python formatting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator

import numpy as np

from x86pt.coalesce import coalesce, present_only
from x86pt.errors import BudgetError
from x86pt.fields import (
    BIT_A,
    BIT_D,
    BIT_G,
    BIT_P,
    BIT_PAT_4K,
    BIT_PCD,
    BIT_PS,
    BIT_PWT,
    BIT_RW,
    BIT_US,
    BIT_XD,
)
from x86pt.limits import DEFAULT_MAX_ENTRIES
from x86pt.scan import EFF_RSVD, EFF_RW, EFF_US, RECORD_COST, SHIFT, U64, Chunk
from x86pt.state import CR0_PG, PagingState

if TYPE_CHECKING:
    from x86pt.memory.base import PhysicalMemory

QEMU_TABLE_MASK = 0x3FFFFFFFFF000
QEMU_FRAME_MASK = np.array([0, 0x3FFFFFFFFF000, 0x3FFFFFFE00000, 0x3FFFFC0000000, 0, 0], dtype=U64)
PG_DISABLED = b"PG disabled\n"
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
HEX2 = np.stack([_HEX[np.arange(256) >> 4], _HEX[np.arange(256) & 15]], axis=1)  # (256, 2)
# info tlb flag letters, left to right, with their entry bits (print_pte in monitor.c)
TLB_FLAGS = tuple(
    (mask.bit_length() - 1, ch)
    for mask, ch in (
        (BIT_XD, "X"),
        (BIT_G, "G"),
        (BIT_PS, "P"),
        (BIT_D, "D"),
        (BIT_A, "A"),
        (BIT_PCD, "C"),
        (BIT_PWT, "T"),
        (BIT_US, "U"),
        (BIT_RW, "W"),
    )
)
LINE_BLOCK = 1 << 18


# byte -> its two hex digits packed in a uint16 (first digit in the low byte: little-endian view)
HEX16 = (HEX2[:, 0].astype(np.uint16) | (HEX2[:, 1].astype(np.uint16) << 8)).astype("<u2")


def hex16(v: np.ndarray) -> np.ndarray:
    """(n,) uint64 -> (n, 16) uint8 ASCII lower-case hex, zero-padded."""
    b = np.ascontiguousarray(v, dtype=">u8").view(np.uint8)
    return np.take(HEX16, b).view(np.uint8).reshape(-1, 16)


def _flag_bytes(raw: np.ndarray, level: np.ndarray) -> np.ndarray:
    """(n,) leaf entries -> (n, 9) letters. 4K entries are shown with bit 7 masked."""
    raw = np.where(level == 1, raw & ~U64(BIT_PAT_4K), raw)
    out = np.empty((len(raw), 9), dtype=np.uint8)
    for col, (bit, ch) in enumerate(TLB_FLAGS):
        out[:, col] = np.where((raw >> U64(bit)) & U64(1), ord(ch), ord("-"))
    return out


def _record_blocks(chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """Present records in blocks of at most LINE_BLOCK entries (a record has at most 512)."""
    for ch in present_only(chunks):
        n = len(ch)
        if not n:
            continue
        ends = np.cumsum(ch.count.astype(np.int64))
        lo = 0
        while lo < n:
            base = int(ends[lo - 1]) if lo else 0
            hi = max(int(np.searchsorted(ends, base + LINE_BLOCK, side="right")), lo + 1)
            yield ch.take(slice(lo, hi))
            lo = hi


def _hex8(v: np.ndarray) -> np.ndarray:
    """(n,) values below 2^32 -> (n, 8) ASCII hex."""
    b = np.ascontiguousarray(v, dtype=">u4").view(np.uint8)
    return np.take(HEX16, b).view(np.uint8).reshape(-1, 8)


def tlb_bytes(chunks: Iterable[Chunk]) -> Iterator[memoryview]:
    """`info tlb` text in blocks. `chunks` must come from a scan with addr_mask=QEMU_TABLE_MASK.

    One line per record is formatted and repeated for every entry of the record; per entry only
    the low 32 bits of VA and PA are formatted again: a run from a whole table starts at a VA
    aligned to the table's span, so for 4K and 2M runs the high half cannot change; frames are
    checked for a carry into bit 32 per record, and 1G runs are formatted in full."""
    for sub in _record_blocks(chunks):
        size = U64(1) << SHIFT[sub.level]
        pa0 = sub.raw & QEMU_FRAME_MASK[sub.level]
        tmpl = np.empty((len(sub), 45), dtype=np.uint8)
        tmpl[:, 0:16] = hex16(sub.va)
        tmpl[:, 16] = ord(":")
        tmpl[:, 17] = ord(" ")
        tmpl[:, 18:34] = hex16(pa0)
        tmpl[:, 34] = ord(" ")
        tmpl[:, 35:44] = _flag_bytes(sub.raw, sub.level)
        tmpl[:, 44] = ord("\n")
        cnt = sub.count.astype(np.int64)
        if bool((cnt == 1).all()):
            yield tmpl.data.cast("B")
            continue
        line = np.repeat(tmpl, cnt, axis=0)
        rec = np.repeat(np.arange(len(sub)), cnt)
        k = (np.arange(len(rec), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)).astype(U64)
        step = k * size[rec]
        low = U64(0xFFFFFFFF)
        full = (sub.level == 3) | ((pa0 & low) + (sub.count - U64(1)) * size > low)
        if not full.any():
            line[:, 8:16] = _hex8((sub.va & low)[rec] + step)
            line[:, 26:34] = _hex8((pa0 & low)[rec] + step)
        else:
            part = ~full[rec]
            line[part, 8:16] = _hex8((sub.va[rec][part] & low) + step[part])
            line[part, 26:34] = _hex8((pa0[rec][part] & low) + step[part])
            whole = full[rec]
            line[whole, 0:16] = hex16(sub.va[rec][whole] + step[whole])
            line[whole, 18:34] = hex16(pa0[rec][whole] + step[whole])
        yield line.data.cast("B")


def _canon(v: np.ndarray, bit: int) -> np.ndarray:
    """QEMU's addr_canonical(): set bits 63..bit+1 when `bit` is set (nothing else)."""
    return np.where(v & U64(1 << bit), v | U64(((1 << 64) - 1) & ~((1 << (bit + 1)) - 1)), v)


def mem_bytes(chunks: Iterable[Chunk], state: PagingState) -> Iterator[bytes]:
    """`info mem` text (4-level; see mem_bytes_la57 for QEMU 7.2's 5-level walk)."""
    bits = state.va_bits
    vmask = U64((1 << bits) - 1)
    for runs in coalesce(present_only(chunks), key=lambda c: c.eff & np.uint8(EFF_RW | EFF_US), va_bits=bits):
        s = runs.start & vmask
        length = runs.end - runs.start
        e = s + length
        cs, ce, cl = _canon(s, bits - 1), _canon(e, bits - 1), _canon(length, bits - 1)
        n = len(s)
        line = np.empty((n, 55), dtype=np.uint8)
        line[:, 0:16] = hex16(cs)
        line[:, 16] = ord("-")
        line[:, 17:33] = hex16(ce)
        line[:, 33] = ord(" ")
        line[:, 34:50] = hex16(cl)
        line[:, 50] = ord(" ")
        line[:, 51] = np.where(runs.key & U64(EFF_US), ord("u"), ord("-"))
        line[:, 52] = ord("r")
        line[:, 53] = np.where(runs.key & U64(EFF_RW), ord("w"), ord("-"))
        line[:, 54] = ord("\n")
        yield line.tobytes()


def mem_bytes_la57(
    memory: PhysicalMemory, state: PagingState, max_entries: int = DEFAULT_MAX_ENTRIES
) -> Iterator[bytes]:
    """QEMU 7.2's mem_info_la57() walk, quirk included (docs/paging.md §13.3.2): below the PML4
    its present tests are inverted, so present PDPTEs/PDEs are holes and non-present ones are
    followed (a zero entry points at physical page 0). Emulated with a memo per
    (table, level, inherited prot): each subtree becomes a list of prot changes.

    The work is charged as the Scanner charges it (512 per table read, RECORD_COST per prot
    change held or copied) against `max_entries`: tables whose prot alternates entry by entry
    would otherwise expand to 2^27 changes per PDPT, held in memory."""
    from x86pt.errors import PhysicalAddressError

    P, RW, US, PS = BIT_P, BIT_RW, BIT_US, BIT_PS
    mask = QEMU_TABLE_MASK
    memo: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}
    spent = [0]

    def charge(n: int) -> None:
        spent[0] += n
        if spent[0] > max_entries:
            raise BudgetError(
                f"work limit reached: the tables expand to more than {max_entries} page-table "
                f"entries (shared or looping subtrees?); raise it with --max-entries N if the image "
                f"really is this large"
            )

    def table(pa: int) -> list[int]:
        charge(512)
        try:
            entries: list[int] = memory.table(pa).tolist()
            return entries
        except PhysicalAddressError:
            return [0] * 512

    def events(pa: int, lvl: int, inh: int) -> tuple[tuple[int, int], ...]:
        """(offset within the table's span, prot) for every mem_print call whose prot differs
        from the previous one inside this subtree (the first call always listed)."""
        inh &= US | RW | P  # the only bits a prot keeps
        key = (pa, lvl, inh)
        got = memo.get(key)
        if got is not None:
            return got
        shift = {3: 30, 2: 21, 1: 12}[lvl]
        out: list[tuple[int, int]] = []

        def emit(off: int, prot: int) -> None:
            if not out or out[-1][1] != prot:
                out.append((off, prot))

        for i, e in enumerate(table(pa)):
            off = i << shift
            if lvl == 1:
                emit(off, (e & (US | RW | P)) & inh if e & P else 0)
            elif e & P:
                emit(off, 0)
            elif e & PS:
                emit(off, (e & (US | RW | P)) & inh)
            else:
                sub = events(e & mask, lvl - 1, inh & e)
                charge(RECORD_COST * len(sub))
                for o, p in sub:
                    emit(off + o, p)
        memo[key] = res = tuple(out)
        return res

    if not state.cr0 & CR0_PG:
        yield PG_DISABLED
        return
    lines: list[str] = []
    start, last = -1, 0

    def mem_print(end: int, prot: int) -> None:
        nonlocal start, last
        if prot != last:
            if start != -1:

                def c(v: int) -> int:
                    return v | (((1 << 64) - 1) & ~((1 << 57) - 1)) if v & (1 << 56) else v

                lines.append(
                    f"{c(start):016x}-{c(end):016x} {c((end - start) & ((1 << 64) - 1)):016x} "
                    f"{'u' if last & US else '-'}r{'w' if last & RW else '-'}\n"
                )
            start = end if prot != 0 else -1
            last = prot

    pml5 = table(state.cr3 & mask)
    for l0, e5 in enumerate(pml5):
        if not e5 & P:
            mem_print(l0 << 48, 0)
            continue
        for l1, e4 in enumerate(table(e5 & mask)):
            base = (l0 << 48) + (l1 << 39)
            if not e4 & P:
                mem_print(base, 0)
                continue
            sub = events(e4 & mask, 3, e5 & e4)
            charge(RECORD_COST * len(sub))
            for off, prot in sub:
                mem_print(base + off, prot)
        if len(lines) > 4096:
            yield "".join(lines).encode()
            lines.clear()
    mem_print(1 << 57, 0)
    yield "".join(lines).encode()


def scan_kwargs() -> dict[str, Any]:
    """How a scan must be set up for these formats: QEMU's pointer mask, no holes."""
    return {"addr_mask": QEMU_TABLE_MASK, "holes": False}


def write_tlb(out: BinaryIO, chunks: Iterable[Chunk], state: PagingState) -> None:
    if not state.cr0 & CR0_PG:
        out.write(PG_DISABLED)
        return
    for b in tlb_bytes(chunks):
        out.write(b)


def write_mem(
    out: BinaryIO, chunks: Iterable[Chunk], state: PagingState, memory: PhysicalMemory | None = None
) -> None:
    if not state.cr0 & CR0_PG:
        out.write(PG_DISABLED)
        return
    if state.la57 and memory is not None:
        for b in mem_bytes_la57(memory, state):
            out.write(b)
        return
    for b in mem_bytes(chunks, state):
        out.write(b)


__all__ = [
    "QEMU_TABLE_MASK",
    "hex16",
    "tlb_bytes",
    "mem_bytes",
    "mem_bytes_la57",
    "write_tlb",
    "write_mem",
    "scan_kwargs",
    "EFF_RSVD",
]
