"""`x86pt conform merge REPORT...` (harness/reports.py): the --json-report files of the shards of
one run (`--shard I/N`, as a CI job matrix writes them) joined give what one run of the same
selection prints and writes; reports of different runs, interrupted ones, missing and duplicate
shards and files that are not reports are refused with one line and exit 2.

The oracle is x86pt's model with a planted deviation (the #PF error code's I/D bit flipped for
user-mode AC writes that fault on a reserved bit): it depends on a case's flags only, so the
mismatches are known without the code under test, and the runs have some to carry.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
from dataclasses import replace

import pytest

import harness.cli as hcli
from harness.oracles.model import ModelOracle
from x86pt.cli import main


# Planted deviations: the #PF error code's I/D bit flipped on faults chosen by a case's flags
# only (matrix: user AC writes faulting on a reserved bit; random tables: user writes that fault).
RULES = {
    "matrix": lambda p, r: p.access == "write" and p.user and p.ac and r.error_code & 0x8,
    "random": lambda p, r: p.access == "write" and p.user,
}
_rule = RULES["matrix"]


def planted(p, r):
    if r.outcome == "page_fault" and _rule(p, r):
        return replace(r, error_code=r.error_code ^ 0x10)
    return r


@contextlib.contextmanager
def planted_model():
    real = hcli._open_oracle
    hcli._open_oracle = lambda name, profile: (
        ModelOracle("intel", deviate=planted) if name == "model" else real(name, profile)
    )
    try:
        yield
    finally:
        hcli._open_oracle = real


@pytest.fixture
def random_rule(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_rule", RULES["random"])


def run(argv, out_dir, tag, *, merge=False):
    """(exit status, stdout lines, stderr lines, report, repros by name without their path)."""
    rdir = out_dir / f"repros-{tag}"
    rep = out_dir / f"report-{tag}.json"
    cmd = (
        ["conform", "merge", *argv, "-o", str(rep)]
        if merge
        else ["conform", *argv, "--json-report", str(rep)]
    )
    out, err = io.StringIO(), io.StringIO()
    with planted_model(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(cmd + ["--repro-dir", str(rdir)])
    report = json.loads(rep.read_text()) if rep.exists() else None
    repros = {}
    for n in sorted(os.listdir(rdir)) if rdir.exists() else []:
        d = json.loads((rdir / n).read_text())
        d.pop("file")
        repros[n] = d
    return rc, out.getvalue().splitlines(), err.getvalue().splitlines(), report, repros


def norm(lines):
    """Stdout without the summary line's timings and the repro directory's name."""
    out = []
    for s in lines:
        if " cases/s" in s:
            s = s.split(" mismatches, ")[0]
        for tag in ("here", "merged"):
            s = s.replace(f"repros-{tag}", "R")
        out.append(s)
    return out


def same_report(a: dict, b: dict) -> None:
    assert a["config"] == b["config"] and a["totals"] == b["totals"]
    assert a["shards"]["done"] == list(range(1, a["shards"]["count"] + 1))
    for oa, ob in zip(a["oracles"], b["oracles"], strict=True):
        assert oa["name"] == ob["name"] and oa["capabilities"] == ob["capabilities"]
        for k in ("cases", "probes", "mismatches"):
            assert oa["summary"][k] == ob["summary"][k], k
        assert oa["mismatches"] == ob["mismatches"]


def planted_count(report: dict) -> int:
    """Every mismatch is the planted one (checked probe by probe); how many there are."""
    n = 0
    for rec in report["oracles"][0]["mismatches"]:
        j = rec["json"]
        for p, m, g in zip(j["probes"], j["model"], j["oracle_result"]):
            if m != g:
                assert m["outcome"] == "page_fault" and p["access"] == "write" and p["user"]
                assert _rule(argparse.Namespace(**p), argparse.Namespace(**m))
                assert g["error_code"] == m["error_code"] ^ 0x10
                n += 1
    return n


def shards_then_merge(tmp_path, base, n, show=()):
    """Run the n shards of `base` (each its own report), then merge them (with the options
    `show`: --max-report, --max-repros, --no-repro); the merge's result and the report paths."""
    paths = []
    for i in range(1, n + 1):
        rc, *_ = run(base + ["--shard", f"{i}/{n}", "--no-repro"], tmp_path, f"s{i}")
        assert rc in (0, 1)
        paths.append(str(tmp_path / f"report-s{i}.json"))
    return run(paths + list(show), tmp_path, "merged", merge=True), paths


def test_merged_random_shards_are_the_local_run(tmp_path, random_rule):
    show = ["--max-report", "4", "--max-repros", "6"]
    base = ["--oracle", "model", "--cases", "random", "--limit", "6000", "--seed", "2"]
    rc1, out1, _, rep1, repros1 = run(base + show, tmp_path, "here")
    (rc2, out2, err2, rep2, repros2), _ = shards_then_merge(tmp_path, base, 3, show)
    m = rep1["totals"]["mismatches"]
    assert rc1 == rc2 == 1 and m > 0 and planted_count(rep1) == m
    assert out1[-1] == f"conform: {m} mismatches in 6000 cases (model)"
    assert norm(out1) == norm(out2) and not err2
    same_report(rep1, rep2)
    assert rep2["shards"] == {"count": 3, "done": [1, 2, 3]} and rep2["merged_from"] == 3
    assert len(repros1) == 6 and repros1 == repros2


@pytest.mark.slow
def test_merged_matrix_shards_on_chunk_boundaries_are_the_local_run(tmp_path):
    # 2 x 65,536 cases: each shard is one MatrixSource chunk, built in the batches of one run
    show = ["--max-report", "2", "--max-repros", "3"]
    base = ["--oracle", "model", "--limit", "131072"]
    rc1, out1, _, rep1, repros1 = run(base + show, tmp_path, "here")
    (rc2, out2, _, rep2, repros2), _ = shards_then_merge(tmp_path, base, 2, show)
    assert rc1 == rc2 == 1 and planted_count(rep1) == rep1["totals"]["mismatches"] > 0
    assert norm(out1) == norm(out2)
    same_report(rep1, rep2)
    assert repros1 == repros2


def test_merged_matrix_shards_anywhere_have_the_local_verdicts(tmp_path):
    # shard boundaries inside a chunk: the same cases and verdicts, other VAs in other batches
    base = ["--oracle", "model", "--sample", "5000", "--seed", "7"]
    rc1, out1, _, rep1, _ = run(base + ["--no-repro"], tmp_path, "here")
    (rc2, out2, _, rep2, _), _ = shards_then_merge(tmp_path, base, 3, ["--no-repro"])
    assert rc1 == rc2 == 1 and out1[-1] == out2[-1]
    s1, s2 = rep1["oracles"][0]["summary"], rep2["oracles"][0]["summary"]
    assert (s1["cases"], s1["probes"], s1["mismatches"]) == (s2["cases"], s2["probes"], s2["mismatches"])

    def verdicts(rep):
        return sorted((r["case"], tuple(r["json"]["differences"])) for r in rep["oracles"][0]["mismatches"])

    assert verdicts(rep1) == verdicts(rep2) and planted_count(rep2) == s2["mismatches"]


# -- refusals -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    base = ["--oracle", "model", "--cases", "random", "--limit", "640", "--no-repro"]
    out = []
    for i in (1, 2):
        rc, *_ = run(base + ["--shard", f"{i}/2"], d, f"s{i}")
        assert rc in (0, 1)
        out.append(json.loads((d / f"report-s{i}.json").read_text()))
    return out


def _merge_err(tmp_path, reports, *extra) -> str:
    paths = []
    for k, r in enumerate(reports):
        p = tmp_path / f"in{k}.json"
        p.write_text(r if isinstance(r, str) else json.dumps(r))
        paths.append(str(p))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["conform", "merge", *paths, "--no-repro", *extra])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("x86pt: error:"), (rc, lines)
    assert not out.getvalue()
    return lines[0]


def _edit(rep, path, value):
    r = copy.deepcopy(rep)
    d = r
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return r


@pytest.mark.parametrize(
    "key,value,msg",
    [
        (("config", "seed"), 1, "seed 1 vs 0"),
        (("config", "limit"), 700, "limit 700 vs 640"),
        (("config", "oracle"), "unicorn", "oracle 'unicorn' vs 'model'"),
        (("config", "cases"), "matrix", "cases"),
        (("config", "per_tree"), 32, "per_tree"),
        (("config", "sample"), 20000, "sample"),
        (("shards", "count"), 3, "shard count"),
        (("x86pt_version",), "0.0.9", "x86pt version"),
        (("interrupted",), True, "interrupted run"),
    ],
)
def test_merge_refuses_reports_of_another_run(shard_reports, tmp_path, key, value, msg):
    a, b = shard_reports
    if key == ("shards", "count"):
        b = _edit(b, ("shards",), {"count": 3, "done": [2]})
    else:
        b = _edit(b, key, value)
    assert msg in _merge_err(tmp_path, [a, b])


def test_merge_refuses_other_capabilities(shard_reports, tmp_path):
    a, b = shard_reports
    b = copy.deepcopy(b)
    b["oracles"][0]["capabilities"]["maxphyaddr"] = 39
    assert "different capabilities (maxphyaddr)" in _merge_err(tmp_path, [a, b])


def test_merge_refuses_missing_and_duplicate_shards(shard_reports, tmp_path):
    a, b = shard_reports
    assert "shard 2 of 2 missing" in _merge_err(tmp_path, [a])
    assert "shard 1/2 is in both" in _merge_err(tmp_path, [a, b, a])


@pytest.mark.parametrize(
    "text,msg",
    [
        ("not json", "is not JSON"),
        ("[1, 2]", "not an x86pt conform report"),
        ('{"x86pt_conform_report": 2}', "report version 2"),
        ('{"x86pt_conform_report": 1, "config": {}}', "malformed"),
        ("[" * 100000, "is not JSON"),
    ],
)
def test_merge_refuses_files_that_are_not_reports(tmp_path, text, msg):
    assert msg in _merge_err(tmp_path, [text])


def test_merge_refuses_a_malformed_shard_list(shard_reports, tmp_path):
    a, _ = shard_reports
    assert "malformed" in _merge_err(tmp_path, [_edit(a, ("shards", "done"), [0])])
    assert "malformed" in _merge_err(tmp_path, [_edit(a, ("oracles",), [{"name": "model"}])])


def test_merge_will_not_write_over_a_report(shard_reports, tmp_path):
    a, b = shard_reports
    p = tmp_path / "in0.json"
    before = json.dumps(a)
    msg = _merge_err(tmp_path, [a, b], "-o", str(p))
    assert "in0.json" in msg and p.read_text() == before


def test_merge_of_a_whole_report_and_its_output(shard_reports, tmp_path):
    """An unsharded report merges alone; the joined report merges again to itself."""
    a, b = shard_reports
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    rc, out, err, joined, _ = run([str(pa), str(pb)], tmp_path, "j1", merge=True)
    assert rc in (0, 1) and not err
    assert joined["totals"]["cases"] == 640 == a["totals"]["cases"] + b["totals"]["cases"]
    rc2, out2, _, again, _ = run([str(tmp_path / "report-j1.json")], tmp_path, "j2", merge=True)
    assert rc2 == rc and norm(out2) == norm(out)
    assert again["oracles"] == joined["oracles"]


def test_json_report_to_a_directory_is_refused(tmp_path, capsys):
    rc = main(["conform", "--oracle", "model", "--limit", "10", "--json-report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--json-report" in err[0]
