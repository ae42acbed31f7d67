"""The tree passes ruff with the project's configuration (pyproject.toml [tool.ruff]): unused
imports and variables, undefined names, syntax errors and bugbear's traps fail CI."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def test_ruff_passes():
    ruff = shutil.which("ruff", path=f"{sys.prefix}/bin") or shutil.which("ruff")
    if ruff is None:
        if (
            "ruff" in __import__("os").environ.get("X86PT_REQUIRE_ORACLES", "")
            or __import__("os").environ.get("CI") == "true"
        ):
            pytest.fail("ruff is not installed (pip install -e '.[test]')")
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run(
        [ruff, "check", "--output-format", "concise", "x86pt", "harness", "tools", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_format_is_applied():
    """Every Python file is laid out by `ruff format` ([tool.ruff.format] in pyproject.toml)."""
    ruff = shutil.which("ruff", path=f"{sys.prefix}/bin") or shutil.which("ruff")
    if ruff is None:
        if __import__("os").environ.get("CI") == "true":
            pytest.fail("ruff is not installed (pip install -e '.[test]')")
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run(
        [ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, "run `ruff format .`:\n" + r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_format_check_can_fail(tmp_path):
    """The format check fails on a file laid out by hand (continuation aligned under the bracket)."""
    ruff = shutil.which("ruff", path=f"{sys.prefix}/bin") or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    (tmp_path / "odd.py").write_text("x = f(1,\n      2)\n")
    r = subprocess.run(
        [ruff, "format", "--check", "--no-cache", str(tmp_path / "odd.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "odd.py" in r.stdout


def test_vulture_finds_no_dead_code():
    """Unused imports, variables and unreachable code (vulture at 80% confidence and above), with
    tools/vulture_whitelist.py for what it cannot see being used."""
    vulture = shutil.which("vulture", path=f"{sys.prefix}/bin") or shutil.which("vulture")
    if vulture is None:
        if __import__("os").environ.get("CI") == "true":
            pytest.fail("vulture is not installed (pip install -e '.[test]')")
        pytest.skip("vulture is not installed (pip install -e '.[test]')")
    r = subprocess.run(
        [vulture, "x86pt", "harness", "tools", "tools/vulture_whitelist.py", "--min-confidence", "80"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_vulture_would_report_dead_code(tmp_path):
    """The check can fail: an unused import and an unreachable line are reported."""
    vulture = shutil.which("vulture", path=f"{sys.prefix}/bin") or shutil.which("vulture")
    if vulture is None:
        pytest.skip("vulture is not installed")
    (tmp_path / "dead.py").write_text("import os\n\n\ndef f():\n    return 1\n    print('never')\n")
    r = subprocess.run(
        [vulture, str(tmp_path / "dead.py"), "--min-confidence", "80"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "unused import 'os'" in r.stdout and "unreachable code" in r.stdout
