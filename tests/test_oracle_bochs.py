"""The Bochs oracle (harness/oracles/bochs.py): Bochs 2.7 runs the probe guest, cpu model tigerlake.

* hand-derived expectations (Intel SDM Vol. 3A §4.5-4.8, §6.15): error codes are written as
  numbers built from the §4.7 bits P=0x1 W=0x2 U=0x4 RSVD=0x8 I/D=0x10 PK=0x20;
* capabilities: what the capability batch measures is what PROFILES['bochs'] says;
* the protection-key deviation (docs/oracles.md "Bochs"): Bochs decides the PKRU check by the
  CPL of the access, not by the page's U/S; a table of 48 hand cases, and a matrix sample whose
  every mismatch that rule explains (the model has no Profile field for it yet);
* plumbing: batches split, A/D carried over, a write into an unbacked frame read back, Bochs
  errors as OracleError, no Bochs process and no scratch directory left after a run, a timeout
  or an error; the `x86pt conform --oracle bochs --cases matrix --limit 2000` slice.
Each Bochs start costs ~0.15 s.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys

import pytest

from tests import guest_oracle_cases as C
from tests.conftest import ROOT, need_oracle
from tests.hand_image import (
    CR0,
    FRAMES,
    KPK,
    KRW,
    NONCANON,
    NP,
    UNX,
    UPK,
    URW,
    P,
    check,
    run_cases,
    tag_frames,
)
from tests.hand_image import hand_image as shared_hand_image
from x86pt.build import Builder
from x86pt.errors import OracleError
from x86pt.oracle import Probe
from x86pt.registry import availability, get_oracle, oracle_names
from x86pt.state import CR0_WP, CR4_PAE, CR4_PKE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_LME, PROFILES
from x86pt.walk import Access, PageFault, Translation, walk

pytestmark = pytest.mark.bochs

OK, REASON = availability("bochs")


@pytest.fixture(scope="module")
def bochs():
    need_oracle("bochs", OK, REASON)
    from harness.oracles.bochs import BochsOracle

    return BochsOracle(timeout=60)


def hand_image() -> Builder:
    return shared_hand_image("intel")


state = C.state_for("bochs")


# -- the registry ----------------------------------------------------------------------------------------
def test_registered_as_a_plugin():
    """pyproject.toml's x86pt.oracles entry point, found by the library's registry."""
    assert "bochs" in oracle_names()
    need_oracle("bochs", OK, REASON)
    o = get_oracle("bochs")
    assert o.name == "bochs" and o.profile == "bochs" and "bochs" in PROFILES
    o.close()


# -- hand-derived (SDM) -------------------------------------------------------------------------------
def test_sdm_base_wp_nxe(bochs):
    b = hand_image()
    run_cases(bochs, b, state(b), C.base_wp_nxe(with_rsvd=True))


def test_sdm_wp0(bochs):
    b = hand_image()
    run_cases(bochs, b, state(b, cr0=CR0 & ~CR0_WP), C.wp0())


def test_sdm_nxe0(bochs):
    """EFER.NXE=0: XD is a reserved bit (§4.5, Table 4-20) and no fault reports I/D unless
    SMEP is on (§4.7)."""
    b = hand_image()
    cases = [
        (P(UNX + 8), ("pf", 0x09)),
        (P(NP, "fetch"), ("pf", 0x00)),
        (P(URW + 0x40, "fetch"), "ok"),
    ]
    run_cases(bochs, b, state(b, efer=EFER_LME | EFER_LMA), cases)


def test_sdm_smep(bochs):
    b = hand_image()
    run_cases(bochs, b, state(b, cr4=CR4_PAE | CR4_SMEP), C.smep())


def test_sdm_smap_and_ac(bochs):
    b = hand_image()
    run_cases(bochs, b, state(b, cr4=CR4_PAE | CR4_SMAP), C.smap_and_ac())


def test_sdm_implicit_supervisor_reads(bochs):
    """§4.6: a descriptor-table read is a supervisor access whatever the CPL; with SMAP it may not
    read a user page (§4.6.1; with EFLAGS.AC=1 at CPL0 Bochs deviates: see
    test_profile_implicit_smap_honours_ac)."""
    b = hand_image()
    probes = [
        Probe(URW, implicit=True),
        Probe(KRW, implicit=True),
        Probe(URW, user=True, implicit=True),
        Probe(KRW, user=True, implicit=True),
    ]
    res = bochs.run(b.memory, state(b, cr4=CR4_PAE | CR4_SMAP), probes[:4]).results
    got = [(r.outcome, r.error_code if r.outcome == "page_fault" else None) for r in res]
    assert got == [("page_fault", 0x1), ("ok", None), ("page_fault", 0x1), ("ok", None)]


def test_sdm_pkru_on_user_pages_at_cpl3(bochs):
    """§4.6.2, the part where Bochs follows the SDM: user accesses to user pages."""
    b = hand_image()
    run_cases(bochs, b, state(b, cr4=CR4_PAE | CR4_PKE, pkru=0b0100), C.pkru_ad1(supervisor_read=False))
    run_cases(bochs, b, state(b, cr4=CR4_PAE | CR4_PKE, pkru=0b1000), C.pkru_wd1())


def test_sdm_accessed_dirty(bochs):
    b = hand_image()
    C.check_accessed_dirty(bochs, b, state(b))


def test_sdm_la57_is_not_offered(bochs):
    """No Bochs 2.7 CPU model has LA57 (CPUID.7.ECX[16]): CR4.LA57=1 is refused (#GP, SDM
    §2.5), the boot ROM's triple fault is a Bochs panic, and that is an OracleError."""
    b = Builder(levels=5, table_base=0x200000, maxphyaddr=40, vendor="intel")
    tag_frames(b.memory, FRAMES, 1)
    b.map(0x0080000000001000, FRAMES, 0x1000, flags="rw a")
    with pytest.raises(OracleError, match="Bochs exited"):
        bochs.run(b.memory, b.state(profile="bochs"), [P(0x0080000000001000)])
    assert bochs.capabilities().la57 is False


# -- capabilities ------------------------------------------------------------------------------------------
def test_capabilities_match_profile(bochs):
    """Measured by the capability batch (and the CPUID table Bochs logs): tigerlake is
    GenuineIntel, MAXPHYADDR 40, 1G pages, PKU, SMEP, SMAP, NX, no LA57; RSVD faults set P."""
    caps = bochs.capabilities()
    prof = PROFILES["bochs"]
    assert caps.vendor == "intel" == prof.vendor
    assert caps.maxphyaddr == 40 == prof.maxphyaddr
    assert (caps.gbpages, caps.pku, caps.smep, caps.smap, caps.nx) == (True,) * 5
    f = prof.features
    assert (f.gbpages, f.pku, f.smep, f.smap, f.nx) == (True,) * 5
    assert caps.la57 is False and f.la57 is False
    assert f.pks is False
    assert caps.rsvd_sets_p is True and prof.rsvd_sets_p is True
    assert caps.implicit_cpl0 and caps.implicit_cpl3, caps.implicit_note
    assert caps.unbacked == "ones"
    assert caps.version.startswith("Bochs x86 Emulator 2.7")
    assert bochs.capabilities() is caps  # cached per process


def test_cpuid_table_of_the_model(bochs):
    """The CPUID leaves Bochs logs for tigerlake (Intel SDM Vol. 2A, CPUID): vendor, SMEP
    (7.EBX[7]), SMAP (7.EBX[20]), PKU (7.ECX[3]), no LA57 (7.ECX[16]), no PKS (7.ECX[31]),
    1G pages (80000001h.EDX[26]), NX (80000001h.EDX[20]), MAXPHYADDR (80000008h.EAX[7:0])."""
    from harness.oracles.bochs import cpuid_from_log, vendor_of

    b = hand_image()
    bochs.run(b.memory, state(b), [P(KRW)])
    c = cpuid_from_log(bochs.last_log)
    assert vendor_of(c) == "intel"
    bit = lambda v, n: (v >> n) & 1  # noqa: E731
    assert (bit(c[7][1], 7), bit(c[7][1], 20), bit(c[7][2], 3)) == (1, 1, 1)
    assert (bit(c[7][2], 16), bit(c[7][2], 31)) == (0, 0)
    assert (bit(c[0x80000001][3], 26), bit(c[0x80000001][3], 20)) == (1, 1)
    assert c[0x80000008][0] & 0xFF == 40


# -- the profile: where Bochs is the SDM, and where QEMU's deviations are not Bochs' ------------------------
def test_profile_has_no_qemu_deviations(bochs):
    """PROFILES['bochs'] keeps the SDM's answer on the fields QEMU deviates on but Bochs does not
    (implicit_smap_honours_ac aside): RSVD faults set P (above), a 1G leaf with a reserved bit or
    a rights fault gets no A (§4.8: A is set on entries used by the translation; a faulting
    leaf is not used), and a non-canonical #GP leaves CR2 alone."""
    prof = PROFILES["bochs"]
    assert (
        prof.rsvd_sets_p,
        prof.ps_1g_without_gbpages,
        prof.a_on_1g_leaf_before_checks,
        prof.gp_writes_cr2,
        prof.amd_top_bit8_reserved,
    ) == (True, False, False, False, True)
    b = hand_image()
    g_rsvd, g_sup = 0x80000000, 0xC0000000
    b.map(g_rsvd, 1 << 30, 1 << 30, 1 << 30, flags="rw")
    b.set_entry(g_rsvd, 3, b.get_entry(g_rsvd, 3) | (1 << 13))  # PDPTE bit 13: reserved
    b.map(g_sup, 2 << 30, 1 << 30, 1 << 30, flags="rw")
    addrs = [b.entry_address(va, 3, create=False) for va in (g_rsvd, g_sup)]
    before = [b.memory.read_u64(a) for a in addrs]
    res = run_cases(
        bochs,
        b,
        state(b),
        [
            (P(g_rsvd), ("pf", 0x09)),
            (P(g_sup, user=True), ("pf", 0x05)),
            (P(NP), ("pf", 0x00)),
            (P(NONCANON), ("gp", 0)),
        ],
    )
    assert [res.memory_after.read_u64(a) for a in addrs] == before


def test_profile_implicit_smap_honours_ac(bochs):
    """Like QEMU (PROFILES['bochs'].implicit_smap_honours_ac), Bochs lets EFLAGS.AC=1 lift SMAP
    for implicit supervisor reads at CPL0; the SDM (§4.6.1) never does. Two ways to see it:
    an implicit probe (an LDT descriptor read) of a user page with AC=1 goes through, and a #PF
    raised with AC=1 is delivered although the harness IDT sits in a user page. Control: with
    AC=0 the IDT read faults -> #DF -> triple fault, a Bochs panic."""
    assert PROFILES["bochs"].implicit_smap_honours_ac is True
    b = hand_image()
    st = state(b, cr4=CR4_PAE | CR4_SMAP)
    res = bochs.run(b.memory, st, [Probe(URW, ac=True, implicit=True), Probe(URW, implicit=True)]).results
    assert [(r.outcome, r.error_code) for r in res] == [("ok", None), ("page_fault", 0x1)]
    check(
        bochs.run(b.memory, st, [P(NP, ac=True)], ram_hook=C.user_idt).results,
        [(P(NP, ac=True), ("pf", 0x00))],
    )
    with pytest.raises(OracleError, match="Bochs exited"):
        bochs.run(b.memory, st, [P(NP)], ram_hook=C.user_idt)
    # The model agrees under profile bochs, and the SDM profile does not.
    assert walk(st, b.memory, URW, Access("read", ac=True, implicit=True)).outcome == "ok"
    assert (
        walk(
            st.replace(profile=PROFILES["intel"]), b.memory, URW, Access("read", ac=True, implicit=True)
        ).outcome
        == "page_fault"
    )


# -- the protection-key deviation (docs/oracles.md "Bochs") ------------------------------------------------
def bochs_pk_denies(st, leaf_pkey: int, access: str, user: bool) -> bool:
    """Bochs 2.7's PKRU check as measured: by the CPL of the access, whatever the page's U/S.
    CPL3: AD denies data accesses, WD denies writes. CPL<3: AD is ignored, WD denies writes when
    CR0.WP=1. (SDM §4.6.2: only pages with U/S=1 have their key checked, and then AD denies
    every data access, CPL0 included.)"""
    if not st.pke or access == "fetch":
        return False
    ad = (st.pkru >> (2 * leaf_pkey)) & 1
    wd = (st.pkru >> (2 * leaf_pkey + 1)) & 1
    if user:
        return bool(ad or (access == "write" and wd))
    return bool(access == "write" and wd and st.cr0 & CR0_WP)


def bochs_expected(st, memory, p: Probe):
    """(outcome, error code) Bochs gives: the SDM walk without keys, then Bochs' key rule (an
    implicit access is a supervisor-mode access, §4.6, so it is judged as CPL0's). And for
    implicit reads with EFLAGS.AC=1 no SMAP at any CPL (the profile's implicit_smap_honours_ac
    covers CPL<3 only; test_deviation_implicit_smap_at_cpl3_honours_ac)."""
    if p.implicit and p.ac:  # EFLAGS.AC=1 lifts SMAP for implicit reads at any CPL
        st = st.replace(cr4=st.cr4 & ~CR4_SMAP)
    r = walk(st.replace(pkru=0), memory, p.va, Access(p.access, p.user, p.ac, p.implicit))
    if isinstance(r, Translation):
        key = r.rights.pkey
    elif isinstance(r, PageFault) and r.level is None and r.steps:  # a rights fault: P=1
        key = (r.steps[-1].raw >> 59) & 0xF
    else:
        return (r.outcome, getattr(r, "error_code", None))
    if not bochs_pk_denies(st, key, p.access, p.user and not p.implicit):
        return (r.outcome, getattr(r, "error_code", None))
    code = (
        r.error_code
        if isinstance(r, PageFault)
        else (0x1 | (0x2 if p.access == "write" else 0) | (0x4 if p.user else 0))
    )
    return ("page_fault", code | 0x20)


def assert_bochs_rules_explain(mm) -> None:
    """Every answer of a mismatch's probes is what bochs_expected says, the probes walked in order
    on the repro's image with A/D updates (as the oracle ran them)."""
    from harness.differential import batch_from_repro

    batch = batch_from_repro(mm.repro)
    mem = batch.memory.copy()
    for p, got in zip(mm.probes, mm.got):
        want = bochs_expected(batch.state, mem, p)
        assert (got.outcome, got.error_code if got.outcome != "ok" else None) == want, mm.render()
        walk(batch.state, mem, p.va, Access(p.access, p.user, p.ac, p.implicit), update_ad=True)


PK_TABLE = [
    # CR0.WP, PKRU, page U/S, CPL, access -> Bochs' answer, the SDM's answer (§4.6.2, hand-derived):
    # an error code, or None for ok. Key 1 on both pages; AD1 is PKRU bit 2, WD1 bit 3.
    (1, 0b0100, "U", 0, "read", None, 0x21),  # SDM: AD denies supervisor data accesses too
    (1, 0b0100, "U", 0, "write", None, 0x23),
    (1, 0b0100, "U", 3, "read", 0x25, 0x25),
    (1, 0b0100, "U", 3, "write", 0x27, 0x27),
    (1, 0b0100, "S", 0, "read", None, None),
    (1, 0b0100, "S", 0, "write", None, None),
    (1, 0b0100, "S", 3, "read", 0x25, 0x05),  # SDM: keys are for user pages only
    (1, 0b0100, "S", 3, "write", 0x27, 0x07),
    (1, 0b1000, "U", 0, "read", None, None),
    (1, 0b1000, "U", 0, "write", 0x23, 0x23),
    (1, 0b1000, "U", 3, "read", None, None),
    (1, 0b1000, "U", 3, "write", 0x27, 0x27),
    (1, 0b1000, "S", 0, "read", None, None),
    (1, 0b1000, "S", 0, "write", 0x23, None),  # SDM: keys are for user pages only
    (1, 0b1000, "S", 3, "read", 0x05, 0x05),
    (1, 0b1000, "S", 3, "write", 0x27, 0x07),
    (0, 0b0100, "U", 0, "read", None, 0x21),
    (0, 0b0100, "U", 0, "write", None, 0x23),
    (0, 0b0100, "S", 3, "read", 0x25, 0x05),
    (0, 0b1000, "U", 0, "write", None, None),  # WD binds supervisor writes only with WP=1
    (0, 0b1000, "S", 0, "write", None, None),
    (0, 0b1000, "S", 3, "write", 0x27, 0x07),
]


def test_profile_pkru_by_cpl(bochs):
    """Bochs 2.7 applies PKRU by the CPL of the access instead of the page's U/S (§4.6.2): Bochs
    answers the table's Bochs column, and so does the model under profile bochs (pkru_by_cpl);
    under the manual's profile the model answers the SDM column (so the field is what differs)."""
    b = hand_image()
    assert sum(r[5] != r[6] for r in PK_TABLE) == 10
    for wp in (1, 0):
        for pkru in (0b0100, 0b1000):
            rows = [r for r in PK_TABLE if r[0] == wp and r[1] == pkru]
            st = state(b, cr0=CR0 if wp else CR0 & ~CR0_WP, cr4=CR4_PAE | CR4_PKE, pkru=pkru)
            probes = [P((UPK if r[2] == "U" else KPK) + 8, r[4], user=r[3] == 3) for r in rows]
            res = bochs.run(b.memory, st, probes).results
            got = [None if r.outcome == "ok" else r.error_code for r in res]
            assert got == [r[5] for r in rows], f"WP={wp} PKRU={pkru:#x}"
            for p, row in zip(probes, rows):
                assert bochs_expected(st, b.memory, p)[1] == row[5], row
                m = walk(st, b.memory, p.va, Access(p.access, p.user))
                assert (None if m.outcome == "ok" else m.error_code) == row[5], row
                sdm = dataclasses.replace(PROFILES["bochs"], pkru_by_cpl=False)
                m = walk(st.replace(profile=sdm), b.memory, p.va, Access(p.access, p.user))
                assert (None if m.outcome == "ok" else m.error_code) == row[6], row


def test_pk_rule_explains_every_matrix_mismatch(bochs):
    """A seeded sample of the classic matrix on Bochs: no mismatch with the model under profile
    bochs; without the profile's two Bochs fields every mismatch is a PKE case that the hand rule
    bochs_pk_denies explains, and none is anything else."""
    from harness import matrix as mx
    from harness.differential import run_conformance
    from harness.matrix import MatrixFeatures, matrix_for
    from harness.matrix_pack import MatrixSource

    feat = MatrixFeatures.from_caps(bochs.capabilities())
    m = matrix_for(feat)
    idx, _, _ = mx.select(m.size, sample=1500, seed=20261202)
    summ = run_conformance(bochs, MatrixSource(m, PROFILES["bochs"], indices=idx))
    assert (summ.cases, summ.mismatches) == (1500, 0)
    bare = dataclasses.replace(PROFILES["bochs"], pkru_by_cpl=False, implicit_smap_honours_ac_cpl3=False)
    mms = []
    summ = run_conformance(bochs, MatrixSource(m, bare, indices=idx), on_mismatch=mms.append)
    assert summ.cases == 1500
    assert mms, "the sample should contain PK cases Bochs answers its own way"
    for mm in mms:
        assert mm.state.pke, mm.render()
        assert not any("after the batch" in d or "missing from" in d for d in mm.differences), mm.render()
        assert_bochs_rules_explain(mm)


def test_profile_implicit_smap_honours_ac_cpl3(bochs):
    """An implicit supervisor read (an LDT descriptor) of a user page at CPL3 with EFLAGS.AC=1
    and CR4.SMAP=1: the SDM (§4.6.1: implicit accesses are always SMAP-checked) says #PF P; Bochs
    lets it through, and so does the model under profile bochs (implicit_smap_honours_ac_cpl3);
    without that field the model says #PF P. Control: AC=0 faults on Bochs too."""
    b = hand_image()
    st = state(b, cr4=CR4_PAE | CR4_SMAP)
    probes = [Probe(URW, user=True, ac=True, implicit=True), Probe(URW, user=True, implicit=True)]
    res = bochs.run(b.memory, st, probes).results
    assert [(r.outcome, r.error_code) for r in res] == [("ok", None), ("page_fault", 0x1)]
    m = walk(st, b.memory, URW, Access("read", user=True, ac=True, implicit=True))
    assert m.outcome == "ok"
    sdm = st.replace(profile=dataclasses.replace(PROFILES["bochs"], implicit_smap_honours_ac_cpl3=False))
    m = walk(sdm, b.memory, URW, Access("read", user=True, ac=True, implicit=True))
    assert (m.outcome, m.error_code) == ("page_fault", 0x1)
    assert bochs_expected(st, b.memory, probes[0]) == ("ok", None)


def test_rules_explain_every_random_table_mismatch(bochs):
    """Random page tables (reserved bits, large leaves, keys, implicit reads): none under profile
    bochs; without its two Bochs fields every mismatch is one of the two deviations above, as
    bochs_expected computes them."""
    from harness.differential import run_conformance
    from harness.matrix import MatrixFeatures
    from harness.random_tables import RandomSource

    feat = MatrixFeatures.from_caps(bochs.capabilities())
    summ = run_conformance(bochs, RandomSource(feat, PROFILES["bochs"], seed=9, cases=1200))
    assert (summ.cases, summ.mismatches) == (1200, 0)
    bare = dataclasses.replace(PROFILES["bochs"], pkru_by_cpl=False, implicit_smap_honours_ac_cpl3=False)
    mms = []
    summ = run_conformance(bochs, RandomSource(feat, bare, seed=9, cases=1200), on_mismatch=mms.append)
    assert summ.cases == 1200 and mms
    for mm in mms:
        # Probes of one tree share entries: when Bochs lets a probe through that the model faults
        # (or the reverse), the entries it used get A/D on one side only, and every case walking
        # them reports that. So entries may differ here, in A (0x20) and D (0x40) only.
        for d in mm.differences:
            assert "missing from" not in d, mm.render()
            if "after the batch" in d:
                assert int(d.rsplit("differs in ", 1)[1].rstrip(")"), 16) & ~0x60 == 0, mm.render()
        assert_bochs_rules_explain(mm)


def test_conform_matrix_slice_has_no_mismatches():
    """The issue's slice: `x86pt conform --oracle bochs --cases matrix --limit 2000`."""
    need_oracle("bochs", OK, REASON)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "x86pt",
            *"conform --oracle bochs --cases matrix --limit 2000 --no-repro".split(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "conform: 0 mismatches in 2000 cases (bochs)" in r.stdout


# -- plumbing -----------------------------------------------------------------------------------------------
def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _leftovers() -> list[str]:
    import tempfile

    return glob.glob(os.path.join(tempfile.gettempdir(), f"x86pt-bochs-{os.getpid()}-*"))


def test_big_batch_is_split_and_ad_carries_over(bochs):
    from harness.oracles.bochs import MAX_PROBES

    b = hand_image()
    C.check_big_batch_split(bochs, b, state(b), MAX_PROBES)


def test_write_into_an_unbacked_frame_comes_back(bochs):
    """A frame the caller's image does not hold (it reads as zeros) that a write probe fills is
    part of the image after the run, as with the other oracles."""
    b = hand_image()
    b.map(0x100000000, 0x900000, 0x1000, flags="rw a d")
    assert 0x900 not in b.memory.pages
    res = bochs.run(b.memory, state(b), [Probe(0x100000010, "write", wvalue=0xABCDEF)])
    check(res.results, [(P(0x100000010, "write"), "ok")])
    assert res.memory_after.read_u64(0x900010) == 0xABCDEF


def test_run_leaves_no_process_and_no_files(bochs):
    b = hand_image()
    bochs.run(b.memory, state(b), [P(KRW)])
    assert bochs.last_pid is not None and not _alive(bochs.last_pid)
    assert not os.path.exists(bochs.last_workdir)
    assert _leftovers() == []


def test_timeout_kills_bochs_and_cleans_up():
    need_oracle("bochs", OK, REASON)
    from harness.oracles.bochs import BochsOracle

    o = BochsOracle(timeout=0.05)
    b = hand_image()
    with pytest.raises(OracleError, match="in time"):
        o.run(b.memory, state(b), [P(KRW)] * 4000)
    assert o.last_pid is not None and not _alive(o.last_pid)
    assert not os.path.exists(o.last_workdir)
    assert _leftovers() == []


def test_bochs_failure_is_an_oracle_error_with_its_message(bochs):
    """A triple fault (no IDT for the #GP of a bad CR4: here the test's CR4.PKS, which tigerlake
    lacks) ends Bochs; the error carries Bochs' own words, and nothing is left behind."""
    b = hand_image()
    st = state(b, cr4=CR4_PAE | (1 << 24))
    with pytest.raises(OracleError) as e:
        bochs.run(b.memory, st, [P(KRW)])
    assert "Bochs" in str(e.value)
    assert not _alive(bochs.last_pid) and _leftovers() == []


def test_bochs_config_error_is_an_oracle_error_with_its_reason():
    """Bochs refusing its configuration (an unknown CPU model) is an OracleError carrying Bochs'
    own words, not a hang or a traceback."""
    need_oracle("bochs", OK, REASON)
    from harness.oracles.bochs import BochsOracle

    b = hand_image()
    o = BochsOracle(cpu="nosuchcpu")
    with pytest.raises(OracleError, match="Bochs is exiting: .*cpu directive malformed"):
        o.run(b.memory, state(b), [P(KRW)])
    assert not _alive(o.last_pid) and _leftovers() == []


def test_bad_image_refused(bochs):
    b = hand_image()
    C.check_bad_image_refused(bochs, b, state(b))


def test_parse_xp_reads_one_and_two_qwords_per_line():
    from harness.oracles.bochs import parse_xp

    lines = [
        "[bochs]:",
        "0x0000000000108000 <bogus+       0>:\t0x00200000\t0x80010001",
        "0x0000000000120000 <bogus+       0>:\t0xff8010b000bc48fa",
        "garbage 0x1 0x2",
    ]
    assert parse_xp(lines) == {0x108000: 0x200000, 0x108008: 0x80010001, 0x120000: 0xFF8010B000BC48FA}


def test_install_script_is_a_no_op_when_installed():
    need_oracle("bochs", OK, REASON)
    r = subprocess.run(
        ["sh", os.path.join(ROOT, "tools", "install_bochs.sh")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "already installed: bochs 2.7" in r.stdout


def test_unavailable_reason_names_the_install_script(monkeypatch):
    import shutil

    import harness.oracles.bochs as hb

    monkeypatch.setattr(shutil, "which", lambda name: None)
    ok, why = hb.available()
    assert not ok and "tools/install_bochs.sh" in why
