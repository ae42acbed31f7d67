"""Coalescing, kept apart from the scan: merge consecutive records of a chunk stream into runs.

A run continues while the caller's key stays equal and the records are adjacent in VA (and,
with `phys=True`, in physical address too, like gdb-pt-dump's `-phys_verbose`). Holes (records
without EFF_P) take part only if the key function lets them (ptdump does, QEMU's `info mem`
does not: it drops them first). Runs are emitted as columnar `Runs` batches; the last run of a
chunk stays open until the next chunk shows whether it continues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from x86pt.scan import U64, Chunk

KeyFn = Callable[[Chunk], np.ndarray]


@dataclass(frozen=True)
class Runs:
    start: np.ndarray  # uint64 canonical VA of the first byte
    end: np.ndarray  # uint64 start + length (wraps to 0 at the top of the address space)
    key: np.ndarray  # uint64, the key shared by the run
    level: np.ndarray  # uint8, level of the run's first record
    raw: np.ndarray  # uint64, first entry
    pa: np.ndarray  # uint64, first frame
    eff: np.ndarray  # uint8, first record's EFF bits
    entries: np.ndarray  # uint64, number of entries merged

    def __len__(self) -> int:
        return len(self.start)

    def take(self, sel: np.ndarray | slice) -> "Runs":
        return Runs(*(getattr(self, f)[sel] for f in _FIELDS))


_FIELDS = ("start", "end", "key", "level", "raw", "pa", "eff", "entries")


def coalesce(
    chunks: Iterable[Chunk], key: KeyFn, *, phys: bool = False, va_bits: int | None = None
) -> Iterator[Runs]:
    """Merge records into runs. `va_bits` set: adjacency is judged on VAs masked to that many
    bits (QEMU's `info mem` merges across the non-canonical hole that way); otherwise on
    canonical VAs."""
    vmask = U64((1 << va_bits) - 1) if va_bits else None
    carry: tuple[np.ndarray, ...] | None = None
    for ch in chunks:
        if not len(ch):
            continue
        span = ch.span
        start = ch.va
        s_adj = start & vmask if vmask is not None else start
        cols = [
            start,
            s_adj,
            s_adj + span,
            key(ch).astype(U64),
            ch.level,
            ch.raw,
            ch.pa,
            ch.pa + span,
            ch.eff,
            ch.count.astype(U64),
            span,
        ]
        if carry is not None:
            cols = [np.concatenate([c0, c1]) for c0, c1 in zip(carry, cols)]
        (start, s_adj, e_adj, k, level, raw, pa, pa_end, eff, cnt, span) = cols
        brk = np.ones(len(start), dtype=bool)
        brk[1:] = (k[1:] != k[:-1]) | (s_adj[1:] != e_adj[:-1])
        if phys:
            brk[1:] |= pa[1:] != pa_end[:-1]
        first = np.nonzero(brk)[0]
        last = np.append(first[1:], len(start)) - 1
        tot_span = np.add.reduceat(span, first)
        tot_cnt = np.add.reduceat(cnt, first)
        # the last run stays open: carry it as one pseudo-record
        f, l = first[-1], last[-1]
        carry = (
            start[f : f + 1],
            s_adj[f : f + 1],
            e_adj[l : l + 1],
            k[f : f + 1],
            level[f : f + 1],
            raw[f : f + 1],
            pa[f : f + 1],
            pa_end[l : l + 1],
            eff[f : f + 1],
            tot_cnt[-1:],
            tot_span[-1:],
        )
        if len(first) > 1:
            fi = first[:-1]
            yield Runs(
                start[fi], start[fi] + tot_span[:-1], k[fi], level[fi], raw[fi], pa[fi], eff[fi], tot_cnt[:-1]
            )
    if carry is not None:
        start, _, _, k, level, raw, pa, _, eff, cnt, span = carry
        yield Runs(start, start + span, k, level, raw, pa, eff, cnt)


def collect(runs: Iterable[Runs]) -> Runs:
    parts = [r for r in runs if len(r)]
    if not parts:
        z = np.zeros(0, U64)
        return Runs(z, z, z, np.zeros(0, np.uint8), z, z, np.zeros(0, np.uint8), z)
    return Runs(*(np.concatenate([getattr(r, f) for r in parts]) for f in _FIELDS))


def present_only(chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    from x86pt.scan import EFF_P

    for ch in chunks:
        sel = (ch.eff & np.uint8(EFF_P)) != 0
        if sel.all():
            yield ch
        elif sel.any():
            yield ch.take(sel)
