"""Live check against a real kernel (marked `linux`): boot Debian's 6.1 kernel under QEMU with the
`modules` workload (one boot, paused at each step), then run the fixture checks on what came back
(trace accounts for the counters, the image walks like the kernel's ptdump, `x86pt dump` equals
the kernel's text) and compare the baseline, which precedes the first pause and so is
deterministic under icount, byte for byte with the committed fixture when kernel package and QEMU
versions match. Needs QEMU, apt (packages are downloaded into the cache on first use), gcc and
make; skipped with the reason otherwise, or failed when X86PT_REQUIRE_ORACLES names `linux`."""
from __future__ import annotations

import os

import pytest

from conftest import need_oracle
from harness.linux.collect import load_json, read_artifact
from x86pt.errors import OracleUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "fixtures", "linux", "6.1-4l-modules")


@pytest.mark.linux
def test_live_modules_run_is_consistent_and_reproduces_the_baseline(tmp_path):
    from harness.linux.run import RunConfig, available, run
    from test_linux_fixtures import (check_dump_equals_kernel, check_image_against_ptdump,
                                     check_trace_accounts)
    ok, why = available("6.1")
    need_oracle("linux", ok, why)
    out = str(tmp_path / "run")
    try:
        meta = run(RunConfig(kernel="6.1", workload="modules", levels=4, images="pause", timeout=600), out)
    except OracleUnavailable as e:
        need_oracle("linux", False, str(e))
    steps = sorted(os.path.join(out, d) for d in os.listdir(out) if d.startswith("step-"))
    assert len(steps) == 7 and meta["chain_consistent"] == "6/6"
    check_trace_accounts(out)
    for sd in (steps[0], steps[-1]):
        check_image_against_ptdump(out, sd, str(tmp_path))
        check_dump_equals_kernel(out, sd, tmp_path)
    if not os.path.isdir(FIXTURE):
        pytest.skip("fixture 6.1-4l-modules not committed")
    fx = load_json(os.path.join(FIXTURE, "meta.json"))
    if (meta["kernel_package_version"], meta["qemu_version"]) != (fx["kernel_package_version"], fx["qemu_version"]):
        pytest.skip(f"fixture is from kernel {fx['kernel_package_version']} / QEMU {fx['qemu_version']}, "
                    f"this machine has {meta['kernel_package_version']} / {meta['qemu_version']}: "
                    "regenerate with tools/linux_fixtures.py")
    # Everything before the first pause is deterministic under icount: the baseline must be the
    # fixture's, byte for byte (later steps may move: a pause/resume perturbs icount, §8).
    a, b = steps[0], os.path.join(FIXTURE, "step-00")
    assert load_json(os.path.join(a, "counters.json")) == load_json(os.path.join(b, "counters.json"))
    assert read_artifact(a, "ptdump.txt") == read_artifact(b, "ptdump.txt")
    assert read_artifact(a, "cpa.trace") == read_artifact(b, "cpa.trace")
