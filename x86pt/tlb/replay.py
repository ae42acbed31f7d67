# SPDX-License-Identifier: GPL-2.0-or-later
"""The replay driver's side (`TlbReplay`): what `cpa replay --tlb` keeps between operations."""

from __future__ import annotations

from typing import Iterable

from x86pt.errors import BadInputError
from x86pt.state import PagingState
from x86pt.tlb.differences import Difference, Window, WindowTracker
from x86pt.tlb.entries import TLB_FLUSH_ALL, TableReader, TLB_SINGLE_PAGE_FLUSH_CEILING
from x86pt.tlb.kernel import FlushDone, TlbOp, TlbResult, apply_tlb_op, flush_tlb_kernel_range
from x86pt.tlb.system import TlbSystem


# -- the replay driver's side --------------------------------------------------------------------
FLUSH_OPS = ("flush_tlb_all", "flush_tlb_kernel_range", "flush_tlb_local", "invlpg")


class TlbReplay:
    """What `cpa replay --tlb` keeps between ops: a TlbSystem, the windows, and the rule of which
    flushes count. The CPA replay calls, per op:

        begin_op(memory, ranges)        tables before the op; the VA ranges it may change
        flush(memory, kind, ...)        at each flush the CPA model issues, tables at that moment
        trace_op(op)                    for a TLB op read from the trace (parse_tlb_line)
        end_op(index, memory)           tables after the op -> differences, closed windows

    `assume`: "speculate" (default) — every CPU may have cached every translation of the op's
    ranges before the op and again after each flush inside it (§4.10.2.3: prefetch and
    speculative fills need no access in the program; the direct map is everybody's); "touch" —
    only `touch`/`speculate` ops of the trace fill. `flushes`: "model" applies the flushes the
    CPA model issues; "trace" ignores them, so only the trace's flush ops invalidate (replay
    against the invalidations a real kernel recorded). The trace's flush ops always apply: they
    are the callers' own flushes (vm_reset_perms after the *_noflush calls) or recorded ones,
    and a flush applied twice at the same point changes nothing."""

    def __init__(
        self,
        memory: TableReader,
        state: PagingState,
        ncpus: int = 2,
        *,
        kernel: str = "6.15",
        assume: str = "speculate",
        flushes: str = "model",
        ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING,
    ) -> None:
        if assume not in ("speculate", "touch"):
            raise BadInputError("assume must be 'speculate' or 'touch'")
        if flushes not in ("model", "trace"):
            raise BadInputError("flushes must be 'model' or 'trace'")
        self.system = TlbSystem(memory, state, ncpus)
        self.tracker = WindowTracker()
        self.kernel, self.assume, self.flushes, self.ceiling = kernel, assume, flushes, ceiling
        self._ranges: list[tuple[int, int]] = []
        self.flushes_done: list[FlushDone] = []

    def _fill(self) -> None:
        if self.assume == "speculate":
            for s, e in self._ranges:
                self.system.speculate(None, s, e)

    def begin_op(self, memory: TableReader, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.system.memory = memory
        self._ranges = [(s, e) for s, e in ranges if e > s]
        self._fill()

    def flush(
        self, memory: TableReader, kind: str, start: int = 0, end: int = TLB_FLUSH_ALL, cpu: int | None = None
    ) -> FlushDone | None:
        """A flush the CPA model issues. kind: "all" (flush_tlb_all: split, collapse, cpa_flush
        over the ceiling, cpa_flush_all), "range" (cpa_flush / flush_tlb_kernel_range [start,
        end): the ceiling rule of the kernel version), "local" (this CPU's __flush_tlb_all:
        DEBUG_PAGEALLOC), "page" (one INVLPG of start on `cpu`, or on every CPU: kfence's local
        flush, flush_tlb_one_kernel). Ignored (None) when flushes come from the trace."""
        if self.flushes != "model":
            return None
        self.system.memory = memory
        if kind == "all":
            self.system.flush_all()
            done = FlushDone(full=1, cpus=tuple(range(len(self.system.cpus))))
        elif kind == "range":
            done = flush_tlb_kernel_range(self.system, start, end, kernel=self.kernel, ceiling=self.ceiling)
        elif kind == "local":
            self.system.flush_all(cpu)
            done = FlushDone(full=1, cpus=tuple(c.index for c in self.system.selected(cpu)))
        elif kind == "page":
            self.system.invlpg(start, cpu)
            done = FlushDone(pages=(start,), cpus=tuple(c.index for c in self.system.selected(cpu)))
        else:
            raise BadInputError(f"unknown flush kind {kind!r} (all, range, local, page)")
        self.flushes_done.append(done)
        self._fill()  # other CPUs may cache the tables as they are now, before the next write
        return done

    def trace_op(self, op: TlbOp, memory: TableReader | None = None) -> TlbResult:
        """A TLB op from the trace (flushes, touches, speculative fills, CR writes)."""
        if memory is not None:
            self.system.memory = memory
        r = apply_tlb_op(self.system, op, kernel=self.kernel, ceiling=self.ceiling)
        if isinstance(r, FlushDone):
            self.flushes_done.append(r)
        return r

    def end_op(self, index: int, memory: TableReader) -> tuple[list[Difference], list[Window]]:
        """Differences after op `index` and the windows this op closed."""
        self.system.memory = memory
        # Entries equal to the tables carry nothing the next begin_op's fill would not make
        # again before their range changes, so a speculating replay keeps only stale ones and
        # its cost stays with the size of each op, not of everything cached so far.
        diffs = self.system.differences(prune=self.assume == "speculate")
        return diffs, self.tracker.update(index, diffs)
