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
        if "ruff" in __import__("os").environ.get("X86PT_REQUIRE_ORACLES", "") or \
                __import__("os").environ.get("CI") == "true":
            pytest.fail("ruff is not installed (pip install -e '.[test]')")
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run([ruff, "check", "--output-format", "concise", "x86pt", "harness", "tools", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
