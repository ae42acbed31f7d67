# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests that kill the surviving mutants of x86pt/coalesce.py (tools/mutate.py x86pt/coalesce.py).

Records are written by hand; the expected runs follow the module's contract (a run continues while
the key is equal and the records are adjacent in VA, and with phys=True in PA too; the last run of
a chunk continues into the next chunk; va_bits masks VAs so QEMU's `info mem` merges across the
non-canonical hole; a run's level/raw/pa/eff are its first record's), not the code's output."""

from __future__ import annotations

import numpy as np

from x86pt.coalesce import Runs, coalesce, collect, present_only
from x86pt.scan import EFF_P, EFF_RW, U64, Chunk

from records import chunk

P, PRW = EFF_P, EFF_P | EFF_RW


def key(ch: Chunk) -> np.ndarray:
    return ch.eff


def rows(runs: Runs) -> list[tuple]:
    assert runs.start.dtype == U64 and runs.entries.dtype == U64 and runs.level.dtype == np.uint8
    return [
        tuple(
            int(getattr(runs, f)[i]) for f in ("start", "end", "key", "level", "raw", "pa", "eff", "entries")
        )
        for i in range(len(runs))
    ]


def test_runs_break_on_key_and_va_gaps():
    ch = chunk(
        (0x1000, 2, 1, 0x5003, 0x5000, PRW),
        (0x3000, 1, 1, 0x7003, 0x7000, PRW),
        (0x4000, 1, 1, 0x8001, 0x8000, P),
        (0x6000, 1, 1, 0x9001, 0x9000, P),
    )
    assert rows(collect(coalesce([ch], key))) == [
        (0x1000, 0x4000, PRW, 1, 0x5003, 0x5000, PRW, 3),
        (0x4000, 0x5000, P, 1, 0x8001, 0x8000, P, 1),
        (0x6000, 0x7000, P, 1, 0x9001, 0x9000, P, 1),
    ]


def test_phys_breaks_where_the_frames_are_not_contiguous():
    # records 0 -> 1 contiguous in PA; 1 -> 2 VA-adjacent but PA jumps; 2 -> 3 key changes while
    # PA stays contiguous (the key break must survive the PA test).
    ch = chunk(
        (0x1000, 1, 1, 0x5003, 0x5000, PRW),
        (0x2000, 1, 1, 0x6003, 0x6000, PRW),
        (0x3000, 1, 1, 0x9003, 0x9000, PRW),
        (0x4000, 1, 1, 0xA001, 0xA000, P),
    )
    assert rows(collect(coalesce([ch], key, phys=True))) == [
        (0x1000, 0x3000, PRW, 1, 0x5003, 0x5000, PRW, 2),
        (0x3000, 0x4000, PRW, 1, 0x9003, 0x9000, PRW, 1),
        (0x4000, 0x5000, P, 1, 0xA001, 0xA000, P, 1),
    ]
    ch = chunk((0x1000, 1, 1, 0x5003, 0x5000, PRW), (0x2000, 1, 1, 0x9003, 0x9000, PRW))
    assert [r[:2] for r in rows(collect(coalesce([ch], key, phys=True)))] == [
        (0x1000, 0x2000),
        (0x2000, 0x3000),
    ]
    assert [r[:2] for r in rows(collect(coalesce([ch], key)))] == [(0x1000, 0x3000)]


def test_the_open_run_continues_into_the_next_chunk():
    c1 = chunk(
        (0x1000, 1, 1, 0x5001, 0x5000, P),
        (0x3000, 1, 1, 0x7003, 0x7000, PRW),
        (0x4000, 2, 1, 0x8003, 0x8000, PRW),
    )
    c2 = chunk((0x6000, 1, 1, 0xA003, 0xA000, PRW), (0x7000, 1, 1, 0xB001, 0xB000, P))
    out = list(coalesce([c1, chunk(), c2], key, phys=True))
    assert rows(collect(out)) == [
        (0x1000, 0x2000, P, 1, 0x5001, 0x5000, P, 1),
        (0x3000, 0x7000, PRW, 1, 0x7003, 0x7000, PRW, 4),
        (0x7000, 0x8000, P, 1, 0xB001, 0xB000, P, 1),
    ]
    assert [len(r) for r in out] == [1, 1, 1]  # each run emitted once it is closed


def test_va_bits_merges_across_the_non_canonical_hole():
    ch = chunk((0x7FFFFFFFF000, 1, 1, 0x5001, 0x5000, P), (0xFFFF800000000000, 1, 1, 0x6001, 0x6000, P))
    assert rows(collect(coalesce([ch], key, va_bits=48))) == [
        (0x7FFFFFFFF000, 0x800000001000, P, 1, 0x5001, 0x5000, P, 2)
    ]  # start + 2 pages
    assert len(collect(coalesce([ch], key))) == 2


def test_collect_take_and_present_only():
    empty = collect([])
    assert len(empty) == 0 and empty.level.dtype == np.uint8 and empty.eff.dtype == np.uint8
    assert all(getattr(empty, f).dtype == U64 for f in ("start", "end", "key", "raw", "pa", "entries"))
    ch = chunk(
        (0x1000, 1, 1, 0x5001, 0x5000, P), (0x3000, 1, 2, 0, 0, 0), (0x5000, 1, 1, 0x7003, 0x7000, PRW)
    )
    runs = collect(coalesce([ch], key))
    t = runs.take(np.array([False, True, True]))
    assert rows(t) == [(0x3000, 0x203000, 0, 2, 0, 0, 0, 1), (0x5000, 0x6000, PRW, 1, 0x7003, 0x7000, PRW, 1)]
    kept = list(present_only([ch, chunk((0x9000, 1, 1, 0, 0, 0)), chunk((0xA000, 1, 1, 0xA001, 0xA000, P))]))
    assert [list(map(int, c.va)) for c in kept] == [[0x1000, 0x5000], [0xA000]]


def test_carried_run_keeps_its_first_level_and_later_runs_theirs():
    # B (4K) + C (2M) + D (2M, next chunk) form one run (same key, adjacent); its level is B's.
    # A chunk holding only the continuation of the open run closes nothing: no empty batch.
    c1 = chunk(
        (0x1000, 1, 1, 0x5001, 0x5000, P),
        (0x1FF000, 1, 1, 0x7003, 0x7000, PRW),
        (0x200000, 1, 2, 0x200083, 0x200000, PRW),
    )
    c2 = chunk((0x400000, 1, 2, 0x400083, 0x400000, PRW))
    c3 = chunk((0x600000, 1, 1, 0xB001, 0xB000, P))
    out = list(coalesce([c1, c2, c3], key))
    assert all(len(r) for r in out)
    assert rows(collect(out)) == [
        (0x1000, 0x2000, P, 1, 0x5001, 0x5000, P, 1),
        (0x1FF000, 0x600000, PRW, 1, 0x7003, 0x7000, PRW, 3),
        (0x600000, 0x601000, P, 1, 0xB001, 0xB000, P, 1),
    ]
    c2 = chunk((0x400000, 1, 2, 0x400083, 0x400000, PRW), (0x600000, 1, 1, 0xB001, 0xB000, P))
    assert [r[3] for r in rows(collect(coalesce([c1, c2], key)))] == [1, 1, 1]


def test_empty_collect_has_no_rows_in_any_column():
    empty = collect([])
    assert [
        len(getattr(empty, f)) for f in ("start", "end", "key", "level", "raw", "pa", "eff", "entries")
    ] == [0] * 8
