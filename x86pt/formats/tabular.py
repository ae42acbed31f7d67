"""JSON lines and CSV: one row per run of leaves (coalesced by the leaf's own non-address bits,
effective rights and level, and by physical contiguity unless `coalesce='attrs'`), or one row
per leaf entry (`coalesce='none'`). Field names follow the SDM (p rw us pwt pcd a d ps g pat xd
pk); effective rights are spelled out."""

from __future__ import annotations

import csv
import io
import json
from typing import Callable, Iterable, Iterator

import numpy as np

from x86pt.coalesce import coalesce, present_only
from x86pt.describe import leaf_flags
from x86pt.fields import BIT_P, PK_MASK, PK_SHIFT
from x86pt.scan import EFF_LOOP, EFF_NX, EFF_RSVD, EFF_RW, EFF_US, SHIFT, U64, Chunk, Issue

# one output row: COLUMNS' values (hex strings, numbers, flags)
Row = dict[str, str | int | bool]

COLUMNS = (
    "va",
    "end",
    "size",
    "pa",
    "level",
    "page_size",
    "entries",
    "flags",
    "pk",
    "user",
    "writable",
    "executable",
    "reserved",
    "loop",
)


def _key(ch: Chunk) -> np.ndarray:
    """Own non-frame bits (bits 51:frame are zero after masking, so eff and level fit at 32+)."""
    size = U64(1) << SHIFT[ch.level]
    own = ch.raw & ~(U64((1 << 52) - 1) & ~(size - U64(1)))
    key: np.ndarray = own | (ch.eff.astype(U64) << U64(32)) | (ch.level.astype(U64) << U64(40))
    return key


def rows(chunks: Iterable[Chunk], *, coalesce_mode: str = "phys", nxe: bool = True) -> Iterator[Row]:
    chunks = present_only(chunks)
    if coalesce_mode == "none":
        for ch in chunks:
            for i in range(len(ch)):
                lvl = int(ch.level[i])
                size = 1 << int(SHIFT[lvl])
                for k in range(int(ch.count[i])):
                    yield _row(
                        int(ch.va[i]) + k * size,
                        size,
                        int(ch.pa[i]) + k * size,
                        lvl,
                        int(ch.raw[i]) + k * size,
                        int(ch.eff[i]),
                        1,
                        nxe,
                    )
        return
    for runs in coalesce(chunks, key=_key, phys=coalesce_mode == "phys"):
        for i in range(len(runs)):
            lvl = int(runs.level[i])
            s = int(runs.start[i])
            length = (int(runs.end[i]) - s) & ((1 << 64) - 1) or (1 << 64)
            yield _row(
                s, length, int(runs.pa[i]), lvl, int(runs.raw[i]), int(runs.eff[i]), int(runs.entries[i]), nxe
            )


def _row(va: int, size: int, pa: int, level: int, raw: int, eff: int, entries: int, nxe: bool) -> Row:
    return {
        "va": f"{va:#018x}",
        "end": f"{(va + size) & ((1 << 64) - 1):#018x}",
        "size": size,
        "pa": f"{pa:#x}",
        "level": level,
        "page_size": 1 << int(SHIFT[level]),
        "entries": entries,
        "flags": leaf_flags(raw, level),
        "pk": (raw & PK_MASK) >> PK_SHIFT if raw & BIT_P else 0,
        "user": bool(eff & EFF_US),
        "writable": bool(eff & EFF_RW),
        "executable": not (nxe and eff & EFF_NX),
        "reserved": bool(eff & EFF_RSVD),
        "loop": bool(eff & EFF_LOOP),
    }


def json_lines(
    chunks: Iterable[Chunk],
    issues_of: Callable[[], Iterable[Issue]] | None = None,
    *,
    coalesce_mode: str = "phys",
    nxe: bool = True,
) -> Iterator[str]:
    buf: list[str] = []
    for r in rows(chunks, coalesce_mode=coalesce_mode, nxe=nxe):
        buf.append(json.dumps(r, separators=(",", ":")))
        if len(buf) >= 4096:
            yield "\n".join(buf) + "\n"
            buf.clear()
    if issues_of is not None:
        buf.extend(json.dumps(i.to_json(), separators=(",", ":")) for i in issues_of())
    if buf:
        yield "\n".join(buf) + "\n"


def csv_lines(chunks: Iterable[Chunk], *, coalesce_mode: str = "phys", nxe: bool = True) -> Iterator[str]:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    n = 0
    for r in rows(chunks, coalesce_mode=coalesce_mode, nxe=nxe):
        w.writerow(r)
        n += 1
        if n % 4096 == 0:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()
