"""unicorn oracle (harness/oracles/unicorn_oracle.py) against hand-derived expectations and the
proofs of PROFILES['unicorn'].

Expected outcomes come from the Intel SDM Vol. 3A (§4.5 reserved bits, §4.6 access rights incl.
SMEP/SMAP/PKRU, §4.7 the #PF error code: P=1 W=2 U=4 RSVD=8 I/D=0x10 PK=0x20, §4.8 A/D) worked
out by hand for each mapping below, or — for the profile proofs — from the deviations measured in
docs/oracles.md §2.4 (D1, D2, D6) and docs/paging.md §12.1. The x86pt model is only ever the
thing checked, in the final cross-check, never the expectation.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import need_oracle
from x86pt.oracle import HARNESS_SLOT, RIG_IMAGE_BASE, Probe, tag_value
from harness.oracles.unicorn_oracle import INSN, UnicornOracle, available, cpuid
from x86pt.build import Builder
from x86pt.errors import BadInputError, OracleError
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_PKS,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PROFILES,
    PagingState,
)
from x86pt.walk import Access, GeneralProtection, PageFault, Translation, walk

pytestmark = pytest.mark.unicorn

M = 40  # unicorn's MAXPHYADDR (every model, spec P6)
WP1 = CR0_PE | CR0_PG | CR0_WP
WP0 = CR0_PE | CR0_PG
NXE = EFER_LME | EFER_LMA | EFER_NXE
ALL_CR4 = CR4_PAE | CR4_SMEP | CR4_SMAP | CR4_PKE
PKRU = (1 << 2) | (1 << 5)  # AD1, WD2 (SDM §4.6.2: bits 2i and 2i+1)

# VA -> (PA, flags) of the hand image; every frame is filled with tag_value.
SUP_RW, SUP_RO, USR_RW, USR_RO = 0x10000000, 0x10001000, 0x10002000, 0x10003000
USR_NX, SUP_NX, USR_K1, USR_K2 = 0x10004000, 0x10005000, 0x10006000, 0x10007000
RSVD, NP = 0x10008000, 0x10009000
BIG2M, BIG1G = 0x10200000, 0x40000000
BAD1G = 0x80000000  # 1G leaf with bit 13 (reserved, SDM table 4-16) set
UNBACKED = 0xC0000000  # PDE -> a PT at 0x80000000, past the 32 MiB of RAM
FOURK = {
    SUP_RW: (0x400000, "rw"),
    SUP_RO: (0x401000, ""),
    USR_RW: (0x402000, "rw us"),
    USR_RO: (0x403000, "us"),
    USR_NX: (0x404000, "rw us nx"),
    SUP_NX: (0x405000, "rw nx"),
    USR_K1: (0x406000, "rw us"),
    USR_K2: (0x407000, "rw us"),
}
KEYS = {USR_K1: 1, USR_K2: 2}


@pytest.fixture(scope="module")
def oracle():
    ok, why = available()
    need_oracle("unicorn", ok, why)
    with UnicornOracle() as o:
        yield o


def fill(mem: SparseMemory, pa: int, size: int) -> None:
    q = np.arange(pa, pa + size, 8, dtype=np.uint64)
    mem.write(pa, ((q << np.uint64(8)) | np.uint64(0xC3)).astype("<u8").tobytes())


def image(table_flags: str = "p rw us a") -> Builder:
    b = Builder(maxphyaddr=M, table_base=RIG_IMAGE_BASE, table_flags=table_flags)
    for va, (pa, flags) in FOURK.items():
        b.map(va, pa, 0x1000, 0x1000, flags, pk=KEYS.get(va, 0))
        fill(b.memory, pa, 0x1000)
    b.set_entry(RSVD, 1, 0x408000 | 0x7 | (1 << 51))  # bit 51 >= M: reserved
    fill(b.memory, 0x408000, 0x1000)
    b.map(BIG2M, 0x600000, 1 << 21, 1 << 21, "rw us")
    fill(b.memory, 0x600000, 1 << 21)
    b.map(BIG1G, 0, 1 << 30, 1 << 30, "rw")  # PA 0: reads go to the frames above
    b.set_entry(BAD1G, 3, 0x0 | 0x3 | 0x80 | (1 << 13))  # P RW PS, bit 13, A clear
    b.set_entry(UNBACKED, 2, 0x80000000 | 0x7)  # below M, but no RAM there
    return b


def st(b: Builder, cr0: int = WP1, cr4: int = ALL_CR4, efer: int = NXE, pkru: int = PKRU) -> PagingState:
    return b.state(cr0=cr0, cr4=cr4, efer=efer, pkru=pkru, profile="unicorn")


def P(va: int, access: str = "read", user: bool = False, ac: bool = False, wvalue: int = 0) -> Probe:
    return Probe(va, access, user, ac, wvalue)


# (probe, expected) with expected = 'ok' | #PF error code | 'GP'; all under WP=1, NXE, SMEP, SMAP,
# PKE, PKRU = AD1|WD2.
SDM_CASES = [
    # not present (§4.7: P=0), W and U from the access
    (P(NP), 0x0),
    (P(NP, "write"), 0x2),
    (P(NP, user=True), 0x4),
    (P(NP, "write", True), 0x6),
    # I/D is set for fetches when NXE=1 (or SMEP=1)
    (P(NP, "fetch"), 0x10),
    (P(NP, "fetch", True), 0x14),
    # XD
    (P(SUP_NX, "fetch"), 0x11),
    (P(USR_NX, "fetch", True), 0x15),
    (P(SUP_NX), "ok"),
    # U/S: CPL3 to a supervisor page
    (P(SUP_RW, user=True), 0x5),
    (P(SUP_RW, "write", True), 0x7),
    (P(SUP_RW, "fetch", True), 0x15),
    # R/W with WP=1
    (P(SUP_RO, "write"), 0x3),
    (P(USR_RO, "write", True), 0x7),
    (P(SUP_RO), "ok"),
    # SMEP
    (P(USR_RW, "fetch"), 0x11),
    (P(USR_RW, "fetch", True), "ok"),
    # SMAP: explicit supervisor data access to a user page needs AC=1
    (P(USR_RW), 0x1),
    (P(USR_RW, "write"), 0x3),
    (P(USR_RW, ac=True), "ok"),
    (P(USR_RW, "write", ac=True), "ok"),
    # PKRU: key 1 access-disabled, key 2 write-disabled (PK=0x20 with P)
    (P(USR_K1, user=True), 0x25),
    (P(USR_K1, "write", True), 0x27),
    (P(USR_K1, ac=True), 0x21),
    (P(USR_K2, user=True), "ok"),
    (P(USR_K2, "write", True), 0x27),
    (P(USR_K2, "write", ac=True), 0x23),
    (P(USR_K1, "fetch", True), "ok"),  # keys never apply to fetches
    # reserved bit 51 (>= MAXPHYADDR): RSVD with P (SDM: RSVD faults are always on present entries)
    (P(RSVD), 0x9),
    (P(RSVD, "write", True), 0xF),
    (P(RSVD, "fetch"), 0x19),
    # non-canonical with 4-level paging: #GP(0), CR2 untouched
    (P(0x0000800000000000), "GP"),
    (P(0xFFFF7FFFFFFFF000, "write"), "GP"),
    # successes that also prove the frame
    (P(SUP_RW + 0x18), "ok"),
    (P(BIG2M + 0x1238, user=True), "ok"),
    (P(BIG1G + 0x405010), "ok"),
]


def _expected_pa(va: int) -> int:
    """The hand map (not the walker): 4K pages from FOURK, the 2M and 1G leaves."""
    if BIG2M <= va < BIG2M + (1 << 21):
        return 0x600000 + (va - BIG2M)
    if BIG1G <= va < BIG1G + (1 << 30):
        return va - BIG1G
    return FOURK[va & ~0xFFF][0] + (va & 0xFFF)


def _check(results, cases) -> None:
    bad = []
    for (p, want), r in zip(cases, results):
        if want == "ok":
            good = r.outcome == "ok"
            if good and p.access == "read":
                good = r.pa == _expected_pa(p.va) and r.value == tag_value(_expected_pa(p.va))
        elif want == "GP":
            good = r.outcome == "general_protection" and r.error_code == 0 and r.cr2 is None
        else:
            good = r.outcome == "page_fault" and r.error_code == want and r.cr2 == p.va
        if not good:
            bad.append(f"{p}: want {want if isinstance(want, str) else hex(want)}, got {r}")
    assert not bad, "\n".join(bad)


def test_sdm_cases_in_one_batch(oracle):
    b = image()
    res = oracle.run(b.memory, st(b), [p for p, _ in SDM_CASES])
    assert len(res.results) == len(SDM_CASES)
    _check(res.results, SDM_CASES)


def test_sdm_cases_one_per_batch_agree_with_the_big_batch(oracle):
    """Batching (segments, CPL switches, fault resumption) must not change any outcome."""
    b = image()
    got = [oracle.run(b.memory, st(b), [p]).results[0] for p, _ in SDM_CASES[::3]]
    _check(got, SDM_CASES[::3])


def test_wp0(oracle):
    """CR0.WP=0: supervisor writes ignore R/W and PKRU WD (SDM §4.6.1, §4.6.2); user writes don't."""
    b = image()
    cases = [
        (P(SUP_RO, "write"), "ok"),
        (P(USR_RO, "write", True), 0x7),
        (P(USR_K2, "write", ac=True), "ok"),
        (P(USR_K2, "write", True), 0x27),
    ]
    _check(oracle.run(b.memory, st(b, cr0=WP0), [p for p, _ in cases]).results, cases)


def test_nxe0_smep0_fetch_has_no_id_and_xd_is_reserved(oracle):
    """EFER.NXE=0, SMEP=0: no I/D bit in the error code; bit 63 of a present entry is reserved."""
    b = image()
    cases = [(P(NP, "fetch"), 0x0), (P(SUP_NX), 0x9), (P(SUP_RW, "fetch"), "ok")]
    s = st(b, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA, pkru=0)
    _check(oracle.run(b.memory, s, [p for p, _ in cases]).results, cases)


def test_accessed_and_dirty_after_success(oracle):
    """SDM §4.8: A set in every entry used; D set in the leaf by a write only; the harness slot of
    the caller's root is not reported as changed."""
    b = image(table_flags="p rw us")  # upper levels start with A=0
    leaf_2m = b.entry_address(BIG2M, 2, create=False)
    walk_4k = [b.entry_address(USR_RW, lv, create=False) for lv in (4, 3, 2, 1)]
    before = {a: b.memory.read_u64(a) for a in walk_4k + [leaf_2m]}
    assert not any(v & 0x20 for v in before.values())
    res = oracle.run(b.memory, st(b), [P(USR_RW, user=True), P(BIG2M + 8, "write", True, wvalue=0x1234C3)])
    assert [r.outcome for r in res.results] == ["ok", "ok"]
    after = res.memory_after
    for a in walk_4k:
        assert after.read_u64(a) == before[a] | 0x20, hex(a)  # A, no D (a read)
    assert after.read_u64(leaf_2m) == before[leaf_2m] | 0x60  # A and D
    assert res.results[1].pa == 0x600008
    assert after.read_u64(0x600008) == 0x1234C3
    assert after.read_u64(b.root + 8 * HARNESS_SLOT) == b.memory.read_u64(b.root + 8 * HARNESS_SLOT)
    assert b.memory.read_u64(leaf_2m) == before[leaf_2m]  # the caller's image untouched


def test_la57_walk(oracle):
    b = Builder(levels=5, maxphyaddr=M, table_base=RIG_IMAGE_BASE)
    va = (1 << 48) | (3 << 39) | 0x5000
    b.map(va, 0x500000, 0x1000, 0x1000, "rw")
    fill(b.memory, 0x500000, 0x1000)
    s = b.state(profile="unicorn")
    assert s.cr4 & CR4_LA57
    res = oracle.run(
        b.memory,
        s,
        [P(va + 0x40), P(1 << 47), P(1 << 56), P(va, "write", wvalue=0xC3), P(va + 0x80, user=True)],
    )
    r = res.results
    assert (r[4].outcome, r[4].error_code, r[4].cr2) == ("page_fault", 0x5, va + 0x80)  # U/S=0 leaf
    assert (r[0].outcome, r[0].pa, r[0].value) == ("ok", 0x500040, tag_value(0x500040))
    assert (r[1].outcome, r[1].error_code, r[1].cr2) == ("page_fault", 0x0, 1 << 47)  # canonical now
    assert (r[2].outcome, r[2].error_code) == ("general_protection", 0)
    assert (r[3].outcome, r[3].pa) == ("ok", 0x500000)


def test_probes_run_in_order_and_writes_carry(oracle):
    """A write then a read of the same qword: the read sees the written value (base.py: in order)."""
    b = image()
    probes = [
        P(SUP_RW + 0x20, "write", wvalue=0xAB12C3),
        P(SUP_RW + 0x20),
        P(USR_RW + 0x28, "write", True, wvalue=0xCD34C3),
        P(USR_RW + 0x28, user=True),
    ]
    r = oracle.run(b.memory, st(b), probes).results
    assert [x.value for x in r] == [None, 0xAB12C3, None, 0xCD34C3]


def test_capabilities_match_the_profile(oracle):
    caps = oracle.capabilities()
    prof = PROFILES["unicorn"]
    assert (caps.name, caps.vendor, caps.maxphyaddr) == ("unicorn", prof.vendor, prof.maxphyaddr)
    f = prof.features
    assert (caps.gbpages, caps.la57, caps.pku, caps.smep, caps.smap, caps.nx) == (
        f.gbpages,
        f.la57,
        f.pku,
        f.smep,
        f.smap,
        f.nx,
    )
    assert caps.rsvd_sets_p == prof.rsvd_sets_p
    assert "2.1.4" in caps.version


def test_instruction_bytes_and_listing(oracle):
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    dis = {k: [(i.mnemonic, i.op_str) for i in md.disasm(v, 0)] for k, v in INSN.items()}
    assert dis == {
        "read": [("mov", "rax, qword ptr [rbx]")],
        "write": [("mov", "qword ptr [rbx], rdx")],
        "fetch": [("call", "rbx")],
    }
    assert oracle.instruction_bytes(P(0x1000, "write")) == INSN["write"]
    text = oracle.listing([P(0x1000, ac=True), P(0x2000, "write", True, True, 5), P(0x3000, "fetch")])
    for needle in (
        "mov cr3, rax",
        "mov rax, qword ptr [rbx]",
        "iretq",
        "call rbx",
        "popfq",
        "probe #1: write va=0x2000 cpl=3 ac=1",
        "movabs rdx, 5",
    ):
        assert needle in text, needle
    assert "(bad)" not in text


def test_bad_input(oracle):
    mem = SparseMemory()
    mem.write_u64(0x100000, 0x3)  # a page inside the harness area
    with pytest.raises(BadInputError, match="outside the rig's image region"):
        oracle.run(mem, PagingState(cr3=0x200000), [P(0)])
    b = image()
    with pytest.raises(BadInputError, match="64-bit"):  # refused where the probe is made
        oracle.run(b.memory, st(b), [P(1 << 64)])
    empty = oracle.run(b.memory, st(b), [])
    assert empty.results == [] and set(empty.memory_after.pages) == set(b.memory.pages)
    with pytest.raises(OracleError, match="PKS"):
        oracle.run(b.memory, st(b, cr4=CR4_PAE | CR4_PKS), [P(SUP_RW)])
    with pytest.raises(OracleError, match="closes every key"):
        oracle.run(b.memory, st(b, pkru=0xFFFFFFFF), [P(USR_RW, user=True)])


def test_fetch_target_without_ret_is_an_error_not_a_wrong_answer(oracle):
    b = image()
    b.memory.write(0x402100, b"\x0f\x0b")  # ud2 where the fetch lands
    with pytest.raises(OracleError):
        oracle.run(b.memory, st(b), [P(USR_RW + 0x100, "fetch", True)])


# -- profile proofs: PROFILES['unicorn'] deviations still hold --------------------------------------
def test_profile_ps_1g_without_gbpages():
    """D1: the Haswell model's CPUID has no PDPE1GB (CPUID.80000001H:EDX[26]), yet a 1G leaf
    translates; the SDM makes PDPTE.PS reserved then (RSVD #PF 0x9)."""
    ok, why = available()
    need_oracle("unicorn", ok, why)
    assert PROFILES["unicorn"].ps_1g_without_gbpages
    assert not (cpuid("haswell", 0x80000001)[3] >> 26) & 1
    assert (cpuid("icelake", 0x80000001)[3] >> 26) & 1
    b = image()
    with UnicornOracle("haswell") as hw:
        r = hw.run(b.memory, st(b, cr4=CR4_PAE, pkru=0), [P(BIG1G + 0x405010)]).results[0]
    assert (r.outcome, r.pa) == ("ok", 0x405010), r


def test_profile_a_on_1g_leaf_before_checks(oracle):
    """D2: a read through a 1G leaf with reserved bit 13 faults RSVD|P (0x9) but leaves A=1 in that
    PDPTE; the SDM sets A only in entries it used for a translation."""
    assert PROFILES["unicorn"].a_on_1g_leaf_before_checks
    b = image()
    pdpte = b.entry_address(BAD1G, 3, create=False)
    assert not b.memory.read_u64(pdpte) & 0x20
    res = oracle.run(b.memory, st(b), [P(BAD1G + 0x400000)])
    assert (res.results[0].outcome, res.results[0].error_code) == ("page_fault", 0x9)
    assert res.memory_after.read_u64(pdpte) == b.memory.read_u64(pdpte) | 0x20


def test_profile_implicit_smap_honours_ac(oracle):
    """docs/paging.md §12.1: an implicit supervisor read (a GDT descriptor load at CPL0) of a user
    page with CR4.SMAP: the SDM faults it whatever EFLAGS.AC is (#PF 0x1); unicorn lets AC=1
    through. The AC=0 row is the control: it does fault."""
    assert PROFILES["unicorn"].implicit_smap_honours_ac
    b = image()
    s = st(b, cr4=CR4_PAE | CR4_SMAP, pkru=0)
    r0 = oracle.implicit_gdt_read(b.memory, s, ac=False)
    r1 = oracle.implicit_gdt_read(b.memory, s, ac=True)
    assert (r0.outcome, r0.error_code) == ("page_fault", 0x1), r0
    assert r1.outcome == "ok", r1
    # Without SMAP the same read is fine either way: the fault above is SMAP's.
    assert oracle.implicit_gdt_read(b.memory, st(b, cr4=CR4_PAE, pkru=0), ac=False).outcome == "ok"


def test_profile_unbacked_read_zero(oracle):
    """D6: a PDE pointing at a PT in unbacked physical memory (0x80000000, below MAXPHYADDR, past
    RAM) reads as zero: a plain not-present #PF 0x0 (hardware would typically read all-ones, so
    RSVD)."""
    assert PROFILES["unicorn"].unbacked_read == "zero"
    b = image()
    r = oracle.run(b.memory, st(b), [P(UNBACKED + 0x3000), P(UNBACKED, "write", True)]).results
    assert [(x.outcome, x.error_code) for x in r] == [("page_fault", 0x0), ("page_fault", 0x6)]


# -- the model with profile 'unicorn' agrees with the oracle ------------------------------------------
def _random_probes(rng: random.Random, n: int) -> list[Probe]:
    vas = list(FOURK) + [
        RSVD,
        NP,
        BIG2M,
        BIG2M + 0x1FF000,
        BIG1G + 0x400000,
        BIG1G + 0x601000,
        BAD1G,
        UNBACKED,
        0x0000800000000000,
        0x20000000,
    ]
    out = []
    for _ in range(n):
        va = rng.choice(vas) + 8 * rng.randrange(512)
        access = rng.choice(("read", "read", "write", "fetch"))
        # Written values keep the low byte 0xC3 so later fetches from the same qword still return.
        out.append(
            Probe(va, access, rng.random() < 0.5, rng.random() < 0.3, (rng.getrandbits(48) << 8) | 0xC3)
        )
    return out


@pytest.mark.parametrize(
    "cr0,cr4,efer", [(WP1, ALL_CR4, NXE), (WP0, CR4_PAE | CR4_SMEP, EFER_LME | EFER_LMA)]
)
def test_model_agrees_with_oracle_on_random_probes(oracle, cr0, cr4, efer):
    """Cross-check (the oracle is the expectation): outcome, error code, CR2, PA, and the A/D bits
    and data the run leaves behind."""
    rng = random.Random(cr4)
    b = image(table_flags="p rw us")
    s = st(b, cr0=cr0, cr4=cr4, efer=efer)
    probes = _random_probes(rng, 100)
    res = oracle.run(b.memory, s, probes)
    model_mem = b.memory.copy()
    bad = []
    for p, r in zip(probes, res.results):
        m = walk(s, model_mem, p.va, Access(p.access, p.user, p.ac), update_ad=True)
        if isinstance(m, Translation):
            want = ("ok", None, None, m.pa if p.access != "fetch" else None)
            if p.access == "write":
                model_mem.write_u64(m.pa, p.wvalue)
        elif isinstance(m, PageFault):
            want = ("page_fault", m.error_code, m.cr2, None)
        else:
            assert isinstance(m, GeneralProtection)
            want = ("general_protection", m.error_code, m.cr2, None)
        got = (r.outcome, r.error_code, r.cr2, r.pa)
        if got != want:
            bad.append(f"{p}: oracle {got}, model {want} ({getattr(m, 'reason', '')})")
    assert not bad, "\n".join(bad)
    for pn in sorted(set(model_mem.pages) | set(res.memory_after.pages)):
        a = model_mem.read(pn << 12, 4096)
        o = res.memory_after.read(pn << 12, 4096)
        assert a == o, f"page {pn << 12:#x} differs after the run"


@pytest.mark.parametrize("user", [False, True])
def test_no_stale_tlb_between_probes(oracle, user):
    """base.py: each probe walks afresh. A write probe (same CPL) clears the PTE of a page an
    earlier probe used, through a user alias of the PT page; the next access to that page must
    fault not-present. The page is global (G=1) and CR4.PGE=1, so only a full flush drops it."""
    b = image()
    va = 0x10010000
    b.map(va, 0x409000, 0x1000, 0x1000, "rw us g")
    fill(b.memory, 0x409000, 0x1000)
    pte = b.entry_address(va, 1, create=False)
    alias = 0x10011000  # the PT page itself, user RW
    b.map(alias, pte & ~0xFFF, 0x1000, 0x1000, "rw us")
    s = st(b, cr4=ALL_CR4 | (1 << 7), pkru=0)  # CR4.PGE
    code = 0x4 if user else 0x0
    probes = [
        P(va, user=user, ac=True),
        P(alias + (pte & 0xFFF), "write", user, ac=True, wvalue=0),
        P(va + 8, user=user, ac=True),
    ]
    r = oracle.run(b.memory, s, probes).results
    assert [(x.outcome, x.error_code) for x in r] == [("ok", None), ("ok", None), ("page_fault", code)]


def test_chunks_continue_one_run(oracle, monkeypatch):
    """A batch longer than a chunk runs as several chunks on the same engine and image."""
    import harness.oracles.unicorn_program as U

    monkeypatch.setattr(U, "CHUNK", 7)
    b = image()
    res = oracle.run(b.memory, st(b), [p for p, _ in SDM_CASES])
    _check(res.results, SDM_CASES)


def test_other_unicorn_versions_are_refused(monkeypatch):
    import harness.oracles.unicorn_caps as U
    from x86pt.errors import OracleUnavailable

    ok, why = available()
    need_oracle("unicorn", ok, why)
    monkeypatch.setattr(U, "_version_of_lib", lambda: (2, 1, 3))
    with pytest.raises(OracleUnavailable, match=r"unicorn 2\.1\.3"):
        UnicornOracle()
