"""The library passes a strict type check (issue 13): `python -m mypy` with the project's
configuration (pyproject.toml [tool.mypy]: strict on x86pt/, third-party packages without types
listed by module, and a ratchet of modules not yet clean, each with only the error codes it still
has). Three checks:

* the configured run reports no error;
* the check can fail: a copy of a clean module with a planted type error and a planted
  unannotated function, checked with the same configuration, is refused for both;
* the ratchet only shrinks: with the ratchet taken out, every module it lists must still have
  errors (a module that became clean leaves the list); codes an entry no longer needs are
  reported as a warning.
"""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import ROOT

PYPROJECT = Path(ROOT) / "pyproject.toml"
_ERROR = re.compile(r"^(?P<path>[^:\n]+\.py):\d+: error: .*\[(?P<code>[a-z0-9-]+)\]$", re.M)


def _mypy_available() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mypy is not installed (pip install -e '.[test]')")
        pytest.skip("mypy is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One mypy cache for the module's runs (pytest removes it): the later runs reuse the first's."""
    _mypy_available()
    return str(tmp_path_factory.mktemp("mypy-cache"))


def _mypy(args: list[str], cache: str, config: str | Path = PYPROJECT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            cache,
            "--show-error-codes",
            "--no-color-output",
            "--no-error-summary",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _config() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["tool"]["mypy"]


def _ratchet(cfg: dict) -> dict[str, set[str]]:
    """module -> error codes the ratchet lets it have (the x86pt overrides)."""
    out: dict[str, set[str]] = {}
    for o in cfg.get("overrides", []):
        mods = [o["module"]] if isinstance(o["module"], str) else o["module"]
        for m in mods:
            if m == "x86pt" or m.startswith("x86pt."):
                assert set(o) == {"module", "disable_error_code"}, (
                    f"ratchet entry {m}: relax by disable_error_code only ({sorted(set(o) - {'module'})})"
                )
                out[m] = set(o["disable_error_code"])
    return out


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"unexpected value {v!r} in [tool.mypy]")


def _config_without_ratchet(cfg: dict, path: Path) -> Path:
    """The same [tool.mypy] with the x86pt overrides left out, as a TOML file mypy can read."""
    lines = ["[tool.mypy]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if k != "overrides"]
    for o in cfg.get("overrides", []):
        mods = [o["module"]] if isinstance(o["module"], str) else o["module"]
        if any(m == "x86pt" or m.startswith("x86pt.") for m in mods):
            continue
        lines.append("[[tool.mypy.overrides]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in o.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _module(path: str) -> str:
    mod = path.removesuffix(".py").replace(os.sep, ".").replace("/", ".")
    return mod.removesuffix(".__init__")


def test_library_passes_strict_mypy(cache_dir: str) -> None:
    r = _mypy([], cache_dir)  # the files the configuration names (x86pt)
    assert r.returncode == 0, (
        "mypy --strict (pyproject.toml [tool.mypy]) found errors; annotate, or "
        "fix, the code (the ratchet list only shrinks):\n" + r.stdout[-6000:] + r.stderr[-2000:]
    )


def test_check_can_fail(cache_dir: str, tmp_path: Path) -> None:
    """x86pt/numbers.py is strict-clean; a copy with a wrong return type and an unannotated function
    added must be refused with the same configuration, for exactly those two lines."""
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = (Path(ROOT) / "x86pt" / "numbers.py").read_text()
    clean = pkg / "clean_numbers.py"
    clean.write_text(src)
    planted = pkg / "numbers.py"
    n = src.count("\n")
    planted.write_text(
        src + "\n\ndef planted_wrong_return(text: str) -> int:\n    return text\n"
        "\n\ndef planted_unannotated(text):\n    return text\n"
    )
    r = _mypy([str(clean), str(planted)], cache_dir)
    found = {(m["path"], m["code"]) for m in _ERROR.finditer(r.stdout)}
    assert r.returncode == 1, r.stdout + r.stderr
    where = str(planted)
    assert found == {(where, "return-value"), (where, "no-untyped-def")}, r.stdout + r.stderr
    lines = sorted(int(x) for x in re.findall(re.escape(where) + r":(\d+): error", r.stdout))
    assert lines == [n + 4, n + 7], r.stdout


def test_ratchet_only_shrinks(cache_dir: str, tmp_path: Path) -> None:
    """A module the ratchet lists still has errors under plain strict: once clean it must leave the
    list, so that it stays clean. Codes an entry allows but its module no longer has, and entries
    for modules that do not exist, are reported as warnings (other work in progress may bring
    them back); take them out when you see them."""
    cfg = _config()
    allowed = _ratchet(cfg)
    assert allowed, "no ratchet in pyproject.toml [tool.mypy]"
    r = _mypy([], cache_dir, _config_without_ratchet(cfg, tmp_path / "strict.toml"))
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    have: dict[str, set[str]] = defaultdict(set)
    for m in _ERROR.finditer(r.stdout):
        have[_module(m["path"])].add(m["code"])

    def exists(mod: str) -> bool:
        base = Path(ROOT, *mod.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()

    clean = sorted(mod for mod in allowed if exists(mod) and not have.get(mod))
    assert not clean, (
        "these modules are clean under strict mypy: take their entries out of the ratchet "
        f"in pyproject.toml [tool.mypy]: {clean}"
    )
    gone = sorted(mod for mod in allowed if not exists(mod))
    stale = {
        mod: sorted(codes - have[mod])
        for mod, codes in allowed.items()
        if have.get(mod) and codes - have[mod]
    }
    if gone or stale:
        warnings.warn(
            f"mypy ratchet can shrink: codes no longer found {stale}; no such module {gone}", stacklevel=1
        )
    unlisted = {
        mod: sorted(codes - allowed.get(mod, set()))
        for mod, codes in have.items()
        if not codes <= allowed.get(mod, set())
    }
    assert not unlisted, f"errors outside the ratchet (see test_library_passes_strict_mypy): {unlisted}"


def test_mypy_is_a_test_dependency() -> None:
    with open(PYPROJECT, "rb") as f:
        test_extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    assert any(re.match(r"mypy\b", d) for d in test_extra), test_extra
