"""Plugins by package entry point: the groups `x86pt.oracles` (an oracle class per name) and
`x86pt.commands` (a module with `register(subparsers)` that adds CLI commands).

A package announces its plugins in its metadata, as pytest and volatility3 plugins do:

    [project.entry-points."x86pt.oracles"]
    myemu = "myemu_x86pt:MyEmuOracle"

The groups are read here from each distribution's `entry_points.txt` (the packaging
specification's "Entry points" file: INI sections named by group, `name = module:attr` lines)
rather than with importlib.metadata, whose import alone costs about 18 ms (email, zipfile, csv)
against a start-up budget of 30 ms for `x86pt --help`; the file scan costs about 1 ms.
tests/test_plugins.py checks that both readers find the same entry points.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

ORACLES = "x86pt.oracles"
COMMANDS = "x86pt.commands"
# The library's own command modules besides x86pt/cli.py (each has register(subparsers)).
BUILTIN_COMMANDS = ("x86pt.formats.cli", "x86pt.cpa.cli")
# SHIPPED_COMMANDS: the command modules this distribution ships besides x86pt/cli.py (the rig's come in
# through the `x86pt.commands` entry points), with the one-line help of each command they register,
# in the order they register them: `x86pt --help` lists them from here without importing the modules
# (x86pt.cli.build_parser(shallow=True); tests/test_startup.py checks the result against the help of
# the whole tree).
SHIPPED_COMMANDS: dict[str, tuple[tuple[str, str], ...]] = {
    "x86pt.formats.cli": (
        ("dump", "dump every mapping: ptdump, QEMU info mem/tlb, JSON, CSV"),
        ("census", "DirectMap4k/2M/1G as /proc/meminfo, leaves per level, table pages"),
        ("wx", "every writable+executable mapping, as the kernel's W+X check reports it"),
        ("find", "every virtual address that maps a physical address (aliases)"),
        ("diff", "semantic difference of two images' translations"),
    ),
    "x86pt.cpa.cli": (("cpa", "the Linux CPA / direct-map model: replay, compare, generate"),),
    "harness.cli": (("conform", "differential conformance: the x86pt model vs unicorn/QEMU/KVM"),),
    "harness.linux.cli": (("linux", "ground truth from a real Linux kernel under QEMU"),),
}
# The top-level commands each of them registers: `x86pt CMD ...` for one of these builds only its
# module's parsers and reads no plugin metadata (docs/startup.md; tests/test_startup.py checks this
# table against the parsers the modules register).
BUILTIN_COMMAND_NAMES = {name: mod for mod in BUILTIN_COMMANDS for name, _ in SHIPPED_COMMANDS[mod]}

# compiled on first use (re caches it): `x86pt CMD` for a built-in CMD reads no entry point and
# should not pay the 0.15 ms of compiling it
_META_DIR = r"^(?P<name>[^-]+)(?:-[^/]*)?\.(?:dist-info|egg-info)$"


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _parse(text: str) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = groups.setdefault(line[1:-1].strip(), {})
        elif current is not None and "=" in line:
            name, value = line.split("=", 1)
            current.setdefault(name.strip(), value.strip())
    return groups


def entry_points(group: str) -> dict[str, str]:
    """{name: "module:attr"} of every installed distribution on sys.path for `group`. The first
    distribution of a name on sys.path wins (as importlib.metadata), then the first entry of a name."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    for entry in sys.path:
        where = entry or "."
        if not os.path.isdir(where):
            continue
        try:
            names = sorted(os.listdir(where))
        except OSError:
            continue
        for n in names:
            m = re.match(_META_DIR, n)
            if m is None:
                continue
            dist = _normalise(m.group("name"))
            if dist in seen:
                continue
            seen.add(dist)
            try:
                with open(os.path.join(where, n, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            for name, value in _parse(text).get(group, {}).items():
                found.setdefault(name, value)
    return found


def load(value: str) -> object:
    """The object an entry point names: "package.module:attr.attr" (or a module alone)."""
    module, _, attr = value.partition(":")
    obj = importlib.import_module(module.strip())
    for part in attr.strip().split(".") if attr.strip() else ():
        obj = getattr(obj, part)
    return obj


def command_modules() -> tuple[str, ...]:
    """The modules that add CLI commands: the library's own, then each `x86pt.commands` plugin
    (shallow modules first, then by name, so the help's order is stable)."""
    plugged = sorted(
        {v.partition(":")[0].strip() for v in entry_points(COMMANDS).values()},
        key=lambda mod: (mod.count("."), mod),
    )
    return BUILTIN_COMMANDS + tuple(plugged)
