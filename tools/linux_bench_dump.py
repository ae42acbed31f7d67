#!/usr/bin/env python3
"""Benchmark: `x86pt dump --format qemu-mem` against QEMU's own HMP `info mem` on the same real
guest (Debian kernel, paused at the end of its workload). Both are measured in the same run:
`info mem` by QMP on the paused guest, then x86pt on the page-table image captured from that
very guest's RAM at that moment.

  python3 tools/linux_bench_dump.py [--kernel 6.1] [--levels 4] [--run DIR]

With --run DIR, an existing run made with `x86pt linux run ... --info-mem` is used instead of
booting. Prints the two times and their ratio; writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness.linux.collect import load_json, materialize  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--run", default=None, help="an existing run dir made with --info-mem")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="x86pt-bench-") as tmp:
        run_dir = args.run
        if run_dir is None:
            from harness.linux.run import RunConfig, run

            run_dir = os.path.join(tmp, "run")
            run(
                RunConfig(
                    kernel=args.kernel, workload="boot", levels=args.levels, images="last", info_mem=True
                ),
                run_dir,
                log=lambda m: print(m, file=sys.stderr),
            )
        meta = load_json(os.path.join(run_dir, "run.json"))
        if "info_mem_seconds" not in meta:
            print("that run has no info mem timing (run it with --info-mem)", file=sys.stderr)
            return 2
        steps = sorted(d for d in os.listdir(run_dir) if d.startswith("step-"))
        elf = materialize(os.path.join(run_dir, steps[-1]), "tables.elf", tmp)
        load_json(os.path.join(run_dir, "layout.json"))
        times = []
        lines = 0
        for _ in range(args.repeat):
            t = time.monotonic()
            p = subprocess.run(
                [sys.executable, "-m", "x86pt", "dump", elf, "--format", "qemu-mem"],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            times.append(time.monotonic() - t)
            if p.returncode != 0:
                print(f"x86pt dump failed: {p.stderr.strip()}", file=sys.stderr)
                return 1
            lines = len(p.stdout.splitlines())
        best = min(times)
        qemu = meta["info_mem_seconds"]
        print(
            f"guest: {meta['kernel_release']} {meta['config']['levels']}-level, QEMU {meta['qemu_version']}"
        )
        print(f"QEMU HMP `info mem`: {qemu:.2f} s, {meta.get('info_mem_lines')} lines")
        print(
            f"x86pt dump --format qemu-mem (whole process, best of {args.repeat}): {best:.2f} s, {lines} lines"
        )
        print(f"ratio info mem / x86pt: {qemu / best:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
