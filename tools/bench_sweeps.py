#!/usr/bin/env python3
"""Benchmark of `x86pt conform` across workers: the same slice with `--jobs W` (local processes)
and with `--executor dask://` on a local Dask cluster of W worker processes (1 thread each) started
here, in the same run; then the wall time of the full matrix projected for other worker counts
from the measured per-case rate (docs/conformance-sweeps.md §4).

Reported per way of running: cases, wall seconds, cases/s (wall), and the CPU seconds per case of
every process that did the work (the CLI and its workers for --jobs; the CLI and the Dask
workers for dask), so a machine shared with other work still gives a per-case cost.

    python3 tools/bench_sweeps.py                                   # unicorn, extended, 1 slice
    python3 tools/bench_sweeps.py --oracle unicorn --workers 2 --slice "--extended --full --shard 300/600"
    python3 tools/bench_sweeps.py --project 8,32 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _conform(argv: list[str], report: str) -> tuple[int, float, float, dict]:
    """Run the CLI; (exit status, wall seconds, CPU seconds of it and its children, report)."""
    exe = os.path.join(os.path.dirname(sys.executable), "x86pt")
    cmd = [exe if os.path.exists(exe) else "x86pt", "conform", *argv, "--no-repro", "--json-report", report]
    c0, t0 = _children_cpu(), time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - c0
    if p.returncode not in (0, 1):
        sys.exit(f"bench_sweeps: {' '.join(map(shlex.quote, cmd))} failed: {p.stderr.strip()[-400:]}")
    with open(report, encoding="utf-8") as f:
        return p.returncode, wall, cpu, json.load(f)


def _row(name: str, wall: float, cpu: float, rep: dict) -> dict:
    cases = rep["totals"]["cases"]
    return {
        "how": name,
        "cases": cases,
        "mismatches": rep["totals"]["mismatches"],
        "wall_seconds": round(wall, 2),
        "cases_per_s": round(cases / wall) if wall else None,
        "cpu_seconds": round(cpu, 2),
        "cpu_us_per_case": round(1e6 * cpu / cases, 1) if cases else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle", default="unicorn")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--slice",
        default="--extended --full --shard 300/600",
        help="conform options that select the cases (default: 1/600 of the extended matrix, from its middle)",
    )
    ap.add_argument("--project", default="8,32", help="worker counts to project the full matrix for")
    ap.add_argument("--skip-jobs", action="store_true", help="only the Dask run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        print("bench_sweeps: needs dask[distributed] (pip install 'x86pt[dask]')", file=sys.stderr)
        return 2
    from harness.matrix import MatrixFeatures, matrix_for
    from x86pt.registry import get_oracle

    sel = ["--oracle", args.oracle, *shlex.split(args.slice)]
    o = get_oracle(args.oracle)
    try:
        feat = MatrixFeatures.from_caps(o.capabilities())
        version = o.capabilities().version
    finally:
        o.close()
    full = matrix_for(feat, extended="--extended" in sel).size
    rows = []
    with tempfile.TemporaryDirectory(prefix="x86pt-bench-sweeps-") as tmp:
        if not args.skip_jobs:
            _, wall, cpu, rep = _conform(sel + ["--jobs", str(args.workers)], os.path.join(tmp, "jobs.json"))
            rows.append(_row(f"--jobs {args.workers}", wall, cpu, rep))
        import logging

        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            w0 = sum(client.run(_self_cpu).values())
            addr = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
            _, wall, cpu, rep = _conform(sel + ["--executor", addr], os.path.join(tmp, "dask.json"))
            wcpu = sum(client.run(_self_cpu).values()) - w0
        rows.append(_row(f"dask, {args.workers} workers", wall, cpu + wcpu, rep))
    d = rows[-1]
    per_worker = d["cases_per_s"] / args.workers
    proj = []
    for w in (int(x) for x in args.project.split(",") if x.strip()):
        proj.append(
            {
                "workers": w,
                "hours_at_measured_rate": round(full / (per_worker * w) / 3600, 2),
                "hours_at_cpu_cost": round(full * d["cpu_us_per_case"] * 1e-6 / w / 3600, 2),
            }
        )
    load = os.getloadavg()
    out = {
        "oracle": args.oracle,
        "version": version,
        "slice": args.slice,
        "full_matrix_cases": full,
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in load],
        "runs": rows,
        "projection": proj,
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"{args.oracle} ({version}), slice: {args.slice}; {os.cpu_count()} CPUs, load average {load[0]:.1f}"
    )
    for r in rows:
        print(
            f"  {r['how']:<18} {r['cases']:>9,} cases, {r['mismatches']} mismatches, {r['wall_seconds']:7.1f} s "
            f"wall, {r['cases_per_s']:>6,} cases/s; CPU {r['cpu_us_per_case']} us/case"
        )
    print(f"  full matrix ({full:,} cases), projected wall time:")
    for p in proj:
        print(
            f"    {p['workers']:>3} workers: {p['hours_at_measured_rate']} h at the measured rate per worker, "
            f"{p['hours_at_cpu_cost']} h at the measured CPU cost per case (a core per worker)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
