"""Helpers the rig's own oracles share beyond the library's interface (x86pt/oracle.py): the
capability check of implicit supervisor reads, X86PT_REQUIRE_ORACLES, a fast ProbeResult, and
the batch loop of the probe-guest oracles (run_batches).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from x86pt.errors import BadInputError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import BatchResult, Probe, ProbeResult

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


def run_batches(
    name: str,
    memory: SparseMemory,
    probes: Sequence[Probe],
    max_probes: int,
    launch: Callable[[int, SparseMemory, Sequence[Probe]], tuple[list[ProbeResult], SparseMemory]],
) -> BatchResult:
    """Run `probes` in order as consecutive launches of at most `max_probes` (one launch for an
    empty batch), each starting from the image the previous one left, so A/D bits carry over as
    the rig's conventions ask. `launch(n, image, chunk)` runs the n-th chunk and returns its
    results and the image after it; `name` is the oracle's, for the error on a non-sparse image."""
    if not isinstance(memory, SparseMemory):
        raise BadInputError(f"the {name} oracle takes a SparseMemory image")
    t0 = time.monotonic()
    results: list[ProbeResult] = []
    current = memory
    chunks = [probes[i : i + max_probes] for i in range(0, len(probes), max_probes)] or [[]]
    for n, chunk in enumerate(chunks):
        res, current = launch(n, current, chunk)
        results.extend(res)
    return BatchResult(results, current, time.monotonic() - t0)
