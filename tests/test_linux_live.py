"""Live check against a real kernel (marked `linux`): boot Debian's 6.1 kernel under QEMU with the
`modules` workload in one boot, and compare every step with the committed fixture
fixtures/linux/6.1-4l-modules, which came from one boot per checkpoint. Under icount the runs are
deterministic, so with the same kernel package and QEMU the counters, the CPA trace, the kernel's
ptdump and the final page-table image must be byte-identical. Needs QEMU, apt (the packages are
downloaded into the cache on first use) and gcc; skipped with the reason otherwise, or failed when
X86PT_REQUIRE_ORACLES names `linux`."""
from __future__ import annotations

import json
import os

import pytest

from conftest import need_oracle
from harness.linux.collect import load_json, read_artifact
from x86pt.errors import OracleUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "fixtures", "linux", "6.1-4l-modules")


@pytest.mark.linux
def test_live_modules_run_reproduces_the_fixture(tmp_path):
    from harness.linux.run import RunConfig, available, run
    ok, why = available("6.1")
    need_oracle("linux", ok, why)
    if not os.path.isdir(FIXTURE):
        pytest.skip("fixture 6.1-4l-modules not committed")
    out = str(tmp_path / "run")
    try:
        meta = run(RunConfig(kernel="6.1", workload="modules", levels=4, images="last", timeout=600), out)
    except OracleUnavailable as e:
        need_oracle("linux", False, str(e))
    fx = load_json(os.path.join(FIXTURE, "meta.json"))
    steps = sorted(d for d in os.listdir(out) if d.startswith("step-"))
    assert steps == sorted(d for d in os.listdir(FIXTURE) if d.startswith("step-"))
    if (meta["kernel_package_version"], meta["qemu_version"]) != (fx["kernel_package_version"], fx["qemu_version"]):
        pytest.skip(f"fixture is from kernel {fx['kernel_package_version']} / QEMU {fx['qemu_version']}, "
                    f"this machine has {meta['kernel_package_version']} / {meta['qemu_version']}: "
                    "regenerate with tools/linux_fixtures.py")
    for s in steps:
        a, b = os.path.join(out, s), os.path.join(FIXTURE, s)
        assert load_json(os.path.join(a, "counters.json")) == load_json(os.path.join(b, "counters.json")), s
        for name in ("ptdump.txt", "cpa.trace"):
            assert read_artifact(a, name) == read_artifact(b, name), f"{s}/{name}"
    last = steps[-1]
    assert read_artifact(os.path.join(out, last), "tables.elf") == read_artifact(os.path.join(FIXTURE, last), "tables.elf")
    assert json.loads(read_artifact(os.path.join(out, last), "step.json"))["image"]["table_pages"] > 50
