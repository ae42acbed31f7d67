"""The differential runner (harness/differential.py) shown to fail on wrong answers: a buggy oracle
(the ModelOracle with a `deviate` hook that lies in one field, or a wrapper that lies in the memory
after the batch) must be reported with the right text, in the right case and counted once; an
allowed difference (docs/design.md §5.2: A of a non-leaf entry, or of a large leaf, that no
successful walk of the case used) must not be. Repros are written, read back and replayed.

The image is written by hand (raw entries below) and every expected value is derived by hand from
the SDM (Vol. 3A §4.5 walk, §4.7 error codes, §4.8 A/D: a successful walk sets A in every entry it
used) and the runner's stated contract (docs/design.md §5, docs/formats.md §7) — never copied from
the runner's output. Model results for the unit tests of the entry rules are built by hand too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace

import pytest

import harness.differential as hd
from harness.differential import (
    Batch,
    CaseInfo,
    Mismatch,
    OwnedEntry,
    Summary,
    batch_from_repro,
    check_batch,
    compare_entries,
    decoded_walk,
    differing_qwords,
    disassemble,
    fix_write_values,
    load_repro,
    make_repro,
    probe_from_json,
    probe_instruction,
    probe_json,
    replay,
    run_conformance,
)
from harness.oracles.model import ModelOracle, deviation
from x86pt.compare import model_run
from x86pt.errors import BadInputError, OracleError
from x86pt.fields import LEVELS, Kind
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import BatchResult, Probe, ProbeResult, tag_value
from x86pt.state import CR4_PAE, CR4_SMAP, EFER_LMA, EFER_LME, PagingState, profile_named
from x86pt.walk import PageFault, Rights, Step, Translation

# -- the hand-written image ----------------------------------------------------------------------
# PML4 @0x200000, PDPT @0x201000, PD @0x202000, PT @0x203000, an empty PT @0x204000.
# Flags: P=1 RW=2 US=4 A=0x20 PS=0x80.
PML4E, PDPTE, PDE0, PDE1, PDE2, PDE3 = 0x200000, 0x201000, 0x202000, 0x202008, 0x202010, 0x202018
PTE1, PTE2, PTE3, PTE4 = 0x203008, 0x203010, 0x203018, 0x203020
RAW = {
    PML4E: 0x201007,  # -> PDPT, P RW US
    PDPTE: 0x202007,  # -> PD
    PDE0: 0x203007,  # -> PT                       VA 0x000000-0x1fffff
    PDE1: 0x600087,  # 2M leaf at 0x600000, RW US  VA 0x200000-0x3fffff
    PDE2: 0x800085,  # 2M leaf at 0x800000, RO US  VA 0x400000-0x5fffff
    PDE3: 0x204007,  # -> empty PT                 VA 0x600000-0x7fffff
    PTE1: 0x400007,  # VA 0x1000 -> 0x400000, RW US
    PTE2: 0x401005,  # VA 0x2000 -> 0x401000, RO US
    PTE4: 0x402003,  # VA 0x4000 -> 0x402000, RW supervisor
}  # PTE3 (VA 0x3000) is 0: not present
A = 0x20
FRAMES = (0x400000, 0x401000, 0x600000)


def image(accessed: bool = False) -> SparseMemory:
    """The image; with `accessed`, every entry has A set already (a walk then changes nothing)."""
    mem = SparseMemory(32 << 20)
    for addr, raw in RAW.items():
        mem.write_u64(addr, raw | (A if accessed else 0))
    for f in FRAMES:  # the rig's frame pattern: qword at pa holds tag(pa)
        for pa in range(f, f + 4096, 8):
            mem.write_u64(pa, ((pa & ~7) << 8) | 0xC3)
    return mem


STATE = PagingState(cr3=0x200000, profile=profile_named("intel"))

# The probes and the cases of the batch used throughout, with what the SDM says of each:
P_READ = Probe(0x1000)  # ok, pa 0x400000; A in PML4E PDPTE PDE0 PTE1
P_ROWRITE = Probe(0x2008, "write", user=True)  # #PF 0x7 (P|W|U), cr2 0x2008; PTE2 stays 0x401005
P_NP = Probe(0x3000, "fetch")  # #PF 0x10 (I/D, not present): PTE3 is 0
P_2M = Probe(0x200010)  # ok, pa 0x600010 through the 2M leaf PDE1
P_2MRO = Probe(0x400000, "write", user=True)  # #PF 0x7 through the read-only 2M leaf PDE2
P_EMPTY = Probe(0x600000)  # #PF 0x0: the PTE under PDE3 is 0
P_GP = Probe(0x0000800000000000)  # non-canonical: #GP(0), no walk
PROBES = [P_READ, P_ROWRITE, P_NP, P_2M, P_2MRO, P_EMPTY, P_READ, P_NP]
CASES = [
    CaseInfo("t#read", None, (0,), (OwnedEntry(PTE1, RAW[PTE1], "pte"),), (0x400000,)),
    CaseInfo("t#rowrite", None, (1,), (OwnedEntry(PTE2, RAW[PTE2], "pte"),)),
    CaseInfo("t#np", None, (2,), (OwnedEntry(PTE3, 0, "pte"),)),
    CaseInfo("t#2m", None, (3,), (OwnedEntry(PDE1, RAW[PDE1], "pde2m"),)),
    CaseInfo("t#2mro", None, (4,), (OwnedEntry(PDE2, RAW[PDE2], "pde2m"),)),
    CaseInfo("t#empty", None, (5,), (OwnedEntry(PDE3, RAW[PDE3], "pde"),)),
    CaseInfo("t#mixed", 3, (6, 7)),  # a successful walk, then a faulting one, through PDE0
]
# A batch with a #GP goes to check_batch whole (the vectorised model takes no #GP): kept apart, so
# the batch above also checks the fast path (run_conformance's _fast_check).
GP_CASES = [CaseInfo("t#gp", None, (0,), (OwnedEntry(PTE3, 0, "pte"),))]


def batch(probes=PROBES, cases=CASES, state=STATE, accessed=False) -> Batch:
    return Batch(image(accessed), state, list(probes), list(cases))


@dataclass
class ListSource:
    name: str = "hand"
    n: int = 1
    probes: tuple = tuple(PROBES)
    cases: tuple = tuple(CASES)
    state: PagingState = STATE
    accessed: bool = False

    @property
    def total(self) -> int:
        return self.n * len(self.cases)

    def batches(self):
        for _ in range(self.n):
            yield batch(self.probes, self.cases, self.state, self.accessed)


class MemoryLiar(ModelOracle):
    """The model, whose memory after the batch has the bits `xor` flipped at `addr`."""

    def __init__(self, flips: dict[int, int], **kw) -> None:
        super().__init__(**kw)
        self.flips = flips

    def run(self, memory, state, probes):
        got = super().run(memory, state, probes)
        for addr, bits in self.flips.items():
            got.memory_after.write_u64(addr, got.memory_after.read_u64(addr) ^ bits)
        return got


def conform(oracle, n=1, **source):
    mms: list[Mismatch] = []
    s = run_conformance(oracle, ListSource(n=n, **source), on_mismatch=mms.append)
    return s, mms


# -- the honest oracle, and the hand-derived facts the rest relies on ------------------------------
def test_the_honest_model_agrees_and_the_counts_are_the_batch_sizes():
    s, mms = conform(ModelOracle("intel"), n=2)
    assert mms == []
    assert (s.oracle, s.cases, s.probes, s.mismatches, s.interrupted) == ("model", 14, 16, 0, False)


def test_the_model_after_the_batch_is_as_the_sdm_says():
    """Not a test of the runner: the facts the entry rules below are derived from."""
    results, after = model_run(image(), STATE, PROBES)
    for addr in (PML4E, PDPTE, PDE0, PTE1, PDE1):  # used by a successful walk: A set
        assert after.read_u64(addr) == RAW[addr] | A
    assert after.read_u64(PTE2) == RAW[PTE2] and after.read_u64(PTE3) == 0
    assert [r.outcome for r in results] == [
        "ok",
        "page_fault",
        "page_fault",
        "ok",
        "page_fault",
        "page_fault",
        "ok",
        "page_fault",
    ]
    assert [getattr(r, "error_code", None) for r in results[1:6]] == [0x7, 0x10, None, 0x7, 0x0]
    gp, _ = model_run(image(), STATE, [P_GP])
    assert (gp[0].outcome, gp[0].error_code) == ("general_protection", 0)


# -- per probe: a lie in one field is one mismatch in its case ------------------------------------
@pytest.mark.parametrize(
    "field,value,when,label,text",
    [
        (
            "error_code",
            0x5,
            lambda p, r: p == P_ROWRITE,
            "t#rowrite",
            "#PF error code: model 0x7, oracle 0x5",
        ),
        ("cr2", 0x2000, lambda p, r: p == P_ROWRITE, "t#rowrite", "CR2: model 0x2008, oracle 0x2000"),
        ("pa", 0x600000, lambda p, r: p == P_2M, "t#2m", "physical address: model 0x600010, oracle 0x600000"),
        ("error_code", None, lambda p, r: p == P_ROWRITE, "t#rowrite", "#PF error code: model 0x7, oracle ?"),
        # P_EMPTY faults with error code 0: a lie that only adds bits
        ("error_code", 0x4, lambda p, r: p == P_EMPTY, "t#empty", "#PF error code: model 0x0, oracle 0x4"),
        # a supervisor's answer to a user write (P|W instead of P|W|U)
        (
            "error_code",
            0x3,
            lambda p, r: p == P_ROWRITE,
            "t#rowrite",
            "#PF error code: model 0x7, oracle 0x3",
        ),
        ("error_code", 0x3, lambda p, r: p == P_GP, "t#gp", "#GP error code: model 0x0, oracle 0x3"),
    ],
)
def test_a_lie_in_one_field_is_reported_in_its_case(field, value, when, label, text):
    src = dict(probes=(P_GP,), cases=tuple(GP_CASES)) if label == "t#gp" else {}
    s, mms = conform(ModelOracle("intel", deviate=deviation(**{field: value}, when=when)), **src)
    assert [m.case.label for m in mms] == [label] and s.mismatches == 1
    assert mms[0].differences == (text,)
    assert mms[0].oracle == "model"


def test_a_wrong_outcome_names_both_answers():
    dev = deviation(outcome="ok", error_code=None, cr2=None, pa=0x401008, when=lambda p, r: p == P_ROWRITE)
    _, mms = conform(ModelOracle("intel", deviate=dev))
    assert [m.differences for m in mms] == [
        ("outcome: model #PF 0x7 (P|W|U) cr2=0x2008, oracle ok pa=0x401008",)
    ]


def test_a_multi_probe_case_numbers_its_probes_from_one():
    """t#mixed owns probes 6 and 7 of the batch: a lie in the second is 'probe 2'."""
    dev = deviation(error_code=0x11, when=lambda p, r: p == P_NP)
    s, mms = conform(ModelOracle("intel", deviate=dev), n=2)
    assert [m.case.label for m in mms] == ["t#np", "t#mixed"] * 2 and s.mismatches == 4
    assert mms[0].differences == ("#PF error code: model 0x10, oracle 0x11",)
    assert mms[1].differences == ("probe 2: #PF error code: model 0x10, oracle 0x11",)


def test_the_mismatch_carries_both_answers_the_model_read_and_the_repro():
    dev = deviation(pa=0x401000, when=lambda p, r: p == P_READ)
    _, mms = conform(ModelOracle("intel", deviate=dev))
    assert [m.case.label for m in mms] == ["t#read", "t#mixed"]
    mm = mms[0]
    assert mm.probes == (P_READ,) and mm.state == STATE
    # the model's own answer, with the qword its read loaded (the frame tag of 0x400000)
    assert mm.model == (ProbeResult("ok", pa=0x400000, value=(0x400000 << 8) | 0xC3),)
    assert mm.got == (ProbeResult("ok", pa=0x401000, value=(0x400000 << 8) | 0xC3),)
    assert mm.differences == ("physical address: model 0x400000, oracle 0x401000",)
    assert mm.instructions == ("mov rax, qword ptr [rbx]   (CPL0, rbx=0x1000)",)
    assert mm.repro["oracle"] == "model" and mm.repro["case"] == "t#read"
    assert mm.repro["differences"] == ["physical address: model 0x400000, oracle 0x401000"]
    m2 = mms[1]
    assert m2.differences == ("probe 1: physical address: model 0x400000, oracle 0x401000",)
    assert len(m2.model) == 2 and m2.model[1].outcome == "page_fault"


def test_a_read_without_a_pa_is_judged_by_its_value():
    """An oracle that tells no pa: the tag of the value a read returned names the frame."""
    dev = deviation(pa=None, value=tag_value(0x401000), when=lambda p, r: p == P_2M)
    _, mms = conform(ModelOracle("intel", deviate=dev))
    assert [(m.case.label, m.differences) for m in mms] == [
        ("t#2m", ("physical address: model 0x600010, oracle 0x401000",))
    ]
    dev = deviation(pa=None, value=0x1234, when=lambda p, r: p == P_2M)
    _, mms = conform(ModelOracle("intel", deviate=dev))
    assert [(m.case.label, m.differences) for m in mms] == [
        (
            "t#2m",
            (f"read returned 0x1234, not the frame tag {(0x600010 << 8) | 0xC3:#x} of model pa 0x600010",),
        )
    ]
    dev = deviation(pa=None, when=lambda p, r: p == P_2M)  # the honest tag only
    assert conform(ModelOracle("intel", deviate=dev))[1] == []


def test_blind_range_error_code_bits_are_dont_care_but_cr2_is_not():
    """kvm-epyc-pvm: CPL3 accesses of 0xffff800000000000.. fault with P and RSVD don't-care
    (docs/design.md §5.2). An unmapped user read there is #PF 0x4 (U); an oracle saying 0x5 agrees,
    one that also reports another CR2 differs in CR2 only."""
    st = PagingState(cr3=0x200000, profile=profile_named("kvm-epyc-pvm"))
    va = 0xFFFF800000001000
    b = Batch(image(), st, [Probe(va, user=True)], [CaseInfo("blind", None, (0,))])
    results, after = model_run(b.memory, st, b.probes)
    ok = BatchResult([ProbeResult("page_fault", error_code=0x5, cr2=va)], after)
    assert check_batch("kvm", b, results, after, ok) == []
    bad = BatchResult([ProbeResult("page_fault", error_code=0x5, cr2=va + 8)], after)
    mms = check_batch("kvm", b, results, after, bad)
    assert [m.differences for m in mms] == [(f"CR2: model {va:#x}, oracle {va + 8:#x}",)]


def test_a_short_answer_is_an_oracle_error():
    b = batch()
    results, after = model_run(b.memory, b.state, b.probes)
    with pytest.raises(OracleError) as e:
        check_batch("emu", b, results, after, BatchResult([ProbeResult("ok")], after))
    assert str(e.value) == "emu answered 1 probes for a batch of 8"


def test_check_batch_hands_its_oracle_and_name_on():
    """The instruction text comes from the oracle's own encoding; the mismatch and its repro
    carry the oracle's name."""

    class Rcx(ModelOracle):
        def instruction_bytes(self, probe):
            if probe.access == "read":
                return bytes.fromhex("488b0b")  # mov rcx, [rbx]
            raise ValueError("no fixed encoding")

    dev = deviation(pa=0x1000, when=lambda p, r: p == P_2M)
    _, mms = conform(Rcx("intel", deviate=dev, name="rcx-emu"))
    assert mms[0].oracle == "rcx-emu" and mms[0].repro["oracle"] == "rcx-emu"
    assert mms[0].instructions == ("mov rcx, qword ptr [rbx]   (CPL0, rbx=0x200010)",)


# -- per case, after the batch: the entry rules (design.md §5.2) ----------------------------------
def entry_line(kind, addr, model, oracle):
    return (
        f"{kind} at {addr:#x} after the batch: model {model:#018x}, oracle {oracle:#018x}"
        f" (differs in {model ^ oracle:#x})"
    )


def test_a_4k_pte_must_match_exactly_after_a_batch():
    # the oracle leaves A clear in the PTE of a successful read
    _, mms = conform(MemoryLiar({PTE1: A}, profile="intel"))
    assert [(m.case.label, m.differences) for m in mms] == [
        ("t#read", (entry_line("pte", PTE1, 0x400027, 0x400007),)),
        ("t#mixed", (entry_line("pte", PTE1, 0x400027, 0x400007),)),
    ]
    # the oracle sets A in the PTE of a faulting write (a 4K PTE has no don't-care bit)
    _, mms = conform(MemoryLiar({PTE2: A}, profile="intel"))
    assert [(m.case.label, m.differences) for m in mms] == [
        ("t#rowrite", (entry_line("pte", PTE2, 0x401005, 0x401025),))
    ]
    # P (bit 0) is compared too
    _, mms = conform(MemoryLiar({PTE2: 1}, profile="intel"))
    assert [m.differences for m in mms] == [(entry_line("pte", PTE2, 0x401005, 0x401004),)]


def test_a_of_a_non_leaf_entry_counts_only_when_a_successful_walk_used_it():
    """PDE0 is walked by t#read (ok), t#rowrite and t#np (faults) and t#mixed (ok, then a fault):
    an oracle that leaves its A clear differs where a successful walk used it, and only there."""
    s, mms = conform(MemoryLiar({PDE0: A}, profile="intel"))
    assert [(m.case.label, m.differences) for m in mms] == [
        ("t#read", (entry_line("pde", PDE0, 0x203027, 0x203007),)),
        ("t#mixed", (entry_line("pde", PDE0, 0x203027, 0x203007),)),
    ]
    assert s.mismatches == 2


def test_a_of_entries_only_faulting_walks_used_is_dont_care():
    """PDE3 (a table) under a not-present PTE and PDE2 (a read-only 2M leaf) under a faulting
    write: A flipped either way is fine, any other bit is not (the model's own A there is the
    profile's business, so the expected lines take the model's value from its run)."""
    assert conform(MemoryLiar({PDE3: A, PDE2: A}, profile="intel"))[1] == []
    _, mms = conform(MemoryLiar({PDE3: A | 0x2, PDE2: A | 0x40}, profile="intel"))
    _, after = model_run(image(), STATE, PROBES)
    m2, m3 = after.read_u64(PDE2), after.read_u64(PDE3)
    assert [(m.case.label, m.differences) for m in mms] == [
        (
            "t#2mro",
            (
                f"pde2m at 0x202010 after the batch: model {m2:#018x}, oracle {m2 ^ A ^ 0x40:#018x}"
                " (differs in 0x40)",
            ),
        ),
        (
            "t#empty",
            (
                f"pde at 0x202018 after the batch: model {m3:#018x}, oracle {m3 ^ A ^ 0x2:#018x}"
                " (differs in 0x2)",
            ),
        ),
    ]


def test_a_2m_leaf_used_by_a_successful_walk_is_compared_with_its_a():
    _, mms = conform(MemoryLiar({PDE1: A}, profile="intel"))
    assert [(m.case.label, m.differences) for m in mms] == [
        ("t#2m", (entry_line("pde2m", PDE1, 0x6000A7, 0x600087),))
    ]


def test_a_case_whose_every_entry_differs_is_still_compared():
    """t#gp walks nothing (#GP before the walk): its one owned entry is all the case has."""
    _, mms = conform(MemoryLiar({PTE3: 0x4}, profile="intel"))
    assert [(m.case.label, m.differences) for m in mms] == [
        ("t#np", (entry_line("pte", PTE3, 0, 4),)),
        ("t#mixed", (entry_line("pte", PTE3, 0, 4),)),
    ]
    _, mms = conform(MemoryLiar({PTE3: 0x4}, profile="intel"), probes=(P_GP,), cases=tuple(GP_CASES))
    assert [(m.case.label, m.differences) for m in mms] == [("t#gp", (entry_line("pte", PTE3, 0, 4),))]


def test_probe_and_entry_differences_are_listed_together():
    o = MemoryLiar(
        {PTE2: A}, profile="intel", deviate=deviation(cr2=0x2000, when=lambda p, r: p == P_ROWRITE)
    )
    _, mms = conform(o)
    assert [m.differences for m in mms] == [
        ("CR2: model 0x2008, oracle 0x2000", entry_line("pte", PTE2, 0x401005, 0x401025))
    ]


# compare_entries on hand-made walks
LV = {n: LEVELS[n] for n in (1, 2, 3, 4)}


def step(level, addr, kind):
    return Step(LV[level], addr, RAW.get(addr, 0), kind)


WALK_OK = (
    step(4, PML4E, Kind.PML4E),
    step(3, PDPTE, Kind.PDPTE),
    step(2, PDE0, Kind.PDE),
    step(1, PTE1, Kind.PTE),
)
RIGHTS = Rights(writable=True, user=True, executable=True, pkey=0)


def t_ok(steps=WALK_OK, va=0x1000, pa=0x400000):
    return Translation(va, pa, 4096, 1, RIGHTS, steps)


def t_pf(steps, va=0x3000):
    return PageFault(va, 0x10, va, "hand-made", steps, 1)


class Holey:
    """Oracle memory that cannot read `hole` (beyond the oracle's RAM, say)."""

    def __init__(self, mem, hole):
        self.mem, self.hole = mem, hole

    def read_u64(self, addr):
        if addr == self.hole:
            raise ValueError("unbacked")
        return self.mem.read_u64(addr)


def test_compare_entries_used_or_rule_is_per_case_and_any_success():
    model = image()
    for a in (PML4E, PDPTE, PDE0):
        model.write_u64(a, RAW[a] | A)
    oracle = image()  # A left clear in the walk's non-leaf entries
    case = CaseInfo("c", None, (0, 1))
    walk_np = WALK_OK[:3] + (step(1, PTE3, Kind.PTE),)
    want = [
        entry_line(k, a, RAW[a] | A, RAW[a]) for k, a in (("pml4e", PML4E), ("pdpte", PDPTE), ("pde", PDE0))
    ]
    assert compare_entries(case, [t_ok(), t_pf(walk_np)], model, oracle) == want
    assert compare_entries(case, [t_pf(walk_np), t_pf(walk_np)], model, oracle) == []
    # the walk's kind names an entry the case does not own; an owned entry keeps the owner's kind
    owned = CaseInfo("c", None, (0,), (OwnedEntry(PDE0, RAW[PDE0], "table"),))
    assert compare_entries(owned, [t_ok()], model, oracle) == [
        entry_line("pml4e", PML4E, RAW[PML4E] | A, RAW[PML4E]),
        entry_line("pdpte", PDPTE, RAW[PDPTE] | A, RAW[PDPTE]),
        entry_line("table", PDE0, RAW[PDE0] | A, RAW[PDE0]),
    ]


def test_compare_entries_reports_a_missing_entry_and_goes_on():
    model, oracle = image(), image()
    oracle.write_u64(PTE1, RAW[PTE1] | 0x40)
    case = CaseInfo("c", None, (), (OwnedEntry(PDE0, RAW[PDE0], "pde"), OwnedEntry(PTE1, RAW[PTE1], "pte")))
    assert compare_entries(case, [], model, Holey(oracle, PDE0)) == [
        "entry at 0x202000 (pde) missing from the oracle's memory",
        entry_line("pte", PTE1, RAW[PTE1], RAW[PTE1] | 0x40),
    ]


# -- differing_qwords --------------------------------------------------------------------------------
def test_differing_qwords_lists_each_differing_qword_and_each_missing_page():
    model = SparseMemory(1 << 20)
    model.write_u64(0x9000, 5)  # a page the oracle lacks (first in the model's pages)
    model.write_u64(0x3000, 1)  # equal pages
    model.write_u64(0x4000, 0xFFFFFFFFFFFFFFFF)  # equal qwords in a differing page (a NaN double)
    model.write_u64(0x4008, 1)
    model.write_u64(0x4FF8, 7)
    oracle = SparseMemory(0x8000)
    oracle.write_u64(0x3000, 1)
    oracle.write_u64(0x4000, 0xFFFFFFFFFFFFFFFF)
    oracle.write_u64(0x4008, 1)
    oracle.write_u64(0x4010, 2)
    oracle.write_u64(0x4FF8, 6)
    # every qword of the page the oracle lacks, not only its first
    assert differing_qwords(model, oracle) == set(range(0x9000, 0xA000, 8)) | {0x4010, 0x4FF8}
    assert differing_qwords(oracle, oracle.copy()) == set()


# -- fix_write_values ----------------------------------------------------------------------------------
def test_a_write_stores_the_tag_of_its_model_pa():
    probes = [
        Probe(0x1008, "write", wvalue=0x99),
        Probe(0x1010, "write", wvalue=tag_value(0x400010)),
        Probe(0x1018, wvalue=0x5),
        Probe(0x3000, "write", wvalue=0x77),
    ]
    b = Batch(image(), STATE, list(probes), [])
    results = [
        t_ok(va=0x1008, pa=0x400008),
        t_ok(va=0x1010, pa=0x400010),
        t_ok(va=0x1018, pa=0x400018),
        t_pf(()),
    ]
    fix_write_values(b, results)
    assert b.probes == [
        Probe(0x1008, "write", wvalue=(0x400008 << 8) | 0xC3),
        Probe(0x1010, "write", wvalue=(0x400010 << 8) | 0xC3),
        Probe(0x1018, wvalue=0x5),
        Probe(0x3000, "write", wvalue=0x77),
    ]


# -- instruction text -----------------------------------------------------------------------------------
def test_disassembly_text():
    assert disassemble(bytes.fromhex("9090")) == "nop; nop"
    assert disassemble(bytes.fromhex("ebfe")) == "jmp 0"  # a jump to itself at address 0
    assert disassemble(bytes.fromhex("ebfe"), 0x10) == "jmp 0x10"
    assert disassemble(bytes.fromhex("ff")) == "ff (not decodable)"


def test_disassembly_without_capstone(monkeypatch):
    monkeypatch.setitem(sys.modules, "capstone", None)
    assert disassemble(bytes.fromhex("488b03")) == "488b03 (capstone not installed)"


class Encodings:
    """An oracle with its own encodings: reads as mov rcx,[rbx]; writes unknown (raises);
    fetches empty (use the canonical one)."""

    def instruction_bytes(self, probe):
        if probe.access == "read":
            return bytes.fromhex("488b0b")
        if probe.access == "fetch":
            return b""
        raise RuntimeError("no fixed encoding")


@pytest.mark.parametrize(
    "oracle,probe,text",
    [
        (None, Probe(0x1000), "mov rax, qword ptr [rbx]   (CPL0, rbx=0x1000)"),
        (None, Probe(0x1000, "write", user=True), "mov qword ptr [rbx], rdx   (CPL3, rbx=0x1000)"),
        (None, Probe(0x2000, "fetch", ac=True), "call rbx   (CPL0, EFLAGS.AC=1, rbx=0x2000)"),
        (
            Encodings(),
            Probe(0x1000, user=True, ac=True),
            "mov rcx, qword ptr [rbx]   (CPL3, EFLAGS.AC=1, rbx=0x1000)",
        ),
        (Encodings(), Probe(0x1000, "write"), "mov qword ptr [rbx], rdx   (CPL0, rbx=0x1000)"),
        (Encodings(), Probe(0x1000, "fetch"), "call rbx   (CPL0, rbx=0x1000)"),
        (
            Encodings(),
            Probe(0x5000, implicit=True),
            "mov es, eax   (CPL0, implicit supervisor read of LDT entry 0, LDT base=0x5000)",
        ),
        (
            None,
            Probe(0x5000, user=True, ac=True, implicit=True),
            "mov es, eax   (CPL3, EFLAGS.AC=1, implicit supervisor read of LDT entry 0, LDT base=0x5000)",
        ),
    ],
)
def test_probe_instruction_text(oracle, probe, text):
    assert probe_instruction(oracle, probe) == text


# -- decoded walk ------------------------------------------------------------------------------------------
def test_the_decoded_walk_shows_each_entry_once_as_before_the_batch():
    mem = image()
    walk_rw = WALK_OK[:3] + (step(1, PTE2, Kind.PTE),)
    # the second walk carries raws with A set (as after the first): the lines show memory's value
    later = tuple(replace(s, raw=s.raw | A) for s in walk_rw)
    lines = decoded_walk(STATE, [t_ok(), t_pf(later, va=0x2008)], mem)
    assert lines == [
        "L4 PML4[  0] @0x200000 = 0x0000000000201007  PML4E: P RW US",
        "L3 PDPT[  0] @0x201000 = 0x0000000000202007  PDPTE (table): P RW US",
        "L2 PD  [  0] @0x202000 = 0x0000000000203007  PDE (table): P RW US",
        "L1 PT  [  1] @0x203008 = 0x0000000000400007  PTE: P RW US",
        "L1 PT  [  2] @0x203010 = 0x0000000000401005  PTE: P US",
    ]


def test_the_decoded_walk_names_reserved_bits_by_the_state():
    """XD (bit 63) is reserved when EFER.NXE=0 (SDM Vol. 3A §4.5, table 4-20); an entry beyond
    memory is shown with the walk's raw value. VA 0xffffff8040201000 indexes 511/1/1/1."""
    st = PagingState(cr3=0x200000, efer=EFER_LME | EFER_LMA, profile=profile_named("intel"))
    mem = SparseMemory(0x300000)
    mem.write_u64(0x200000 + 8 * 511, (1 << 63) | 0x201003)
    steps = (Step(LV[4], 0x200000 + 8 * 511, 0, Kind.PML4E), Step(LV[3], 0x400008, 0x203001, Kind.PDPTE))
    lines = decoded_walk(st, [t_pf(steps, va=0xFFFFFF8040201000)], mem)
    assert lines == [
        "L4 PML4[511] @0x200ff8 = 0x8000000000201003  PML4E: P RW XD  RESERVED 0x8000000000000000",
        "L3 PDPT[  1] @0x400008 = 0x0000000000203001  PDPTE (table): P",
    ]


# -- Mismatch rendering -------------------------------------------------------------------------------------
def hand_mismatch(**kw) -> Mismatch:
    d = dict(
        oracle="emu",
        case=CaseInfo("matrix#7", 0x3, (0, 1), description="two probes"),
        state=STATE,
        probes=(Probe(0x1000, user=True, ac=True, implicit=True), Probe(0x2008, "write")),
        model=(ProbeResult("ok", pa=0x400000), ProbeResult("page_fault", 0x3, 0x2008)),
        got=(ProbeResult("ok", pa=0x401000), ProbeResult("page_fault", 0x1, 0x2008)),
        differences=("probe 1: one", "probe 2: two"),
        walk=("L4 a", "L1 b"),
        instructions=("INS1", "INS2"),
        repro={"file": "/r/x.json", "x86pt_repro": 1},
    )
    d.update(kw)
    return Mismatch(**d)


def test_the_mismatch_render_text():
    assert hand_mismatch().render() == "\n".join(
        [
            "MISMATCH matrix#7 on emu",
            "  test pte.rw pte.user",
            "  two probes",
            "  state: cr0=0x80010001 cr3=0x200000 cr4=0x20 efer=0xd00 pkru=0x0 M=46 intel profile=intel [WP NXE]",
            "  probe implicit read va=0x1000 user ac: INS1",
            "    model:  ok pa=0x400000",
            "    oracle: ok pa=0x401000",
            "  probe write va=0x2008 supervisor: INS2",
            "    model:  #PF 0x3 (P|W) cr2=0x2008",
            "    oracle: #PF 0x1 (P) cr2=0x2008",
            "  walk (model, entries as they were before the batch):",
            "    L4 a",
            "    L1 b",
            "  FAIL: probe 1: one",
            "  FAIL: probe 2: two",
            "  repro: x86pt conform --repro /r/x.json --oracle emu",
        ]
    )


def test_the_mismatch_render_without_flags_description_or_repro_file():
    m = hand_mismatch(
        case=CaseInfo("random#1:2", None, (0,)),
        probes=(Probe(0x1000),),
        model=(ProbeResult("ok", pa=0x400000),),
        got=(ProbeResult("ok", pa=0x401000),),
        differences=("d",),
        walk=(),
        instructions=("I",),
        repro={},
    )
    assert m.render().splitlines() == [
        "MISMATCH random#1:2 on emu",
        "  state: cr0=0x80010001 cr3=0x200000 cr4=0x20 efer=0xd00 pkru=0x0 M=46 intel profile=intel [WP NXE]",
        "  probe read va=0x1000 supervisor: I",
        "    model:  ok pa=0x400000",
        "    oracle: ok pa=0x401000",
        "  walk (model, entries as they were before the batch):",
        "  FAIL: d",
    ]


def test_the_mismatch_json():
    j = hand_mismatch().to_json()
    assert j == {
        "type": "mismatch",
        "oracle": "emu",
        "case": "matrix#7",
        "flags": "pte.rw pte.user",
        "state": {
            "cr0": "0x80010001",
            "cr3": "0x200000",
            "cr4": "0x20",
            "efer": "0xd00",
            "pkru": "0x0",
            "pkrs": "0x0",
            "maxphyaddr": 46,
            "profile": "intel",
        },
        "probes": [
            {"va": "0x1000", "access": "read", "user": True, "ac": True, "wvalue": "0x0", "implicit": True},
            {"va": "0x2008", "access": "write", "user": False, "ac": False, "wvalue": "0x0"},
        ],
        "model": [
            {"outcome": "ok", "error_code": None, "cr2": None, "pa": "0x400000"},
            {"outcome": "page_fault", "error_code": 3, "cr2": "0x2008", "pa": None},
        ],
        "oracle_result": [
            {"outcome": "ok", "error_code": None, "cr2": None, "pa": "0x401000"},
            {"outcome": "page_fault", "error_code": 1, "cr2": "0x2008", "pa": None},
        ],
        "differences": ["probe 1: one", "probe 2: two"],
        "walk": ["L4 a", "L1 b"],
        "instructions": ["INS1", "INS2"],
        "repro": "/r/x.json",
    }
    j = hand_mismatch(case=CaseInfo("r", None, (0,)), repro={}).to_json()
    assert j["flags"] is None and j["repro"] is None and j["case"] == "r"


# -- repros: written, read back, replayed -------------------------------------------------------------------
def test_probe_json_round_trip_and_defaults():
    p = Probe(0x1008, "read", user=True, ac=True, wvalue=0x1234, implicit=True)
    assert probe_json(p) == {
        "va": "0x1008",
        "access": "read",
        "user": True,
        "ac": True,
        "wvalue": "0x1234",
        "implicit": True,
    }
    assert probe_from_json(probe_json(p)) == p
    assert probe_from_json({"va": "0x10"}) == Probe(0x10, "read", False, False, 0, False)
    assert probe_from_json({"va": 16, "user": 1}) == Probe(0x10, user=True)


@pytest.mark.parametrize(
    "d,msg",
    [
        ({}, "repro probe lacks va"),
        ({"va": "zz"}, "bad probe va: 'zz' (expected decimal or 0x-hex)"),
        ({"va": 0, "wvalue": "q"}, "bad probe wvalue: 'q' (expected decimal or 0x-hex)"),
    ],
)
def test_a_bad_repro_probe_is_named(d, msg):
    with pytest.raises(BadInputError) as e:
        probe_from_json(d)
    assert str(e.value) == msg


def test_make_repro_is_the_case_s_entries_before_the_batch_and_its_frames():
    b = batch()
    results, after = model_run(b.memory, b.state, b.probes)
    case = CaseInfo("t#x", 0x5, (0, 1), (OwnedEntry(PTE3, 0, "pte"),), (0x900000,))
    r = make_repro("emu", b, case, results, ["d1"])
    assert r == {
        "x86pt_repro": 1,
        "oracle": "emu",
        "case": "t#x",
        "flags": 5,
        "state": STATE.to_json(),
        "ram_size": 32 << 20,
        "entries": [
            {"pa": "0x200000", "value": "0x0000000000201007", "kind": "pml4e"},
            {"pa": "0x201000", "value": "0x0000000000202007", "kind": "pdpte"},
            {"pa": "0x202000", "value": "0x0000000000203007", "kind": "pde"},
            {"pa": "0x203008", "value": "0x0000000000400007", "kind": "pte"},
            {"pa": "0x203010", "value": "0x0000000000401005", "kind": "pte"},
            {"pa": "0x203018", "value": "0x0000000000000000", "kind": "pte"},
        ],
        "frames": ["0x400000", "0x900000"],  # the read's frame (pa 0x400000) and the case's
        "probes": [probe_json(P_READ), probe_json(P_ROWRITE)],
        "differences": ["d1"],
    }
    # a translation in the middle of a page adds its page
    r = make_repro("emu", b, CaseInfo("t#2m", None, (3,)), results, [])
    assert r["frames"] == ["0x600000"] and r["flags"] is None


REPRO = {
    "x86pt_repro": 1,
    "case": "t#y",
    "flags": 9,
    "state": STATE.to_json(),
    "ram_size": "0x800000",
    "entries": [
        {"pa": "0x200000", "value": "0x201007", "kind": "pml4e"},
        {"pa": "0x203008", "value": "0x400007"},
    ],
    "frames": ["0x400123"],
    "probes": [{"va": "0x1000"}, {"va": "0x1008", "access": "write"}],
}


def test_batch_from_repro_rebuilds_the_image():
    b = batch_from_repro(json.loads(json.dumps(REPRO)))
    assert b.memory.size == 0x800000 and b.state.to_json() == STATE.to_json()
    assert sorted(b.memory.pages) == [0x200, 0x203, 0x400]  # two table pages, one frame page
    assert b.memory.read_u64(0x200000) == 0x201007 and b.memory.read_u64(0x203008) == 0x400007
    assert b.memory.read_u64(0x400000) == (0x400000 << 8) | 0xC3
    assert b.memory.read_u64(0x400FF8) == (0x400FF8 << 8) | 0xC3
    assert b.probes == [Probe(0x1000), Probe(0x1008, "write")]
    assert b.cases == [
        CaseInfo(
            "t#y",
            9,
            (0, 1),
            (OwnedEntry(0x200000, 0x201007, "pml4e"), OwnedEntry(0x203008, 0x400007, "entry")),
        )
    ]
    d = {k: v for k, v in REPRO.items() if k not in ("ram_size", "frames", "case")}
    d["flags"] = "pte.rw"
    b = batch_from_repro(d)
    assert b.memory.size == 32 << 20 and sorted(b.memory.pages) == [0x200, 0x203]
    assert b.cases[0].label == "repro" and b.cases[0].flags is None


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"x86pt_repro": 2}, "not an x86pt conform repro file (x86pt_repro: 1 missing)"),
        ({"state": None}, "repro file lacks state"),
        ({"probes": None}, "repro file lacks probes"),
        ({"entries": [{"value": "0x1"}]}, "repro file lacks pa"),
        ({"entries": [1]}, "repro file is malformed"),
        ({"probes": []}, "repro file has no probes"),
        ({"ram_size": "big"}, "bad ram_size: 'big' (expected decimal or 0x-hex)"),
        ({"frames": ["f"]}, "bad frame: 'f' (expected decimal or 0x-hex)"),
        ({"entries": [{"pa": "p", "value": 1}]}, "bad entry pa: 'p' (expected decimal or 0x-hex)"),
        ({"entries": [{"pa": 8, "value": "v"}]}, "bad entry value: 'v' (expected decimal or 0x-hex)"),
    ],
)
def test_a_bad_repro_is_one_line(change, msg):
    d = dict(REPRO)
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(BadInputError) as e:
        batch_from_repro(d)
    assert str(e.value) == msg


def test_a_repro_that_is_not_a_dict():
    with pytest.raises(BadInputError) as e:
        batch_from_repro([1])
    assert str(e.value) == "not an x86pt conform repro file (x86pt_repro: 1 missing)"


def test_load_repro_errors(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("[1,", encoding="utf-8")
    with pytest.raises(BadInputError) as e:
        load_repro(str(p))
    assert str(e.value).startswith(f"repro {p} is not JSON: ")
    p.write_text(json.dumps({"case": "é"}), encoding="utf-8")
    assert load_repro(str(p)) == {"case": "é"}


def test_a_written_repro_replays_the_same_mismatch(tmp_path):
    """Each planted lie: the repro file, read back, gives the same case and differences on the
    same liar, and none on the honest model."""
    liars = [
        ModelOracle("intel", deviate=deviation(error_code=0x5, when=lambda p, r: p == P_ROWRITE)),
        ModelOracle("intel", deviate=deviation(pa=0x600000, when=lambda p, r: p == P_2M)),
        MemoryLiar({PDE0: A}, profile="intel"),
    ]
    for n, liar in enumerate(liars):
        _, mms = conform(liar)
        assert mms
        for k, mm in enumerate(mms):
            f = tmp_path / f"r{n}-{k}.json"
            f.write_text(json.dumps(mm.repro))
            rb, _, again = replay(liar, load_repro(str(f)))
            assert [(m.case.label, m.differences) for m in again] == [(mm.case.label, mm.differences)]
            assert again[0].oracle == "model"
            assert replay(ModelOracle("intel"), load_repro(str(f)))[2] == []


def test_replay_runs_under_the_oracle_s_profile_and_name():
    r = make_repro("emu", batch(), CASES[0], model_run(image(), STATE, PROBES)[0], [])
    b, _, mms = replay(ModelOracle("amd"), r)
    assert b.state.profile.name == "amd" and mms == []

    class Bare:
        """An oracle with neither a name nor a profile: the repro's profile, the name 'oracle'."""

        def run(self, memory, state, probes):
            return ModelOracle("intel", deviate=deviation(pa=0x1000)).run(memory, state, probes)

    b, _, mms = replay(Bare(), r)
    assert b.state.profile.name == "intel"
    assert [(m.oracle, m.differences) for m in mms] == [
        ("oracle", ("physical address: model 0x400000, oracle 0x1000",))
    ]
    assert mms[0].instructions == ("mov rax, qword ptr [rbx]   (CPL0, rbx=0x1000)",)

    class Rcx(ModelOracle):
        def instruction_bytes(self, probe):
            return bytes.fromhex("488b0b")

    _, _, mms = replay(Rcx("intel", deviate=deviation(pa=0x1000)), r)
    assert mms[0].instructions == ("mov rcx, qword ptr [rbx]   (CPL0, rbx=0x1000)",)


# -- the translation-only path (qemu-monitor) ------------------------------------------------------------------
def test_translation_only_each_verdict_text():
    """VA 0x1000 maps to 0x400000; 0x3000 is not mapped; PML4[1] points beyond RAM (1 GiB), so
    0x8000000000 cannot be translated by the tables at all (the model's walk stops there too: its
    result is a hand-made fault)."""
    mem = image()
    mem.write_u64(PML4E + 8, 0x40000007)
    probes = [Probe(0x1000), Probe(0x1000), Probe(0x3000), Probe(0x8000000000), Probe(0x1008)]
    cases = [CaseInfo(f"m#{i}", None, (i,)) for i in range(5)]
    b = Batch(mem, STATE, probes, cases)
    results, after = model_run(mem, STATE, probes[:3] + probes[4:])
    results.insert(3, t_pf((), va=0x8000000000))
    got = BatchResult(
        [
            ProbeResult("ok", pa=0x401000),
            ProbeResult("page_fault"),
            ProbeResult("ok", pa=0x3000),
            ProbeResult("ok", pa=0x1234),
            ProbeResult("ok"),
        ],
        after,
    )
    mms = check_batch("qemu-monitor", b, results, after, got, Encodings())
    assert [(m.case.label, m.differences) for m in mms] == [
        ("m#0", ("monitor maps 0x1000 to 0x401000, the tables to 0x400000",)),
        ("m#1", ("monitor says 0x1000 is unmapped; the tables map it to 0x400000",)),
        ("m#2", ("monitor maps 0x3000 to 0x3000; the tables do not map it",)),
        ("m#3", ("monitor maps 0x8000000000 to 0x1234; the tables do not map it",)),
    ]
    m = mms[0]
    assert (m.oracle, m.state, m.probes) == ("qemu-monitor", STATE, (Probe(0x1000),))
    assert m.model == (ProbeResult("ok", pa=0x400000),) and m.got == (ProbeResult("ok", pa=0x401000),)
    assert m.instructions == ("mov rcx, qword ptr [rbx]   (CPL0, rbx=0x1000)",)
    assert m.walk == (
        "L4 PML4[  0] @0x200000 = 0x0000000000201007  PML4E: P RW US",
        "L3 PDPT[  0] @0x201000 = 0x0000000000202007  PDPTE (table): P RW US",
        "L2 PD  [  0] @0x202000 = 0x0000000000203007  PDE (table): P RW US",
        "L1 PT  [  1] @0x203008 = 0x0000000000400007  PTE: P RW US",
    )
    assert m.repro["oracle"] == "qemu-monitor" and m.repro["case"] == "m#0"
    assert m.repro["differences"] == ["monitor maps 0x1000 to 0x401000, the tables to 0x400000"]


# -- run_conformance's counting and timing ------------------------------------------------------------------
class Clock:
    def __init__(self, ticks):
        self.ticks = list(ticks)

    def perf_counter(self):
        return self.ticks.pop(0)


class Progress:
    def __init__(self):
        self.calls = []

    def update_to(self, done, **kw):
        self.calls.append((done, kw))


def test_summary_counts_and_times_per_phase(monkeypatch):
    # t0, tb | t1 t2 t3 tb | t1 t2 t3 tb | end
    monkeypatch.setattr(hd, "time", Clock([100, 101, 103, 106, 110, 115, 121, 128, 136, 145, 155]))
    dev = deviation(error_code=0x5, when=lambda p, r: p == P_ROWRITE)
    prog = Progress()
    mms = []
    s = run_conformance(
        ModelOracle("intel", deviate=dev), ListSource(n=2), on_mismatch=mms.append, progress=prog
    )
    assert (s.cases, s.probes, s.mismatches, len(mms)) == (14, 16, 2, 2)
    assert (s.build_seconds, s.model_seconds, s.oracle_seconds, s.seconds) == (8, 10, 12, 55)
    assert prog.calls == [(7, {"mismatches": 1}), (14, {"mismatches": 2})]


def test_compare_false_runs_the_model_only(monkeypatch):
    monkeypatch.setattr(hd, "time", Clock([0, 1, 3, 6, 10, 20]))  # t0 tb | t1 t2 tb | end
    dev = deviation(error_code=0x5)
    s = run_conformance(ModelOracle("intel", deviate=dev), ListSource(), compare=False)
    assert (s.cases, s.mismatches, s.oracle_seconds, s.model_seconds, s.build_seconds, s.seconds) == (
        7,
        0,
        0,
        3,
        2,
        20,
    )


def test_without_an_oracle_only_the_model_runs():
    s = run_conformance(None, ListSource())
    assert (s.oracle, s.cases, s.probes, s.mismatches) == ("model-only", 7, 8, 0)


def test_an_oracle_without_a_name_is_called_oracle():
    class Bare:
        def run(self, memory, state, probes):
            return ModelOracle("intel", deviate=deviation(pa=0x1000, when=lambda p, r: p == P_2M)).run(
                memory, state, probes
            )

    mms = []
    s = run_conformance(Bare(), ListSource(), on_mismatch=mms.append)
    assert s.oracle == "oracle" and [m.oracle for m in mms] == ["oracle"]


class Flag:
    def __init__(self):
        self.requested = False


def test_an_interrupt_stops_after_the_batch_in_flight():
    flag = Flag()
    flag.requested = True  # before the first batch: nothing runs
    s = run_conformance(ModelOracle("intel"), ListSource(n=3), interrupt=flag)
    assert isinstance(s, Summary) and (s.cases, s.interrupted) == (0, True)

    flag = Flag()

    def on_mismatch(mm):
        flag.requested = True  # Ctrl-C while the first batch is checked

    dev = deviation(error_code=0x5, when=lambda p, r: p == P_ROWRITE)
    s = run_conformance(
        ModelOracle("intel", deviate=dev), ListSource(n=3), on_mismatch=on_mismatch, interrupt=flag
    )
    assert (s.cases, s.probes, s.mismatches, s.interrupted) == (7, 8, 1, True)

    flag = Flag()

    class LastBatch(ListSource):
        def batches(self):
            yield batch()
            flag.requested = True  # Ctrl-C after the last batch was handed out

    s = run_conformance(ModelOracle("intel"), LastBatch(), interrupt=flag)
    assert (s.cases, s.interrupted) == (7, True)
    s = run_conformance(ModelOracle("intel"), ListSource(), interrupt=Flag())
    assert (s.cases, s.interrupted) == (7, False)


def test_summary_json():
    s = Summary(
        "emu",
        cases=10,
        probes=12,
        mismatches=3,
        seconds=1.23456,
        model_seconds=2.50049,
        oracle_seconds=4.40049,
        build_seconds=0.12345,
        skipped="no kvm",
        interrupted=True,
    )
    assert s.to_json() == {
        "type": "summary",
        "oracle": "emu",
        "cases": 10,
        "probes": 12,
        "mismatches": 3,
        "seconds": 1.235,
        "model_seconds": 2.5,
        "oracle_seconds": 4.4,
        "build_seconds": 0.123,
        "oracle_cases_per_s": 2,
        "model_cases_per_s": 4,
        "skipped": "no kvm",
        "interrupted": True,
    }
    assert Summary("emu").to_json() == {
        "type": "summary",
        "oracle": "emu",
        "cases": 0,
        "probes": 0,
        "mismatches": 0,
        "seconds": 0.0,
        "model_seconds": 0.0,
        "oracle_seconds": 0.0,
        "build_seconds": 0.0,
        "oracle_cases_per_s": None,
        "model_cases_per_s": None,
    }


def test_repro_files_are_read_as_utf8(tmp_path, monkeypatch):
    """A repro is JSON, and JSON exchanged between systems is UTF-8 (RFC 8259 §8.1), whatever
    the locale says."""
    seen = []
    real = open

    def spy(path, *args, **kw):
        seen.append(kw.get("encoding"))
        return real(path, *args, **kw)

    p = tmp_path / "r.json"
    p.write_text('{"case": "\u00e9"}', encoding="utf-8")
    monkeypatch.setattr(hd, "open", spy, raising=False)
    assert load_repro(str(p)) == {"case": "\u00e9"}
    assert [e.lower() for e in seen] == ["utf-8"]


# -- the fast path (run_conformance's vectorised model and _fast_check) must not hide a lie ---------------
# Each lie below is one the fast path could wave through if its own test were wrong; the batches have
# no #GP, so the fast path does look at them.
def test_an_ok_the_oracle_calls_a_fault_is_reported():
    dev = deviation(
        outcome="page_fault", error_code=0x5, cr2=0x1000, pa=None, value=None, when=lambda p, r: p == P_READ
    )
    _, mms = conform(ModelOracle("intel", deviate=dev))
    text = "outcome: model ok pa=0x400000, oracle #PF 0x5 (P|U) cr2=0x1000"
    assert [(m.case.label, m.differences) for m in mms] == [
        ("t#read", (text,)),
        ("t#mixed", ("probe 1: " + text,)),
    ]


P_WRITE = Probe(0x1010, "write")  # ok, pa 0x400010


def test_a_wrong_pa_of_a_write_is_reported():
    dev = deviation(pa=0x400018, when=lambda p, r: p.va == P_WRITE.va)  # (the runner set its wvalue)
    _, mms = conform(ModelOracle("intel", deviate=dev), probes=(P_WRITE,), cases=(CaseInfo("w", None, (0,)),))
    assert [(m.case.label, m.differences) for m in mms] == [
        ("w", ("physical address: model 0x400010, oracle 0x400018",))
    ]


def test_a_write_stores_the_tag_so_a_later_read_names_its_frame():
    """An oracle that tells no pa: the read after the write must return tag(0x400010), which it
    does only if the runner made the write store it (the probe's own wvalue is 0)."""
    honest_by_value = ModelOracle("intel", deviate=deviation(pa=None))
    s, mms = conform(honest_by_value, probes=(P_WRITE, Probe(0x1010)), cases=(CaseInfo("wr", None, (0, 1)),))
    assert (s.mismatches, mms) == (0, [])


def test_a_changed_entry_no_probe_walks_is_reported_for_its_owner():
    owner = (CaseInfo("owner", None, (0,), (OwnedEntry(PTE3, 0, "pte"),)),)
    _, mms = conform(MemoryLiar({PTE3: 0x4}, profile="intel"), probes=(P_READ,), cases=owner)
    assert [(m.case.label, m.differences) for m in mms] == [("owner", (entry_line("pte", PTE3, 0, 4),))]


def test_blind_range_dont_care_bits_through_the_whole_run():
    """kvm-epyc-pvm's blind range (docs/design.md §5.2): at CPL3 the P and RSVD error-code bits are
    don't-care there, W is not. PML4[256] is 0, so a user read of 0xffff800000001000 is #PF 0x4."""
    va = 0xFFFF800000001000
    src = dict(
        probes=(Probe(va, user=True), P_READ),
        cases=(CaseInfo("blind", None, (0,)),),
        state=PagingState(cr3=0x200000, profile=profile_named("kvm-epyc-pvm")),
    )
    s, mms = conform(
        ModelOracle("kvm-epyc-pvm", deviate=deviation(error_code=0x5, when=lambda p, r: p.va == va)), **src
    )
    assert (s.mismatches, mms) == (0, [])
    _, mms = conform(
        ModelOracle("kvm-epyc-pvm", deviate=deviation(error_code=0x6, when=lambda p, r: p.va == va)), **src
    )
    assert [m.differences for m in mms] == [("#PF error code: model 0x4, oracle 0x6",)]


def test_a_short_answer_stops_the_run():
    class Short(ModelOracle):
        def run(self, memory, state, probes):
            got = super().run(memory, state, probes)
            return BatchResult(got.results[:-1], got.memory_after)

    with pytest.raises(OracleError) as e:
        conform(Short("intel"))
    assert str(e.value) == "model answered 7 probes for a batch of 8"


def test_a_translation_only_oracle_through_the_whole_run():
    dev = deviation(pa=0x401000, when=lambda p, r: p == P_2M)
    cases = tuple(CaseInfo(f"q#{i}", None, (i,)) for i in range(3))
    s, mms = conform(
        ModelOracle("intel", deviate=dev, name="qemu-monitor"), n=2, probes=(P_READ, P_2M, P_NP), cases=cases
    )
    assert (s.cases, s.probes, s.mismatches) == (6, 6, 2)
    assert [(m.case.label, m.differences) for m in mms] == [
        ("q#1", ("monitor maps 0x200010 to 0x401000, the tables to 0x600010",))
    ] * 2


def test_a_translation_only_oracle_is_never_judged_by_the_full_compare():
    """The model behind the name qemu-monitor answers a rights fault with #PF, where the tables map
    the address (0x2008 -> 0x401008): a translation-only oracle saying 'fault' there is wrong, even
    though the full compare would find both answers equal."""
    cases = (CaseInfo("q#0", None, (0,)), CaseInfo("q#1", None, (1,)))
    _, mms = conform(ModelOracle("intel", name="qemu-monitor"), probes=(P_READ, P_ROWRITE), cases=cases)
    assert [(m.case.label, m.differences) for m in mms] == [
        ("q#1", ("monitor says 0x2008 is unmapped; the tables map it to 0x401008",))
    ]


# One probe per batch, its entries' A set already: a lie the fast path waves through is then not
# rescued by another probe, or by the A bits of a walk the lie contradicts, sending it to check_batch.
def one(probe, label="one"):
    return dict(probes=(probe,), cases=(CaseInfo(label, None, (0,)),), accessed=True)


@pytest.mark.parametrize(
    "probe,state,lie,text",
    [
        # an ok the oracle calls a fault, and it tells no pa or value
        (
            P_READ,
            STATE,
            dict(outcome="page_fault", error_code=0x5, cr2=0x1000, pa=None, value=None),
            "outcome: model ok pa=0x400000, oracle #PF 0x5 (P|U) cr2=0x1000",
        ),
        # an aligned read (bit 3 set) that returns no tag
        (
            Probe(0x1008),
            STATE,
            dict(pa=None, value=0x1234),
            "read returned 0x1234, not the frame tag 0x400008c3 of model pa 0x400008",
        ),
        # a fault with error code 0 the oracle gives a bit
        (P_EMPTY, STATE, dict(error_code=0x4), "#PF error code: model 0x0, oracle 0x4"),
        # a user write answered as a supervisor one
        (P_ROWRITE, STATE, dict(error_code=0x3), "#PF error code: model 0x7, oracle 0x3"),
        # SMAP: a supervisor read of a user page with EFLAGS.AC=1 is allowed (SDM Vol. 3A §4.6.1)
        (
            Probe(0x1000, ac=True),
            PagingState(cr3=0x200000, cr4=CR4_PAE | CR4_SMAP, profile=profile_named("intel")),
            dict(outcome="page_fault", error_code=0x1, cr2=0x1000, pa=None, value=None),
            "outcome: model ok pa=0x400000, oracle #PF 0x1 (P) cr2=0x1000",
        ),
        # an implicit (supervisor) read at CPL3 of a supervisor page is allowed (SDM Vol. 3A §4.6)
        (
            Probe(0x4000, user=True, implicit=True),
            STATE,
            dict(outcome="page_fault", error_code=0x5, cr2=0x4000, pa=None, value=None),
            "outcome: model ok pa=0x402000, oracle #PF 0x5 (P|U) cr2=0x4000",
        ),
    ],
)
def test_a_lie_alone_in_its_batch_is_reported(probe, state, lie, text):
    _, mms = conform(ModelOracle("intel", deviate=deviation(**lie)), state=state, **one(probe))
    assert [(m.case.label, m.differences) for m in mms] == [("one", (text,))]
    assert conform(ModelOracle("intel"), state=state, **one(probe))[1] == []


def test_agreeing_batches_are_settled_by_the_fast_path(monkeypatch):
    """The vectorised check exists so that agreeing batches skip the scalar walker: an honest
    oracle, however little it tells (pa, only a read's tag, nothing but outcomes and error codes),
    and a blind-range difference in don't-care bits, never reach check_batch."""
    calls = []
    real = hd.check_batch

    def spy(*a, **kw):
        calls.append(a[1].cases[0].label)
        return real(*a, **kw)

    monkeypatch.setattr(hd, "check_batch", spy)
    va = 0xFFFF800000001000
    blind = dict(
        probes=(Probe(va, user=True), P_READ),
        cases=(CaseInfo("blind", None, (0, 1)),),
        state=PagingState(cr3=0x200000, profile=profile_named("kvm-epyc-pvm")),
    )
    runs = [
        (ModelOracle("intel"), {}),
        (ModelOracle("intel", deviate=deviation(pa=None)), {}),
        (ModelOracle("intel", deviate=deviation(pa=None, value=None)), {}),
        (ModelOracle("intel", deviate=deviation(pa=None, value=None, cr2=None)), {}),
        (
            ModelOracle("intel", deviate=deviation(pa=None)),
            dict(probes=(P_WRITE, Probe(0x1010)), cases=(CaseInfo("wr", None, (0, 1)),)),
        ),
        (ModelOracle("kvm-epyc-pvm", deviate=deviation(error_code=0x5, when=lambda p, r: p.va == va)), blind),
    ]
    for oracle, src in runs:
        s, mms = conform(oracle, **src)
        assert (s.mismatches, mms) == (0, [])
    assert calls == []
    # and a differing batch does reach it, once
    conform(ModelOracle("intel", deviate=deviation(error_code=0x5, when=lambda p, r: p == P_ROWRITE)))
    assert calls == ["t#read"]


def test_differing_qwords_sees_pages_only_one_side_holds():
    """A page the oracle's memory lacks differs in every qword (not only its first), and a page
    only the oracle's memory holds differs wherever it is not zero (the model reads zeros there)."""
    from harness.differential import differing_qwords

    model = SparseMemory(0x10000)
    model.write_u64(0x1018, 0x2001)  # an entry at offset 0x18 of page 1
    oracle = SparseMemory(0x1000)  # page 1 is past the oracle's memory
    assert {0x1000, 0x1018, 0x1FF8} <= differing_qwords(model, oracle)
    oracle = SparseMemory(0x10000)
    oracle.write_u64(0x1018, 0x2001)
    oracle.write_u64(0x3020, 0x20)  # A set in a table page the model never held
    assert differing_qwords(model, oracle) == {0x3020}
    oracle.write_u64(0x3020, 0)
    assert differing_qwords(model, oracle) == set()


def test_a_repro_probe_that_is_not_an_object_is_one_line():
    from harness.differential import probe_from_json
    from x86pt.errors import BadInputError

    for bad in ([1, 2], "0x1000", 7, None):
        with pytest.raises(BadInputError, match="bad repro probe: .* is not an object"):
            probe_from_json(bad)


def test_differing_qwords_an_oracle_only_qword_with_only_bit_63():
    """A qword of an oracle-only page is compared as a 64-bit integer: 0x8000000000000000 (XD
    alone) differs from the model's zero (as a float it would read as -0.0 == 0)."""
    model = SparseMemory(0x10000)
    oracle = SparseMemory(0x10000)
    oracle.write_u64(0x5008, 0x8000000000000000)
    assert differing_qwords(model, oracle) == {0x5008}


def test_differing_qwords_oracle_memory_without_a_page_map():
    """An oracle memory that only reads (no `pages`): the model's pages are compared, nothing
    else is looked for, and nothing fails."""

    class ReadOnly:
        def __init__(self, mem):
            self.mem = mem

        def read(self, pa, n):
            return self.mem.read(pa, n)

    model = SparseMemory(0x10000)
    model.write_u64(0x1018, 0x2001)
    other = SparseMemory(0x10000)
    other.write_u64(0x1018, 0x2003)
    assert differing_qwords(model, ReadOnly(other)) == {0x1018}


class PastTheEnd:
    """An oracle's memory after the batch that ends below `end` (its RAM is smaller than the
    image's address space): reads at or above `end` fail as on a real oracle."""

    def __init__(self, mem: SparseMemory, end: int) -> None:
        self.mem, self.end = mem, end
        self.pages = {pn: p for pn, p in mem.pages.items() if pn * 4096 < end}

    def read(self, pa, n):
        if pa + n > self.end:
            from x86pt.errors import PhysicalAddressError

            raise PhysicalAddressError(f"{pa:#x} past the oracle's RAM", pa)
        return self.mem.read(pa, n)

    def read_u64(self, pa):
        return int.from_bytes(self.read(pa, 8), "little")


def test_an_entry_neither_memory_holds_is_not_compared():
    """The empty PT at 0x204000 is in no page of the model's image (read as zeros, never stored)
    and past the end of the oracle's RAM: nobody could have written A/D there, so the case that
    walks it has nothing to compare after the batch, even while another qword of the batch
    differs (the suspect set is not empty). Reporting its PTE 'missing from the oracle's memory'
    would be a false mismatch."""
    from x86pt.compare import as_probe_result, read_value

    st = PagingState(cr3=0x200000, profile=profile_named("intel"))
    probes = [Probe(0x600000), Probe(0x1000)]
    cases = [CaseInfo("empty-pt", None, (0,)), CaseInfo("other", None, (1,))]
    b = Batch(image(), st, probes, cases)
    assert 0x204 not in b.memory.pages  # the hand image never stores the empty PT
    results, after = model_run(b.memory, st, b.probes)
    assert isinstance(results[0], PageFault) and results[0].steps[-1].entry_addr == 0x204000
    got_mem = after.copy()
    got_mem.write_u64(0x400000, 0x1234)  # a qword no case owns or walks differs
    oracle_after = PastTheEnd(got_mem, 0x204000)
    got = BatchResult(
        [as_probe_result(r, read_value(after, r, p)) for r, p in zip(results, probes)], oracle_after
    )
    assert differing_qwords(after, oracle_after) != set()
    assert check_batch("emu", b, results, after, got) == []
