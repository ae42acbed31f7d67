# SPDX-License-Identifier: GPL-2.0-or-later
"""The TLB model against expectations derived by hand from the SDM's rules (Intel SDM Vol. 3A
§4.10 "Caching Translation Information"), one rule per test, the section quoted in the docstring.
Expected sets are written out here as the rule gives them, not computed by x86pt."""

from __future__ import annotations

import time

import pytest

from x86pt.build import Builder
from x86pt.state import CR4_PCIDE, CR4_PGE, CR4_SMEP
from x86pt.tlb import (
    CR3_NOFLUSH,
    TLB_FLUSH_ALL,
    FlushDone,
    GeneralProtection,
    TlbSystem,
    Use,
    apply_tlb_op,
    format_tlb_op,
    kernel_range_plan,
    parse_tlb_line,
)
from x86pt.walk import Access, Rights, Translation, walk

KB4, MB2, GB1 = 1 << 12, 1 << 21, 1 << 30
VA4K = 0xFFFF888000001000  # a 4K page (PTE)
VA4K_B = 0xFFFF888000002000  # its neighbour in the same page table
VA2M = 0xFFFF888000200000  # a 2M page (PDE with PS=1)
PA4K, PA4K_B, PA2M = 0x5000, 0x6000, 0x400000
RW_NX = Rights(True, False, False, 0)  # kernel data: supervisor, writable, not executable
RO_NX = Rights(False, False, False, 0)
BIT_RW, BIT_G, BIT_NX, BIT_D = 1 << 1, 1 << 8, 1 << 63, 1 << 6


def image(flags: str = "rw nx g a d"):
    b = Builder(maxphyaddr=46, table_base=0x200000)
    b.map(VA4K, PA4K, KB4, KB4, flags)
    b.map(VA4K_B, PA4K_B, KB4, KB4, flags)
    b.map(VA2M, PA2M, MB2, MB2, flags)
    return b


def system(b, ncpus=2, cr4=CR4_PGE, pcid=0):
    st = b.state(cr4=cr4)
    st = st.replace(cr3=st.cr3 | pcid)
    return TlbSystem(b.memory, st, ncpus)


def tables(pa, size, rights):
    return Use(pa, size, rights)


def change(b, va, level, clear=0, set_=0):
    b.set_entry(va, level, (b.get_entry(va, level) & ~clear) | set_)


# -- §4.10.2: fills and stale entries --------------------------------------------------------------
def test_stale_4k_entry_stays_usable_after_pte_change_without_invalidation():
    """§4.10.2.2: 'The processor may retain a TLB entry unmodified even if software subsequently
    modifies the relevant paging-structure entries in memory'. A read caches RW; the PTE is made
    read-only: the CPU may use either."""
    b = image()
    s = system(b)
    assert s.touch(0, VA4K) == {("ok", PA4K)}
    change(b, VA4K, 1, clear=BIT_RW)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RW_NX), tables(PA4K, KB4, RO_NX)}
    # and a write may succeed through the stale entry, or fault through the tables (P|W)
    assert s.outcomes(0, VA4K, Access("write")) == {("ok", PA4K), ("page_fault", 0b11)}


def test_invlpg_removes_the_stale_entry():
    """§4.10.4.1 INVLPG: 'invalidates any TLB entries that are for a page number corresponding
    to the linear address and that are associated with the current PCID'."""
    b = image()
    s = system(b)
    s.touch(0, VA4K)
    change(b, VA4K, 1, clear=BIT_RW)
    s.invlpg(VA4K, 0)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RO_NX)}


def test_invlpg_anywhere_in_a_2m_page_removes_the_whole_2m_entry():
    """§4.10.2.3 (large pages cached as smaller pieces): 'an execution of INVLPG for a linear
    address on such a page invalidates any and all smaller-page TLB entries for the translation
    of that page'; INVLPG of any address inside the 2M page removes the 2M translation."""
    b = image()
    s = system(b)
    s.touch(0, VA2M + 0x1000)
    change(b, VA2M, 2, clear=BIT_RW)
    assert s.may_use(0, VA2M + 0x1000) == {
        tables(PA2M + 0x1000, MB2, RW_NX),
        tables(PA2M + 0x1000, MB2, RO_NX),
    }
    s.invlpg(VA2M + 0x1FF000, 0)  # the last 4K of the page, not the touched one
    assert s.may_use(0, VA2M + 0x1000) == {tables(PA2M + 0x1000, MB2, RO_NX)}
    assert s.may_use(0, VA2M + 0x100000) == {tables(PA2M + 0x100000, MB2, RO_NX)}


def test_a_fault_caches_nothing():
    """§4.10.2.3: a TLB entry exists only for a page number whose walk has P=1 and no reserved
    bits; §4.10.4.1: a page fault invalidates the TLB entries for the faulting page number and
    the paging-structure-cache entries used for it. A write to a read-only page faults: nothing
    is left cached for it."""
    b = image("ro nx g a d")
    s = system(b)
    assert s.touch(0, VA4K, Access("write")) == {("page_fault", 0b11)}
    assert not list(s.cpus[0].entries())
    assert not list(s.cpus[0].psc_entries())
    b.unmap(VA4K_B)
    assert s.touch(0, VA4K_B) == {("page_fault", 0)}
    assert not list(s.cpus[0].entries())


def test_rw_0_to_1_without_invalidation_allows_a_spurious_fault():
    """§4.10.4.3: 'If a paging-structure entry is modified to change the R/W flag from 0 to 1,
    failure to perform an invalidation may result in a "spurious" page-fault exception'. The
    cached read-only entry may make the write fault (P|W); the walk lets it through."""
    b = image("ro nx g a d")
    s = system(b)
    s.touch(0, VA4K)
    change(b, VA4K, 1, set_=BIT_RW)
    assert s.outcomes(0, VA4K, Access("write")) == {("ok", PA4K), ("page_fault", 0b11)}


def test_a_page_fault_removes_the_stale_entries_for_its_page():
    """§4.10.4.1: 'a page-fault exception resulting from an attempt to use a linear address will
    invalidate any TLB entries that are for a page number corresponding to that linear address
    and that are associated with the current PCID'. A read-only entry stays cached after the PTE
    is cleared; a write faults whichever way the CPU translates (stale RO entry: P|W; tables:
    not present, W), so the fault happens and the stale entry is gone: a read now only faults."""
    b = image("ro nx g a d")
    s = system(b)
    s.touch(0, VA4K)
    b.unmap(VA4K)
    assert s.outcomes(0, VA4K) == {("ok", PA4K), ("page_fault", 0)}
    assert s.touch(0, VA4K, Access("write")) == {("page_fault", 0b11), ("page_fault", 0b10)}
    assert s.outcomes(0, VA4K) == {("page_fault", 0)}
    assert s.may_use(0, VA4K) == {Use(None, None, None)}


def test_an_entry_cached_with_d0_is_not_used_for_a_write():
    """§4.10.2.2: a TLB entry holds the dirty flag; §4.8: every write sets D in the leaf. An
    entry cached by a read with D=0 cannot complete a write without a walk, so after the PTE
    becomes read-only a write can only see the tables (fault); a read may still use it."""
    b = image("rw nx g a")  # D=0
    s = system(b)
    s.touch(0, VA4K)
    change(b, VA4K, 1, clear=BIT_RW)
    assert s.may_use(0, VA4K, Access("write")) == {tables(PA4K, KB4, RO_NX)}
    assert s.may_use(0, VA4K, Access("read")) == {tables(PA4K, KB4, RW_NX), tables(PA4K, KB4, RO_NX)}


# -- §4.10.2.4 global pages, MOV to CR3, MOV to CR4 ----------------------------------------------
def test_global_entries_survive_mov_cr3_but_not_a_pge_toggle():
    """§4.10.4.1 MOV to CR3 (PCIDE=0): 'invalidates all TLB entries associated with PCID 000H
    except those for global pages'; MOV to CR4: 'invalidates all TLB entries (including global
    entries) ... if it changes the value of CR4.PGE'."""
    b = image()
    s = system(b)
    s.touch(0, VA4K)
    change(b, VA4K, 1, clear=BIT_RW)
    c = s.cpus[0]
    c.mov_cr3(c.state.cr3)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RW_NX), tables(PA4K, KB4, RO_NX)}
    c.toggle_pge()
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RO_NX)}


def test_non_global_entries_do_not_survive_mov_cr3():
    """§4.10.4.1 MOV to CR3 with PCIDE=0: non-global entries of PCID 000H go."""
    b = image("rw nx a d")
    s = system(b)
    s.touch(0, VA4K)
    change(b, VA4K, 1, clear=BIT_RW)
    s.cpus[0].mov_cr3(s.cpus[0].state.cr3)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RO_NX)}


def test_g_without_cr4_pge_is_not_global():
    """§4.10.2.4: an entry is global only if G=1 in the leaf and CR4.PGE=1."""
    b = image()
    s = system(b, cr4=0)
    s.touch(0, VA4K)
    change(b, VA4K, 1, clear=BIT_RW)
    s.cpus[0].mov_cr3(s.cpus[0].state.cr3)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RO_NX)}


# -- §4.10.1 PCIDs -------------------------------------------------------------------------------
def pcid_system(flags="rw nx a d"):
    b = image(flags)
    return b, system(b, cr4=CR4_PGE | CR4_PCIDE, pcid=1)


def test_mov_cr3_with_bit63_keeps_the_old_pcids_entries():
    """§4.10.4.1 MOV to CR3, PCIDE=1: 'If ... bit 63 of the instruction's source operand is 1,
    the instruction is not required to invalidate any TLB entries'; entries of another PCID are
    not used (§4.10.2.3) but are kept for when the PCID returns."""
    b, s = pcid_system()
    c = s.cpus[0]
    root = c.state.root
    s.touch(0, VA4K)
    change(b, VA4K, 1, clear=BIT_RW)
    c.mov_cr3(root | 2 | CR3_NOFLUSH)
    assert c.state.cr3 == root | 2  # bit 63 is not stored
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RO_NX)}  # PCID 2 sees no PCID-1 entry
    c.mov_cr3(root | 1 | CR3_NOFLUSH)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RW_NX), tables(PA4K, KB4, RO_NX)}


def test_mov_cr3_without_bit63_flushes_only_the_new_pcid():
    """§4.10.4.1: bit 63 clear 'invalidates all TLB entries associated with the PCID specified
    in bits 11:0 ... It is not required to invalidate entries ... associated with other PCIDs'."""
    b, s = pcid_system()
    c = s.cpus[0]
    root = c.state.root
    s.touch(0, VA4K)  # cached under PCID 1
    change(b, VA4K, 1, clear=BIT_RW)
    c.mov_cr3(root | 2)  # flushes PCID 2 only
    c.mov_cr3(root | 1 | CR3_NOFLUSH)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RW_NX), tables(PA4K, KB4, RO_NX)}
    c.mov_cr3(root | 1)  # now PCID 1 itself
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RO_NX)}


def _two_pcids_and_a_global():
    """VA4K and VA4K_B cached non-global under PCID 1, VA4K again under PCID 2, VA2M global;
    then all three leaves made read-only. Returns (builder, system)."""
    b = image("rw nx a d")
    change(b, VA2M, 2, set_=BIT_G)
    s = system(b, cr4=CR4_PGE | CR4_PCIDE, pcid=1)
    c = s.cpus[0]
    root = c.state.root
    s.touch(0, VA4K)
    s.touch(0, VA4K_B)
    s.touch(0, VA2M)
    c.mov_cr3(root | 2 | CR3_NOFLUSH)
    s.touch(0, VA4K)
    c.mov_cr3(root | 1 | CR3_NOFLUSH)
    for va, lv in ((VA4K, 1), (VA4K_B, 1), (VA2M, 2)):
        change(b, va, lv, clear=BIT_RW)
    return b, s


def stale(s, va, cpu=0):
    return any(u.rights is not None and u.rights.writable for u in s.may_use(cpu, va))


def held(s, pcid, va, cpu=0):
    return any(e.pcid == pcid and e.contains(va) for e in s.cpus[cpu].entries())


def test_invpcid_type0_individual_address():
    """§4.10.4.1 INVPCID type 0: 'invalidates mappings—except global translations—for the
    linear address and PCID specified'."""
    b, s = _two_pcids_and_a_global()
    c = s.cpus[0]
    c.invpcid(0, 1, VA4K)
    assert not held(s, 1, VA4K) and held(s, 1, VA4K_B) and held(s, 2, VA4K)
    c.invpcid(0, 1, VA2M)
    assert stale(s, VA2M)  # global: kept


def test_invpcid_type1_single_context():
    """INVPCID type 1: 'invalidates all mappings—except global translations—associated with the
    PCID specified'."""
    b, s = _two_pcids_and_a_global()
    s.cpus[0].invpcid(1, 1)
    assert not held(s, 1, VA4K) and not held(s, 1, VA4K_B)
    assert held(s, 2, VA4K) and stale(s, VA2M)


def test_invpcid_type2_all_including_globals():
    """INVPCID type 2: 'invalidates all mappings—including global translations—associated with
    any PCID'."""
    b, s = _two_pcids_and_a_global()
    s.cpus[0].invpcid(2)
    assert not list(s.cpus[0].entries()) and not list(s.cpus[0].psc_entries())


def test_invpcid_type3_all_but_globals():
    """INVPCID type 3: 'invalidates all mappings—except global translations—associated with any
    PCID'."""
    b, s = _two_pcids_and_a_global()
    s.cpus[0].invpcid(3)
    assert [e.page for e in s.cpus[0].entries()] == [VA2M]
    assert stale(s, VA2M) and not stale(s, VA4K) and not held(s, 2, VA4K)


def test_invlpg_removes_a_global_entry_made_under_another_pcid():
    """§4.10.4.1 INVLPG: 'It also invalidates any global TLB entries with that page number,
    regardless of PCID'."""
    b, s = _two_pcids_and_a_global()
    c = s.cpus[0]
    c.mov_cr3(c.state.root | 2 | CR3_NOFLUSH)
    assert stale(s, VA2M)  # the PCID-1 global entry is usable here
    c.invlpg(VA2M + 0x5000)
    assert not stale(s, VA2M)


def test_cr4_pcide_and_smep_changes():
    """§4.10.4.1 MOV to CR4: PCIDE 1->0 invalidates everything; SMEP 0->1 invalidates all
    entries of the current PCID. §4.10.1: setting PCIDE needs CR3[11:0] = 0 (#GP)."""
    b, s = _two_pcids_and_a_global()
    c = s.cpus[0]
    c.mov_cr4(c.state.cr4 | CR4_SMEP)
    assert not held(s, 1, VA4K) and not held(s, 1, VA2M) and held(s, 2, VA4K)
    c.mov_cr3(c.state.root | 2 | CR3_NOFLUSH)
    c.mov_cr3(c.state.root | 0 | CR3_NOFLUSH)
    c.mov_cr4(c.state.cr4 & ~CR4_PCIDE)
    assert not list(c.entries())
    c.mov_cr3(c.state.root | 0x5)  # PCIDE=0: bits 11:0 are not a PCID
    with pytest.raises(GeneralProtection):
        c.mov_cr4(c.state.cr4 | CR4_PCIDE)


# -- several CPUs --------------------------------------------------------------------------------
def test_a_second_cpu_keeps_its_entry_after_the_first_cpus_invlpg():
    """§4.10.4.1 lists instructions that invalidate the executing logical processor's caches;
    §4.10.5 ('Propagation of Paging-Structure Changes to Multiple Processors'): software must
    invalidate on every processor (a TLB shootdown)."""
    b = image()
    s = system(b, ncpus=2)
    s.touch(0, VA4K)
    s.touch(1, VA4K)
    change(b, VA4K, 1, clear=BIT_RW)
    s.invlpg(VA4K, 0)
    assert s.may_use(0, VA4K) == {tables(PA4K, KB4, RO_NX)}
    assert s.may_use(1, VA4K) == {tables(PA4K, KB4, RW_NX), tables(PA4K, KB4, RO_NX)}
    assert [(d.cpu, d.kind, d.severity) for d in s.differences()] == [(1, "rw", "dangerous")]


# -- §4.10.3 paging-structure caches ----------------------------------------------------------------
def test_a_cached_pde_keeps_a_changed_pde_usable():
    """§4.10.3.1: 'If the processor creates a PDE-cache entry, the processor may retain it
    unmodified even if software subsequently modifies the corresponding PDE in memory';
    §4.10.3.2: a PDE-cache entry for the address lets the processor read the PTE from the cached
    table. VA4K_B was never accessed (no TLB entry), but its PDE was cached by VA4K's walk: after
    the PDE is pointed at a new page table, the old table still translates it. INVLPG of any
    address removes every paging-structure-cache entry of the PCID (§4.10.4.1)."""
    b = image()
    s = system(b)
    s.touch(0, VA4K)
    old_pde = b.get_entry(VA4K, 2)
    new_pt = b.alloc_table()
    pte_b = b.get_entry(VA4K_B, 1)
    b.memory.write_u64(new_pt | (((VA4K_B >> 12) & 0x1FF) << 3), (pte_b & ~0xFFFFFFFFF000) | 0x9000)
    b.set_entry(VA4K, 2, (old_pde & ~0xFFFFFFFFF000) | new_pt)
    assert s.may_use(0, VA4K_B) == {tables(0x9000, KB4, RW_NX), tables(PA4K_B, KB4, RW_NX)}
    srcs = {u.source for u in s.may_use(0, VA4K_B)}
    assert srcs == {"tables", "PDE-cache"}
    kinds = {(d.kind, d.severity, d.start, d.end) for d in s.differences(0)}
    assert ("table", "dangerous", VA4K & ~(MB2 - 1), (VA4K & ~(MB2 - 1)) + MB2) in kinds
    assert ("frame", "dangerous", VA4K_B, VA4K_B + KB4) in kinds
    s.invlpg(VA2M, 0)  # any address
    assert s.may_use(0, VA4K_B) == {tables(0x9000, KB4, RW_NX)}


def test_model_walk_agrees_with_the_walker():
    """The tables' translation in the model is the walker's (x86pt.walk, SDM §4.5/§4.6)."""
    b = image()
    s = system(b)
    st = s.cpus[0].state
    for va in (VA4K, VA4K_B + 0x123, VA2M + 0x1ABCD):
        w = walk(st, b.memory, va)
        assert isinstance(w, Translation)
        assert s.table_use(0, va) == Use(w.pa, w.page_size, w.rights)


# -- the difference report --------------------------------------------------------------------
def test_differences_kinds_and_severities_after_a_split():
    """A 2M entry cached before its page is split and changed piece by piece without a flush:
    RW kept after read-only, X kept after NX (here: NX kept after X, benign), present kept after
    not-present, another frame. Dangerous = the cached translation allows more (§4.10.4.3 lists
    the opposite cases as spurious faults only)."""
    b = image("rw x g a d")
    s = system(b, ncpus=2)
    s.touch(1, VA2M)
    pde = b.get_entry(VA2M, 2)
    b.set_entry(VA2M, 2, 0)  # split: a page table of 512 PTEs
    b.map(VA2M, PA2M, MB2, KB4, "rw x g a d")
    change(b, VA2M + 0x1000, 1, clear=BIT_RW)  # RW kept after read-only
    change(b, VA2M + 0x2000, 1, set_=BIT_NX)  # X kept after NX
    b.unmap(VA2M + 0x3000)  # present kept after not-present
    change(b, VA2M + 0x4000, 1, clear=0xFFFFFFFFF000, set_=0x7000)  # another frame
    assert pde & 1
    got = [(d.cpu, d.start - VA2M, d.end - VA2M, d.kind, d.severity) for d in s.differences()]
    assert got == [
        (1, 0x1000, 0x2000, "rw", "dangerous"),
        (1, 0x2000, 0x3000, "x", "dangerous"),
        (1, 0x3000, 0x4000, "present", "dangerous"),
        (1, 0x4000, 0x5000, "frame", "dangerous"),
    ]
    assert s.differences(0) == []


def test_differences_benign_when_the_cached_entry_is_more_restrictive():
    """§4.10.4.3: R/W 0->1 or XD 1->0 without invalidation: 'a spurious page-fault exception
    ... but no other adverse behavior'."""
    b = image("ro nx g a d")
    s = system(b)
    s.speculate(0, VA4K, VA4K + KB4)
    change(b, VA4K, 1, set_=BIT_RW, clear=BIT_NX)
    got = sorted((d.kind, d.severity) for d in s.differences())
    assert got == [("rw", "benign"), ("x", "benign")]


def test_differences_are_merged_into_ranges_and_fast_on_a_64g_direct_map():
    """The report works per cached entry: a 64 GiB direct map of 1G pages, all cached on two
    CPUs; one 1G page split down to 2M and one 2M to 4K, 40 pages made read-only: one merged
    range per CPU, found without visiting every address."""
    base = 0xFFFF888000000000
    b = Builder(maxphyaddr=46, table_base=0x100000)
    b.map(base, 0, 64 * GB1, GB1, "rw nx g a d")
    s = TlbSystem(b.memory, b.state(cr4=CR4_PGE), 2)
    assert s.speculate(None, base, base + 64 * GB1) == 64
    victim = base + 5 * GB1
    b.set_entry(victim, 3, 0)
    b.map(victim, 5 * GB1, GB1, MB2, "rw nx g a d")
    b.set_entry(victim, 2, 0)
    b.map(victim, 5 * GB1, MB2, KB4, "rw nx g a d")
    for i in range(8, 48):
        change(b, victim + i * KB4, 1, clear=BIT_RW)
    t0 = time.perf_counter()
    got = [(d.cpu, d.start, d.end, d.kind, d.severity) for d in s.differences()]
    assert time.perf_counter() - t0 < 5
    assert got == [
        (0, victim + 8 * KB4, victim + 48 * KB4, "rw", "dangerous"),
        (1, victim + 8 * KB4, victim + 48 * KB4, "rw", "dangerous"),
    ]
    s.flush_all()
    assert s.differences() == []


# -- the kernel's flushes and trace ops -----------------------------------------------------------
def test_flush_tlb_kernel_range_ceiling():
    """arch/x86/mm/tlb.c flush_tlb_kernel_range: per-page INVLPG up to
    tlb_single_page_flush_ceiling (33) pages, else a full flush; up to v6.14 the test is on
    bytes (end - start > 33 << PAGE_SHIFT), from v6.15 on whole pages ((end - start) >>
    PAGE_SHIFT > 33, commit 4a02ed8e1cc3)."""
    a = 0xFFFF888000000000
    assert kernel_range_plan(a, a + 33 * KB4) == tuple(a + i * KB4 for i in range(33))
    assert kernel_range_plan(a, a + 34 * KB4) is None
    assert kernel_range_plan(a, a + 33 * KB4 + 1, "6.14") is None
    assert len(kernel_range_plan(a, a + 33 * KB4 + 1, "6.15")) == 34
    assert kernel_range_plan(0, TLB_FLUSH_ALL) is None


def test_trace_ops_round_trip_and_apply():
    lines = [
        "flush_tlb_all",
        "flush_tlb_kernel_range 0xffff888000200000 0xffff888000202000",
        "flush_tlb_local 1",
        "invlpg 0xffff888000001000",
        "invlpg 0xffff888000001000 1",
        "touch 0 0xffff888000001000 2 write",
        "touch all 0xffff888000001000 1 read user",
        "speculate all 0xffff888000000000 0xffff888000400000",
        "mov_cr3 0 0x200000",
        "mov_cr4 1 0xa0",
        "invpcid 0 3 0x0 0x0",
    ]
    for line in lines:
        op = parse_tlb_line(line)
        assert parse_tlb_line(format_tlb_op(op)) == op, line
    assert parse_tlb_line("set_memory_ro 0x1000 1") is None
    assert parse_tlb_line("  # comment") is None
    b = image()
    s = system(b)
    apply_tlb_op(s, parse_tlb_line("touch all 0xffff888000200000"))
    change(b, VA2M, 2, clear=BIT_RW)
    assert len(s.differences()) == 2
    done = apply_tlb_op(s, parse_tlb_line("flush_tlb_kernel_range 0xffff888000200000 0xffff888000202000"))
    assert done == FlushDone(pages=(VA2M, VA2M + KB4), cpus=(0, 1))
    assert s.differences() == []


def test_prune_keeps_only_stale_entries():
    """With prune (a replay that re-fills each range before changing it), entries equal to the
    tables are dropped after the report and stale ones kept, so what is held stays small."""
    b = image()
    s = system(b)
    s.speculate(0, VA4K, VA2M + MB2)
    change(b, VA4K, 1, clear=BIT_RW)
    assert [(d.start, d.kind) for d in s.differences(prune=True)] == [(VA4K, "rw")]
    assert [e.page for e in s.cpus[0].entries()] == [VA4K]
    assert not list(s.cpus[0].psc_entries())
    assert s.differences(prune=True)[0].kind == "rw"


def test_mov_cr0_clearing_pg_removes_everything_and_invlpg_of_a_noncanonical_address_is_a_nop():
    """§4.10.4.1 MOV to CR0: 'invalidates all TLB entries (including global entries) and all
    entries in all paging-structure caches (for all PCIDs) if it changes the value of CR0.PG from
    1 to 0'. Vol. 2A INVLPG: with a non-canonical operand 'INVLPG is the same as a NOP'."""
    b = image()
    s = system(b)
    s.touch(0, VA4K)
    c = s.cpus[0]
    c.invlpg(0x0000800000000000)
    assert list(c.entries()) and list(c.psc_entries())
    c.mov_cr0(c.state.cr0 & ~(1 << 31))
    assert not list(c.entries()) and not list(c.psc_entries())
