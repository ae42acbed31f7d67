#!/usr/bin/env python3
"""How fast the classic access matrix runs against each oracle, phase by phase, on a fixed slice,
and the projected wall time of the full matrix (`x86pt conform --oracle O --full --jobs 2`).

The slice: --blocks blocks of --block consecutive cases (default 2 x 65,536, one MatrixSource chunk
each, one at each end of the matrix: the PKU-off and the PKU-on state groups), cut into batches
exactly as `x86pt conform --full` cuts them. Per
oracle, three passes over the same slice, timed in CPU seconds (getrusage: user + system of this
process and of the children it reaped, i.e. the QEMU processes; KVM's guest time is this thread's
system time), with the wall time beside it:

* build: the batches (images, states, probes), harness/matrix.py, streamed as conform does;
* model: the model side alone over each built batch (the vectorised x86pt.batch.model_batch as
  run_conformance uses it, or with --scalar-model the scalar walker, compare.model_run);
* oracle side: oracle.run alone over each built batch — the peer: the oracle's own raw batch speed
  with the model side skipped;
* end to end: run_conformance (build + model + oracle + compare), with the mismatch count.

The projection: end-to-end CPU seconds per case x the matrix size / 2 (two jobs on two cores),
plus one oracle open per part (x86pt conform cuts a --jobs 2 run into 8 parts). CPU time is used
because the machine is shared: wall time says what the load was, not what the code costs.

    python3 tools/bench_matrix.py                          # unicorn, qemu, kvm (those available)
    python3 tools/bench_matrix.py --oracle qemu --blocks 4
    python3 tools/bench_matrix.py --oracle unicorn --scalar-model --json
"""

from __future__ import annotations

import argparse
import json
import gc
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

JOBS = 2
PARTS = 8  # harness/executors.py: PARTS_PER_WORKER * workers parts for --jobs 2


class _Clock:
    """CPU seconds (this process and its reaped children, resource.getrusage: microseconds) and
    wall seconds since start; `add` accumulates one more stretch."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0
        self.start()

    @staticmethod
    def _now() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def start(self) -> None:
        self.c0, self.w0 = self._now(), time.perf_counter()

    def add(self) -> None:
        self.cpu += self._now() - self.c0
        self.wall += time.perf_counter() - self.w0

    def read(self) -> tuple[float, float]:
        self.add()
        return self.cpu, self.wall


def slice_indices(size: int, blocks: int, block: int):
    """`blocks` runs of `block` cases spread evenly over the matrix, each starting on a multiple of
    `block` (with --block 65536, a MatrixSource chunk: the batches a --full run builds)."""
    import numpy as np

    last = max(0, (size - block) // block)
    starts = [(k * last // max(1, blocks - 1)) * block for k in range(blocks)] if blocks > 1 else [0]
    return np.concatenate([np.arange(s, min(size, s + block)) for s in starts])


def bench_oracle(name: str, blocks: int, block: int, batch: int | None, scalar: bool) -> dict:
    import harness.differential as diff
    from harness.cli import _default_batch
    from harness.differential import run_conformance
    from harness.matrix import MatrixFeatures, matrix_for
    from harness.matrix_pack import MatrixSource

    try:
        from harness.matrix_pack import probe_cap
    except ImportError:  # a tree from before batch_probes: batches by cases only

        def probe_cap(oracle):
            return None

    from x86pt.compare import model_run
    from x86pt.registry import get_oracle
    from x86pt.state import as_profile

    if scalar:
        diff._fast_model = lambda b: None
    c = _Clock()
    o = get_oracle(name)
    try:
        caps = o.capabilities()
        open_cpu, open_wall = c.read()
        m = matrix_for(MatrixFeatures.from_caps(caps))
        idx = slice_indices(m.size, blocks, block)
        prof = as_profile(o.profile)
        bc = batch or _default_batch(o)

        def source():
            src = MatrixSource(m, prof, indices=idx, batch_cases=bc)
            if batch is None and probe_cap(o) is not None:
                src.batch_probes = probe_cap(o)  # as x86pt conform does
            src.chunk = block  # each block is grouped into batches as a run's chunk is
            return src

        out: dict = {
            "oracle": name,
            "version": caps.version,
            "matrix_cases": m.size,
            "cases": len(idx),
            "batch_cases": bc,
            "model_side": "scalar" if scalar else "vectorised",
            "oracle_open_cpu_s": round(open_cpu, 3),
        }
        gc_was = gc.get_threshold()
        gc.set_threshold(max(gc_was[0], 50_000), max(gc_was[1], 20), max(gc_was[2], 100))  # as conform
        c = _Clock()
        probes = sum(len(b.probes) for b in source().batches())  # streamed, as conform builds
        out["build"] = c.read()
        model, oside = _Clock(), _Clock()
        for b in source().batches():
            model.start()
            fast = None if scalar else diff._fast_model(b)
            if fast is None:
                results, _ = model_run(b.memory, b.state, b.probes)
                diff.fix_write_values(b, results)
            else:
                diff._fix_write_values_fast(b, fast)
            model.add()
            oside.start()
            o.run(b.memory, b.state, b.probes)
            oside.add()
        out["model"] = (model.cpu, model.wall)
        out["oracle_side"] = (oside.cpu, oside.wall)
        gc.set_threshold(*gc_was)
        c = _Clock()
        summ = run_conformance(o, source())
        out["end_to_end"] = c.read()
        out["mismatches"] = summ.mismatches
        out["probes"] = probes
    finally:
        o.close()
    n = out["cases"]
    for k in ("build", "model", "oracle_side", "end_to_end"):
        cpu, wall = out[k]
        out[k] = {
            "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3),
            "cases_per_cpu_s": round(n / cpu) if cpu > 0 else None,
        }
    e2e = out["end_to_end"]["cpu_s"]
    ocpu = out["oracle_side"]["cpu_s"]
    out["oracle_probes_per_cpu_s"] = round(probes / ocpu) if ocpu else None
    out["projected_full_cpu_s"] = round(e2e / n * m.size, 1)
    out["projected_full_wall_s_jobs2"] = round(e2e / n * m.size / JOBS + PARTS / JOBS * open_cpu, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--oracle", action="append", help="unicorn, qemu, kvm (repeatable; default all available)"
    )
    ap.add_argument("--blocks", type=int, default=2, help="blocks in the slice (spread over the matrix)")
    ap.add_argument(
        "--block",
        type=int,
        default=1 << 16,
        help="consecutive cases per block (default: one MatrixSource chunk)",
    )
    ap.add_argument("--batch", type=int, default=None, help="cases per oracle batch (default: conform's)")
    ap.add_argument("--scalar-model", action="store_true", help="the scalar walker as the model side")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.blocks < 1 or args.block < 1 or (args.batch is not None and args.batch < 1):
        ap.error("--blocks, --block and --batch must be >= 1")
    from x86pt.registry import availability

    names = args.oracle or ["unicorn", "qemu", "kvm"]
    rc = 0
    for name in names:
        ok, why = availability(name)
        if not ok:
            print(f"bench_matrix: {name} not available: {why}", file=sys.stderr)
            rc = 2 if args.oracle else rc
            continue
        res = bench_oracle(name, args.blocks, args.block, args.batch, args.scalar_model)
        if args.json:
            print(json.dumps(res))
            continue
        print(
            f"{name} ({res['version']}): {res['cases']:,} cases of {res['matrix_cases']:,}, "
            f"batches of {res['batch_cases']}, model side {res['model_side']}, "
            f"{res['mismatches']} mismatches"
        )
        for k in ("build", "model", "oracle_side", "end_to_end"):
            r = res[k]
            print(
                f"  {k:<11} {r['cases_per_cpu_s']:>9,} cases/CPU-s   ({r['cpu_s']:.2f} CPU-s, "
                f"{r['wall_s']:.2f} s wall)"
            )
        print(f"  peer: the oracle alone runs {res['oracle_probes_per_cpu_s']:,} probes/CPU-s")
        print(
            f"  full classic matrix: {res['projected_full_cpu_s']:,.0f} CPU-s; with --jobs 2 on 2 "
            f"free cores ~{res['projected_full_wall_s_jobs2'] / 60:.1f} min"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
