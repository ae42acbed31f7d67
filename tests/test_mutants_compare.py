"""The compare (x86pt/compare.py) shown to fail on wrong answers: each test plants one difference
between a model result and an oracle record and checks the compare reports it, or plants an allowed
difference and checks it does not. Expectations are written by hand from the compare's contract
(docs/design.md §5.1-§5.2): outcome, #PF error code (profile don't-care bits aside), CR2, and the
physical address when the oracle tells it (its pa, or the rig's frame tag a read returned).
The model results are built by hand, not by the walker, so nothing here comes from the code under test."""

from __future__ import annotations

import pytest

from x86pt.compare import (
    agrees,
    as_probe_result,
    compare_probe,
    describe_outcome,
    dont_care,
    model_run,
    oracle_pa,
    read_value,
)
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import Probe, ProbeResult, tag_value
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PagingState,
    profile_named,
)
from x86pt.walk import GeneralProtection, PageFault, Rights, Translation

VA = 0x7000
PA = 0x345000
RIGHTS = Rights(writable=True, user=True, executable=True, pkey=0)


def ok(pa=PA, va=VA):
    return Translation(va=va, pa=pa, page_size=4096, level=1, rights=RIGHTS, steps=())


def pf(ec=0x7, cr2=VA):
    return PageFault(va=cr2, error_code=ec, cr2=cr2, reason="hand-made", steps=(), level=1)


def gp(cr2=None):
    return GeneralProtection(va=0x0000800000000000, error_code=0, cr2=cr2, reason="non-canonical")


READ = Probe(VA, "read")
WRITE = Probe(VA, "write")
FETCH = Probe(VA, "fetch")


# -- as_probe_result ----------------------------------------------------------------------------
def test_model_results_in_the_oracle_shape():
    r = as_probe_result(ok(), value=0x1234)
    assert (r.outcome, r.pa, r.value, r.error_code, r.cr2) == ("ok", PA, 0x1234, None, None)
    r = as_probe_result(pf(0x5, 0x9000))
    assert (r.outcome, r.error_code, r.cr2, r.vector, r.detail) == (
        "page_fault",
        0x5,
        0x9000,
        14,
        "hand-made",
    )
    r = as_probe_result(gp(cr2=0x55))
    assert (r.outcome, r.error_code, r.cr2, r.vector, r.detail) == (
        "general_protection",
        0,
        0x55,
        13,
        "non-canonical",
    )


# -- oracle_pa / read_value ---------------------------------------------------------------------
def test_the_oracle_pa_comes_from_its_record_or_from_the_tag_of_a_read():
    assert oracle_pa(ProbeResult("ok", pa=0x1000), WRITE) == 0x1000
    assert oracle_pa(ProbeResult("ok", value=tag_value(PA)), READ) == PA
    assert oracle_pa(ProbeResult("ok", value=tag_value(PA)), WRITE) is None  # a write loads nothing
    assert oracle_pa(ProbeResult("ok", value=tag_value(PA)), Probe(VA + 4, "read")) is None  # unaligned
    assert oracle_pa(ProbeResult("ok", value=0x1234), READ) is None  # not a tag


def test_read_value_is_the_qword_a_successful_read_loads():
    mem = SparseMemory()
    mem.write_u64(PA, 0xABCDEF)
    assert read_value(mem, ok(), READ) == 0xABCDEF
    assert read_value(mem, ok(), WRITE) is None
    assert read_value(mem, pf(), READ) is None
    assert read_value(mem, ok(pa=1 << 60), READ) is None  # beyond any physical address


# -- compare_probe and its fast path agree ------------------------------------------------------
def both(model, got, probe, state=None):
    diffs = compare_probe(model, got, probe, state)
    assert agrees(model, got, probe, state) == (not diffs), (diffs, model, got)
    return diffs


def test_equal_answers_have_no_difference():
    assert both(ok(), ProbeResult("ok", pa=PA), WRITE) == []
    assert both(ok(), ProbeResult("ok", value=tag_value(PA)), READ) == []
    assert both(ok(), ProbeResult("ok"), FETCH) == []  # the oracle cannot tell a pa
    assert both(pf(0x7), ProbeResult("page_fault", error_code=0x7, cr2=VA), WRITE) == []
    assert both(pf(0x7), ProbeResult("page_fault", error_code=0x7), WRITE) == []  # no CR2 reported


def test_a_different_outcome_is_one_difference_naming_both():
    d = both(ok(), ProbeResult("page_fault", error_code=0x5, cr2=VA), READ)
    assert len(d) == 1 and d[0].startswith("outcome: model ok pa=0x345000, oracle #PF 0x5")
    d = both(pf(0x5), ProbeResult("ok", pa=PA), READ)
    assert d == [f"outcome: model #PF 0x5 (P|U) cr2={VA:#x}, oracle ok pa={PA:#x}"]


@pytest.mark.parametrize("bit", [0, 1, 2, 3, 4, 5, 15])
def test_every_error_code_bit_is_compared(bit):
    d = both(pf(0x4), ProbeResult("page_fault", error_code=0x4 ^ (1 << bit), cr2=VA), READ)
    assert d == [f"#PF error code: model 0x4, oracle {0x4 ^ (1 << bit):#x}"]


def test_a_missing_error_code_is_a_difference():
    assert both(pf(0x4), ProbeResult("page_fault", cr2=VA), READ) == ["#PF error code: model 0x4, oracle ?"]


def test_cr2_is_compared_when_the_oracle_reports_it():
    d = both(pf(0x4, cr2=VA), ProbeResult("page_fault", error_code=0x4, cr2=VA + 8), READ)
    assert d == [f"CR2: model {VA:#x}, oracle {VA + 8:#x}"]
    d = both(pf(0x6, cr2=VA), ProbeResult("page_fault", error_code=0x4, cr2=VA + 8), READ)
    assert len(d) == 2  # both differences listed


def test_the_physical_address_is_compared():
    assert both(ok(), ProbeResult("ok", pa=PA + 0x1000), WRITE) == [
        f"physical address: model {PA:#x}, oracle {PA + 0x1000:#x}"
    ]
    assert both(ok(), ProbeResult("ok", value=tag_value(PA + 0x1000)), READ) == [
        f"physical address: model {PA:#x}, oracle {PA + 0x1000:#x}"
    ]


def test_a_read_that_returns_no_tag_is_a_difference_when_aligned_only():
    d = both(ok(), ProbeResult("ok", value=0x1234), READ)
    assert d == [f"read returned 0x1234, not the frame tag {tag_value(PA):#x} of model pa {PA:#x}"]
    unaligned = Probe(VA + 4, "read")
    assert both(ok(va=VA + 4, pa=PA + 4), ProbeResult("ok", value=0x1234), unaligned) == []
    assert both(ok(), ProbeResult("ok", value=None), READ) == []  # no value reported


def test_general_protection_error_code_and_cr2():
    assert compare_probe(gp(), ProbeResult("general_protection", error_code=0), READ) == []
    d = compare_probe(gp(), ProbeResult("general_protection", error_code=8), READ)
    assert d == ["#GP error code: model 0x0, oracle 0x8"]
    d = compare_probe(gp(), ProbeResult("general_protection", error_code=0, cr2=VA), READ)
    assert d == ["CR2 on #GP: model leaves it, oracle writes it"]
    d = compare_probe(gp(cr2=VA), ProbeResult("general_protection", error_code=0), READ)
    assert d == ["CR2 on #GP: model writes it, oracle leaves it"]
    # a CR2 that is not the probe's address is not a write of CR2 by the #GP
    assert compare_probe(gp(), ProbeResult("general_protection", error_code=0, cr2=0x1), READ) == []
    assert not agrees(gp(), ProbeResult("general_protection", error_code=0), READ)  # slow path decides


# -- don't-care bits of a profile ---------------------------------------------------------------
BLIND = 0xFFFF800000001000  # inside the kvm-epyc-pvm profile's CPL3 blind range


def _state(profile: str) -> PagingState:
    return PagingState(
        cr0=CR0_PE | CR0_PG | CR0_WP,
        cr3=0x1000,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA | EFER_NXE,
        profile=profile_named(profile),
    )


def test_blind_range_bits_are_dont_care_for_user_accesses_only():
    st = _state("kvm-epyc-pvm")
    user = Probe(BLIND, "read", user=True)
    assert dont_care(st, user) == 0x9  # P | RSVD
    assert dont_care(st, Probe(BLIND, "read")) == 0  # a supervisor access
    assert dont_care(st, Probe(BLIND, "read", user=True, implicit=True)) == 0  # implicit: supervisor
    assert dont_care(st, Probe(0x1000, "read", user=True)) == 0  # outside the range
    assert dont_care(_state("intel"), user) == 0  # the manual has no blind range
    assert dont_care(None, user) == 0
    m = pf(0x5, BLIND)
    assert both(m, ProbeResult("page_fault", error_code=0x4 | 0x8, cr2=BLIND), user, st) == []
    assert (
        both(m, ProbeResult("page_fault", error_code=0x4 | 0x2, cr2=BLIND), user, st) != []
    )  # W/R is cared for
    assert both(m, ProbeResult("page_fault", error_code=0x4, cr2=BLIND), user, _state("intel")) != []


def test_describe_outcome_names_everything():
    assert describe_outcome(ProbeResult("ok")) == "ok"
    assert describe_outcome(ProbeResult("ok", pa=0x1000)) == "ok pa=0x1000"
    assert describe_outcome(ProbeResult("page_fault", error_code=0x3, cr2=0x10)) == "#PF 0x3 (P|W) cr2=0x10"
    assert describe_outcome(ProbeResult("page_fault")) == "#PF ?"
    assert describe_outcome(ProbeResult("general_protection", error_code=0)) == "#GP(0)"
    assert describe_outcome(ProbeResult("general_protection", error_code=0, cr2=0x20)) == "#GP(0) cr2=0x20"


# -- model_run ---------------------------------------------------------------------------------
def _image() -> tuple[SparseMemory, PagingState]:
    """PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; VA 0x7000 -> PA 0x345000 (P RW US),
    VA 0x8000 -> PA 0x346000 read-only (P US). Hand-built entries."""
    mem = SparseMemory()
    mem.write_u64(0x1000, 0x2000 | 0x7)
    mem.write_u64(0x2000, 0x3000 | 0x7)
    mem.write_u64(0x3000, 0x4000 | 0x7)
    mem.write_u64(0x4000 + 7 * 8, PA | 0x7)
    mem.write_u64(0x4000 + 8 * 8, 0x346000 | 0x5)
    mem.write_u64(PA, 0x1111)
    return mem, _state("intel")


def test_model_run_walks_in_order_with_ad_and_data_writes():
    mem, st = _image()
    values: list = []
    probes = [
        Probe(VA, "read"),
        Probe(VA, "write", wvalue=0x2222),
        Probe(VA, "read"),
        Probe(0x8000, "write", wvalue=0x3333),
        Probe(VA, "read", user=True),
    ]
    results, after = model_run(mem, st, probes, values)
    assert [r.outcome for r in results] == ["ok", "ok", "ok", "page_fault", "ok"]
    assert results[3].error_code == 0x3  # present, write, supervisor, WP=1
    assert values == [0x1111, None, 0x2222, None, 0x2222]  # each read sees the earlier write
    assert after.read_u64(PA) == 0x2222
    assert after.read_u64(0x346000) == 0  # the faulting write stored nothing
    assert after.read_u64(0x4000 + 7 * 8) == PA | 0x7 | 0x60  # A and D set on the PTE
    assert mem.read_u64(PA) == 0x1111 and mem.read_u64(0x4000 + 7 * 8) == PA | 0x7  # input unchanged
    results2, _ = model_run(mem, st, probes)  # values are optional
    assert [r.outcome for r in results2] == [r.outcome for r in results]


def test_a_write_beyond_physical_memory_is_dropped_not_raised():
    mem, st = _image()
    mem.write_u64(0x4000 + 9 * 8, (1 << 45) | 0x7)  # a frame no SparseMemory page backs
    results, after = model_run(mem, st, [Probe(0x9000, "write", wvalue=5)])
    assert results[0].outcome == "ok"


def test_model_run_passes_cpl_ac_and_implicit_to_the_walk():
    """SDM Vol. 3A §4.6: with CR4.SMAP=1 a supervisor read of a user page faults unless EFLAGS.AC=1;
    an implicit (descriptor-table) read is a supervisor access whatever the CPL and ignores AC."""
    from x86pt.state import CR4_SMAP

    mem, st = _image()
    mem.write_u64(0x4000 + 10 * 8, 0x347000 | 0x3)  # VA 0xA000: a supervisor page (P RW)
    st = st.replace(cr4=st.cr4 | CR4_SMAP)
    probes = [
        Probe(0xA000, "read", user=True),  # user read of a supervisor page
        Probe(VA, "read"),  # SMAP, AC=0
        Probe(VA, "read", ac=True),  # SMAP, AC=1
        Probe(VA, "read", user=True, implicit=True),
    ]  # implicit: supervisor, SMAP-checked
    results, _ = model_run(mem, st, probes)
    got = [(r.outcome, getattr(r, "error_code", None)) for r in results]
    assert got == [("page_fault", 0x5), ("page_fault", 0x1), ("ok", None), ("page_fault", 0x1)]
