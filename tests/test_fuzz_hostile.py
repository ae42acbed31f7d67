# SPDX-License-Identifier: GPL-2.0-or-later
"""The hostile-input fuzzer (tools/fuzz.py) under hypothesis: random and malformed images (raw, ELF
core, LiME, shared and looping tables), register values and probe files through the library and
the CLI. A finding is any exception but an X86ptError from the library, an internal error (exit
3) or a malformed exit-2 message from the CLI, a changed input, or a case slower than 10 s.

CI runs a fixed budget (150 examples a test, derandomized: about 20-30 s for both). The long mode:

    X86PT_FUZZ_LONG=1 pytest tests/test_fuzz_hostile.py     # 20,000 examples a test
    python tools/fuzz.py --seconds 3600 --seed 7            # plain seeded randomness, much faster
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("x86pt_fuzz", os.path.join(ROOT, "tools", "fuzz.py"))
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["x86pt_fuzz"] = fuzz  # dataclasses look their module up there
_spec.loader.exec_module(fuzz)

LONG = os.environ.get("X86PT_FUZZ_LONG") == "1"
EXAMPLES = 20_000 if LONG else 150
CASE_SECONDS = 10.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


class HypothesisSource:
    """tools/fuzz.py's choice interface over hypothesis' data, so failures shrink."""

    def __init__(self, data) -> None:
        self.d = data

    def int(self, lo: int, hi: int) -> int:
        return self.d.draw(st.integers(lo, hi))

    def coin(self, p: float = 0.5) -> bool:
        return self.d.draw(st.integers(0, 999)) < int(p * 1000)

    def choice(self, seq):
        return seq[self.d.draw(st.integers(0, len(seq) - 1))]

    def bytes(self, n: int) -> bytes:
        return self.d.draw(st.binary(min_size=n, max_size=n))


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "img"), str(tmp_path / "probes.jsonl")


def _write(case, paths) -> None:
    with open(paths[0], "wb") as f:
        f.write(case.image)
    with open(paths[1], "wb") as f:
        f.write(case.probes)


@FUZZ
@given(data=st.data())
def test_fuzz_library(paths, data):
    case = fuzz.make_case(HypothesisSource(data))
    _write(case, paths)
    t = time.monotonic()
    fuzz.run_library(case, *paths)  # raises on anything but an X86ptError
    assert time.monotonic() - t < CASE_SECONDS


@FUZZ
@given(data=st.data())
def test_fuzz_cli(paths, data, monkeypatch):
    monkeypatch.setenv("X86PT_DEBUG", "1")  # an internal error raises here with its traceback
    src = HypothesisSource(data)
    case = fuzz.make_case(src)
    _write(case, paths)
    t = time.monotonic()
    rc, err = fuzz.run_cli(fuzz.cli_argv(src, case, *paths), paths[0])
    assert rc in (0, 1, 2)
    assert time.monotonic() - t < CASE_SECONDS
