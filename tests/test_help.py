"""Help a person can use: every subcommand (and sub-subcommand) has a description, every option a
help text, and an epilog with 2-4 real examples; each example is a command the parser accepts."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import argparse
import shlex

import pytest

from x86pt.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _commands(sub, path + (name,))


def _is_group(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


COMMANDS = list(_commands(build_parser()))


def test_every_command_is_listed():
    names = {" ".join(p) for p, _ in COMMANDS}
    for want in (
        "decode",
        "dump",
        "cpa replay",
        "cpa compare",
        "cpa generate",
        "conform",
        "linux run",
        "linux report",
    ):
        assert want in names


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_is_complete(path, parser):
    assert (parser.description or "").strip(), f"x86pt {' '.join(path)}: no description"
    missing = [
        a.option_strings or a.dest
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction))
        and not (a.help and a.help.strip() and a.help != argparse.SUPPRESS)
    ]
    assert not missing, f"x86pt {' '.join(path)}: options without help: {missing}"
    if _is_group(parser):
        return
    epilog = parser.epilog or ""
    examples = [line.strip() for line in epilog.splitlines() if line.strip().startswith("x86pt ")]
    assert 2 <= len(examples) <= 4, f"x86pt {' '.join(path)}: {len(examples)} examples in the epilog"
    top = build_parser()
    for ex in examples:
        words = shlex.split(ex.split("  #")[0], comments=True)[1:]
        try:
            top.parse_args(words)
        except SystemExit as e:  # argparse refuses: the example is not a real command line
            pytest.fail(f"example does not parse: {ex} (exit {e.code})")


@pytest.mark.parametrize(
    "path,parser",
    [(p, q) for p, q in COMMANDS if not _is_group(q)],
    ids=[" ".join(p) for p, q in COMMANDS if not _is_group(q)],
)
def test_every_command_speaks_json(path, parser):
    """The README: every command prints JSON with --json (dump: with --format json)."""
    opts = {o for a in parser._actions for o in a.option_strings}
    if path == ("dump",):
        fmt = next(a for a in parser._actions if "--format" in a.option_strings)
        assert "json" in fmt.choices
    else:
        assert "--json" in opts, f"x86pt {' '.join(path)} has no --json"
