"""tools/mutate.py --only: a function glob becomes mutmut's mutant-name glob of exactly those
functions, and --update after a partial run keeps every other function's listed survivors and
score lines (a hand-written list, merged by hand in the expectations)."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import importlib.util
import sys

import pytest

from pathlib import Path

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("x86pt_mutate_tool_only", Path(ROOT) / "tools" / "mutate.py")
assert _spec and _spec.loader
mutate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutate
_spec.loader.exec_module(mutate)

FUNCS = ["hi_bit", "hi_bits", "Space.size", "Space.flags_of", "build_batch"]


def test_function_globs_become_exact_mutant_globs():
    assert mutate.only_patterns("harness/matrix.py", ["hi_bit"], FUNCS) == [
        "harness.matrix.x_hi_bit__mutmut_*"
    ]
    assert mutate.only_patterns("harness/matrix.py", ["Space.*"], FUNCS) == [
        "harness.matrix.x\u01c1Space\u01c1size__mutmut_*",
        "harness.matrix.x\u01c1Space\u01c1flags_of__mutmut_*",
    ]
    # a glob on mutmut's own names passes through untouched
    assert mutate.only_patterns("harness/matrix.py", ["harness.matrix.x_build*"], FUNCS) == [
        "harness.matrix.x_build*"
    ]
    with pytest.raises(ValueError):
        mutate.only_patterns("harness/matrix.py", ["nothing*"], FUNCS)


def test_selected_does_not_take_a_longer_name():
    pats = mutate.only_patterns("harness/matrix.py", ["hi_bit"], FUNCS)
    assert mutate.selected("harness.matrix.x_hi_bit__mutmut_3", pats)
    assert not mutate.selected("harness.matrix.x_hi_bits__mutmut_3", pats)
    assert mutate.selected("anything", None)
    # the names func_of_key reads back are the names the globs were made from
    assert mutate.func_of_key("harness.matrix.x\u01c1Space\u01c1size__mutmut_2") == "Space.size"


OLD = """# Surviving mutants of m.py (tools/mutate.py m.py); score 7/10 on 2026-12-01, one run.
# Each line: file:line  function | original => mutated  # why
# run f 4/5 2026-12-01
# run g 3/5 2026-12-01
m.py:3  f | a = 1 => a = 2  # equivalent: a unused
m.py:9  g | b = 1 => b = 2  # TODO
m.py:10  g | c = 1 => c = 2  # equivalent: c unused
"""


def test_partial_update_keeps_the_functions_it_did_not_run(tmp_path):
    text = mutate.merge_list(
        OLD,
        "m.py",
        ["m.py:10  g | c = 1 => c = 2  # equivalent: c unused"],
        {"g": (4, 5, "2026-12-02 (9 s for 1 functions)")},
        {"g"},
        "2026-12-02",
    )
    assert text.splitlines() == [
        "# Surviving mutants of m.py (tools/mutate.py m.py); score 8/10 on 2026-12-02, "
        "summed over the per-function runs below (2 functions).",
        "# Each line: file:line  function | original => mutated  # why it is equivalent (or not worth a test)",
        "# run f 4/5 2026-12-01",
        "# run g 4/5 2026-12-02 (9 s for 1 functions)",
        "m.py:3  f | a = 1 => a = 2  # equivalent: a unused",
        "m.py:10  g | c = 1 => c = 2  # equivalent: c unused",
    ]
    (tmp_path / "m.txt").write_text(text)
    assert mutate.read_runs(tmp_path / "m.txt") == {
        "f": (4, 5, "2026-12-01"),
        "g": (4, 5, "2026-12-02 (9 s for 1 functions)"),
    }
    assert mutate.read_list(tmp_path / "m.txt") == {
        "f | a = 1 => a = 2": "equivalent: a unused",
        "g | c = 1 => c = 2": "equivalent: c unused",
    }


def test_a_whole_run_replaces_everything():
    text = mutate.merge_list(OLD, "m.py", [], {"f": (5, 5, "2026-12-02")}, None, "2026-12-02")
    assert text.splitlines()[2:] == ["# run f 5/5 2026-12-02"]
    assert "score 5/5 on 2026-12-02, one run." in text.splitlines()[0]


def test_a_function_gone_from_the_module_is_dropped():
    text = mutate.merge_list(OLD, "m.py", [], {"g": (5, 5, "2026-12-02")}, {"g"}, "2026-12-02", {"g", "h"})
    assert text.splitlines()[2:] == ["# run g 5/5 2026-12-02"]
    assert "score 5/5" in text.splitlines()[0]


def test_function_lines_start_where_mutmut_s_diff_starts():
    # mutmut shows a function with the comment lines right above it and its decorators
    src = "x = 1\n\n# a comment\n# more\ndef f():\n    pass\n\n\n@dec\ndef g():\n    pass\n\n\ndef h():\n    pass\n"
    assert mutate.func_lines(src) == {"f": 3, "g": 9, "h": 14}


def test_a_changed_line_with_a_comment_keeps_its_justification(tmp_path):
    (tmp_path / "m.txt").write_text(
        "m.py:4  f | x = [0, 1]  # [a, b] => x = [1, 1]  # [a, b]  # equivalent: x[0] unused\n"
    )
    assert mutate.read_list(tmp_path / "m.txt") == {
        "f | x = [0, 1]  # [a, b] => x = [1, 1]  # [a, b]": "equivalent: x[0] unused"
    }
