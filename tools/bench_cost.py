#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark x86pt.cost on the 64 GiB preset after a generated workload, against the peer in
the same run: the replay of that workload's trace by the CPA model.

    python3 tools/bench_cost.py [--ops 100000] [--workload mixed-rox] [--layout server-64g]

Prints the replay time, then for the final state: the time to read the leaves out of the model,
each pattern's analytic cost, one simulated run, and the ratio of one full analytic cost (leaves
+ pattern + estimate) to the replay. `cpa compare --cost` computing it at each of S plot samples
costs S times that: the last line gives the largest S that keeps cost under 10% of the replay.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x86pt.cost import analytic, simulate  # noqa: E402
from x86pt.costinput import Leaves, pattern_named  # noqa: E402
from x86pt.cpa.layout import PRESETS  # noqa: E402
from x86pt.cpa.ops import CpaModel  # noqa: E402
from x86pt.cpa.trace import replay  # noqa: E402
from x86pt.cpa.workload import generate  # noqa: E402


def best(f, n: int = 3):
    t_best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = f()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=100_000)
    ap.add_argument("--workload", default="mixed-rox")
    ap.add_argument("--kernel", default="6.15")
    ap.add_argument("--layout", default="server-64g")
    ap.add_argument("--policy", default="none")
    ap.add_argument("--sim-accesses", type=int, default=100_000)
    a = ap.parse_args()
    lay = PRESETS[a.layout]
    ops = generate(lay, a.kernel, a.workload, a.ops, 1)
    m = CpaModel(lay, a.kernel, a.policy)
    r = replay(m, ops, samples=0)
    print(f"replay: {r.ops} ops ({a.workload}, {a.layout}, policy {a.policy}) in {r.seconds:.2f} s")
    t_leaves, lv = best(lambda: Leaves.from_model(m))
    print(f"leaves from the model: {len(lv)} ({lv.counts()}) in {t_leaves * 1e3:.1f} ms")
    worst = 0.0
    for spec in ("uniform", "hot:4", "workload"):
        t_pat, pat = best(lambda: pattern_named(spec, lv, seed=1, ops=ops, page_offset=m.page_offset))  # noqa: B023 (called in this iteration)
        t_an, c = best(lambda: analytic(lv, pat))  # noqa: B023 (called in this iteration)
        total = t_leaves + t_pat + t_an
        worst = max(worst, total)
        print(
            f"  {spec:9s} pattern {t_pat * 1e3:7.1f} ms  analytic {t_an * 1e3:7.1f} ms  "
            f"total {total * 1e3:7.1f} ms = {total / r.seconds:.4f} x replay | walks/1000 "
            f"{1000 * c.walks:.2f} refs/1000 {1000 * c.refs:.2f}  translations {c.translations}"
        )
    pat = pattern_named("uniform", lv)
    t = time.perf_counter()
    s = simulate(lv, pat, accesses=a.sim_accesses, seed=1)
    t_sim = time.perf_counter() - t
    print(
        f"simulated uniform ({a.sim_accesses} accesses + warm-up): {t_sim:.2f} s = "
        f"{t_sim / r.seconds:.3f} x replay | walks/1000 {1000 * s.walks:.2f} refs/1000 {1000 * s.refs:.2f}"
    )
    print(
        f"ratio (slowest full analytic cost / replay): {worst / r.seconds:.4f}; samples that keep "
        f"cost under 10% of the replay: {int(0.1 * r.seconds / worst)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
