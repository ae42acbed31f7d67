"""The vectorised scan equals the scalar reference scan and the walker on random trees
(hypothesis), including loops, shared subtrees, pointers past the end and reserved bits."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as hst

from x86pt.build import Builder
from x86pt.errors import BadInputError, PhysicalAddressError
from x86pt.memory.sparse import SparseMemory
from x86pt.scan import EFF_LOOP, EFF_P, Scanner, scan_reference
from x86pt.state import CR4_LA57, CR4_PAE, PagingState, PROFILES
from x86pt.walk import PageFault, Translation, walk

M46 = 46
TABLES = 6
BASE = 0x10000


@hst.composite
def random_tree(draw):
    """Up to TABLES table pages at BASE; each gets a few entries: a leaf-ish value, a pointer to
    one of the tables (ancestors included: loops), a pointer past the end, or junk."""
    levels = draw(hst.sampled_from([4, 5]))
    mem = SparseMemory(BASE + TABLES * 4096 + 0x3000)
    n = draw(hst.integers(1, TABLES))
    for t in range(n):
        mem.write(BASE + t * 4096, bytes(4096))
        for _ in range(draw(hst.integers(0, 6))):
            idx = draw(hst.integers(0, 511))
            kind = draw(hst.sampled_from(["table", "table", "leaf", "ps", "junk", "past"]))
            flags = draw(hst.integers(0, 0x1FF)) | 1
            xd = draw(hst.sampled_from([0, 1 << 63]))
            if kind == "table":
                v = (BASE + draw(hst.integers(0, n - 1)) * 4096) | (flags & ~0x80) | xd
            elif kind == "leaf":
                v = draw(hst.integers(0, (1 << 40) - 1)) & ~0xFFF | (flags & ~0x80) | xd
            elif kind == "ps":
                v = draw(hst.integers(0, (1 << 40) - 1)) & ~0xFFF | flags | 0x80 | xd
            elif kind == "past":
                v = (1 << 35) | (flags & ~0x80)
            else:
                v = draw(hst.integers(0, (1 << 64) - 1))
            if draw(hst.booleans()) and kind != "junk":
                v |= 1 << draw(hst.integers(M46, 51))  # a reserved address bit
            mem.write_u64(BASE + t * 4096 + 8 * idx, v)
    cr4 = CR4_PAE | (CR4_LA57 if levels == 5 else 0)
    st = PagingState(cr3=BASE, cr4=cr4, profile=PROFILES["intel"], maxphyaddr=M46)
    return mem, st


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_tree(), hst.sampled_from([1, 2, 1024]))
def test_vectorised_equals_reference(tree, batch):
    mem, st = tree
    sc = Scanner(st, mem, batch=batch, max_entries=1 << 16)
    try:
        fast = list(sc.mappings())
    except BadInputError:
        return  # blow-up guard: the reference would be as large
    assert fast == scan_reference(st, mem)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_tree())
def test_scan_agrees_with_the_walker(tree):
    """Every listed mapping translates through walk() to the same frame (or faults with RSVD when
    the scan flagged reserved bits); sampled VAs in the gaps fault as not present."""
    mem, st = tree
    try:
        maps = list(Scanner(st, mem, max_entries=1 << 14).mappings())
    except BadInputError:
        return
    for m in maps[:64]:
        r = walk(st, mem, m.va + 8)
        if m.reserved:
            assert isinstance(r, PageFault) and r.error_code & 8
        else:
            assert isinstance(r, Translation), (hex(m.va), r)
            assert r.pa == m.pa + 8 and r.page_size == m.size
            assert r.rights.writable == m.writable and r.rights.user == m.user
    covered = sorted((m.va, m.end) for m in maps)
    rng = np.random.default_rng(len(maps))
    for va in rng.integers(0, 1 << 47, 32, dtype=np.uint64).tolist():
        va &= ~0xFFF
        if any(a <= va < b for a, b in covered):
            continue
        try:
            r = walk(st, mem, va)
        except PhysicalAddressError:
            continue  # a table past the end: the scan lists nothing below it
        assert isinstance(r, PageFault)  # not present, or RSVD above an empty subtree


def test_uniform_table_is_one_record():
    """A PT of 512 PTEs with equal flags and consecutive frames is one run of 512."""
    b = Builder(levels=4, table_base=0x100000)
    b.map(0xFFFF888000000000, 0x40000000, 2 << 20, 4096, "p rw a d g nx")
    b.map(0xFFFF888000200000, 0x50000000, 4096, 4096, "p rw a d g nx")
    st = b.state()
    chunks = list(Scanner(st, b.memory).chunks())
    counts = np.concatenate([c.count for c in chunks]).tolist()
    assert counts == [512, 1]
    assert list(Scanner(st, b.memory).mappings()) == scan_reference(st, b.memory)


def test_holes_tile_the_address_space():
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 0x3000, 4096, "p rw us")
    b.map(0xFFFFFFFF81000000, 0x1000000, 4 << 20, 2 << 20, "p g")
    st = b.state()
    chunks = list(Scanner(st, b.memory, holes=True).chunks())
    va = np.concatenate([c.va for c in chunks])
    end = np.concatenate([c.va + c.span for c in chunks])
    assert va[0] == 0 and (va[1:] == end[:-1]).sum() == len(va) - 2  # one jump: the hole at bit 47
    assert int(end[-1]) == 0  # wraps at the top


def test_recursive_slot_is_walked_once_per_level_and_flagged():
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 0x1000, 4096, "p rw us")
    b.memory.write_u64(b.root + 510 * 8, b.root | 0x63)
    st = b.state()
    sc = Scanner(st, b.memory)
    maps = list(sc.mappings())
    assert maps == scan_reference(st, b.memory)
    assert any(i.what == "loop" for i in sc.stats.issues)
    # through PML4[510] the PT is mapped at the recursive address of 0x400000's PTE page
    rec = [m for m in maps if m.va >> 39 & 511 == 510]
    assert rec and all(m.size == 4096 for m in rec)
    chunks = list(Scanner(st, b.memory).chunks())
    effs = np.concatenate([c.eff for c in chunks])
    assert (effs & EFF_LOOP).any() and (effs & EFF_P).all()


def test_range_filter_visits_only_overlapping_entries():
    b = Builder(levels=4, table_base=0x100000)
    b.map(0x400000, 0x5000000, 0x10000, 4096, "p rw us")
    st = b.state()
    maps = list(Scanner(st, b.memory, va_range=(0x404000, 0x406000)).mappings())
    assert [m.va for m in maps] == [0x404000, 0x405000]
