"""The conformance suite as a pytest plugin (harness/pytest_plugin.py, x86pt/conformance/).

Each test runs pytest in a subprocess in a temporary project, as a user's CI would. Expectations
come from outside the plugin: items that exist without it (a project's own tests), the CPU state a
failing item's message prints (parsed here and compared with the configuration its id names),
and a program that flips one error-code bit (test_cmd_oracle.FLIP)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from conftest import need_oracle
from x86pt.registry import availability
from test_cmd_oracle import BROKEN, FLIP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")


def pytest_run(cwd, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def suite(cwd, *args, **kw) -> subprocess.CompletedProcess:
    return pytest_run(cwd, "--pyargs", "x86pt.conformance", *args, **kw)


def _unicorn():
    ok, why = availability("unicorn")
    need_oracle("unicorn", ok, why)


# -- nothing changes for runs that do not ask ---------------------------------------------------------
PROJECT = """
import sys

def test_one():
    assert 1 + 1 == 2

def test_nothing_heavy_was_imported():
    heavy = sorted(m for m in sys.modules if m == "numpy" or m.startswith(("x86pt", "harness.")))
    assert heavy == ["harness.pytest_plugin"]     # the plugin module itself, nothing else
"""


def test_a_project_without_the_option_sees_only_its_own_items(tmp_path):
    (tmp_path / "test_project.py").write_text(PROJECT)
    r = pytest_run(tmp_path, "--co", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    items = [ln for ln in r.stdout.splitlines() if "::" in ln]
    assert items == ["test_project.py::test_one", "test_project.py::test_nothing_heavy_was_imported"]
    r = pytest_run(tmp_path, "-q")
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout + r.stderr
    # the plugin was loaded all the same (its options are there)
    r = pytest_run(tmp_path, "--help")
    assert "--x86pt-oracle" in r.stdout


def test_loading_the_plugin_imports_nothing_heavy():
    code = (
        "import sys, harness.pytest_plugin as p; "
        "print(sorted(m for m in sys.modules if m == 'numpy' or m.startswith(('x86pt', 'harness.'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "['harness.pytest_plugin']", r.stdout + r.stderr


def test_x86pts_own_suite_collects_the_same_items_with_and_without_the_plugin():
    files = ["tests/test_plugins.py", "tests/test_cmd_oracle.py"]
    a = pytest_run(REPO, "--co", "-q", *files)
    b = pytest_run(REPO, "--co", "-q", "-p", "no:x86pt", *files)
    assert a.returncode == b.returncode == 0, a.stdout + a.stderr
    ia = [ln for ln in a.stdout.splitlines() if "::" in ln]
    assert ia and ia == [ln for ln in b.stdout.splitlines() if "::" in ln]


def test_the_library_never_imports_the_rig():
    hits = []
    for root, _, names in os.walk(os.path.join(REPO, "x86pt")):
        for n in names:
            if n.endswith(".py"):
                with open(os.path.join(root, n), encoding="utf-8") as f:
                    for k, line in enumerate(f, 1):
                        if re.match(r"\s*(from|import)\s+harness\b", line):
                            hits.append(f"{n}:{k}")
    assert hits == []


def test_without_an_oracle_the_suite_is_one_skipped_item(tmp_path):
    r = suite(tmp_path, "-q", "-rs")
    assert r.returncode == 0 and "1 skipped" in r.stdout and "--x86pt-oracle" in r.stdout, r.stdout


# -- running the suite --------------------------------------------------------------------------------------
def test_the_model_oracle_passes_with_one_item_per_random_tree(tmp_path):
    r = suite(
        tmp_path,
        "-v",
        "--x86pt-oracle",
        "model",
        "--x86pt-cases",
        "random",
        "--x86pt-limit",
        "150",
        "--x86pt-seed",
        "7",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    # 150 cases, 64 per tree: trees 0, 1, 2 of seed 7
    assert re.findall(r"test_conformance\[(random-seed7-tree\d)\] PASSED", r.stdout) == [
        "random-seed7-tree0",
        "random-seed7-tree1",
        "random-seed7-tree2",
    ]


def test_shards_split_the_items(tmp_path):
    ids = []
    for shard in ("1/2", "2/2"):
        r = suite(
            tmp_path,
            "--co",
            "-q",
            "--x86pt-oracle",
            "model",
            "--x86pt-cases",
            "random",
            "--x86pt-limit",
            "256",
            "--x86pt-shard",
            shard,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        ids.append(re.findall(r"\[(random-\S+)\]", r.stdout))
    assert ids == [["random-seed0-tree0", "random-seed0-tree1"], ["random-seed0-tree2", "random-seed0-tree3"]]


@pytest.mark.unicorn
def test_unicorn_passes_the_matrix_with_items_named_by_configuration(tmp_path):
    _unicorn()
    r = suite(tmp_path, "-v", "--x86pt-oracle", "unicorn", "--x86pt-limit", "3000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ids = re.findall(r"test_conformance\[(matrix-\S+)\] PASSED", r.stdout)
    assert ids and all(re.fullmatch(r"matrix-[a-z0-9.+]+-\d+", i) for i in ids)


@pytest.mark.unicorn
def test_unicorn_passes_cpa_replays(tmp_path):
    _unicorn()
    r = suite(tmp_path, "-v", "--x86pt-oracle", "unicorn", "--x86pt-cases", "cpa", "--x86pt-limit", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert len(re.findall(r"test_conformance\[cpa-[a-z-]+-seed0\] PASSED", r.stdout)) == 2


@pytest.mark.unicorn
def test_the_reference_adapter_runs_under_the_plugin(tmp_path):
    _unicorn()
    oracle = (
        f"cmd:{shlex.quote(sys.executable)} {shlex.quote(os.path.join(EXAMPLES, 'cmd_oracle_adapter.py'))}"
    )
    r = suite(tmp_path, "-v", "--x86pt-oracle", oracle, "--x86pt-cases", "random", "--x86pt-limit", "128")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert len(re.findall(r"test_conformance\[random-seed0-tree\d\] PASSED", r.stdout)) == 2


def test_a_third_party_oracle_package_runs_under_the_plugin(tmp_path):
    """A package outside the repo, registered by its metadata only (as in test_plugins.py)."""
    from test_plugins import _fake_dist

    site = tmp_path / "site"
    site.mkdir()
    _fake_dist(
        site,
        "tinyemu2",
        """
        from x86pt.registry import get_oracle

        class TinyOracle:
            name = "tiny2"
            profile = "intel"

            def __init__(self):
                self._inner = get_oracle("model", profile="intel")

            def capabilities(self):
                return self._inner.capabilities()

            def run(self, memory, state, probes):
                return self._inner.run(memory, state, probes)

            def close(self):
                pass
        """,
        """
        [x86pt.oracles]
        tiny2 = tinyemu2:TinyOracle
        """,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    r = suite(
        tmp_path, "-v", "--x86pt-oracle", "tiny2", "--x86pt-cases", "random", "--x86pt-limit", "64", env=env
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "test_conformance[random-seed0-tree0] PASSED" in r.stdout


# the configuration flag each id word names -> the bracketed word PagingState.describe() prints
CFG_WORDS = {"cr0.wp": "WP", "efer.nx": "NXE", "cr4.smep": "SMEP", "cr4.smap": "SMAP", "cr4.pke": "PKE"}


def test_a_planted_mismatch_fails_its_item_with_the_walk_and_the_repro_in_junit(tmp_path):
    flip = tmp_path / "flip_adapter.py"
    flip.write_text(FLIP.format(examples=EXAMPLES))
    oracle = f"cmd:{shlex.quote(sys.executable)} {shlex.quote(str(flip))} --oracle model"
    xml = tmp_path / "out.xml"
    r = suite(
        tmp_path,
        "-q",
        "--x86pt-oracle",
        oracle,
        "--x86pt-limit",
        "3000",
        f"--junitxml={xml}",
        "--x86pt-repro-dir",
        str(tmp_path / "repros"),
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    cases = ET.parse(xml).getroot().iter("testcase")
    failed = [(c.get("name"), c.find("failure")) for c in cases if c.find("failure") is not None]
    assert failed
    for name, failure in failed:
        m = re.fullmatch(r"test_conformance\[matrix-([a-z0-9.+]+)-\d+\]", name)
        assert m, name
        text = failure.get("message", "") + (failure.text or "")
        assert "MISMATCH matrix#" in text and "#PF error code: model" in text
        assert "walk (model, entries as they were before the batch):" in text
        assert re.search(r"L4 PML4\s*\[", text)  # the decoded walk
        repro = re.search(r"repro: x86pt conform --repro (\S+\.json) --oracle 'cmd:", text)
        assert repro and os.path.exists(repro.group(1))
        # the configuration in the item's name is the state in its message
        state = re.search(r"state: .*\[([A-Z0-9 ]*)\]", text).group(1).split()
        cfg = set() if m.group(1) == "base" else set(m.group(1).split("+"))
        for word, bit in CFG_WORDS.items():
            assert (word in cfg) == (bit in state), (name, state)


def test_a_broken_oracle_is_a_one_line_usage_error(tmp_path):
    r = suite(tmp_path, "-q", "--x86pt-oracle", "nope")
    assert r.returncode == 4 and "Traceback" not in r.stdout + r.stderr
    assert re.search(r"ERROR: x86pt: --x86pt-oracle 'nope': unknown oracle 'nope'", r.stderr), r.stderr
    r = suite(tmp_path, "-q", "--x86pt-oracle", "model", "--x86pt-shard", "3/2")
    assert r.returncode == 4 and "bad --x86pt-shard '3/2'" in r.stderr, r.stderr
    r = suite(tmp_path, "-q", "--x86pt-oracle", "cmd:/no/such/emulator")
    assert r.returncode == 4 and "no such program /no/such/emulator" in r.stderr, r.stderr


def test_a_program_crashing_in_a_batch_fails_that_item_with_the_oracle_error(tmp_path):
    prog = tmp_path / "broken.py"
    prog.write_text(BROKEN)
    oracle = f"cmd:{shlex.quote(sys.executable)} {shlex.quote(str(prog))} crash"
    r = suite(tmp_path, "-q", "--x86pt-oracle", oracle, "--x86pt-cases", "random", "--x86pt-limit", "20")
    assert r.returncode == 1, r.stdout[-3000:]
    assert re.search(
        r"^oracle error: cmd:.* run exited with status 3; stderr: emulator log line \| "
        r"emulator exploded at rip=0xdead$",
        r.stdout,
        re.M,
    ), r.stdout[-3000:]
    assert "Traceback" not in r.stdout and "MISMATCH" not in r.stdout and "During handling" not in r.stdout


# -- fixtures for users' own cases ---------------------------------------------------------------------------
USER_TESTS = """
def test_supervisor_write_to_a_read_only_page_with_wp(x86pt_builder):
    case = x86pt_builder()
    frame = case.frame()
    case.map(0x400000, frame, flags="p us")
    case.probe(0x400000, "write")
    case.probe(0x400000, "read", user=True)
    got = case.check(cr0_wp=True)
    # SDM Vol. 3A 4.7: P=1, W/R=1 (a write), U/S=0 (CPL0) -> error code 3; then a user read is fine
    assert got[0].outcome == "page_fault" and got[0].error_code == 0x3
    assert got[1].outcome == "ok"


def test_the_oracle_fixture(x86pt_oracle):
    assert x86pt_oracle.capabilities().maxphyaddr >= 36
"""


def test_users_write_their_own_cases_with_the_fixtures(tmp_path):
    (tmp_path / "test_mine.py").write_text(USER_TESTS)
    r = pytest_run(tmp_path, "-q", "--x86pt-oracle", "model")
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    flip = tmp_path / "flip_adapter.py"
    flip.write_text(FLIP.format(examples=EXAMPLES))
    oracle = f"cmd:{shlex.quote(sys.executable)} {shlex.quote(str(flip))} --oracle model"
    r = pytest_run(
        tmp_path,
        "-q",
        "--x86pt-oracle",
        oracle,
        "test_mine.py::test_supervisor_write_to_a_read_only_page_with_wp",
        "--x86pt-repro-dir",
        str(tmp_path / "repros"),
    )
    assert r.returncode == 1 and "MISMATCH user#0" in r.stdout and "#PF error code: model 0x3" in r.stdout, (
        r.stdout[-3000:]
    )


def test_the_docs_name_every_option():
    with open(os.path.join(REPO, "docs", "conformance.md"), encoding="utf-8") as f:
        doc = f.read()
    src = open(os.path.join(REPO, "harness", "pytest_plugin.py"), encoding="utf-8").read()
    for opt in re.findall(r'addoption\("(--x86pt-[a-z-]+)"', src):
        assert opt in doc, opt
    assert textwrap.dedent("x86pt_builder") in doc and "x86pt_oracle" in doc
