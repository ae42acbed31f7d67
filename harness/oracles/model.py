"""ModelOracle: an 'oracle' that answers with x86pt's own walker (x86pt.walk.walk) under a named
profile. It exists to test the differential runner without an emulator, and `model_run` is the
one place where the model side of every comparison is computed.

Probes run in order on a copy of the image; A/D writes carry from probe to probe (as on the rig,
x86pt/oracle.py), a successful write stores `wvalue` at the translated address and a
successful read loads the 8 bytes there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from x86pt.compare import as_probe_result, model_run
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import RIG_RAM_SIZE, BatchResult, Capabilities, Probe, ProbeResult
from x86pt.state import PagingState, Profile, as_profile


@dataclass
class ModelOracle:
    """The x86pt model behind the Oracle protocol. `deviate` (tests only) may rewrite answers to
    play a buggy oracle."""

    in_all = False  # the model compared with itself proves nothing

    profile: "str | Profile" = "intel"
    maxphyaddr: int | None = None
    ram_size: int = RIG_RAM_SIZE
    deviate: Callable[[Probe, ProbeResult], ProbeResult] | None = None
    name: str = "model"

    def __post_init__(self) -> None:
        self._profile: Profile = as_profile(self.profile)

    def capabilities(self) -> Capabilities:
        f = self._profile.features
        return Capabilities(
            name=self.name,
            vendor=self._profile.vendor,
            maxphyaddr=self.maxphyaddr or self._profile.maxphyaddr,
            gbpages=f.gbpages,
            la57=f.la57,
            pku=f.pku,
            smep=f.smep,
            smap=f.smap,
            nx=f.nx,
            rsvd_sets_p=self._profile.rsvd_sets_p,
            ram_size=self.ram_size,
            version="x86pt model",
            notes=(f"profile {self._profile.name}",),
        )

    def run(self, memory: SparseMemory, state: PagingState, probes: Sequence[Probe]) -> BatchResult:
        t0 = time.perf_counter()
        st = state if state.profile == self._profile else state.replace(profile=self._profile)
        values: list = []
        walks, mem = model_run(memory, st, probes, values)
        results = []
        for p, r, v in zip(probes, walks, values):
            pr = as_probe_result(r, v)
            if self.deviate is not None:
                pr = self.deviate(p, pr)
            results.append(pr)
        return BatchResult(results, mem, time.perf_counter() - t0)

    def instruction_bytes(self, probe: Probe) -> bytes:
        from harness.differential import canonical_instruction

        return canonical_instruction(probe)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ModelOracle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def deviation(**changes) -> Callable[[Probe, ProbeResult], ProbeResult]:
    """A `deviate` hook that rewrites fields of every answer matching `when` (tests)."""
    when = changes.pop("when", lambda p, r: True)

    def f(p: Probe, r: ProbeResult) -> ProbeResult:
        return replace(r, **changes) if when(p, r) else r

    return f
