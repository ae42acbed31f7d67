"""The semantic difference of two page-table images: what each VA translates to and with which
rights, independent of table shape (a 2M leaf and 512 PTEs mapping the same frames with the same
rights are identical).

Both trees are scanned and coalesced into translation runs (VA adjacent, frames adjacent, same
attributes); the union of both run boundaries cuts the address space into pieces, and each piece
is identical, added (only in B), removed (only in A), or changed (rights, frame, or both).
Attributes compared: effective RW, US, executable (XD ORed, only when NXE), the leaf's PWT, PCD,
PAT, G, PK, and whether a reserved bit makes the translation fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from x86pt.coalesce import Runs, coalesce, collect, present_only
from x86pt.fields import BIT_G, BIT_PAT_4K, BIT_PAT_LARGE, BIT_PWT, PK_MASK, PK_SHIFT
from x86pt.memory.base import PhysicalMemory
from x86pt.scan import EFF_NX, EFF_RSVD, EFF_RW, EFF_US, U64, Chunk, Scanner
from x86pt.state import PagingState
from x86pt.walk import rights_letters

IDENTICAL, ADDED, REMOVED, RIGHTS, FRAME, BOTH = range(6)
CATEGORY = {
    IDENTICAL: "=",
    ADDED: "+",
    REMOVED: "-",
    RIGHTS: "~rights",
    FRAME: "~frame",
    BOTH: "~rights+frame",
}
# Bit numbers of the leaf's own attributes, from the field table.
_PWT, _G, _PAT_4K, _PAT_LARGE = (m.bit_length() - 1 for m in (BIT_PWT, BIT_G, BIT_PAT_4K, BIT_PAT_LARGE))


def attr_key(ch: Chunk, nxe: bool = True) -> np.ndarray:
    """Packed attributes: bit0 NX, 1 RW, 2 US, 3 RSVD, 4 PWT, 5 PCD, 6 PAT, 7 G, 8..11 PK."""
    eff = ch.eff.astype(U64) & U64(EFF_RW | EFF_US | EFF_RSVD | (EFF_NX if nxe else 0))
    raw = ch.raw
    pat = np.where(ch.level == 1, (raw >> U64(_PAT_4K)) & U64(1), (raw >> U64(_PAT_LARGE)) & U64(1))
    key: np.ndarray = (
        eff
        | (((raw >> U64(_PWT)) & U64(3)) << U64(4))
        | (pat << U64(6))  # PWT, PCD adjacent
        | (((raw >> U64(_G)) & U64(1)) << U64(7))
        | (((raw & U64(PK_MASK)) >> U64(PK_SHIFT)) << U64(8))
    )
    return key


def attr_text(key: int) -> str:
    s = rights_letters(bool(key & EFF_US), bool(key & EFF_RW), not key & EFF_NX)
    extra = [n for n, b in (("pwt", 16), ("pcd", 32), ("pat", 64), ("g", 128)) if key & b]
    if key >> 8 & 15:
        extra.append(f"pk{key >> 8 & 15}")
    if key & EFF_RSVD:
        extra.append("RSVD")
    return s + (" " + ",".join(extra) if extra else "")


def translation_runs(state: PagingState, memory: PhysicalMemory, **scan_kw: Any) -> tuple[Runs, Scanner]:
    sc = Scanner(state, memory, **scan_kw)
    runs = collect(coalesce(present_only(sc.chunks()), key=lambda c: attr_key(c, state.nxe), phys=True))
    return runs, sc


@dataclass(frozen=True)
class Piece:
    start: int
    end: int  # exclusive; 0 means the top of the address space
    category: int
    pa_a: int | None
    pa_b: int | None
    key_a: int | None
    key_b: int | None

    @property
    def size(self) -> int:
        return ((self.end - self.start) & ((1 << 64) - 1)) or (1 << 64)

    def render(self) -> str:
        c = CATEGORY[self.category]
        head = f"{c:<14}0x{self.start:016x}-0x{self.end:016x} {self.size:>#14x}"
        if self.category == ADDED:
            assert self.key_b is not None  # only B maps the piece
            return f"{head}  pa {self.pa_b:#x} {attr_text(self.key_b)}"
        assert self.key_a is not None  # A maps every other piece
        if self.category == REMOVED:
            return f"{head}  pa {self.pa_a:#x} {attr_text(self.key_a)}"
        if self.category == IDENTICAL:
            return f"{head}  pa {self.pa_a:#x} {attr_text(self.key_a)}"
        assert self.key_b is not None  # a change: B maps it too
        parts = []
        if self.category in (FRAME, BOTH):
            parts.append(f"pa {self.pa_a:#x} -> {self.pa_b:#x}")
        else:
            parts.append(f"pa {self.pa_a:#x}")
        if self.category in (RIGHTS, BOTH):
            parts.append(f"{attr_text(self.key_a)} -> {attr_text(self.key_b)}")
        else:
            parts.append(attr_text(self.key_a))
        return f"{head}  " + "  ".join(parts)

    def to_json(self) -> dict[str, Any]:
        def h(v: int | None) -> str | None:
            return None if v is None else hex(v)

        return {
            "change": CATEGORY[self.category],
            "start": f"{self.start:#018x}",
            "end": f"{self.end:#018x}",
            "size": self.size,
            "pa_a": h(self.pa_a),
            "pa_b": h(self.pa_b),
            "attrs_a": None if self.key_a is None else attr_text(self.key_a),
            "attrs_b": None if self.key_b is None else attr_text(self.key_b),
        }


def _locate(runs: Runs, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    j = np.searchsorted(runs.start, at, side="right").astype(np.int64) - 1
    jc = np.maximum(j, 0)
    if len(runs) == 0:
        return np.zeros(len(at), dtype=bool), jc
    inside = (j >= 0) & (at - runs.start[jc] < runs.end[jc] - runs.start[jc])
    return inside, jc


def diff_runs(a: Runs, b: Runs) -> list[Piece]:
    """Cut the union of both run sets at every boundary and classify each piece; adjacent pieces
    of the same kind that continue each other (VA, both frames, both attributes) are merged."""
    bounds = np.unique(np.concatenate([a.start, a.end, b.start, b.end]))
    if not len(bounds):
        return []
    # the end of a run at the top of the space wraps to 0: treat it as 2^64
    starts = bounds
    nxt = np.append(bounds[1:], U64(0))
    ina, ja = _locate(a, starts)
    inb, jb = _locate(b, starts)
    sel = ina | inb
    starts, nxt, ina, ja, inb, jb = starts[sel], nxt[sel], ina[sel], ja[sel], inb[sel], jb[sel]
    pa_a = np.where(ina, a.pa[ja] + (starts - a.start[ja]), U64(0)) if len(a) else np.zeros(len(starts), U64)
    pa_b = np.where(inb, b.pa[jb] + (starts - b.start[jb]), U64(0)) if len(b) else np.zeros(len(starts), U64)
    ka = a.key[ja] if len(a) else np.zeros(len(starts), U64)
    kb = b.key[jb] if len(b) else np.zeros(len(starts), U64)
    cat = np.full(len(starts), IDENTICAL, dtype=np.uint8)
    both = ina & inb
    rights = both & (ka != kb)
    frame = both & (pa_a != pa_b)
    cat[both & rights & ~frame] = RIGHTS
    cat[both & frame & ~rights] = FRAME
    cat[both & frame & rights] = BOTH
    cat[ina & ~inb] = REMOVED
    cat[inb & ~ina] = ADDED
    out: list[Piece] = []
    for i in range(len(starts)):
        s, e, c = int(starts[i]), int(nxt[i]), int(cat[i])
        pa_ai = int(pa_a[i]) if ina[i] else None
        pa_bi = int(pa_b[i]) if inb[i] else None
        ka_i = int(ka[i]) if ina[i] else None
        kb_i = int(kb[i]) if inb[i] else None
        if out:
            p = out[-1]
            d = (s - p.start) & ((1 << 64) - 1)
            if (
                p.end == s
                and p.category == c
                and p.key_a == ka_i
                and p.key_b == kb_i
                and (p.pa_a is None) == (pa_ai is None)
                and (p.pa_b is None) == (pa_bi is None)
                and (pa_ai is None or p.pa_a is not None and p.pa_a + d == pa_ai)
                and (pa_bi is None or p.pa_b is not None and p.pa_b + d == pa_bi)
            ):
                out[-1] = Piece(p.start, e, c, p.pa_a, p.pa_b, p.key_a, p.key_b)
                continue
        out.append(Piece(s, e, c, pa_ai, pa_bi, ka_i, kb_i))
    return out


@dataclass(frozen=True)
class DiffResult:
    pieces: list[Piece]
    shape_a: dict[int, int]  # leaves per level
    shape_b: dict[int, int]
    tables_a: int
    tables_b: int

    @property
    def changed(self) -> list[Piece]:
        return [p for p in self.pieces if p.category != IDENTICAL]

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.pieces:
            out[CATEGORY[p.category]] = out.get(CATEGORY[p.category], 0) + p.size
        return out

    def render(self, show_identical: bool = False) -> str:
        lines = [p.render() + "\n" for p in self.pieces if show_identical or p.category != IDENTICAL]
        summ = self.summary()

        def sizes(d: dict[int, int]) -> str:
            return " ".join(f"{lbl}:{d.get(l, 0)}" for l, lbl in ((1, "4K"), (2, "2M"), (3, "1G")))

        lines.append(
            "summary: "
            + ", ".join(f"{k} {v:#x} bytes" for k, v in sorted(summ.items()))
            + ("" if summ else "both images map nothing")
            + "\n"
        )
        if self.shape_a != self.shape_b or self.tables_a != self.tables_b:
            lines.append(
                f"shape: A leaves {sizes(self.shape_a)}, {self.tables_a} table pages; "
                f"B leaves {sizes(self.shape_b)}, {self.tables_b} table pages"
                + (" (translations identical)" if not self.changed else "")
                + "\n"
            )
        return "".join(lines)


def diff_images(
    state_a: PagingState, mem_a: PhysicalMemory, state_b: PagingState, mem_b: PhysicalMemory, **scan_kw: Any
) -> DiffResult:
    ra, sa = translation_runs(state_a, mem_a, **scan_kw)
    rb, sb = translation_runs(state_b, mem_b, **scan_kw)
    return DiffResult(
        diff_runs(ra, rb),
        dict(sa.stats.entries),
        dict(sb.stats.entries),
        sa.stats.distinct_tables(),
        sb.stats.distinct_tables(),
    )
