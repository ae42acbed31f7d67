"""Shared test plumbing. Oracle tests call `need_oracle(name)`: it skips with the reason when the
oracle is missing, and fails instead when X86PT_REQUIRE_ORACLES names that oracle (CI sets it)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "fixtures")


def required_oracles() -> set[str]:
    return {s.strip() for s in os.environ.get("X86PT_REQUIRE_ORACLES", "").split(",") if s.strip()}


def need_oracle(name: str, available: bool, reason: str = "") -> None:
    """Skip (or, when required, fail) unless oracle `name` is available."""
    if available:
        return
    msg = f"{name} oracle not available: {reason}" if reason else f"{name} oracle not available"
    if name in required_oracles():
        pytest.fail(msg + f" (X86PT_REQUIRE_ORACLES={os.environ.get('X86PT_REQUIRE_ORACLES')})")
    pytest.skip(msg)


@pytest.fixture
def fixtures_dir() -> str:
    return FIXTURES


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (the README's full sizes, minutes each) run only with X86PT_SLOW=1 or
    when `-m slow` selects them; CI runs the small sizes of the same checks."""
    if os.environ.get("X86PT_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set X86PT_SLOW=1 to run the full sizes")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("unicorn", marks=pytest.mark.unicorn),
        pytest.param("qemu", marks=pytest.mark.qemu),
        pytest.param("kvm", marks=pytest.mark.kvm),
        pytest.param("bochs", marks=pytest.mark.bochs),
    ],
)
def oracle(request):
    """Each real oracle of the rig in turn (skipped, or failed when required, where it is missing);
    closed after the module."""
    from x86pt.registry import availability, get_oracle

    name = request.param
    ok, why = availability(name)
    need_oracle(name, ok, why)
    o = get_oracle(name)
    try:
        yield o
    finally:
        o.close()
