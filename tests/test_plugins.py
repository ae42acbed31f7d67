"""Plugins by entry point (x86pt/plugins.py, x86pt/oracle.py's registry). Expectations come from
importlib.metadata (the standard library's reader of the same files) and from packages this test
writes by hand."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import textwrap

import pytest

from x86pt import plugins
from x86pt.errors import BadInputError, OracleUnavailable
from x86pt.registry import all_oracles, availability, get_oracle, oracle_class, oracle_list, oracle_names


@pytest.mark.parametrize("group", [plugins.ORACLES, plugins.COMMANDS, "console_scripts"])
def test_the_fast_reader_agrees_with_importlib_metadata(group):
    want: dict[str, str] = {}
    for ep in md.entry_points(group=group):
        want.setdefault(ep.name, ep.value)
    assert plugins.entry_points(group) == want


def test_the_rig_registers_its_oracles_and_commands():
    assert {"unicorn", "qemu", "kvm", "qemu-monitor", "model"} <= set(oracle_names())
    # --oracle all: the execution oracles, not the model (itself) or the monitor (translation only)
    assert {"unicorn", "qemu", "kvm"} <= set(all_oracles())
    assert "model" not in all_oracles() and "qemu-monitor" not in all_oracles()
    assert plugins.command_modules()[:2] == plugins.BUILTIN_COMMANDS
    assert "harness.cli" in plugins.command_modules()


def test_unknown_names_are_refused_with_the_list():
    with pytest.raises(BadInputError, match="unknown oracle 'nope'.*unicorn"):
        oracle_list("unicorn,nope")
    ok, why = availability("nope")
    assert not ok and "unknown oracle" in why
    with pytest.raises(OracleUnavailable):
        get_oracle("nope")


def _fake_dist(root, name: str, body: str, eps: str) -> None:
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(eps))


def tiny_oracle_source(name: str) -> str:
    """A third party's oracle module: x86pt's model behind another name (a stand-in emulator).
    tests/test_wheel.py installs it as a real package."""
    return f'''
import dataclasses

from harness.oracles.model import ModelOracle


class TinyOracle:
    name = "{name}"
    profile = "intel"

    def __init__(self):
        self._inner = ModelOracle()

    @staticmethod
    def available():
        return True, ""

    def capabilities(self):
        return dataclasses.replace(self._inner.capabilities(), name="{name}")

    def run(self, memory, state, probes):
        return self._inner.run(memory, state, probes)

    def close(self):
        pass
'''


def test_a_third_party_oracle_is_found_by_entry_point(tmp_path, monkeypatch):
    """A package outside the repo adds an oracle: registered by its metadata only."""
    _fake_dist(
        tmp_path,
        "tinyemu",
        tiny_oracle_source("tiny")
        + """

class Broken:
    pass
""",
        """
        [x86pt.oracles]
        tiny = tinyemu:TinyOracle
        broken = tinyemu:Broken
        gone = tinyemu_missing:Gone
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"tiny", "broken", "gone"} <= set(oracle_names())
    assert oracle_class("tiny").__name__ == "TinyOracle"
    assert get_oracle("tiny").name == "tiny"
    ok, why = availability("broken")
    assert not ok and "not an oracle class" in why
    ok, why = availability("gone")
    assert not ok and "missing module tinyemu_missing" in why
    # the whole CLI: conform finds it and compares (a model subclass agrees with the model)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "x86pt",
            "conform",
            "--oracle",
            "tiny",
            "--cases",
            "random",
            "--limit",
            "40",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiny" in r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "x86pt", "conform", "--oracle", "gone", "--cases", "random", "--limit", "5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode != 0 and "tinyemu_missing" in r.stderr and "Traceback" not in r.stderr


def test_a_third_party_command_is_found_by_entry_point(tmp_path):
    _fake_dist(
        tmp_path,
        "tinycmd",
        """
        def register(sub):
            p = sub.add_parser("hello", help="say hello")
            p.set_defaults(func=lambda args: print("hello from a plugin") or 0)
        """,
        """
        [x86pt.commands]
        hello = tinycmd
        """,
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "x86pt", "hello"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0 and "hello from a plugin" in r.stdout, r.stderr
