# SPDX-License-Identifier: GPL-2.0-or-later
"""Live checks against a real kernel (marked `linux`): boot Debian's 6.1 kernel under QEMU with the
`modules` workload twice, exactly as `x86pt linux run` does for a user, then

* check what came back (the trace accounts for the counters, the image walks like the kernel's
  ptdump, `x86pt dump` equals the kernel's text, the guest's table dump equals guest RAM);
* run `x86pt linux report` on the fresh run: every step replays in the CPA model;
* the second run repeats the first byte for byte (icount, one boot, no pause before the end);
* compare with the committed fixture: byte for byte when kernel package, QEMU and guest pieces are
  the fixture's, else on what does not depend on the exact build (harness/linux/compare.py), so a
  Debian kernel update does not turn the check into a skip.

Needs QEMU, gcc, make and the kernel (in the cache, or apt and Debian's package registry to
download 85 MB on first use); skipped with the reason otherwise, or failed when
X86PT_REQUIRE_ORACLES names `linux`. About 45 s on 2 cores with the kernel cached."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest

from conftest import need_oracle
from harness.linux.collect import load_json, read_artifact
from x86pt.errors import OracleUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "fixtures", "linux", "6.1-4l-modules")
pytestmark = pytest.mark.linux


@pytest.fixture(scope="module")
def live_runs(tmp_path_factory):
    """Two fresh runs of 6.1, 4-level, `modules`, with the defaults of `x86pt linux run`."""
    from harness.linux.run import RunConfig, available, prepare, run

    ok, why = available("6.1")
    need_oracle("linux", ok, why)
    base = tmp_path_factory.mktemp("linux-live")
    dirs = [str(base / "run1"), str(base / "run2")]
    cfg = RunConfig(kernel="6.1", workload="modules", levels=4, timeout=600)
    try:
        prepare(cfg)  # download (first use) and build: may be unavailable here
    except OracleUnavailable as e:
        need_oracle("linux", False, str(e))
    try:
        # the first exactly as a user types it (the CLI, --json); the second through the library
        rc, out, err = _x86pt(
            "linux", "run", "--kernel", "6.1", "--workload", "modules", "--out", dirs[0], "--json"
        )
        assert rc == 0, err
        summary = json.loads(out)
        assert summary["out"] == dirs[0] and summary["config"]["images"] == "guest"
        # not a terminal: no progress lines; the kernel is cached here, so no download notice
        assert err == "", err
        run(cfg, dirs[1])
        yield dirs
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _x86pt(*args: str) -> tuple[int, str, str]:
    from x86pt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_live_run_is_consistent(live_runs, tmp_path):
    from test_linux_fixtures import check_dump_equals_kernel, check_image_against_ptdump, check_trace_accounts

    out = live_runs[0]
    meta = load_json(os.path.join(out, "run.json"))
    steps = sorted(os.path.join(out, d) for d in os.listdir(out) if d.startswith("step-"))
    assert len(steps) == 7 and meta["chain_consistent"] == "6/6"
    assert meta["image_check"] == "same"  # the guest's dump of step 6 = the RAM at the pause
    check_trace_accounts(out)
    for sd in (steps[0], steps[-1]):
        check_image_against_ptdump(out, sd, str(tmp_path))
        check_dump_equals_kernel(out, sd, tmp_path)


def test_live_report_on_a_fresh_run_replays_every_step(live_runs, tmp_path):
    """`x86pt linux report` on what `x86pt linux run` just wrote (it used to fail: meta.json)."""
    out = live_runs[0]
    rc, text, err = _x86pt("linux", "report", out, "--plot", str(tmp_path / "a.png"))
    assert rc == 0, err
    assert "model" in text and (tmp_path / "a.png").exists()
    rc, js, err = _x86pt("linux", "report", out, "--json", "--plot", str(tmp_path / "b.png"))
    assert rc == 0, err
    data = json.loads(js)
    assert [s["model"] for s in data["steps"]] == ["-"] + ["yes"] * 6
    assert all(s["trace_accounts"] == "yes" for s in data["steps"][1:])
    # the report's counters are the kernel's /proc/meminfo lines, not a recomputation
    assert data["final_counters"] == load_json(os.path.join(out, "step-06", "counters.json"))


def test_live_run_repeats_byte_for_byte(live_runs):
    from harness.linux.compare import compare_bytes

    a, b = live_runs
    assert compare_bytes(a, b) == []
    assert read_artifact(os.path.join(a, "boots"), "boot-06.txt") == read_artifact(
        os.path.join(b, "boots"), "boot-06.txt"
    )


def test_live_run_matches_the_committed_fixture(live_runs):
    """Bytes when the sources match; across a kernel package update, what the workload does."""
    from harness.linux.compare import compare_runs

    if not os.path.isdir(FIXTURE):
        pytest.skip("fixture 6.1-4l-modules not committed")
    c = compare_runs(live_runs[0], FIXTURE)
    fx = load_json(os.path.join(FIXTURE, "meta.json"))
    assert c.same, (
        f"{c.mode} compare with the fixture (kernel {fx['kernel_package_version']}, QEMU "
        f"{fx['qemu_version']}) failed; regenerate with tools/linux_fixtures.py if the "
        "kernel really changed:\n" + "\n".join(c.differences[:20])
    )
