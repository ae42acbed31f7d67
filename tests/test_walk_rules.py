"""Hand-derived expectations from the manuals' rules (SDM Vol. 3A §4.5-§4.8, §6.15 "Interrupt 14";
docs/paging.md §2-§10), written here row by row — not computed by x86pt."""

from __future__ import annotations

import itertools

import pytest

from x86pt.build import Builder
from x86pt.errors import PhysicalAddressError
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
    Features,
    PagingState,
    PROFILES,
    Profile,
)
from x86pt.walk import Access, GeneralProtection, PageFault, Translation, walk

P, W, U, RSVD, ID, PK = 1, 2, 4, 8, 16, 32


# -- the §5.3 decision table, one row per (access, address type), every switch enumerated --------
# Row text (docs/paging.md §7.3) -> the function below is a literal transcription of the table cell.
def expected(acc, cpl3, ac, addr_user, writable, executable, wp, smep, smap, pke, ad, wd):
    """Return the #PF error code, or None for 'allowed'. `executable` already folds NXE."""
    err = (W if acc == "write" else 0) | (U if cpl3 else 0) | (ID if acc == "fetch" else 0)
    deny, keydeny = False, False
    if cpl3:
        if not addr_user:  # "user x / supervisor-mode address: fault"
            deny = True
        elif acc == "read":  # "allowed (PKRU AD check)"
            keydeny = pke and ad
        elif acc == "write":  # "needs writable; PKRU AD/WD check"
            deny = not writable
            keydeny = pke and (ad or wd)
        else:  # "needs executable; no key check"
            deny = not executable
    else:
        if acc == "fetch":
            deny = (addr_user and smep) or not executable  # "SMEP=1 -> fault; else needs executable"
        elif not addr_user:  # supervisor-mode address
            deny = acc == "write" and wp and not writable  # (PKS not enabled in this table)
        else:  # user-mode address
            smap_fault = smap and not ac
            if acc == "read":
                deny = smap_fault
                keydeny = pke and ad
            else:
                deny = smap_fault or (wp and not writable)
                keydeny = pke and (ad or (wd and wp))
    if not (deny or keydeny):
        return None
    return err | P | (PK if keydeny else 0)


def one_page_image(leaf_flags: str, pk: int = 0):
    b = Builder(maxphyaddr=46, table_base=0x200000)
    b.map(0x7000, 0x9000, 4096, 4096, leaf_flags, pk=pk)
    return b


def test_rights_decision_table_every_row():
    images = {}
    for us, rw, xd in itertools.product((0, 1), repeat=3):
        flags = "p" + (" us" if us else "") + (" rw" if rw else "") + (" nx" if xd else "")
        images[(us, rw, xd)] = one_page_image(flags, pk=1)
    n = 0
    for (us, rw, xd), b in images.items():
        for acc, cpl3, ac, wp, smep, smap, pke, nxe, ad, wd in itertools.product(
            ("read", "write", "fetch"),
            (False, True),
            (False, True),
            (False, True),
            (False, True),
            (False, True),
            (False, True),
            (False, True),
            (False, True),
            (False, True),
        ):
            if cpl3 and ac:
                continue  # AC only matters at CPL<3
            cr0 = CR0_PE | CR0_PG | (CR0_WP if wp else 0)
            cr4 = CR4_PAE | (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0) | (CR4_PKE if pke else 0)
            efer = EFER_LME | EFER_LMA | (EFER_NXE if nxe else 0)
            pkru = (1 << 2 if ad else 0) | (1 << 3 if wd else 0)  # key 1
            st = PagingState(cr3=b.root, cr0=cr0, cr4=cr4, efer=efer, pkru=pkru)
            if xd and not nxe:
                exp = (
                    (W if acc == "write" else 0)
                    | (U if cpl3 else 0)
                    | (ID if acc == "fetch" and smep else 0)
                    | P
                    | RSVD
                )
            else:
                exp = expected(
                    acc, cpl3, ac, bool(us), bool(rw), not (xd and nxe), wp, smep, smap, pke, ad, wd
                )
                if exp is not None and acc == "fetch" and not (nxe or smep):
                    exp &= ~ID  # I/D only with NXE or SMEP (SDM §4.7)
            r = walk(st, b.memory, 0x7123, Access(acc, user=cpl3, ac=ac))
            got = None if isinstance(r, Translation) else r.error_code
            assert got == exp, (us, rw, xd, acc, cpl3, ac, wp, smep, smap, pke, nxe, ad, wd, r)
            n += 1
    assert n == 8 * 3 * 3 * 2**7


def test_rights_fold_across_levels():
    # RW and US ANDed, XD ORed (SDM §4.6.1): clear RW in the PDPTE, US in the PDE, set XD in PML4E.
    b = Builder(maxphyaddr=46, table_base=0x200000)
    b.map(0x40000000, 0x9000, 4096, 4096, "p rw us")
    st = b.state()
    for level, clear, setbit, acc, user, code in (
        (3, 2, 0, "write", True, P | W | U),
        (2, 4, 0, "read", True, P | U),
        (4, 0, 1 << 63, "fetch", False, P | ID),
    ):
        mem = b.memory.copy()
        a = b.entry_address(0x40000000, level, create=False)
        mem.write_u64(a, (mem.read_u64(a) & ~clear) | setbit)
        r = walk(st, mem, 0x40000000, Access(acc, user=user))
        assert isinstance(r, PageFault) and r.error_code == code


# -- reserved bits (docs/paging.md §5), one rule at a time ---------------------------------------------
def rsvd_case(profile="intel", m=46, levels=4, gb=True):
    b = Builder(
        maxphyaddr=m,
        levels=levels,
        table_base=0x200000,
        vendor=PROFILES[profile].vendor if isinstance(profile, str) else profile.vendor,
    )
    b.map(0x200000, 0x400000, 4096, 4096, "p rw us")  # 4K
    b.map(0x40000000, 0x40000000, 1 << 21, 1 << 21, "p rw us")  # 2M
    b.map(0x80000000, 0x80000000, 1 << 30, 1 << 30, "p rw us")  # 1G
    return b


@pytest.mark.parametrize(
    "va,level,bit,profile,m,rsvd",
    [
        (0x200000, 1, 45, "intel", 46, False),  # below MAXPHYADDR: an address bit
        (0x200000, 1, 46, "intel", 46, True),  # 51:M reserved
        (0x200000, 1, 51, "intel", 46, True),
        (0x200000, 1, 52, "intel", 46, False),  # 58:52 ignored
        (0x200000, 1, 51, "intel", 52, False),  # M=52: nothing reserved up there
        (0x200000, 2, 46, "intel", 46, True),  # non-leaf PDE too
        (0x200000, 4, 7, "intel", 46, True),  # PS in PML4E
        (0x200000, 4, 8, "intel", 46, False),  # PML4E bit 8: ignored on Intel
        (0x200000, 4, 8, "amd", 48, True),  # ... reserved on AMD
        (0x200000, 3, 8, "amd", 48, False),  # PDPTE bit 8: ignored on AMD too
        (0x200000, 1, 7, "intel", 46, False),  # PTE bit 7 is PAT
        (0x200000, 2, 6, "intel", 46, False),  # non-leaf bit 6 ignored
        (0x40000000, 2, 13, "intel", 46, True),  # 2M leaf: 20:13 reserved
        (0x40000000, 2, 20, "intel", 46, True),
        (0x40000000, 2, 12, "intel", 46, False),  # 2M leaf bit 12 is PAT
        (0x40000000, 2, 21, "intel", 46, False),  # an address bit (frame moves, no fault)
        (0x80000000, 3, 13, "intel", 46, True),  # 1G leaf: 29:13 reserved
        (0x80000000, 3, 29, "intel", 46, True),
        (0x80000000, 3, 12, "intel", 46, False),  # 1G leaf bit 12 is PAT
        (0x80000000, 3, 59, "intel", 46, False),  # key bits: not reserved
    ],
)
def test_reserved_bit_rules(va, level, bit, profile, m, rsvd):
    b = rsvd_case(profile, m)
    a = b.entry_address(va, level, create=False)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << bit)
    st = b.state(profile=profile, maxphyaddr=m)
    r = walk(st, b.memory, va + 0x10, Access("read"))
    if rsvd:
        assert isinstance(r, PageFault) and r.error_code == P | RSVD and r.level == level, r
    else:
        assert not (isinstance(r, PageFault) and r.error_code & RSVD), r


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_bit63_is_reserved_at_every_level_when_nxe_is_0(level):
    b = rsvd_case()
    a = b.entry_address(0x200000, level, create=False)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << 63)
    st = b.state(efer=EFER_LME | EFER_LMA)
    r = walk(st, b.memory, 0x200000, Access("write", user=True))
    assert isinstance(r, PageFault) and r.error_code == P | W | U | RSVD and r.level == level
    st = b.state()
    assert isinstance(walk(st, b.memory, 0x200000, Access("read")), Translation)


def test_ps_in_pdpte_is_reserved_without_1g_pages_and_qemu_accepts_it():
    b = rsvd_case()
    no_gb = Profile("nogb", features=Features(gbpages=False))
    r = walk(b.state(profile=no_gb), b.memory, 0x80001000, Access("read"))
    assert isinstance(r, PageFault) and r.error_code == P | RSVD and r.level == 3
    q = Profile("q", features=Features(gbpages=False), ps_1g_without_gbpages=True)
    assert isinstance(walk(b.state(profile=q), b.memory, 0x80001000, Access("read")), Translation)


def test_ps_in_pml5e_is_reserved():
    b = rsvd_case(levels=5)
    a = b.entry_address(0x200000, 5, create=False)
    b.memory.write_u64(a, b.memory.read_u64(a) | 0x80)
    r = walk(b.state(), b.memory, 0x200000, Access("read"))
    assert isinstance(r, PageFault) and r.error_code == P | RSVD and r.level == 5


def test_first_entry_that_ends_the_walk_wins():
    # Not-present above beats reserved below; reserved beats a rights fault (docs/paging.md §8).
    b = rsvd_case()
    pte = b.entry_address(0x200000, 1, create=False)
    pde = b.entry_address(0x200000, 2, create=False)
    pml4 = b.entry_address(0x200000, 4, create=False)
    b.memory.write_u64(pte, b.memory.read_u64(pte) | 1 << 50)
    b.memory.write_u64(pml4, b.memory.read_u64(pml4) & ~4)  # US=0 up top
    r = walk(b.state(), b.memory, 0x200000, Access("read", user=True))
    assert r.error_code == P | U | RSVD and r.level == 1  # RSVD, not the US fault
    b.memory.write_u64(pde, 0)
    r = walk(b.state(), b.memory, 0x200000, Access("read", user=True))
    assert r.error_code == U and r.level == 2  # P=0, nothing below read
    assert len(r.steps) == 3


def test_rsvd_without_p_in_the_qemu_profile():
    b = rsvd_case(m=40)
    a = b.entry_address(0x200000, 1, create=False)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << 45)
    r = walk(b.state(profile="qemu"), b.memory, 0x200000, Access("write"))
    assert r.error_code == W | RSVD  # 0x0a, docs/paging.md §12.1


# -- canonical addresses (SDM §3.3.7.1; sandpile's holes) -----------------------------------------
@pytest.mark.parametrize(
    "levels,va,canonical",
    [
        (4, 0x00007FFFFFFFFFFF, True),
        (4, 0x0000800000000000, False),
        (4, 0xFFFF7FFFFFFFFFFF, False),
        (4, 0xFFFF800000000000, True),
        (4, 0xFFFFFFFFFFFFFFFF, True),
        (4, 0x0100000000000000, False),
        (5, 0x00FFFFFFFFFFFFFF, True),
        (5, 0x0100000000000000, False),
        (5, 0x0000800000000000, True),
        (5, 0xFEFFFFFFFFFFFFFF, False),
        (5, 0xFF00000000000000, True),
        (5, 0xFFFF800000000000, True),
    ],
)
def test_canonical_boundaries(levels, va, canonical):
    b = Builder(levels=levels, table_base=0x200000)
    st = b.state()
    r = walk(st, b.memory, va, Access("read"))
    if canonical:
        assert isinstance(r, PageFault) and r.error_code == 0  # walked, found nothing
    else:
        assert isinstance(r, GeneralProtection) and r.error_code == 0 and r.cr2 is None and r.steps == ()


def test_five_level_walk_reaches_the_upper_half_of_57_bits():
    b = Builder(levels=5, table_base=0x200000)
    va = 0x00FF_8000_0000_0000 | 0x1234_5000
    b.map(va & ~0xFFF, 0xABC000, 4096, 4096, "p rw")
    r = walk(b.state(), b.memory, va | 0x678, Access("read"))
    assert isinstance(r, Translation) and r.pa == 0xABC678 and len(r.steps) == 5
    assert [s.level.number for s in r.steps] == [5, 4, 3, 2, 1]


# -- A/D (SDM §4.8, docs/paging.md §9) --------------------------------------------------------------------
def test_ad_on_success_fault_and_wp0():
    b = Builder(table_base=0x200000, table_flags="p rw us")  # tables start with A=0
    b.map(0x1000, 0x9000, 4096, 4096, "p us")
    entries = [b.entry_address(0x1000, lv, create=False) for lv in (4, 3, 2, 1)]
    raw0 = [b.memory.read_u64(a) for a in entries]
    st = b.state()
    mem = b.memory.copy()
    r = walk(st, mem, 0x1000, Access("write", user=True), update_ad=True)  # protection fault
    assert isinstance(r, PageFault)
    assert mem.read_u64(entries[3]) == raw0[3]  # leaf untouched, no D
    assert all(mem.read_u64(a) == r0 | 0x20 for a, r0 in zip(entries[:3], raw0[:3]))  # 'used' upper A
    mem = b.memory.copy()
    walk(b.state(profile="kvm-epyc-pvm"), mem, 0x1000, Access("write", user=True), update_ad=True)
    assert [mem.read_u64(a) for a in entries] == raw0  # KVM: nothing on faults
    mem = b.memory.copy()
    walk(st, mem, 0x1000, Access("read"), update_ad=True)
    assert [mem.read_u64(a) for a in entries] == [r | 0x20 for r in raw0]  # A everywhere, no D
    mem = b.memory.copy()
    wp0 = b.state(cr0=CR0_PE | CR0_PG)
    r = walk(wp0, mem, 0x1000, Access("write"), update_ad=True)  # sup write, WP=0, RO page
    assert isinstance(r, Translation)
    assert mem.read_u64(entries[3]) == raw0[3] | 0x60  # D set although RW=0
    assert mem.read_u64(entries[2]) == raw0[2] | 0x20  # no D in a non-leaf


def test_a_set_on_a_faulting_1g_leaf_in_the_qemu_profile_only():
    b = Builder(maxphyaddr=40, table_base=0x200000, table_flags="p rw us")
    b.map(0x40000000, 0x40000000, 1 << 30, 1 << 30, "p rw")
    e = b.entry_address(0x40000000, 3, create=False)
    b.memory.write_u64(e, b.memory.read_u64(e) | 1 << 13)
    for prof, expect_a in (("qemu", True), ("unicorn", True), ("intel", False)):
        mem = b.memory.copy()
        r = walk(b.state(profile=prof), mem, 0x40000000, Access("read"), update_ad=True)
        assert isinstance(r, PageFault) and r.error_code & RSVD
        assert bool(mem.read_u64(e) & 0x20) == expect_a, prof


# -- protection keys ---------------------------------------------------------------------------------
def test_key_comes_from_the_leaf_only():
    # KUT puts key 2 in the non-leaf PDE and key 1 in the leaf and denies key 2 (docs/paging.md §4 notes).
    b = Builder(table_base=0x200000)
    b.map(0x1000, 0x9000, 4096, 4096, "p rw us", pk=1)
    pde = b.entry_address(0x1000, 2, create=False)
    b.memory.write_u64(pde, b.memory.read_u64(pde) | 2 << 59)
    st = b.state(cr4=CR4_PAE | CR4_PKE, pkru=0b110000)  # AD2|WD2
    assert isinstance(walk(st, b.memory, 0x1000, Access("write", user=True)), Translation)
    st = b.state(cr4=CR4_PAE | CR4_PKE, pkru=0b0100)  # AD1
    assert walk(st, b.memory, 0x1000, Access("read", user=True)).error_code == P | U | PK
    st = b.state(cr4=CR4_PAE, pkru=0xFFFFFFFC)  # PKE=0: keys ignored
    assert isinstance(walk(st, b.memory, 0x1000, Access("write", user=True)), Translation)


def test_pk_reported_together_with_another_denial():
    # SMAP denies and the key denies: PK is set whenever the key denies (SDM §4.7).
    b = Builder(table_base=0x200000)
    b.map(0x1000, 0x9000, 4096, 4096, "p rw us", pk=1)
    st = b.state(cr4=CR4_PAE | CR4_PKE | CR4_SMAP, pkru=0b0100)
    assert walk(st, b.memory, 0x1000, Access("read")).error_code == P | PK


def test_pks_on_supervisor_pages():
    # pks.c: AD faults regardless of WP; WD faults only with WP=1; user pages ignore PKRS.
    b = Builder(table_base=0x200000)
    b.map(0x1000, 0x9000, 4096, 4096, "p rw", pk=3)
    b.map(0x2000, 0xA000, 4096, 4096, "p rw us", pk=3)
    prof = Profile("pks", features=Features(pks=True))
    ad = b.state(cr4=CR4_PAE | CR4_PKS, pkrs=1 << 6, profile=prof)
    wd = b.state(cr4=CR4_PAE | CR4_PKS, pkrs=1 << 7, profile=prof)
    wd0 = b.state(cr0=CR0_PE | CR0_PG, cr4=CR4_PAE | CR4_PKS, pkrs=1 << 7, profile=prof)
    assert walk(ad, b.memory, 0x1000, Access("read")).error_code == P | PK
    assert walk(wd, b.memory, 0x1000, Access("write")).error_code == P | W | PK
    assert isinstance(walk(wd0, b.memory, 0x1000, Access("write")), Translation)
    assert isinstance(walk(ad, b.memory, 0x2000, Access("read", user=True)), Translation)
    assert isinstance(walk(ad, b.memory, 0x1000, Access("fetch")), Translation)  # keys never stop fetches


# -- SMAP and implicit accesses --------------------------------------------------------------------
def test_implicit_supervisor_access_ignores_ac_except_in_the_qemu_profile():
    b = Builder(table_base=0x200000)
    b.map(0x1000, 0x9000, 4096, 4096, "p rw us")
    for prof, cpl3, ok in (
        ("intel", False, False),
        ("intel", True, False),
        ("qemu", False, True),
        ("qemu", True, False),
    ):
        st = b.state(cr4=CR4_PAE | CR4_SMAP, profile=prof)
        r = walk(st, b.memory, 0x1000, Access("read", user=cpl3, ac=True, implicit=True))
        assert isinstance(r, Translation) == ok, (prof, cpl3)
        if not ok:
            assert r.error_code == P  # implicit at CPL3 is a supervisor access: no U bit


# -- bad memory --------------------------------------------------------------------------------------
def test_table_pointer_past_the_end_is_a_clear_error():
    mem = SparseMemory(size=0x10000)
    mem.write_u64(0x1000, 0x7FFF000 | 7)  # PML4E -> far beyond memory
    st = PagingState(cr3=0x1000)
    with pytest.raises(PhysicalAddressError, match="outside"):
        walk(st, mem, 0x0, Access("read"))
    u = walk(st.replace(profile=PROFILES["unicorn"]), mem, 0x0, Access("read"))
    assert isinstance(u, PageFault) and u.error_code == 0  # unicorn reads 0 there (D6)


def test_self_referencing_table_cannot_loop():
    mem = SparseMemory()
    mem.write_u64(0x1000, 0x1000 | 7)  # PML4[0] -> PML4 itself (recursive map)
    st = PagingState(cr3=0x1000)
    r = walk(st, mem, 0x0, Access("read"))
    assert len(r.steps) == 4  # a walk has at most one step per level
    assert isinstance(r, Translation) and r.pa == 0x1000
