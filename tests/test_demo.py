# SPDX-License-Identifier: GPL-2.0-or-later
"""`x86pt demo`: every section reaches the verdict the embedded image was built for, and the
demo's exit status says when one does not. Expected values are derived by hand from the image's
construction (x86pt/demo.py's RAM list and mappings) and the SDM's access rules, not read from a
previous run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PO = 0xFFFF888000000000


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run(
        [sys.executable, "-m", "x86pt", "demo", "--json", "--out", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p, recs, cwd, out


def _section(recs, name):
    return [r for r in recs if r.get("section") == name]


def test_demo_exits_0_and_writes_only_into_out(demo_json):
    p, recs, cwd, out = demo_json
    assert p.returncode == 0, p.stderr
    assert "FAILED" not in p.stdout + p.stderr
    assert os.listdir(cwd) == []  # nothing in the working folder
    assert {"linux-like.elf", "cpa-demo.trace", "cpa-demo.png"} <= set(os.listdir(out))


# (what, outcome, pa, error code): SDM Vol. 3A §4.6 (WP, SMAP, SMEP, US) and §4.7 (error code
# bits P=1, W=2, U=4, I/D=16), the image's mappings for the frames.
WALKS = {
    "direct map, inside a 2M page": ("ok", 0x12345678, None),
    "direct map, 1G page": ("ok", 0x140000000, None),
    "kernel text (ROX)": ("ok", 0x1001234, None),
    "kernel text is read-only (WP=1)": ("page_fault", None, 0x3),
    "module text, a 4K alias of the direct map": ("ok", 0x3A001000, None),
    "user data": ("ok", 0x5002010, None),
    "SMAP: kernel read of user data with AC=0": ("page_fault", None, 0x1),
    "... with EFLAGS.AC=1": ("ok", 0x5002010, None),
    "SMEP: kernel fetch from user text": ("page_fault", None, 0x11),
    "user write to its text": ("page_fault", None, 0x7),
    "unmapped user address": ("page_fault", None, 0x4),
    "non-canonical": ("general_protection", None, 0),
}


def test_demo_walk_section_verdicts(demo_json):
    walks = {r["what"]: r for r in _section(demo_json[1], "walk")}
    assert set(walks) == set(WALKS)
    for what, (outcome, pa, code) in WALKS.items():
        r = walks[what]
        assert r["outcome"] == outcome, what
        if pa is not None:
            assert int(r["pa"], 16) == pa, what
        if code is not None:
            assert r["error_code"] == code, what


def test_demo_census_section_verdict(demo_json):
    """RAM 0-0x9f000, 1M-3G, 4G-6G. 4K: 159 + 256 pages below 2M plus the kernel data's 2M
    split into 512 PTEs (counted as the kernel does) = 927 pages = 3708 kB; 2M: 2M..1G = 511
    leaves minus that split = 510; 1G: 1-2G, 2-3G, 4-5G, 5-6G = 4."""
    (c,) = _section(demo_json[1], "census")
    assert (c["DirectMap4k_kB"], c["DirectMap2M_kB"], c["DirectMap1G_kB"]) == (
        927 * 4,
        510 * 2048,
        4 * 1048576,
    )


def test_demo_diff_section_verdict(demo_json):
    """set_memory_ro of one page of a 2M leaf: exactly that 4K page changes, rw -> ro."""
    (d,) = _section(demo_json[1], "diff")
    assert (int(d["start"], 16), d["size"], d["change"]) == (PO + 0x3005000, 0x1000, "~rights")
    assert int(d["pa_a"], 16) == int(d["pa_b"], 16) == 0x3005000
    assert "w" in d["attrs_a"] and "w" not in d["attrs_b"]


def test_demo_cpa_section_verdict(demo_json):
    """Both policies replay all 2000 ops with the validator holding (the L1TF false alarm of
    issue 10 stopped both at op 593)."""
    cpa = {r["policy"]: r for r in _section(demo_json[1], "cpa")}
    assert set(cpa) == {"none", "upstream"}
    for pol, r in cpa.items():
        assert r["violation"] is None, (pol, r["violation"])
        assert r["ops"] == 2000, pol


def test_demo_dump_section_printed(demo_json):
    (d,) = _section(demo_json[1], "dump")
    assert d["lines"] > 10


def test_demo_exit_status_is_1_when_a_section_fails(tmp_path, monkeypatch, capsys):
    """A validator violation in the CPA section makes the whole demo fail (in-process)."""
    import x86pt.cpa.trace as trace
    from x86pt.cpa.validate import Violation
    from x86pt.demo import run_demo

    real = trace.replay

    def bad_replay(m, ops, **kw):
        r = real(m, ops[:10], **kw)
        r.violation = Violation(3, "a", "planted by the test")
        return r

    monkeypatch.setattr(trace, "replay", bad_replay)
    monkeypatch.chdir(tmp_path)
    rc = run_demo(argparse.Namespace(out=str(tmp_path / "out"), json=False))
    err = capsys.readouterr().err
    assert rc == 1
    assert "demo: FAILED cpa: none: validator: op 3: invariant (a) violated: planted by the test" in err


def test_demo_tlb_section_verdict(demo_json):
    # A set_memory_ro of one page inside a 2M direct-map page: each CPU may hold the writable 2M
    # entry until an INVLPG of the page (SDM Vol. 3A §4.10.4.1); the recorded flush closes the
    # window at op 1, and without it the call ends with the page writable on both CPUs.
    recs = {r["case"]: r for r in _section(demo_json[1], "tlb")}
    va = 0xFFFF888012345000
    ok, bad = recs["with-flush"], recs["flush-removed"]
    assert ok["ok"] and ok["dangerous_at_end_of_call"] == [] and ok["open_at_end"] == []
    assert {
        (w["cpu"], w["kind"], w["opened"], w["closed"])
        for w in ok["windows_closed"]
        if w["severity"] == "dangerous"
    } == {(0, "rw", 0, 1), (1, "rw", 0, 1)}
    assert not bad["ok"]
    (f,) = bad["dangerous_at_end_of_call"]
    assert [(w["cpu"], w["start"], w["end"], w["kind"]) for w in f["windows"]] == [
        (0, hex(va), hex(va + 0x1000), "rw"),
        (1, hex(va), hex(va + 0x1000), "rw"),
    ]
