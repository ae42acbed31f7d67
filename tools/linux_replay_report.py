#!/usr/bin/env python3
"""Per-step replay agreement of the CPA model with real Linux kernels (issue 6 item 4).

For each committed run under fixtures/linux (or the runs named on the command line), step k is
replayed on the model started from the tables captured after step k-1, and the result is
compared with the kernel after step k: direct-map and highmap leaves, /proc/meminfo DirectMap,
split events. Prints one row per step and the agreement per kernel and paging mode.

    python3 tools/linux_replay_report.py [RUN_DIR ...]
"""
from __future__ import annotations

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.linux.collect import run_meta  # noqa: E402
from harness.linux.replay import render, replay_run  # noqa: E402
from x86pt.errors import X86ptError  # noqa: E402


def main(argv: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = argv or sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "fixtures", "linux", "*", "meta.json")))
    results, groups = [], {}
    try:
        for d in runs:
            cfg = run_meta(d).get("config", {})
            rs = replay_run(d)
            results += rs
            g = groups.setdefault(f"{cfg.get('kernel')} {cfg.get('levels')}-level", [0, 0])
            g[0] += sum(r.identical for r in rs)
            g[1] += len(rs)
    except X86ptError as e:
        print(f"linux_replay_report: error: {e}", file=sys.stderr)
        return 2
    print(render(results))
    print()
    print("agreement (steps identical / total): " +
          ", ".join(f"{k}: {a}/{n}" for k, (a, n) in sorted(groups.items())))
    for r in results:
        for d in r.divergences[:5]:
            print(f"divergence {r.run} step {r.step}: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
