# SPDX-License-Identifier: GPL-2.0-or-later
"""harness/linux/compare.py on the committed real-kernel fixture: a run compared with itself under
another kernel package version takes the build-independent path and finds nothing; planted
changes of the kind a wrong kernel or a wrong collector would make are each reported."""

from __future__ import annotations

import json
import lzma
import os
import shutil

import pytest

from harness.linux.collect import read_artifact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "fixtures", "linux", "6.1-4l-modules")
pytestmark = pytest.mark.skipif(not os.path.isdir(FIXTURE), reason="fixture 6.1-4l-modules not committed")


def _copy(tmp_path, version: str | None = None) -> str:
    d = str(tmp_path / "copy")
    shutil.copytree(FIXTURE, d)
    if version:
        for fn in ("run.json", "meta.json"):
            p = os.path.join(d, fn)
            with open(p, encoding="utf-8") as f:
                m = json.load(f)
            m["kernel_package_version"] = version
            with open(p, "w", encoding="utf-8") as f:
                json.dump(m, f)
    return d


def _rewrite(step_dir: str, name: str, fn) -> None:
    data = fn(read_artifact(step_dir, name).decode())
    for p in (os.path.join(step_dir, name), os.path.join(step_dir, name + ".xz")):
        if os.path.exists(p):
            os.unlink(p)
    with open(os.path.join(step_dir, name + ".xz"), "wb") as f:
        f.write(lzma.compress(data.encode()))


def test_same_sources_compare_bytes(tmp_path):
    from harness.linux.compare import compare_runs

    c = compare_runs(FIXTURE, _copy(tmp_path))
    assert c.mode == "bytes" and c.same


def test_kernel_update_alone_changes_nothing_build_independent(tmp_path):
    from harness.linux.compare import compare_runs

    c = compare_runs(FIXTURE, _copy(tmp_path, "6.1.192-99"))
    assert c.mode == "build-independent"
    assert c.same, c.differences


def test_a_lost_glb_is_a_note_a_lost_rw_is_a_difference(tmp_path):
    """Which pages lack G follows page placement (a build changes it): noted, not failed. A page
    that changes rights changes what the workload did: a difference."""
    from harness.linux.compare import compare_independent

    d = _copy(tmp_path, "6.1.192-99")
    step = os.path.join(d, "step-03")
    text = read_artifact(step, "ptdump.txt").decode()
    lines = text.splitlines()
    i = next(
        n
        for n, l in enumerate(lines)
        if l.startswith("0xffff888")
        and " GLB " in l
        and " pte" in l
        and l.split()[1].endswith("K")
        and int(l.split()[1][:-1]) >= 16
    )
    start, end = (int(x, 16) for x in lines[i].split()[0].split("-"))
    # the first 4K of that range without G: same attributes otherwise
    nog = lines[i].replace(" GLB ", "     ", 1)
    lines[i : i + 1] = [
        f"0x{start:016x}-0x{start + 4096:016x}" + nog[37:],
        f"0x{start + 4096:016x}-0x{end:016x}" + lines[i][37:],
    ]
    _rewrite(step, "ptdump.txt", lambda _t: "\n".join(lines) + "\n")
    notes: list[str] = []
    assert compare_independent(FIXTURE, d, replay=False, notes=notes) == []
    assert notes == ["step 3: direct-map pages without G " + notes[0].split(" G ")[1]]
    a, b = (int(v.split()[0]) for v in notes[0].split(" G ")[1].split(" vs "))
    assert b == a + 4
    # now the same 4K page read-only as well
    lines[i] = lines[i].replace(" RW ", " ro ", 1)
    _rewrite(step, "ptdump.txt", lambda _t: "\n".join(lines) + "\n")
    diffs = compare_independent(FIXTURE, d, replay=False)
    assert any(x.startswith("step 3: direct map") for x in diffs), diffs


def test_counter_and_mask_changes_are_reported(tmp_path):
    from harness.linux.compare import compare_independent

    d = _copy(tmp_path, "6.1.192-99")
    cj = os.path.join(d, "step-02", "counters.json")
    with open(cj, encoding="utf-8") as f:
        c = json.load(f)
    c["DirectMap4k"] += 2048
    c["DirectMap2M"] -= 2048
    with open(cj, "w", encoding="utf-8") as f:
        json.dump(c, f)
    _rewrite(
        os.path.join(d, "step-05"),
        "calls.jsonl",
        lambda t: t.replace('"mask_clr": "0x2"', '"mask_clr": "0x3"', 1),
    )
    diffs = compare_independent(FIXTURE, d, replay=False)
    assert any(x.startswith("step 2: counter deltas") for x in diffs), diffs
    assert any(x.startswith("step 3: counter deltas") for x in diffs), diffs  # back again
    assert any(x.startswith("step 5:") and "CPA calls" in x for x in diffs), diffs
