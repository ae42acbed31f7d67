"""`x86pt conform --executor dask://HOST:PORT` and `--jobs N` (harness/executors.py): a run cut
into parts on a two-worker Dask cluster (started here: distributed.LocalCluster, processes, 2
workers, 1 thread each, always closed) or on two local processes prints, writes and reports what
one run in this process does — the same cases, the same mismatches with the same text, the same
repro files.

The mismatches come from an oracle planted the way a third party adds one (an `x86pt.oracles`
entry point of a package on PYTHONPATH, so the workers find it too): x86pt's own model with the
#PF error code's I/D bit flipped on some faults, a deviation that depends on a case's flags only.
The expected result is the in-process run's; the planted rule gives the expected count too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap

import pytest

from x86pt.cli import main

try:
    import distributed  # noqa: F401

    HAVE_DASK = True
except ImportError:
    HAVE_DASK = False
needs_dask = pytest.mark.skipif(
    not HAVE_DASK, reason="dask[distributed] not installed (pip install 'x86pt[dask]'; the test extra has it)"
)

PLUGIN = '''
from dataclasses import replace
from harness.oracles.model import ModelOracle


def planted(p, r):
    """A user-mode write with EFLAGS.AC that faults on a reserved bit: I/D flipped."""
    if (p.access == "write" and p.user and p.ac and r.outcome == "page_fault"
            and r.error_code & 0x8):
        return replace(r, error_code=r.error_code ^ 0x10)
    return r


class PlantedOracle(ModelOracle):
    def __init__(self, **kw):
        super().__init__(deviate=planted, name="planted", **kw)


class BrokenOracle(ModelOracle):
    def __init__(self, **kw):
        super().__init__(name="broken", **kw)

    def run(self, memory, state, probes):
        raise RuntimeError("the emulator fell over")
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A package outside the repo with two oracles, on PYTHONPATH for this process and every
    process started while the module runs (the cluster's workers, --jobs workers)."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "planted_x86pt.py").write_text(textwrap.dedent(PLUGIN))
    meta = d / "planted_x86pt-1.0.dist-info"
    meta.mkdir()
    (meta / "entry_points.txt").write_text(
        "[x86pt.oracles]\nplanted = planted_x86pt:PlantedOracle\nbroken = planted_x86pt:BrokenOracle\n"
    )
    old_env, old_path = os.environ.get("PYTHONPATH"), list(sys.path)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(d)] + ([old_env] if old_env else []))
    sys.path.insert(0, str(d))
    yield d
    sys.path[:] = old_path
    if old_env is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_env


@pytest.fixture(scope="module")
def cluster(plugin_dir):
    """A local two-worker cluster (processes, 1 thread each); closed after the module."""
    import logging
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as c:
        yield "dask://" + c.scheduler_address.removeprefix("tcp://")


def _run(argv, tmp_path, tag):
    """Run conform; (exit status, stdout lines, report, repro files by name without their path)."""
    import contextlib
    import io

    rdir = tmp_path / f"repros-{tag}"
    rep = tmp_path / f"report-{tag}.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["conform", *argv, "--repro-dir", str(rdir), "--json-report", str(rep)])
    report = json.loads(rep.read_text())
    repros = {}
    for n in sorted(os.listdir(rdir)) if rdir.exists() else []:
        d = json.loads((rdir / n).read_text())
        d.pop("file")
        repros[n] = d
    return rc, buf.getvalue().replace(str(rdir), "R").splitlines(), report, repros


MATRIX_ARGV = [
    "--oracle",
    "planted",
    "--sample",
    "70000",
    "--seed",
    "3",
    "--max-report",
    "3",
    "--max-repros",
    "5",
]


@pytest.fixture(scope="module")
def matrix_here(plugin_dir, tmp_path_factory):
    """The in-process run every other way of running is held to: 70,000 sampled cases, two
    MatrixSource chunks, so two parts on two workers."""
    return _run(MATRIX_ARGV, tmp_path_factory.mktemp("here"), "here")


def _same_text(a: list[str], b: list[str]) -> None:
    """Equal but for the summary line's timings."""

    def norm(lines):
        out = []
        for s in lines:
            if ": " in s and " cases/s" in s:
                s = s.split(" mismatches, ")[0]
            out.append(s)
        return out

    assert norm(a) == norm(b)


def _same_report(a: dict, b: dict) -> None:
    assert a["config"] == b["config"] and a["shards"] == b["shards"]
    assert a["totals"] == b["totals"]
    assert [o["name"] for o in a["oracles"]] == [o["name"] for o in b["oracles"]]
    for oa, ob in zip(a["oracles"], b["oracles"]):
        for k in ("cases", "probes", "mismatches"):
            assert oa["summary"][k] == ob["summary"][k], k
        assert oa["capabilities"] == ob["capabilities"]
        assert oa["mismatches"] == ob["mismatches"]


def _expected_planted(report: dict) -> int:
    """Mismatches the planted rule makes, counted from the in-process run's own probe records:
    each mismatch must be exactly that rule (I/D of a reserved-bit #PF of a user AC write)."""
    n = 0
    for rec in report["oracles"][0]["mismatches"]:
        j = rec["json"]
        for p, m, g in zip(j["probes"], j["model"], j["oracle_result"]):
            if m != g:
                assert p["access"] == "write" and p["user"] and p["ac"]
                assert m["outcome"] == "page_fault" and m["error_code"] & 0x8
                assert g["error_code"] == m["error_code"] ^ 0x10
                n += 1
    return n


@needs_dask
def test_dask_matrix_run_is_the_local_run(cluster, matrix_here, tmp_path):
    rc1, out1, rep1, repros1 = matrix_here
    rc2, out2, rep2, repros2 = _run(MATRIX_ARGV + ["--executor", cluster], tmp_path, "dask")
    assert rc1 == rc2 == 1
    m = rep1["totals"]["mismatches"]
    assert m > 20 and _expected_planted(rep1) == m
    assert out1[-1] == f"conform: {m} mismatches in 70000 cases (planted)"
    _same_text(out1, out2)
    _same_report(rep1, rep2)
    assert rep2["executor"] == cluster and rep2["workers"] == 2
    assert len(repros1) == 5 and repros1 == repros2


@needs_dask
def test_dask_random_run_on_unicorn_is_the_local_run(cluster, tmp_path):
    from x86pt.registry import availability
    from conftest import need_oracle

    ok, why = availability("unicorn")
    need_oracle("unicorn", ok, why)
    argv = ["--oracle", "unicorn", "--cases", "random", "--limit", "2048", "--seed", "5"]
    rc1, out1, rep1, _ = _run(argv, tmp_path, "here")
    rc2, out2, rep2, _ = _run(argv + ["--executor", cluster], tmp_path, "dask")
    assert rc1 == rc2 == 0
    assert out1[-1] == out2[-1] == "conform: 0 mismatches in 2048 cases (unicorn)"
    _same_report(rep1, rep2)


@needs_dask
def test_dask_shard_of_a_run(cluster, tmp_path):
    # --shard with an executor: the shard (42 of 128 trees) is cut into two parts, the report names the shard
    argv = ["--oracle", "planted", "--cases", "random", "--limit", "8192", "--shard", "2/3"]
    rc1, out1, rep1, _ = _run(argv, tmp_path, "here")
    rc2, out2, rep2, _ = _run(argv + ["--executor", cluster], tmp_path, "dask")
    assert rep1["shards"] == {"count": 3, "done": [2]}
    _same_text(out1, out2)
    _same_report(rep1, rep2)


def test_local_jobs_is_the_local_run(matrix_here, tmp_path):
    rc1, out1, rep1, repros1 = matrix_here
    rc2, out2, rep2, repros2 = _run(MATRIX_ARGV + ["--jobs", "2"], tmp_path, "jobs")
    assert rc1 == rc2 == 1 and rep1["totals"]["mismatches"] > 0
    _same_text(out1, out2)
    _same_report(rep1, rep2)
    assert repros1 == repros2 and len(repros1) == 5
    assert rep2["executor"] == "local:2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_dask
def test_unreachable_scheduler_is_one_line_exit_2(monkeypatch, capsys):
    import harness.executors as ex

    monkeypatch.setattr(ex, "DASK_CONNECT_TIMEOUT", 1.0)
    port = _free_port()
    rc = main(["conform", "--oracle", "model", "--limit", "10", "--executor", f"dask://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"x86pt: error: cannot reach the Dask scheduler at 127.0.0.1:{port}")


@pytest.mark.parametrize(
    "text",
    [
        "dask://",
        "dask://host",
        "dask://host:0",
        "dask://host:99999",
        "tcp://127.0.0.1:8786",
        "spark://h:1",
        "localx",
    ],
)
def test_bad_executor_is_one_line_exit_2(text, capsys):
    rc = main(["conform", "--oracle", "model", "--limit", "10", "--executor", text])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "bad --executor" in err[0]


@pytest.mark.parametrize("jobs", ["0", "x", "-2"])
def test_bad_jobs_is_one_line_exit_2(jobs, capsys):
    rc = main(["conform", "--oracle", "model", "--limit", "10", "--jobs", jobs])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--jobs" in err[0]


@needs_dask
def test_worker_failure_is_an_oracle_error(cluster, capsys):
    rc = main(["conform", "--oracle", "broken", "--limit", "100", "--executor", cluster])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "RuntimeError: the emulator fell over" in err[0]


def test_parts_cover_the_selection_on_chunk_boundaries():
    from harness.executors import split

    # matrix: 200,000 cases in chunks of 65,536 for 2 workers -> 4 parts, one per chunk
    assert split(200_000, 65_536, 2, "matrix") == [
        (0, 65_536),
        (65_536, 131_072),
        (131_072, 196_608),
        (196_608, 200_000),
    ]
    # a selection within one chunk is one part whatever the workers
    assert split(60_000, 65_536, 8, "matrix") == [(0, 60_000)]
    # random: at least 16 trees a part
    assert split(40, 1, 4, "random") == [(0, 20), (20, 40)]
    assert split(0, 65_536, 2, "matrix") == [(0, 0)]
    for units, align, w in ((19_200_000, 65_536, 8), (155_000_000, 65_536, 32), (1000, 1, 3)):
        sp = split(units, align, w, "matrix")
        assert sp[0][0] == 0 and sp[-1][1] == units and len(sp) <= 4 * w
        assert all(a == pb for (_, pb), (a, _) in zip(sp, sp[1:]))
        assert all(a % align == 0 for a, _ in sp)
