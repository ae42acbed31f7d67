"""The model's answer beside an oracle's, probe by probe: the model run of a probe list
(`model_run`, the one place the model side of every comparison is computed), its answer in the
oracle's record shape, and `compare_probe`, which says how two answers differ.

What is compared per probe: outcome, #PF/#GP error code (bits the profile leaves open are not
compared: walk.error_code_dont_care), CR2 (for #PF; for #GP whether CR2 was written), and the
physical address when the oracle tells it (ProbeResult.pa, or the frame tag a read returned).
"""

from __future__ import annotations

from typing import Sequence

from x86pt.errors import PhysicalAddressError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import Probe, ProbeResult, pa_from_value, tag_value
from x86pt.state import PagingState
from x86pt.walk import Access, GeneralProtection, PageFault, Result, Translation, error_code_dont_care, walk


def as_probe_result(r: Result, value: int | None = None) -> ProbeResult:
    """The model's answer in the oracle's record shape."""
    if isinstance(r, Translation):
        return ProbeResult("ok", pa=r.pa, value=value)
    if isinstance(r, PageFault):
        return ProbeResult("page_fault", error_code=r.error_code, cr2=r.cr2, vector=14, detail=r.reason)
    return ProbeResult("general_protection", error_code=r.error_code, cr2=r.cr2, vector=13, detail=r.reason)


def model_run(
    memory: SparseMemory, state: PagingState, probes: Sequence[Probe], values: list[int | None] | None = None
) -> tuple[list[Result], SparseMemory]:
    """Walk every probe in order on a copy of `memory` with A/D updates; returns the walk results
    and the memory afterwards. With `values`, the qword each read loaded (at that moment) is
    appended there, one per probe."""
    mem = memory.copy()
    out: list[Result] = []
    for p in probes:
        r = walk(
            state, mem, p.va, Access(p.access, user=p.user, ac=p.ac, implicit=p.implicit), update_ad=True
        )
        if isinstance(r, Translation) and p.access == "write":
            try:
                mem.write_u64(r.pa, p.wvalue)
            except PhysicalAddressError:
                pass
        if values is not None:
            values.append(read_value(mem, r, p))
        out.append(r)
    return out, mem


def read_value(memory: SparseMemory, r: Result, probe: Probe) -> int | None:
    if not isinstance(r, Translation) or probe.access != "read":
        return None
    try:
        return memory.read_u64(r.pa)
    except PhysicalAddressError:
        return None


def oracle_pa(got: ProbeResult, probe: Probe) -> int | None:
    if got.pa is not None:
        return got.pa
    if probe.access == "read":
        return pa_from_value(got.value, probe.va)
    return None


def compare_probe(
    model: Result, got: ProbeResult, probe: Probe, state: PagingState | None = None
) -> list[str]:
    """Differences between the model's and the oracle's answer for one probe. Error-code bits the
    profile of `state` leaves open (walk.error_code_dont_care) are not compared."""
    want = as_probe_result(model)
    diffs: list[str] = []
    if want.outcome != got.outcome:
        diffs.append(f"outcome: model {describe_outcome(want)}, oracle {describe_outcome(got)}")
        return diffs
    # the outcomes agree; the model's own record has the numbers (as_probe_result copies them)
    if isinstance(model, PageFault):
        loose = dont_care(state, probe)
        if got.error_code is None or (got.error_code ^ model.error_code) & ~loose:
            diffs.append(
                f"#PF error code: model {model.error_code:#x}, oracle "
                f"{'?' if got.error_code is None else hex(got.error_code)}"
            )
        if got.cr2 is not None and got.cr2 != model.cr2:
            diffs.append(f"CR2: model {model.cr2:#x}, oracle {got.cr2:#x}")
    elif isinstance(model, GeneralProtection):
        if got.error_code is not None and got.error_code != model.error_code:
            diffs.append(f"#GP error code: model {model.error_code:#x}, oracle {got.error_code:#x}")
        model_wrote = model.cr2 is not None
        oracle_wrote = got.cr2 is not None and got.cr2 == probe.va
        if model_wrote != oracle_wrote:
            diffs.append(
                f"CR2 on #GP: model {'writes' if model_wrote else 'leaves'} it, oracle "
                f"{'writes' if oracle_wrote else 'leaves'} it"
            )
    else:
        pa = oracle_pa(got, probe)
        if pa is not None and pa != model.pa:
            diffs.append(f"physical address: model {model.pa:#x}, oracle {pa:#x}")
        elif pa is None and probe.access == "read" and got.value is not None and not probe.va & 7:
            diffs.append(
                f"read returned {got.value:#x}, not the frame tag {tag_value(model.pa):#x} "
                f"of model pa {model.pa:#x}"
            )
    return diffs


def describe_outcome(r: ProbeResult) -> str:
    if r.outcome == "ok":
        return "ok" + (f" pa={r.pa:#x}" if r.pa is not None else "")
    if r.outcome == "page_fault":
        from x86pt.describe import error_code_names

        ec = "?" if r.error_code is None else f"{r.error_code:#x} ({error_code_names(r.error_code)})"
        return f"#PF {ec}" + (f" cr2={r.cr2:#x}" if r.cr2 is not None else "")
    return f"#GP({r.error_code})" + (f" cr2={r.cr2:#x}" if r.cr2 is not None else "")


def agrees(model: Result, got: ProbeResult, probe: Probe, state: PagingState | None = None) -> bool:
    """Fast path of compare_probe for the common case (everything equal)."""
    if isinstance(model, Translation):
        if got.outcome != "ok":
            return False
        pa = oracle_pa(got, probe)
        if pa is None:
            return probe.access != "read" or got.value is None or bool(probe.va & 7)
        return pa == model.pa
    if isinstance(model, PageFault):
        return (
            got.outcome == "page_fault"
            and got.error_code is not None
            and not (got.error_code ^ model.error_code) & ~dont_care(state, probe)
            and (got.cr2 is None or got.cr2 == model.cr2)
        )
    return False


def dont_care(state: PagingState | None, probe: Probe) -> int:
    """Error-code bits the profile leaves open for this probe (walk.error_code_dont_care)."""
    if state is None or not state.profile.cpl3_blind_ranges:
        return 0
    return error_code_dont_care(
        state, probe.va, Access(probe.access, user=probe.user, ac=probe.ac, implicit=probe.implicit)
    )
