"""Start-up: building the whole argument tree (`x86pt --help`) imports none of the heavy
libraries; each command loads them when it runs (python -X importtime lists every import)."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import argparse
import importlib
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


# -- `x86pt CMD ...` builds CMD's parser alone (x86pt.cli.build_parser(only); docs/startup.md) --------
def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _tree(p: argparse.ArgumentParser, path: tuple[str, ...]):
    yield path, p
    for name, q in _subparsers(p).items():
        yield from _tree(q, path + (name,))


def _fast_commands() -> list[str]:
    from x86pt.cli import OWN_COMMANDS
    from x86pt.plugins import BUILTIN_COMMAND_NAMES

    return [*OWN_COMMANDS, *BUILTIN_COMMAND_NAMES]


def test_the_fast_path_knows_exactly_the_builtin_commands():
    """x86pt.cli.OWN_COMMANDS and plugins.BUILTIN_COMMAND_NAMES name what each module registers:
    a command added to a module and not to the table would miss the fast path (still correct, only
    slow); a name in the table that its module does not register would be an empty parser."""
    from x86pt import plugins
    from x86pt.cli import OWN_COMMANDS, build_parser

    for mod in plugins.BUILTIN_COMMANDS:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(mod).register(sub)
        assert sorted(sub.choices) == sorted(n for n, m in plugins.BUILTIN_COMMAND_NAMES.items() if m == mod)
    plugged = argparse.ArgumentParser().add_subparsers()
    for mod in plugins.command_modules()[len(plugins.BUILTIN_COMMANDS) :]:
        importlib.import_module(mod).register(plugged)
    full = set(_subparsers(build_parser()))
    assert full - set(plugged.choices) - set(plugins.BUILTIN_COMMAND_NAMES) == set(OWN_COMMANDS)
    for name in _fast_commands():
        assert list(_subparsers(build_parser(name))) == [name]


@pytest.mark.parametrize("name", _fast_commands())
def test_one_command_parser_is_the_same_as_in_the_whole_tree(name):
    """Usage, help (description, options, epilog) of the command and of each of its subcommands
    read the same whether the whole tree was built or the command's parser alone."""
    from x86pt.cli import build_parser

    full = dict(_tree(_subparsers(build_parser())[name], (name,)))
    fast = dict(_tree(_subparsers(build_parser(name))[name], (name,)))
    assert list(fast) == list(full)
    for path, p in full.items():
        assert fast[path].format_usage() == p.format_usage(), path
        assert fast[path].format_help() == p.format_help(), path


@pytest.mark.parametrize(
    "words",
    [
        ["decode", "0x80000000400000e3", "--kind", "pde", "--json"],
        ["encode", "--kind", "pte", "p", "rw", "pa=0x1000"],
        ["dump", "x.raw", "--cr3", "0x1000", "--format", "csv", "--user", "--level", "4k"],
        ["census", "x.elf", "--no-gbpages"],
        ["cpa", "replay", "t.trace", "--policy", "linux"],
        ["dump", "x.raw", "--format", "nope"],
        ["dump", "x.raw", "--user", "--kernel"],
        ["decode"],
        ["walk", "x.raw"],
    ],
)
def test_main_parses_a_command_line_as_the_whole_tree_does(words, capsys):
    """Same namespace, or the same error message and status, from the fast path as from the whole
    tree (argparse errors name the parser's prog, which must not change)."""
    from x86pt.cli import build_parser

    def parse(p):
        try:
            return vars(p.parse_args(words)), None
        except SystemExit as e:
            return capsys.readouterr().err, e.code

    assert parse(build_parser(words[0])) == parse(build_parser())


def test_a_builtin_command_reads_no_plugin_metadata(monkeypatch):
    """The fast path never scans sys.path for entry points; the whole tree does (the patch bites)."""
    from x86pt import plugins
    from x86pt.cli import build_parser

    def boom(group):
        raise AssertionError(f"entry points of {group} read")

    monkeypatch.setattr(plugins, "entry_points", boom)
    for name in _fast_commands():
        build_parser(name)
    with pytest.raises(AssertionError, match="entry points"):
        build_parser()


def test_decode_loads_neither_the_walker_nor_other_commands():
    mods = _imported("decode", "0x80000000400000e3", "--kind", "pde")
    assert "x86pt.fields" in mods  # the listing is complete enough to see what decode does use
    unwanted = {
        "x86pt.walk",
        "x86pt.state",
        "x86pt.formats.cli",
        "x86pt.cpa.cli",
        "json",
        "numpy",
        "dataclasses",
        "shutil",
        "typing",
    }
    assert not unwanted & mods, sorted(unwanted & mods)


def test_a_qemu_dump_loads_only_its_own_renderer(tmp_path):
    """A 2M page at VA 0 (PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000) dumped as QEMU's
    `info mem`: the ptdump/JSON/CSV renderers, the W+X check and the writer's tempfile stay out."""
    img = bytearray(0x4000)
    for pa, entry in ((0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x83)):
        img[pa : pa + 8] = entry.to_bytes(8, "little")
    path = tmp_path / "tiny.raw"
    path.write_bytes(bytes(img))
    args = ("dump", str(path), "--cr3", "0x1000", "--cr4", "0x20", "--efer", "0x500", "--format", "qemu-mem")
    mods = _imported(*args)
    assert "x86pt.formats.qemu" in mods
    unwanted = {
        "x86pt.formats.ptdump",
        "x86pt.formats.tabular",
        "x86pt.formats.wx",
        "x86pt.describe",
        "x86pt.walk",
        "csv",
        "json",
        "tempfile",
    }
    assert not unwanted & mods, sorted(unwanted & mods)


# -- `x86pt --help` builds the shallow tree (x86pt.cli.build_parser(shallow=True); docs/startup.md) ---
@pytest.fixture
def third_party_plugin(tmp_path, monkeypatch):
    """A third party's command module next to the shipped ones (its name sorts before harness.cli)."""
    from x86pt import plugins

    (tmp_path / "zz_x86pt_plugin.py").write_text(
        "def register(sub):\n"
        "    p = sub.add_parser('zzcmd', help='a third party command, help from its own module')\n"
        "    p.add_argument('--flag', action='store_true')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    real = plugins.entry_points
    monkeypatch.setattr(
        plugins,
        "entry_points",
        lambda group: {**real(group), "zz": "zz_x86pt_plugin"} if group == plugins.COMMANDS else real(group),
    )


@pytest.mark.parametrize("plugged", [False, True], ids=["shipped", "third-party"])
def test_the_shallow_top_level_help_is_the_whole_trees(plugged, request):
    """`x86pt --help` from the shallow tree (every shipped command a one-line parser from
    x86pt.cli.OWN_HELP and x86pt.plugins.SHIPPED_COMMANDS) reads exactly as from the whole tree:
    the same commands, order and help lines, so the tables cannot drift from the modules; a third
    party's command is listed with the help its own module gives."""
    from x86pt.cli import build_parser

    if plugged:
        request.getfixturevalue("third_party_plugin")
    full, shallow = build_parser(), build_parser(shallow=True)
    assert shallow.format_usage() == full.format_usage()
    assert shallow.format_help() == full.format_help()
    assert ("zzcmd" in _subparsers(shallow)) is plugged


@pytest.mark.parametrize("words", [[], ["--help"], ["-h"], ["--version"]])
def test_main_answers_the_top_level_words_as_the_whole_tree(words, capsys):
    """No words (the usage error), -h/--help and --version print the same text with the same
    status from the shallow tree as from the whole tree."""
    from x86pt.cli import build_parser, main

    def run(f):
        with pytest.raises(SystemExit) as e:
            f()
        out = capsys.readouterr()
        return out.out, out.err, e.value.code

    assert run(lambda: main(words)) == run(lambda: build_parser().parse_args(words))


def test_top_level_help_imports_no_command_module():
    """`x86pt --help` imports neither the command modules (the shallow tree lists them from its
    table) nor what only they or a command's help use (typing, json, shutil)."""
    code = (
        "import sys\nfrom x86pt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    mods = set(r.stderr.split())
    assert "x86pt.cli" in mods and "argparse" in mods
    unwanted = {
        "x86pt.formats.cli",
        "x86pt.cpa.cli",
        "harness.cli",
        "harness.linux.cli",
        "x86pt.helpdoc",
        "x86pt.cliargs",
        "typing",
        "json",
        "shutil",
    }
    assert not unwanted & mods, sorted(unwanted & mods)


@pytest.mark.parametrize("columns", [None, "100", "37", "0", "-3", "wide"])
def test_the_help_width_is_shutils(columns, monkeypatch):
    """x86pt.cli._columns (argparse's default width without importing shutil) is
    shutil.get_terminal_size().columns for any $COLUMNS (set, unset, not a positive number), and a
    help printed with it wraps as argparse's own formatter wraps it."""
    import shutil

    from x86pt.cli import _columns, build_parser

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert _columns() == shutil.get_terminal_size().columns
    p = build_parser(shallow=True)
    ours = p.format_help()
    p.formatter_class = argparse.HelpFormatter
    assert ours == p.format_help()


@pytest.mark.parametrize(
    "module, names",
    [
        ("x86pt.fields", ["_Field", "_Level", "_Masks"]),
        ("x86pt.scan", ["_Chunk", "_Filter", "_Issue", "_Mapping"]),
        ("x86pt.memory.base", ["_Segment"]),
    ],
)
def test_the_typed_declarations_of_the_record_tuples_are_the_run_time_ones(module, names):
    """x86pt/fields.py (Level, Field, Masks), x86pt/scan.py (Issue, Chunk, Mapping, Filter) and
    x86pt/memory/base.py (Segment) build their records on collections.namedtuple (no typing, no
    @dataclass at start-up) and declare them to mypy as typing.NamedTuple classes under
    TYPE_CHECKING: the two must name the same fields in the same order with the same defaults
    (read from the source), and each public class adds methods only (no fields, no __dict__)."""
    import ast

    mod = importlib.import_module(module)
    tree = ast.parse(open(mod.__file__, encoding="utf-8").read())
    block = next(n for n in tree.body if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.orelse)
    assert block.test.id == "TYPE_CHECKING"
    declared = {
        c.name: [(a.target.id, a.value) for a in c.body if isinstance(a, ast.AnnAssign)]
        for c in block.body
        if isinstance(c, ast.ClassDef)
    }
    assert sorted(declared) == names
    for name, items in declared.items():
        base = getattr(mod, name)
        assert base._fields == tuple(n for n, _ in items), name
        assert base._field_defaults == {n: ast.literal_eval(v) for n, v in items if v is not None}, name
        public = getattr(mod, name[1:])
        assert public.__bases__ == (base,) and public.__slots__ == ()
