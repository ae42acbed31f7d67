"""The tree passes ruff with the project's configuration (pyproject.toml [tool.ruff]): unused
imports and variables, undefined names, syntax errors and bugbear's traps fail CI; every file is
laid out by `ruff format`; vulture finds no dead code. Each check is also shown to fail."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def tool(name: str, *, required_in_ci: bool = True) -> str:
    """The venv's (or PATH's) `name`; a failure under CI (it is a test extra), a skip elsewhere."""
    exe = shutil.which(name, path=f"{sys.prefix}/bin") or shutil.which(name)
    if exe is None:
        msg = f"{name} is not installed (pip install -e '.[test]')"
        if required_in_ci and os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def run(argv: list[str], *, cwd: str | None = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_passes():
    r = run([tool("ruff"), "check", "--output-format", "concise", "x86pt", "harness", "tools", "tests"])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_format_is_applied():
    """Every Python file is laid out by `ruff format` ([tool.ruff.format] in pyproject.toml)."""
    r = run([tool("ruff"), "format", "--check", "."])
    assert r.returncode == 0, "run `ruff format .`:\n" + r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_checks_can_fail(tmp_path):
    """Both ruff checks fail on a bad file: an unused import, a continuation aligned by hand."""
    ruff = tool("ruff", required_in_ci=False)
    (tmp_path / "odd.py").write_text("import os\nx = f(1,\n      2)\n")
    r = run([ruff, "format", "--check", "--no-cache", str(tmp_path / "odd.py")], cwd=None)
    assert r.returncode == 1 and "odd.py" in r.stdout
    r = run([ruff, "check", "--no-cache", "--select", "F", str(tmp_path / "odd.py")], cwd=None)
    assert r.returncode == 1 and "F401" in r.stdout


def test_vulture_finds_no_dead_code():
    """Unused imports, variables and unreachable code (vulture at 80% confidence and above), with
    tools/vulture_whitelist.py for what it cannot see being used."""
    r = run(
        [tool("vulture"), "x86pt", "harness", "tools", "tools/vulture_whitelist.py", "--min-confidence", "80"]
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_vulture_would_report_dead_code(tmp_path):
    """The check can fail: an unused import and an unreachable line are reported."""
    (tmp_path / "dead.py").write_text("import os\n\n\ndef f():\n    return 1\n    print('never')\n")
    r = run(
        [tool("vulture", required_in_ci=False), str(tmp_path / "dead.py"), "--min-confidence", "80"], cwd=None
    )
    assert r.returncode != 0
    assert "unused import 'os'" in r.stdout and "unreachable code" in r.stdout
