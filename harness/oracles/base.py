"""Helpers the rig's own oracles share beyond the library's interface (x86pt/oracle.py): the
capability check of implicit supervisor reads, X86PT_REQUIRE_ORACLES, a fast ProbeResult, and
the batch loop of the probe-guest oracles (ProbeGuestOracle).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, ContextManager, Sequence

from x86pt.errors import BadInputError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import BatchResult, Probe, ProbeResult
from x86pt.state import PagingState

_new, _set = object.__new__, object.__setattr__


def made_result(outcome, error_code, cr2, pa, value, vector, detail) -> ProbeResult:
    """ProbeResult(outcome, error_code, cr2, pa, value, vector, detail) without its __init__ (a
    frozen dataclass: ~3x cheaper, equal and printing the same; tests/test_matrix_speed.py checks
    the field list). The backends that decode many results at once use it."""
    r = _new(ProbeResult)
    _set(
        r,
        "__dict__",
        {
            "outcome": outcome,
            "error_code": error_code,
            "cr2": cr2,
            "pa": pa,
            "value": value,
            "vector": vector,
            "detail": detail,
        },
    )
    return r


def implicit_support(results, what: str) -> tuple[bool, bool, str]:
    """(CPL0, CPL3, note) from the four implicit probes of a capability batch run with CR4.SMAP=1
    and EFLAGS.AC=0: an implicit read of a user page, then of a supervisor page, at CPL0 then CPL3.
    SDM Vol. 3A §4.6/§4.7: the user page faults with error code P only (a supervisor access: no U
    bit, even at CPL3), the supervisor page translates."""
    r = list(results)
    ok = [(x.outcome, x.error_code if x.outcome == "page_fault" else None) for x in r]
    want = ("page_fault", 0x1), ("ok", None)
    cpl0 = tuple(ok[0:2]) == want
    cpl3 = tuple(ok[2:4]) == want
    note = ""
    if not (cpl0 and cpl3):
        note = (
            f"{what}: implicit supervisor reads answered {ok} (wanted #PF 0x1 on a user page "
            f"and ok on a supervisor page, at CPL0 and at CPL3)"
        )
    return cpl0, cpl3, note


def required_oracles() -> set[str]:
    """X86PT_REQUIRE_ORACLES=unicorn,qemu,kvm: those oracles must be present (skips fail)."""
    return {s.strip() for s in os.environ.get("X86PT_REQUIRE_ORACLES", "").split(",") if s.strip()}


class ProbeGuestOracle:
    """What the oracles that run the probe guest (harness/guest) in an emulator share (QEMU and
    Bochs): run() splits a batch into consecutive launches of at most `max_probes`, each starting
    from the image the previous one left, so A/D bits carry over as the rig's conventions ask
    (one launch for an empty batch); launches are counted and the last one timed.

    A subclass sets name, profile, label (for messages) and max_probes, and implements
    `_launch(scope, n, image, state, chunk, ram_hook)` -> (results, image after), `scope` being
    what `_scope()` (a context manager around one run() call, by default none) gave."""

    name: str
    profile: str
    label: str
    max_probes: int
    launches = 0
    last_launch_seconds = 0.0

    def close(self) -> None:
        pass

    def _scope(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def _launch(
        self,
        scope: Any,
        n: int,
        memory: SparseMemory,
        state: PagingState,
        probes: Sequence[Probe],
        ram_hook: Callable[[Any], None] | None,
    ) -> tuple[list[ProbeResult], SparseMemory]:
        raise NotImplementedError

    def run(
        self,
        memory: SparseMemory,
        state: PagingState,
        probes: Sequence[Probe],
        *,
        ram_hook: Callable[[Any], None] | None = None,
    ) -> BatchResult:
        """Run `probes` in order on `memory` under `state`. `ram_hook(ram)` (experiments only) may
        patch the prepared guest RAM before each launch, e.g. the harness's own tables."""
        if not isinstance(memory, SparseMemory):
            raise BadInputError(f"the {self.label} oracle takes a SparseMemory image")
        t0 = time.monotonic()
        results: list[ProbeResult] = []
        current = memory
        size = self.max_probes
        chunks = [probes[i : i + size] for i in range(0, len(probes), size)] or [[]]
        with self._scope() as scope:
            for n, chunk in enumerate(chunks):
                res, current = self._launch(scope, n, current, state, chunk, ram_hook)
                results.extend(res)
        return BatchResult(results, current, time.monotonic() - t0)
