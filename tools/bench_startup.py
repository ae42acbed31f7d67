"""Start-up of the CLI against its peers measured in the same run: a bare interpreter
(`python -c pass`), the interpreter importing numpy, and `x86pt --help`, `x86pt decode`, and a
dump of a small image (the embedded demo image, written once). Best of N whole-process runs
(round robin: each round runs every command once), as wall time and as the child's CPU time
(user + sys from wait4: less sensitive to a loaded machine).

    .venv/bin/python tools/bench_startup.py [--runs 15] [--json]
    .venv/bin/python tools/bench_startup.py --python /tmp/wheelvenv/bin/python   # a wheel install
    .venv/bin/python tools/bench_startup.py --imports decode 0x80000000400000e3 --kind pde

Every child runs with byte code cached: PYTHONDONTWRITEBYTECODE is dropped and the children share
a fresh PYTHONPYCACHEPREFIX (the first, unmeasured run of each command fills it), so a shell that
sets PYTHONDONTWRITEBYTECODE does not make every run compile x86pt from source. The children run
in a temporary directory, so `python -m x86pt` finds the x86pt of the interpreter (the checkout on
PYTHONPATH for the dev venv unless --no-pythonpath; the installed wheel for a wheel venv).
--imports prints, for one command, each module's best self / cumulative import time over the runs
(`python -X importtime`; modules loaded by importlib.import_module are not listed by the
interpreter, their imports are).
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


def run_once(cmd: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one whole-process run."""
    s = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - s
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}")
    return wall, ru.ru_utime + ru.ru_stime


def best(cmds: dict[str, list[str]], runs: int, env: dict, cwd: str) -> dict[str, tuple[float, float]]:
    """{name: (best wall, best CPU)} over `runs` rounds; each round runs every command once, so a
    change of load on a shared machine reaches all of them alike (a ratio compares like with like)."""
    for cmd in cmds.values():
        run_once(cmd, env, cwd)  # fills the byte-code cache
    t = {k: (float("inf"), float("inf")) for k in cmds}
    for _ in range(runs):
        for k, cmd in cmds.items():
            a, b = run_once(cmd, env, cwd)
            t[k] = (min(t[k][0], a), min(t[k][1], b))
    return t


def importtime(cmd: list[str], runs: int, env: dict, cwd: str) -> list[tuple[str, int, int]]:
    """[(indented module name, best self us, best cumulative us)] in first-seen order."""
    seen: dict[str, list[int]] = {}
    for _ in range(runs + 1):
        r = subprocess.run(
            [cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, env=env, cwd=cwd
        )
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or line.count("|") != 2 or "[us]" in line:
                continue
            s, c, name = line[len("import time:") :].split("|")
            b = seen.setdefault(name.rstrip(), [int(s), int(c)])
            b[0], b[1] = min(b[0], int(s)), min(b[1], int(c))
    return [(k, v[0], v[1]) for k, v in seen.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="runs per command (the best counts)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter to measure")
    ap.add_argument("--no-pythonpath", action="store_true", help="do not put the checkout on PYTHONPATH")
    ap.add_argument(
        "--module",
        action="store_true",
        help="run `python -m x86pt` (default: the interpreter's `x86pt` console script when it has one)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--imports", nargs=argparse.REMAINDER, metavar="ARGS", help="x86pt ARGS: import times")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if not args.no_pythonpath:
        env["PYTHONPATH"] = ROOT
    py = args.python
    script = os.path.join(os.path.dirname(py), "x86pt")
    # the console script is what a user runs; `python -m` adds runpy's imports (importlib.util,
    # contextlib) to every run
    x = [py, "-m", "x86pt"] if args.module or not os.path.exists(script) else [py, script]
    with tempfile.TemporaryDirectory() as d:
        env["PYTHONPYCACHEPREFIX"] = os.path.join(d, "pycache")
        if args.imports is not None:
            for name, s, c in importtime([py, "-m", "x86pt", *args.imports], args.runs, env, d):
                print(f"{s:8d} {c:8d} {name}")
            return 0
        subprocess.run(x + ["demo", "--out", d], stdout=subprocess.DEVNULL, env=env, cwd=d, check=True)
        img = os.path.join(d, "linux-like.elf")
        load = os.getloadavg()[0]
        cmds = {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import numpy'": [py, "-c", "import numpy"],
            "x86pt --help": x + ["--help"],
            "x86pt decode": x + ["decode", "0x80000000400000e3", "--kind", "pde"],
            "x86pt dump --format qemu-mem (demo image)": x + ["dump", img, "--format", "qemu-mem"],
        }
        t = best(cmds, args.runs, env, d)
        load = max(load, os.getloadavg()[0])
    ratios = {}
    for i, what in enumerate(("wall", "cpu")):
        bare, numpy = t["python -c pass"][i], t["python -c 'import numpy'"][i]
        ratios[what] = {
            "--help / bare": t["x86pt --help"][i] / bare,
            "decode / bare": t["x86pt decode"][i] / bare,
            "dump - (numpy import) [ms]": (t["x86pt dump --format qemu-mem (demo image)"][i] - numpy) * 1e3,
        }
    if args.json:
        print(json.dumps({"command": x, "load": load, "seconds": t, "ratios": ratios}, indent=1))
    else:
        print(f"{' '.join(x)}  (best of {args.runs}; 1-min load average up to {load:.1f})")
        print(f"{'':<45} {'wall':>8} {'cpu':>8}")
        for k, (w, c) in t.items():
            print(f"{k:<45} {w * 1e3:5.1f} ms {c * 1e3:5.1f} ms")
        for k in ratios["wall"]:
            print(f"{k:<45} {ratios['wall'][k]:8.2f} {ratios['cpu'][k]:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
