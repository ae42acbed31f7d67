"""Start-up: building the whole argument tree (`x86pt --help`) imports none of the heavy
libraries; each command loads them when it runs (python -X importtime lists every import)."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

HEAVY = ("numpy", "construct", "matplotlib", "unicorn", "capstone", "tqdm")


def _imported(*args: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "x86pt", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names = set()
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("dump", "--help"),
        ("cpa", "replay", "--help"),
        ("conform", "--help"),
        ("linux", "run", "--help"),
    ],
)
def test_help_imports_nothing_heavy(args):
    mods = _imported(*args)
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not heavy, f"x86pt {' '.join(args)} imports {heavy[:8]}"


def test_the_heavy_libraries_are_still_loaded_when_a_command_needs_them(tmp_path):
    """The check above can fail: a command that walks an image does import numpy."""
    mods = _imported("demo", "--out", str(tmp_path / "d"))
    assert "numpy" in mods
