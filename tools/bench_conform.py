#!/usr/bin/env python3
"""Benchmark of the differential runner: the access matrix (full, a shard or a fraction) against
one oracle, with the model measured in the same run.

Reports: case count, mismatches, wall time, and per phase the oracle's cases/s next to the
model's cases/s (x86pt.walk under the oracle's profile) and the image building / comparison time,
each summed over the worker processes. With --fraction F it runs an evenly spread fixed part of
the matrix (every shard of --jobs gets its share) and extrapolates the full-matrix wall time,
saying so.

    python3 tools/bench_conform.py --oracle unicorn                  # the full classic matrix
    python3 tools/bench_conform.py --oracle unicorn --fraction 0.02 --jobs 2
    python3 tools/bench_conform.py --oracle kvm --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _work(oracle_name: str, extended: bool, lo: int, hi: int, step: int, batch: int | None) -> dict:
    import numpy as np
    from harness.differential import run_conformance
    from harness.matrix import MatrixFeatures, matrix_for
    from harness.matrix_pack import MatrixSource
    from x86pt.registry import get_oracle
    from x86pt.state import as_profile

    o = get_oracle(oracle_name)
    try:
        caps = o.capabilities()
        m = matrix_for(MatrixFeatures.from_caps(caps), extended=extended)
        prof = as_profile(o.profile)
        if step > 1:
            # every step-th block of 4096 cases: whole batches, spread over the matrix
            blocks = [(b, min(b + 4096, hi)) for b in range(lo, hi, 4096 * step)]
            idx = np.concatenate([np.arange(a, b) for a, b in blocks]) if blocks else np.zeros(0, int)
            src = MatrixSource(m, prof, indices=idx, batch_cases=batch or 4096)
            src.chunk = 4096
        else:
            src = MatrixSource(m, prof, start=lo, stop=hi, batch_cases=batch or 4096)
        examples = []

        def on_mm(mm):
            if len(examples) < 3:
                examples.append(mm.render())

        s = run_conformance(o, src, on_mismatch=on_mm)
        return s.to_json() | {"examples": examples, "matrix_size": m.size, "version": caps.version}
    finally:
        o.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle", default="unicorn")
    ap.add_argument("--extended", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (each its own oracle)")
    ap.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="run about this fraction of the matrix (blocks of 4096 spread evenly)",
    )
    ap.add_argument("--batch", type=int, default=None, help="cases per oracle batch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not 0 < args.fraction <= 1 or args.jobs < 1:
        ap.error("--fraction must be in (0, 1], --jobs >= 1")
    from harness.matrix import MatrixFeatures, matrix_for
    from x86pt.registry import availability, get_oracle

    ok, why = availability(args.oracle)
    if not ok:
        print(f"bench_conform: {args.oracle} not available: {why}", file=sys.stderr)
        return 2
    o = get_oracle(args.oracle)
    try:
        size = matrix_for(MatrixFeatures.from_caps(o.capabilities()), extended=args.extended).size
    finally:
        o.close()
    step = max(1, round(1 / args.fraction))
    parts = [(i * size // args.jobs, (i + 1) * size // args.jobs) for i in range(args.jobs)]
    t0 = time.perf_counter()
    if args.jobs == 1:
        outs = [_work(args.oracle, args.extended, parts[0][0], parts[0][1], step, args.batch)]
    else:
        with ProcessPoolExecutor(args.jobs) as ex:
            futs = [
                ex.submit(_work, args.oracle, args.extended, lo, hi, step, args.batch) for lo, hi in parts
            ]
            outs = [f.result() for f in futs]
    wall = time.perf_counter() - t0
    tot = {
        k: sum(o[k] for o in outs)
        for k in (
            "cases",
            "probes",
            "mismatches",
            "model_seconds",
            "oracle_seconds",
            "build_seconds",
            "seconds",
        )
    }
    compare_s = tot["seconds"] - tot["model_seconds"] - tot["oracle_seconds"] - tot["build_seconds"]
    res = {
        "oracle": args.oracle,
        "version": outs[0]["version"],
        "extended": args.extended,
        "matrix_cases": size,
        "cases": tot["cases"],
        "probes": tot["probes"],
        "mismatches": tot["mismatches"],
        "jobs": args.jobs,
        "wall_seconds": round(wall, 2),
        "oracle_cases_per_s": round(tot["cases"] / tot["oracle_seconds"]) if tot["oracle_seconds"] else None,
        "model_cases_per_s": round(tot["cases"] / tot["model_seconds"]) if tot["model_seconds"] else None,
        "build_cases_per_s": round(tot["cases"] / tot["build_seconds"]) if tot["build_seconds"] else None,
        "compare_cases_per_s": round(tot["cases"] / compare_s) if compare_s > 0 else None,
        "oracle_over_model_speed": round(tot["model_seconds"] / tot["oracle_seconds"], 3)
        if tot["oracle_seconds"]
        else None,
        "cpu_seconds": {k: round(tot[k], 1) for k in ("oracle_seconds", "model_seconds", "build_seconds")}
        | {"compare_seconds": round(compare_s, 1)},
    }
    if tot["cases"] < size:
        res["extrapolated_full_matrix_wall_seconds"] = round(wall * size / max(tot["cases"], 1), 1)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>38}: {v}")
        for o in outs:
            for e in o["examples"]:
                print(e)
    return 0 if tot["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
