# SPDX-License-Identifier: GPL-2.0-or-later
"""The import rules of docs/design.md §2, checked on the import graph grimp builds from the
source (every `import` statement: at module level, inside functions and under TYPE_CHECKING —
a circle hidden that way is still a circle):

(a) the library stands alone: nothing in x86pt imports harness, tools or tests;
(b) no circles among x86pt's modules;
(c) layers inside x86pt, each importing only the ones below it:
    commands (x86pt.cli, helpdoc, demo, formats.cli, cpa.cli) -> cpa -> formats -> scan/batch ->
    state/walk -> fields/layouts.

Each check is shown to fail on a graph with a planted violation, so a green run means something.
"""

from __future__ import annotations

import functools
import sys
import textwrap

import pytest

grimp = pytest.importorskip("grimp")

# (c): highest first. Names relative to x86pt; a package stands for everything in it. The
# modules not listed (errors, numbers, limits, memory, plugins, oracle, tlb, cost, ...) are
# free to be imported by any layer, but a chain through them still counts.
COMMANDS = ("cli", "helpdoc", "demo", "formats.cli", "cpa.cli")
LAYERS: tuple[tuple[str, ...], ...] = (
    COMMANDS,
    ("cpa",),  # minus cpa.cli (a command), see _layers()
    ("formats", "census", "diff"),  # minus formats.cli
    ("scan", "coalesce", "batch", "build", "aliases"),
    ("state", "walk", "describe"),
    ("fields", "layouts"),
)


@functools.lru_cache(maxsize=None)
def _graph():
    return grimp.build_graph("x86pt", "harness", include_external_packages=True, cache_dir=None)


def _fresh_graph():
    return grimp.build_graph("x86pt", "harness", include_external_packages=True, cache_dir=None)


def _expand(graph, names: tuple[str, ...]) -> set[str]:
    """Full module names of a layer: a listed package brings its descendants, except the ones a
    command layer claims."""
    commands = {f"x86pt.{c}" for c in COMMANDS}
    out: set[str] = set()
    for n in names:
        full = f"x86pt.{n}"
        if full not in graph.modules:
            continue
        out.add(full)
        out |= graph.find_descendants(full)
    if names != COMMANDS:
        out -= commands
    return out


def _layer_violations(graph) -> list[str]:
    """Every import chain from a lower layer up to a higher one, as 'importer -> ... -> imported'."""
    layers = [_expand(graph, names) for names in LAYERS]
    found = []
    for hi_i, high in enumerate(layers):
        for low in layers[hi_i + 1 :]:
            for lo_mod in sorted(low):
                for hi_mod in sorted(high):
                    if graph.chain_exists(lo_mod, hi_mod):
                        chain = graph.find_shortest_chain(lo_mod, hi_mod)
                        found.append(" -> ".join(chain))
    return found


def _sccs(graph, prefix: str = "x86pt") -> list[frozenset[str]]:
    """Strongly connected components of more than one module (the circles), among modules whose
    name starts with `prefix` (iterative Tarjan)."""
    mods = sorted(m for m in graph.modules if m == prefix or m.startswith(prefix + "."))
    inside = set(mods)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & inside) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = 0
    for root in mods:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            recurse = False
            for j in range(i, len(edges[v])):
                w = edges[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def _circle_text(graph, comp: frozenset[str]) -> str:
    a = min(comp)
    b = min(graph.find_modules_directly_imported_by(a) & comp)
    back = graph.find_shortest_chain(b, a)
    return " -> ".join((a, *back))


def _rig_imports(graph) -> list[str]:
    bad = []
    for m in sorted(graph.modules):
        if not (m == "x86pt" or m.startswith("x86pt.")):
            continue
        for imp in graph.find_modules_directly_imported_by(m):
            if imp.split(".")[0] in ("harness", "tools", "tests"):
                bad.append(f"{m} imports {imp}")
    return bad


# -- (a) ---------------------------------------------------------------------------------------------
def test_the_library_imports_nothing_from_the_rig_or_the_tools():
    assert _rig_imports(_graph()) == []


def test_a_planted_rig_import_is_found():
    g = _fresh_graph()
    g.add_import(importer="x86pt.scan", imported="harness.matrix", line_number=1, line_contents="import")
    assert _rig_imports(g) == ["x86pt.scan imports harness.matrix"]


# -- (b) ---------------------------------------------------------------------------------------------
def test_no_import_circles_in_x86pt():
    g = _graph()
    circles = list(_sccs(g))
    assert not circles, "import circles: " + "; ".join(_circle_text(g, c) for c in circles)


def test_a_planted_circle_is_found():
    g = _fresh_graph()
    g.add_import(importer="x86pt.fields", imported="x86pt.walk", line_number=1, line_contents="import")
    circles = list(_sccs(g))
    assert any({"x86pt.fields", "x86pt.walk"} <= c for c in circles)


def test_imports_in_functions_and_under_type_checking_count(tmp_path, monkeypatch):
    """grimp reads every import statement: a circle made only of an import inside a function
    and one under TYPE_CHECKING is found."""
    pkg = tmp_path / "circlepkg_x86pt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        textwrap.dedent("""\
        def f():
            from circlepkg_x86pt import b
            return b
        """)
    )
    (pkg / "b.py").write_text(
        textwrap.dedent("""\
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from circlepkg_x86pt.a import f
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        g = grimp.build_graph("circlepkg_x86pt", cache_dir=None)
    finally:
        sys.modules.pop("circlepkg_x86pt", None)
    assert _sccs(g, "circlepkg_x86pt") == [frozenset({"circlepkg_x86pt.a", "circlepkg_x86pt.b"})]


# -- (c) ---------------------------------------------------------------------------------------------
def test_layers_inside_x86pt_import_only_downwards():
    assert _layer_violations(_graph()) == []


@pytest.mark.parametrize(
    "importer,imported",
    [
        ("x86pt.walk", "x86pt.scan"),  # state/walk -> scan/batch
        ("x86pt.scan", "x86pt.formats.ptdump"),  # scan/batch -> formats
        ("x86pt.cpa.ops", "x86pt.cli"),  # cpa -> commands
    ],
)
def test_a_planted_upward_import_is_found(importer, imported):
    g = _fresh_graph()
    g.add_import(importer=importer, imported=imported, line_number=1, line_contents="import")
    assert any(v.startswith(importer) and v.endswith(imported) for v in _layer_violations(g))
