"""tools/mutate.py keeps a survivor's justification across reformatting: the list names a mutant by
its function and changed line, and `ruff format` may split or join that line (a hand-made case each
way, and a different change in the same line that must not match)."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import importlib.util
import sys

from pathlib import Path

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("x86pt_mutate_tool", Path(ROOT) / "tools" / "mutate.py")
assert _spec and _spec.loader
mutate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutate  # dataclasses look their module up
_spec.loader.exec_module(mutate)

LISTED = {
    "f | x = g(a, b, c=1) => x = g(a, b, c=2)": "equivalent: c is ignored",
    "h | return a+1 => return a+2": "equivalent: h's result unused",
}


def test_exact_and_respaced():
    assert mutate.lookup(LISTED, "f | x = g(a, b, c=1) => x = g(a, b, c=2)") == "equivalent: c is ignored"
    assert mutate.lookup(LISTED, "h | return a + 1 => return a + 2") == "equivalent: h's result unused"


def test_line_split_by_the_formatter():
    # after `ruff format`, mutmut's changed line is the fragment `c=1,` of a call on several lines
    assert mutate.lookup(LISTED, "f | c=1, => c=2,") == "equivalent: c is ignored"


def test_lines_joined_by_the_formatter():
    listed = {"f | c=1, => c=2,": "equivalent: c is ignored"}
    assert mutate.lookup(listed, "f | x = g(a, b, c=1) => x = g(a, b, c=2)") == "equivalent: c is ignored"


def test_other_change_or_function_does_not_match():
    assert mutate.lookup(LISTED, "f | x = g(a, b, c=1) => x = g(a, b, c=None)") is None
    assert mutate.lookup(LISTED, "f | c=1, => c=None,") is None
    assert mutate.lookup(LISTED, "other | c=1, => c=2,") is None
