# SPDX-License-Identifier: GPL-2.0-or-later
"""The real kernel's TLB flushes as ground truth (issue 15 item 4). fixtures/linux runs record the
kernel's flush_tlb_all / flush_tlb_kernel_range / flush_tlb_one_kernel during each step beside
its CPA calls; replaying a step from the image before it must predict the flushes the kernel
made for each call (count and addresses), and with the kernel's own flushes no dangerous window
may be open at the end of an API call. A trace with one recorded flush removed is reported at
the call and the addresses the kernel's trace names."""

from __future__ import annotations

import os

import pytest

from harness.linux.collect import read_artifact
from harness.linux.flushes import flush_check
from harness.linux.replay import step_dirs

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "linux")
# the bpf runs (a 4.8 MB module: thousands of pages per call) take ~30 s each
RUNS = (
    "6.1-4l-modules",
    "6.12-4l-modules",
    "6.1-5l-modules",
    "6.12-5l-modules",
    "6.1-4l-secretmem",
    "6.12-4l-secretmem",
    pytest.param("6.1-4l-bpf", marks=pytest.mark.slow),
    pytest.param("6.12-4l-bpf", marks=pytest.mark.slow),
)


def _steps(run):
    d = os.path.join(FIX, run)
    return range(1, len(step_dirs(d))) if os.path.isdir(d) else range(0)


@pytest.mark.parametrize("run", RUNS)
def test_replay_predicts_the_kernels_flushes_and_leaves_no_window(run):
    d = os.path.join(FIX, run)
    if not os.path.isdir(d):
        pytest.skip(f"no fixture {run}")
    seen = False
    for k in _steps(run):
        r = flush_check(d, k)
        seen |= r.recorded_flushes
        assert r.mismatches == [], f"{run} step {k}: {r.mismatches[:3]}"
        assert r.predicted == r.recorded
        assert r.dangerous == [], f"{run} step {k}: {r.dangerous[:3]}"
    assert seen, f"{run}: recorded without the flush probes (regenerate: tools/linux_fixtures.py {run})"


def test_a_removed_flush_is_reported_at_its_call_and_addresses():
    d = os.path.join(FIX, "6.1-4l-modules")
    text = read_artifact(step_dirs(d)[1], "cpa.trace").decode()
    lines = text.splitlines()
    # the kernel's trace: set_memory_ro of the module page 0xffffffffc0210000, whose direct-map
    # alias (cpa_process_alias) is 0xffff8880bff29000, then flush_tlb_all (CPA_FLUSHTLB with an
    # alias: cpa->force_flush_all)
    i = lines.index("cpa 0xffffffffc0210000 1 set=0x0 clr=0x2 flags=0x0 primary")
    assert lines[i + 1].startswith("#   alias cpa 0xffff8880bff29000 1 ")
    assert lines[i + 2] == "flush_tlb_all"
    r = flush_check(d, 1, text="\n".join(lines[: i + 2] + lines[i + 3 :]))
    assert [(m[0], m[2], m[3]) for m in r.mismatches] == [(0, [("all",)], [])]
    at_call = sorted((cpu, s, e, kind) for op, cpu, s, e, kind in r.windows if op == 0)
    assert at_call == [
        (cpu, s, s + 0x1000, "rw") for cpu in (0, 1) for s in (0xFFFF8880BFF29000, 0xFFFFFFFFC0210000)
    ]
