#!/usr/bin/env python3
"""Per-step replay agreement of the CPA model with real Linux kernels (issue 6 item 4).

For each committed run under fixtures/linux (or the runs named on the command line), step k is
replayed on the model started from the tables captured after step k-1, and the result is
compared with the kernel after step k: direct-map and highmap leaves, /proc/meminfo DirectMap,
split events. Prints one row per step and the agreement per kernel and paging mode.

    python3 tools/linux_replay_report.py [RUN_DIR ...]
    python3 tools/linux_replay_report.py --flushes [RUN_DIR ...]

--flushes: the kernel's TLB flushes instead (issue 15 item 4): per step, the flushes the model
issues for the recorded calls against the kernel's, and the dangerous windows a TLB replay with
the kernel's own flushes finds at the end of API calls (harness.linux.flushes.flush_check).
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
    if argv[:1] == ["--flushes"]:
        return flushes(root, argv[1:])
    runs = argv or sorted(
        os.path.dirname(p) for p in glob.glob(os.path.join(root, "fixtures", "linux", "*", "meta.json"))
    )
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
    print(
        "agreement (steps identical / total): "
        + ", ".join(f"{k}: {a}/{n}" for k, (a, n) in sorted(groups.items()))
    )
    for r in results:
        for d in r.divergences[:5]:
            print(f"divergence {r.run} step {r.step}: {d}")
    return 0


def flushes(root: str, argv: list[str]) -> int:
    from harness.linux.flushes import flush_check, render_flushes
    from harness.linux.replay import step_dirs

    runs = argv or sorted(
        os.path.dirname(p) for p in glob.glob(os.path.join(root, "fixtures", "linux", "*", "meta.json"))
    )
    try:
        rs = [flush_check(d, k) for d in runs for k in range(1, len(step_dirs(d)))]
    except X86ptError as e:
        print(f"linux_replay_report: error: {e}", file=sys.stderr)
        return 2
    print(render_flushes(rs))
    exact = sum(r.exact for r in rs)
    print(
        f"\nsteps {len(rs)}, predicted exactly {exact}; flushes: model {sum(r.predicted for r in rs)}, "
        f"kernel {sum(r.recorded for r in rs)} (+{sum(r.caller_flushes for r in rs)} "
        f"flush_tlb_kernel_range by callers); dangerous windows {sum(len(r.dangerous) for r in rs)}"
    )
    return 0 if exact == len(rs) and not any(r.dangerous for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
