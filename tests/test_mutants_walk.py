# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests that kill the surviving mutants of x86pt/walk.py (tools/mutate.py x86pt/walk.py).

Every table here is written entry by entry by hand and every expectation — the whole result
record: error code, CR2, reason, level, the entries read and the A/D writes — follows from Intel
SDM Vol. 3A §4.5-§4.8 and §6.15 (#PF error code), or from the oracle profiles' documented
deviations (x86pt/state.py PROFILES, docs/paging.md §11.2/§12.1), never from the walker's output.
"""

from __future__ import annotations

import dataclasses

import pytest

from x86pt.errors import BadInputError, PhysicalAddressError
from x86pt.fields import LEVELS, Kind
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
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
from x86pt.walk import (
    Access,
    GeneralProtection,
    PageFault,
    Rights,
    Step,
    Translation,
    check_rights,
    debug_translate,
    error_code_dont_care,
    translate,
    walk,
)

P, RW, US, PWT, PCD, A, D, PS = 1, 2, 4, 8, 16, 32, 64, 128
EC_P, EC_W, EC_U, EC_RSVD, EC_ID, EC_PK = 1, 2, 4, 8, 16, 32
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
# Indices 1, 2, 3, 4 at PML4/PDPT/PD/PT (VA bits 47:39, 38:30, 29:21, 20:12), page offset 0x122.
VA = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 0x122
E4, E3, E2, E1 = PML4 + 8, PDPT + 16, PD + 24, PT + 32
CR0 = CR0_PE | CR0_PG | CR0_WP
EFER = EFER_LME | EFER_LMA | EFER_NXE


def mem4k(pte: int, *, upper: int = P | RW | US) -> SparseMemory:
    """PML4E -> PDPT, PDPTE -> PD, PDE -> PT, PTE = `pte`; upper entries carry `upper` (A clear)."""
    m = SparseMemory()
    m.write_u64(E4, PDPT | upper)
    m.write_u64(E3, PD | upper)
    m.write_u64(E2, PT | upper)
    m.write_u64(E1, pte)
    return m


def st(profile: str = "intel", **kw) -> PagingState:
    kw.setdefault("cr3", PML4)
    return PagingState(profile=PROFILES[profile], **kw)


# -- result records ----------------------------------------------------------------------------
def test_not_present_pte_fault_record():
    m = mem4k(0)
    r = walk(st(), m, VA, Access("read"))
    assert isinstance(r, PageFault)
    assert (r.va, r.error_code, r.cr2, r.reason, r.level) == (VA, 0, VA, "PTE not present", 1)
    assert [(s.level.number, s.entry_addr, s.raw, s.kind) for s in r.steps] == [
        (4, E4, PDPT | 7, Kind.PML4E),
        (3, E3, PD | 7, Kind.PDPTE),
        (2, E2, PT | 7, Kind.PDE),
        (1, E1, 0, Kind.PTE),
    ]
    # Intel profile: a faulting walk sets A in the non-leaf entries it used (SDM §4.8).
    assert r.ad_writes == ((E4, PDPT | 7 | A), (E3, PD | 7 | A), (E2, PT | 7 | A))
    assert m.read_u64(E4) == PDPT | 7  # update_ad defaults to False: memory untouched


def test_translation_record_and_ad_writes():
    m = mem4k(0x9000 | P | RW)
    r = walk(st(), m, VA, Access("write"))
    assert isinstance(r, Translation)
    # offset 0x122 is even: a frame mask that kept bit 0 (P) would give an odd PA.
    assert (r.va, r.pa, r.page_size, r.level) == (VA, 0x9122, 4096, 1)
    assert r.rights == Rights(writable=True, user=False, executable=True, pkey=0)
    assert r.ad_writes == ((E4, PDPT | 7 | A), (E3, PD | 7 | A), (E2, PT | 7 | A), (E1, 0x9000 | 3 | A | D))
    assert m.read_u64(E1) == 0x9003
    r2 = walk(st(), m, VA, Access("write"), update_ad=True)
    assert m.read_u64(E1) == 0x9003 | A | D and m.read_u64(E4) == PDPT | 7 | A
    assert r2.ad_writes == r.ad_writes
    assert translate(st(), m, VA) == 0x9122
    assert translate(st(), mem4k(0), VA) is None


def test_va_must_be_a_64_bit_value():
    with pytest.raises(BadInputError, match=r"^virtual address 0x10000000000000000 is not a 64-bit value$"):
        walk(st(), mem4k(0), 1 << 64)
    with pytest.raises(BadInputError):
        walk(st(), mem4k(0), -1)
    # the top of the address space is canonical and unmapped here: a fault, not an error
    assert isinstance(walk(st(), mem4k(0), (1 << 64) - 1), PageFault)


def test_non_canonical_gp_record():
    r = walk(st(), mem4k(0), 1 << 47)
    assert isinstance(r, GeneralProtection)
    assert (r.va, r.error_code, r.cr2, r.reason, r.steps) == (
        1 << 47,
        0,
        None,
        "non-canonical address for 48-bit linear addresses",
        (),
    )
    prof = dataclasses.replace(PROFILES["intel"], gp_writes_cr2=True)
    r = walk(PagingState(cr3=PML4, profile=prof), mem4k(0), 1 << 47)
    assert r.cr2 == 1 << 47


# -- CPL3 blind ranges (kvm-epyc-pvm: PML4 slot 256 kept by the host) ---------------------------
BLIND = 0xFFFF800000000000
BLIND_END = 0xFFFF808000000000
BLIND_REASON = (
    "profile kvm-epyc-pvm: CPL3 accesses to 0xffff800000000000-0xffff808000000000 "
    "never reach the guest's tables"
)


@pytest.mark.parametrize("kind,code", [("read", EC_U), ("write", EC_U | EC_W), ("fetch", EC_U | EC_ID)])
def test_blind_range_user_access_faults_without_reading_tables(kind, code):
    s = st("kvm-epyc-pvm", efer=EFER_LME | EFER_LMA)  # NXE=0, SMEP=0: I/D only from the range rule
    for va in (BLIND, BLIND_END - 8):
        r = walk(s, mem4k(0), va, Access(kind, user=True))
        assert isinstance(r, PageFault)
        assert (r.va, r.error_code, r.cr2, r.reason, r.steps, r.level, r.ad_writes) == (
            va,
            code,
            va,
            BLIND_REASON,
            (),
            None,
            (),
        )
        assert error_code_dont_care(s, va, Access(kind, user=True)) == EC_P | EC_RSVD


def test_blind_range_edges_and_supervisor_accesses_walk_the_tables():
    s = st("kvm-epyc-pvm")
    # BLIND_END is outside [start, end); a supervisor access inside is walked normally.
    for va, acc in ((BLIND_END, Access("read", user=True)), (BLIND, Access("read"))):
        r = walk(s, mem4k(0), va, acc)
        assert r.reason.endswith("not present") and len(r.steps) == 1
        assert error_code_dont_care(s, va, acc) == 0
    assert error_code_dont_care(st(), BLIND, Access("read", user=True)) == 0


# -- unbacked physical reads ---------------------------------------------------------------------
def small_mem() -> SparseMemory:
    m = SparseMemory(size=0x10000)
    m.write_u64(E4, 0x20000 | 7)  # PDPT beyond the end of memory
    return m


def test_unbacked_read_error_zero_and_ones():
    with pytest.raises(
        PhysicalAddressError,
        match=r"^PDPT entry at 0x20010 \(for va 0x8080604122\) lies "
        r"outside the image$",
    ) as ei:
        walk(st(), small_mem(), VA)
    assert ei.value.pa == 0x20010
    r = walk(st("unicorn"), small_mem(), VA)  # unicorn reads zeros there (D6)
    assert (r.reason, r.level, r.steps[-1].raw) == ("PDPTE (table) not present", 3, 0)
    prof = dataclasses.replace(PROFILES["intel"], unbacked_read="ones")
    r = walk(PagingState(cr3=PML4, profile=prof), small_mem(), VA)
    # all ones: P=1, PS=1 (1G leaf), bits 51:46 and 29:13 reserved at M=46
    rsvd = (((1 << 52) - 1) & ~((1 << 46) - 1)) | (((1 << 30) - 1) & ~((1 << 13) - 1))
    assert r.steps[-1].raw == (1 << 64) - 1
    assert (r.error_code, r.level, r.reason) == (
        EC_P | EC_RSVD,
        3,
        f"reserved bits {rsvd:#x} set in PDPTE (1GB page)",
    )


# -- reserved bits ---------------------------------------------------------------------------------
def test_reserved_bit_reason_names_only_the_reserved_bits():
    r = walk(st(), mem4k((1 << 51) | 0x9000 | P | RW), VA)
    assert (r.error_code, r.level, r.reason) == (
        EC_P | EC_RSVD,
        1,
        "reserved bits 0x8000000000000 set in PTE",
    )


def test_nxe_off_adds_bit63_to_the_reserved_bits_and_keeps_the_others():
    s = st(efer=EFER_LME | EFER_LMA)
    r = walk(s, mem4k((1 << 51) | 0x9000 | P), VA)
    assert (r.error_code, r.reason) == (EC_P | EC_RSVD, "reserved bits 0x8000000000000 set in PTE")
    r = walk(s, mem4k((1 << 63) | 0x9000 | P), VA)
    assert r.reason == "reserved bits 0x8000000000000000 set in PTE"


def test_pml4e_bit8_reserved_on_amd_but_not_on_qemu_amd():
    m = mem4k(0x9000 | P)
    m.write_u64(E4, PDPT | 7 | (1 << 8))
    r = walk(st("amd"), m, VA)
    assert (r.error_code, r.level, r.reason) == (EC_P | EC_RSVD, 4, "reserved bits 0x100 set in PML4E")
    assert isinstance(walk(st("qemu"), m, VA), Translation)  # QEMU's AMD model ignores bit 8
    m.write_u64(E4, PDPT | 7 | (1 << 45))  # above M=40 still reserved on qemu
    r = walk(st("qemu"), m, VA)
    assert (r.error_code, r.reason) == (EC_RSVD, "reserved bits 0x200000000000 set in PML4E")


def mem1g(leaf: int) -> SparseMemory:
    m = SparseMemory()
    m.write_u64(E4, PDPT | 7)
    m.write_u64(E3, leaf)
    return m


def test_qemu_1g_leaf_high_reserved_bits_checked_before_a():
    r = walk(st("qemu"), mem1g((1 << 45) | (1 << 30) | PS | 7), VA)
    # QEMU: RSVD without P; the high bits fault before A is set in the leaf.
    assert (r.error_code, r.level, r.reason) == (
        EC_RSVD,
        3,
        "reserved bits 0x200000000000 set in PDPTE (1GB page)",
    )
    assert r.ad_writes == ((E4, PDPT | 7 | A),)


def test_qemu_1g_leaf_alignment_bits_checked_after_a():
    leaf = (1 << 30) | (1 << 13) | PS | 7
    r = walk(st("qemu"), mem1g(leaf), VA, Access("write"))
    assert (r.error_code, r.level, r.reason) == (
        EC_RSVD | EC_W,
        3,
        "reserved bits 0x2000 set in PDPTE (1GB page)",
    )
    assert r.ad_writes == ((E4, PDPT | 7 | A), (E3, leaf | A))
    r = walk(st("unicorn"), mem1g(leaf), VA)  # unicorn keeps P=1 in RSVD codes
    assert r.error_code == EC_P | EC_RSVD


def test_qemu_1g_leaf_rights_fault_sets_a_in_the_leaf_only_for_1g():
    leaf = (1 << 30) | PS | P | RW  # supervisor page
    r = walk(st("qemu"), mem1g(leaf), VA, Access("read", user=True))
    assert (r.error_code, r.level, r.reason) == (
        EC_P | EC_U,
        None,
        "user access to a supervisor-mode address",
    )
    assert r.ad_writes == ((E4, PDPT | 7 | A), (E3, leaf | A))
    r = walk(st("intel"), mem1g(leaf), VA, Access("read", user=True))
    assert r.ad_writes == ((E4, PDPT | 7 | A),)
    m = SparseMemory()  # a 2M leaf under qemu: no leaf A write
    m.write_u64(E4, PDPT | 7)
    m.write_u64(E3, PD | 7)
    m.write_u64(E2, (1 << 21) | PS | P | RW)
    r = walk(st("qemu"), m, VA, Access("read", user=True))
    assert r.ad_writes == ((E4, PDPT | 7 | A), (E3, PD | 7 | A))


# -- check_rights reasons -------------------------------------------------------------------------
def rights(w=True, u=True, x=True, key=0):
    return Rights(writable=w, user=u, executable=x, pkey=key)


@pytest.mark.parametrize(
    "state_kw,r,acc,expect",
    [
        ({}, rights(), Access("read"), (False, False, "")),
        (
            {},
            rights(u=False),
            Access("read", user=True),
            (True, False, "user access to a supervisor-mode address"),
        ),
        ({}, rights(w=False), Access("write", user=True), (True, False, "user write to a read-only address")),
        (
            {},
            rights(x=False),
            Access("fetch", user=True),
            (True, False, "fetch from an execute-disabled address"),
        ),
        (
            {"cr4": CR4_PAE | CR4_SMEP},
            rights(),
            Access("fetch"),
            (True, False, "SMEP: supervisor fetch from a user-mode address"),
        ),
        (
            {},
            rights(u=False, x=False),
            Access("fetch"),
            (True, False, "fetch from an execute-disabled address"),
        ),
        (
            {"cr4": CR4_PAE | CR4_SMAP},
            rights(),
            Access("read"),
            (True, False, "SMAP: supervisor data access to a user-mode address with AC=0"),
        ),
        (
            {"cr4": CR4_PAE | CR4_SMAP},
            rights(),
            Access("read", implicit=True, ac=True),
            (True, False, "SMAP: supervisor data access to a user-mode address (implicit)"),
        ),
        (
            {},
            rights(u=False, w=False),
            Access("write"),
            (True, False, "supervisor write to a read-only address with CR0.WP=1"),
        ),
        (
            {"cr4": CR4_PAE | CR4_PKE, "pkru": 1 << 2},
            rights(key=1),
            Access("read", user=True),
            (True, True, "PKRU AD1=1 denies data access"),
        ),
        (
            {"cr4": CR4_PAE | CR4_PKE, "pkru": 1 << 7},
            rights(key=3),
            Access("write", user=True),
            (True, True, "PKRU WD3=1 denies the write"),
        ),
        (
            {"cr4": CR4_PAE | CR4_PKS, "pkrs": 1 << 4},
            rights(u=False, key=2),
            Access("read"),
            (True, True, "PKRS AD2=1 denies data access"),
        ),
        (
            {"cr4": CR4_PAE | CR4_PKE, "pkru": 1 << 2},
            rights(w=False, key=1),
            Access("write", user=True),
            (True, True, "user write to a read-only address; PKRU AD1=1 denies data access"),
        ),
    ],
)
def test_check_rights_reasons(state_kw, r, acc, expect):
    got = check_rights(st(**state_kw), r, acc)
    assert got == expect
    assert [type(v) for v in got] == [bool, bool, str]


def test_error_code_w_bit():
    r = walk(st(), mem4k(0), VA, Access("write"))
    assert r.error_code == EC_W


# -- small records ---------------------------------------------------------------------------------
def test_rights_letters():
    assert rights().letters() == "urwx"
    assert rights(w=False, u=False, x=False).letters() == "-r--"
    assert rights(w=False).letters() == "ur-x"
    assert rights(u=False, x=False).letters() == "-rw-"


def test_access_describe_and_check():
    assert Access("read", implicit=True).describe() == "implicit supervisor read"
    assert Access("write", user=True).describe() == "user write"
    assert Access("fetch", ac=True).describe() == "supervisor fetch AC=1"
    assert Access("read", user=True, implicit=True).user_access is False
    with pytest.raises(BadInputError, match=r"^access must be read, write or fetch, not 'exec'$"):
        Access("exec")


def test_step_to_json():
    s = Step(LEVELS[1], 0x4020, 0x5003, Kind.PTE)
    assert s.to_json() == {
        "level": 1,
        "table": "PT",
        "entry_addr": "0x4020",
        "raw": "0x0000000000005003",
        "kind": "pte",
    }


# -- debug_translate: QEMU's gva2gpa walker (P and PS only) -----------------------------------
def test_debug_translate_4k_2m_1g_and_misses():
    s = st(cr3=PML4 | PWT | PCD)  # CR3 bits 11:0 are not part of the table address
    m = mem4k((1 << 51) | 0x9000 | P | PS)  # bit 7 of a PTE is PAT: still a 4K page; bit 51 leaks in
    assert debug_translate(s, m, VA) == ((1 << 51) | 0x9122, 4096)
    m = SparseMemory()
    m.write_u64(E4, PDPT | P | PS)  # PS in a PML4E is not a leaf for this walker
    m.write_u64(E3, PD | P)
    m.write_u64(E2, (5 << 21) | P | PS)
    assert debug_translate(s, m, VA) == ((5 << 21) | (VA & ((1 << 21) - 1)), 1 << 21)
    m.write_u64(E3, (7 << 30) | P | PS | (1 << 13))  # 1G leaf; reserved bit 13 is masked by alignment
    assert debug_translate(s, m, VA) == ((7 << 30) | (VA & ((1 << 30) - 1)), 1 << 30)
    m.write_u64(E3, PD)  # not present
    assert debug_translate(s, m, VA) is None
    assert debug_translate(s, m, 1 << 47) is None
    m = mem4k(0)
    assert debug_translate(s, m, VA) is None
    m = mem4k(0x9000 | P)
    m.write_u64(E4, 0)
    assert debug_translate(s, m, VA) is None


def test_unicorn_1g_leaf_high_reserved_bits_keep_p():
    # unicorn (like QEMU) checks a 1G leaf's high reserved bits first, but reports RSVD with P=1.
    r = walk(st("unicorn"), mem1g((1 << 45) | (1 << 30) | PS | 7), VA)
    assert (r.error_code, r.reason) == (
        EC_P | EC_RSVD,
        "reserved bits 0x200000000000 set in PDPTE (1GB page)",
    )


def test_translate_honours_the_access():
    m = mem4k(0x9000 | P | RW)  # supervisor page
    assert translate(st(), m, VA, Access("read", user=True)) is None
    assert translate(st(), m, VA | 1, Access("read")) == 0x9123


def test_debug_translate_ignores_cr3_low_bits_and_keeps_odd_offsets():
    s = st(cr3=PML4 | 1)  # CR3 bit 0 is ignored (SDM §4.5.2, PCIDE=0)
    m = mem4k(0x9000 | P)
    assert debug_translate(s, m, VA | 1) == (0x9123, 4096)


# -- the walk's named steps pass the whole record on (x86pt/walk.py: _before_the_walk,
# _reserved_fault, _fault, _complete): address, CR2, and the A writes applied to memory with
# update_ad. SDM §4.5 (reserved bits 51:M, the 1-GByte alignment bits 29:13), §4.8 (a faulting walk
# may set A in the entries it used: profile `used`), §6.15; unicorn's 1G order: docs/paging.md §12.1.
def _record(r) -> tuple:
    return (type(r).__name__, r.va, r.cr2, r.error_code, r.reason, r.level)


def test_step_not_present_fault_writes_a_in_the_entries_used():
    m = mem4k(0)
    r = walk(st(), m, VA, Access("read"), update_ad=True)
    assert _record(r) == ("PageFault", VA, VA, 0, "PTE not present", 1)
    assert [m.read_u64(a) for a in (E4, E3, E2, E1)] == [PDPT | 7 | A, PD | 7 | A, PT | 7 | A, 0]


def test_step_reserved_bit_fault_record_and_a_writes():
    # Intel profile, MAXPHYADDR 46: bit 51 of a PTE is reserved; P|RSVD for a supervisor read.
    m = mem4k(0x9000 | P | RW | (1 << 51))
    r = walk(st(), m, VA, Access("read"), update_ad=True)
    assert _record(r) == ("PageFault", VA, VA, EC_P | EC_RSVD, "reserved bits 0x8000000000000 set in PTE", 1)
    assert [m.read_u64(a) for a in (E4, E3, E2)] == [PDPT | 7 | A, PD | 7 | A, PT | 7 | A]
    assert m.read_u64(E1) == 0x9000 | P | RW | (1 << 51)  # the faulting entry keeps A=0


def test_step_1g_leaf_high_reserved_bit_faults_before_a_on_the_leaf():
    # unicorn: MAXPHYADDR 40, bit 51 reserved; checked before the leaf gets A.
    leaf = 0x40000000 | P | RW | PS | (1 << 51)
    m = mem1g(leaf)
    r = walk(st("unicorn"), m, VA, Access("read"), update_ad=True)
    assert _record(r) == (
        "PageFault",
        VA,
        VA,
        EC_P | EC_RSVD,
        "reserved bits 0x8000000000000 set in PDPTE (1GB page)",
        3,
    )
    assert (m.read_u64(E4), m.read_u64(E3)) == (PDPT | 7 | A, leaf)


def test_step_1g_leaf_alignment_bit_faults_after_a_on_the_leaf():
    # unicorn: bit 13 of a 1G leaf (alignment, reserved) is checked after the leaf gets A.
    leaf = 0x40000000 | (1 << 13) | P | RW | PS
    m = mem1g(leaf)
    r = walk(st("unicorn"), m, VA, Access("read"), update_ad=True)
    assert _record(r) == (
        "PageFault",
        VA,
        VA,
        EC_P | EC_RSVD,
        "reserved bits 0x2000 set in PDPTE (1GB page)",
        3,
    )
    assert (m.read_u64(E4), m.read_u64(E3)) == (PDPT | 7 | A, leaf | A)


def test_step_rights_fault_record():
    # A user read of a supervisor page (US=0 above): #PF with P|U, no level (a rights fault).
    m = mem4k(0x9000 | P | RW | US, upper=P | RW)
    r = walk(st(), m, VA, Access("read", user=True), update_ad=True)
    assert _record(r) == ("PageFault", VA, VA, EC_P | EC_U, "user access to a supervisor-mode address", None)
    assert [m.read_u64(a) for a in (E4, E3, E2)] == [PDPT | 3 | A, PD | 3 | A, PT | 3 | A]


def test_pkru_by_cpl_names_the_register_and_key():
    """Profile field `pkru_by_cpl` (Bochs 2.7, measured: tests/test_oracle_bochs.py PK_TABLE row
    "WP=1, PKRU=0b1000, S page, CPL0, write -> 0x23"): PKRU's WD1 binds a supervisor write to a
    supervisor page with key 1 when CR0.WP=1, and the reason names PKRU and the key."""
    import dataclasses

    from tests.test_oracle_bochs import CR0, KPK, hand_image, state
    from x86pt.state import CR4_PAE, CR4_PKE, PROFILES

    b = hand_image()
    st = state(b, cr0=CR0, cr4=CR4_PAE | CR4_PKE, pkru=0b1000).replace(profile=PROFILES["bochs"])
    r = walk(st, b.memory, KPK + 8, Access("write"))
    assert (r.outcome, r.error_code, r.reason) == ("page_fault", 0x23, "PKRU WD1=1 denies the write")
    # the same access under the manual's rules: keys are for user pages only
    sdm = dataclasses.replace(PROFILES["bochs"], pkru_by_cpl=False)
    assert walk(st.replace(profile=sdm), b.memory, KPK + 8, Access("write")).outcome == "ok"
