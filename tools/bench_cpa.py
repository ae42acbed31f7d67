#!/usr/bin/env python3
"""Benchmark the CPA model: replay speed on the 64 GiB preset (1G pages) of a generated trace,
with validation off and with incremental validation, and memory used. The peer measured in the
same run is the core walker (x86pt.walk) translating each op's address on the exported image:
the cost of one architectural walk per op, which a walker-based model would pay at least once.

    python3 tools/bench_cpa.py [--ops 1000000] [--workload mixed-rox] [--kernel 6.15] [--repeat 3]
    python3 tools/bench_cpa.py --matrix [--ops 100000]

Each replay is timed by the wall clock and by this process's CPU time (time.process_time): on a
machine shared with other jobs the CPU-time figure is the one to compare between two versions;
--repeat N keeps the best of N replays. The model's size is measured with tracemalloc after
200k ops (all the memory the model holds: tables, dicts, counters).

--matrix replays every generated workload under every merge policy and kernel rule set with the
validator on (traces generated per rule set, seed 1) and prints one line per cell: the verdict
(ok, or the first violation's op index and invariant) and the seconds it took.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x86pt.cpa.layout import PRESETS  # noqa: E402
from x86pt.cpa.ops import CpaModel  # noqa: E402
from x86pt.cpa.trace import replay  # noqa: E402
from x86pt.cpa.workload import generate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--workload", default="mixed-rox")
    ap.add_argument("--kernel", default="6.15")
    ap.add_argument("--layout", default="server-64g")
    ap.add_argument("--policy", default="none")
    ap.add_argument(
        "--validated-ops", type=int, default=None, help="ops for the validated run (default: --ops)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="replays per figure, the best kept (default 1)")
    ap.add_argument("--matrix", action="store_true", help="verdict and time of every cell")
    a = ap.parse_args()
    lay = PRESETS[a.layout]
    if a.matrix:
        return matrix(lay, a.ops if a.ops != 1_000_000 else 100_000)
    t = time.perf_counter()
    ops = generate(lay, a.kernel, a.workload, a.ops, 1)
    print(f"generated {len(ops)} ops ({a.workload}, {a.kernel}) in {time.perf_counter() - t:.1f} s")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m, r, cpu = timed_replay(lay, a, ops, False)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"validation off : {r.ops / r.seconds:10.0f} ops/s  ({r.ops} ops, {r.seconds:.1f} s); "
        f"CPU time {r.ops / cpu:.0f} ops/s; max-RSS growth {(rss1 - rss0) / 1024:.0f} MiB, tables {r.tables}"
    )
    # tracemalloc slows Python down a lot: the model's own size is measured in a separate run
    tracemalloc.start()
    mm = CpaModel(lay, a.kernel, a.policy)
    replay(mm, ops[:200_000], samples=0)
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    table_bytes = mm.table_count() * 4096
    print(
        f"model after 200k ops: {cur / 2**20:.1f} MiB live ({mm.table_count()} tables, "
        f"{table_bytes / 2**20:.1f} MiB of table pages: {cur / table_bytes:.2f}x), peak {peak / 2**20:.1f} MiB"
    )
    del mm
    nv = a.validated_ops or a.ops
    _, r2, cpu2 = timed_replay(lay, a, ops[:nv], True)
    print(
        f"validation on  : {r2.ops / r2.seconds:10.0f} ops/s  ({r2.ops} ops, {r2.seconds:.1f} s); "
        f"CPU time {r2.ops / cpu2:.0f} ops/s; {r2.pages_checked} page checks, violation: {r2.violation}"
    )
    # peer: one x86pt.walk per op on the exported final image
    from x86pt.walk import Access, walk

    mem, st = m.export(), m.paging_state()
    sample = [op[1] for op in ops[:50_000]]
    acc = Access("read")
    t = time.perf_counter()
    for va in sample:
        walk(st, mem, va, acc)
    ws = len(sample) / (time.perf_counter() - t)
    print(f"peer x86pt.walk: {ws:10.0f} walks/s on the exported image")
    print(
        f"ratio model(off)/walk = {r.ops / r.seconds / ws:.1f}x, model(validated)/walk = "
        f"{r2.ops / r2.seconds / ws:.1f}x"
    )
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(m.counters.meminfo_text(lay.gbpages).rstrip())
    return 0


def timed_replay(lay, a, ops, validate: bool):
    """The best of a.repeat replays on fresh models: (model, result, CPU seconds)."""
    best = None
    for _ in range(max(1, a.repeat)):
        m = CpaModel(lay, a.kernel, a.policy)
        c0 = time.process_time()
        r = replay(m, ops, validate=validate, samples=400)
        cpu = time.process_time() - c0
        if best is None or cpu < best[2]:
            best = (m, r, cpu)
        del m
    return best


def matrix(lay, n: int) -> int:
    from x86pt.cpa.merge import POLICIES
    from x86pt.cpa.workload import MIXES, SCENARIOS

    print(f"{'workload':<12} {'kernel':<6} " + " ".join(f"{p:>22}" for p in POLICIES))
    total = time.perf_counter()
    for wl in tuple(MIXES) + SCENARIOS:
        for kernel in ("6.1", "6.6", "6.15", "6.18"):
            ops = generate(lay, kernel, wl, n, 1)
            cells = []
            for p in POLICIES:
                t = time.perf_counter()
                r = replay(CpaModel(lay, kernel, p), ops, validate=True, samples=0)
                v = r.violation
                verdict = "ok" if v is None else f"{v.invariant}@{v.op_index}"
                cells.append(f"{verdict:>12} {time.perf_counter() - t:7.1f}s")
            print(f"{wl:<12} {kernel:<6} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print(f"{n} ops per trace; total {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
