"""Start-up of the CLI against its peers measured in the same run: a bare interpreter
(`python -c pass`), the interpreter importing numpy, and `x86pt --help`, `x86pt decode`, and a
dump of a small image (the embedded demo image, written once). Best of N whole-process runs.

    .venv/bin/python tools/bench_startup.py [--runs 15] [--json]
"""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best(cmd: list[str], runs: int, env: dict) -> float:
    t = float("inf")
    for _ in range(runs):
        s = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
        t = min(t, time.perf_counter() - s)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="runs per command (the best counts)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT)
    py = sys.executable
    x = [py, "-m", "x86pt"]
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(x + ["demo", "--out", d], stdout=subprocess.DEVNULL, env=env, check=True)
        img = os.path.join(d, "linux-like.elf")
        t = {
            "python -c pass": best([py, "-c", "pass"], args.runs, env),
            "python -c 'import numpy'": best([py, "-c", "import numpy"], args.runs, env),
            "x86pt --help": best(x + ["--help"], args.runs, env),
            "x86pt decode": best(x + ["decode", "0x80000000400000e3", "--kind", "pde"], args.runs, env),
            "x86pt dump --format qemu-mem (demo image)": best(
                x + ["dump", img, "--format", "qemu-mem"], args.runs, env
            ),
        }
    bare, numpy = t["python -c pass"], t["python -c 'import numpy'"]
    ratios = {
        "--help / bare": t["x86pt --help"] / bare,
        "decode / bare": t["x86pt decode"] / bare,
        "dump - (numpy import) [ms]": (t["x86pt dump --format qemu-mem (demo image)"] - numpy) * 1e3,
    }
    if args.json:
        print(json.dumps({"seconds": t, "ratios": ratios}, indent=1))
    else:
        for k, v in t.items():
            print(f"{k:<45} {v * 1e3:7.1f} ms")
        for k, v in ratios.items():
            print(f"{k:<45} {v:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
