"""The conformance suite's one test: each item is a batch of cases of one CPU configuration,
compared between the x86pt model and the oracle of --x86pt-oracle. The items come from the x86pt
pytest plugin (pytest_generate_tests); without --x86pt-oracle there is one skipped item."""

from typing import Protocol


class _Case(Protocol):
    """What the plugin's items give the test (harness.pytest_plugin.Case)."""

    def check(self) -> None: ...


def test_conformance(x86pt_case: _Case) -> None:
    x86pt_case.check()
