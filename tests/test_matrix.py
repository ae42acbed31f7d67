"""The access matrix: counts against kvm-unit-tests' (docs/paging.md §11.6, counted there by a C port
of ac_test_bump/ac_test_legal), the product enumeration against the literal bump enumeration, and
the packing of cases into rig images."""

from __future__ import annotations

import numpy as np
import pytest

from harness import matrix as mx
from harness import matrix_pack as mp
from harness.matrix import MatrixFeatures, matrix_for
from harness.matrix_pack import MatrixSource
from x86pt.oracle import HARNESS_SLOT, RIG_IMAGE_BASE, RIG_RAM_SIZE
from x86pt.state import profile_named

# (features, §10.6 count)
KUT_COUNTS = [
    (MatrixFeatures(maxphyaddr=40, pku=True), 19_169_280),  # PKU, 37 <= M <= 51
    (MatrixFeatures(maxphyaddr=51, pku=True), 19_169_280),
    (MatrixFeatures(maxphyaddr=37, pku=True), 19_169_280),
    (MatrixFeatures(maxphyaddr=48, pku=False), 1_916_928),  # no PKU, 37 <= M <= 51
    (MatrixFeatures(maxphyaddr=36, pku=True), 28_999_680),  # PKU, M <= 36
    (MatrixFeatures(maxphyaddr=36, pku=False), 2_899_968),  # IvyBridge, phys-bits=36
    (MatrixFeatures(maxphyaddr=52, pku=True), 9_338_880),  # PKU, M = 52
    (MatrixFeatures(maxphyaddr=40, pku=True, fep=True), 38_338_560),  # force_emulation
]


@pytest.mark.parametrize("feat,count", KUT_COUNTS)
def test_matrix_counts_match_kvm_unit_tests(feat, count):
    assert matrix_for(feat).size == count


def test_smep_absent_or_present_gives_the_same_classic_count():
    # SMEP is excluded from the classic matrix either way (commit 73695c95).
    assert matrix_for(MatrixFeatures(smep=False)).size == matrix_for(MatrixFeatures(smep=True)).size


# Fix most free bits so the literal enumeration walks ~2^17 values instead of 2^28.
_SHRINK = (
    mx.PTE_A
    | mx.PTE_D
    | mx.PDE_A
    | mx.PDE_D
    | mx.PTE_RW
    | mx.PDE_RW
    | mx.PDE_USER
    | mx.ACC_TWICE
    | mx.PDPTE_RO
)


@pytest.mark.parametrize(
    "feat",
    [
        MatrixFeatures(maxphyaddr=40, pku=True),
        MatrixFeatures(maxphyaddr=36, pku=False),
        MatrixFeatures(maxphyaddr=52, pku=True),
        MatrixFeatures(maxphyaddr=48, pku=False),
    ],
)
def test_product_enumeration_equals_kut_bump_enumeration(feat):
    literal = set(mx.bump_enumerate(feat, extra_invalid=_SHRINK))
    space = mx.classic_space(feat, extra_invalid=_SHRINK)
    ours = space.flags_array(0, space.size).tolist()
    assert len(ours) == len(set(ours)) == len(literal)
    # The rotations (SMEP/SMAP/AC configurations, where the reserved high bit goes) add no case:
    # without their bits the set is KUT's, and without rotations it is KUT's exactly.
    assert {f & ~space.rotated_bits for f in ours} == literal
    plain = mx.classic_space(feat, extra_invalid=_SHRINK, rotate=False)
    assert set(plain.flags_array(0, plain.size).tolist()) == literal


def test_every_case_is_legal_and_distinct_on_a_sample():
    feat = MatrixFeatures(maxphyaddr=40)
    m = matrix_for(feat)
    rng = np.random.default_rng(7)
    idx = rng.choice(m.size, 5000, replace=False)
    flags = [m.flags_at(int(i)) for i in idx]
    assert len(set(flags)) == len(flags)
    inv = mx.invalid_mask(feat)
    rot = m.spaces[0].rotated_bits
    for f in flags:
        assert mx.kut_legal(f & ~rot) and not f & ~rot & inv, mx.flag_names(f)


def test_flags_at_agrees_with_flags_range():
    m = matrix_for(MatrixFeatures(maxphyaddr=40), extended=True)
    for start in (0, 12345, m.spaces[0].size - 3):
        arr = m.flags_range(start, start + 6)
        assert [int(x) for x in arr] == [m.flags_at(start + k) for k in range(len(arr))]


def test_kut_legal_rules():
    assert not mx.kut_legal(mx.ACC_WRITE | mx.ACC_FETCH)
    assert not mx.kut_legal(mx.PKU_AD)
    assert mx.kut_legal(mx.PKU_AD | mx.PKE)
    assert not mx.kut_legal(mx.PDE_13)
    assert mx.kut_legal(mx.PDE_13 | mx.PDE_PSE)
    assert not mx.kut_legal(mx.PDE_51 | mx.PTE_51)
    assert not mx.kut_legal(mx.PTE_NX | mx.PTE_51)  # NX is reserved without efer.nx
    assert mx.kut_legal(mx.PTE_NX | mx.PTE_51 | mx.EFER_NX)
    assert not mx.kut_legal(mx.SMEP)


def test_flag_names_round_trip():
    f = mx.PTE_RW | mx.PDE_PSE | mx.ACC_TWICE | mx.PKEY
    assert mx.flag_names(f) == "pte.rw pde.pse pkey=1 twice"
    assert mx.flags_from_names("pte.rw pde.pse pkey=1 twice") == f


def test_state_key_pkru_follows_kut():
    cr0, cr4, efer, pkru = mp.state_key(mx.PKE | mx.PKU_AD | mx.CR0_WP_F | mx.EFER_NX)
    assert pkru == 0x34 and cr0 & (1 << 16) and cr4 & (1 << 22) and efer & (1 << 11)
    assert mp.state_key(mx.PKE | mx.PKU_WD)[3] == 0x38
    assert mp.state_key(0)[3] == 0


def _batches(n=3000, extended=False, seed=3):
    prof = profile_named("unicorn")
    feat = MatrixFeatures.from_profile(prof)
    m = matrix_for(feat, extended=extended)
    idx, _, _ = mx.select(m.size, sample=n, seed=seed)
    return list(MatrixSource(m, prof, indices=idx).batches())


def test_packing_follows_the_rig_conventions():
    for b in _batches(extended=True):
        st = b.state
        # the harness slot of the root is free
        assert b.memory.read_u64(st.root + 8 * HARNESS_SLOT) == 0
        for pn in b.memory.pages:
            assert RIG_IMAGE_BASE <= pn * 4096 < RIG_RAM_SIZE
        owned = [e.addr for c in b.cases for e in c.owned]
        assert len(owned) == len(set(owned)), "two cases share an entry"
        vas = {b.probes[c.probes[-1]].va for c in b.cases}
        assert len(vas) == len(b.cases)
        keys = {mp.state_bits(c.flags) for c in b.cases}
        assert len(keys) == 1


def test_twice_adds_a_supervisor_read_first():
    for b in _batches(500):
        for c in b.cases:
            if c.flags & mx.ACC_TWICE:
                first = b.probes[c.probes[0]]
                assert len(c.probes) == 2 and first.access == "read" and not first.user
            else:
                assert len(c.probes) == 1


def test_cases_of_different_cpu_state_cannot_share_a_batch():
    from x86pt.errors import BadInputError

    with pytest.raises(BadInputError):
        mp.build_batch([("a", 0), ("b", mx.CR0_WP_F)], MatrixFeatures(), profile_named("intel"))


def test_select_shards_partition_the_matrix():
    total = 1000
    seen = []
    for i in range(1, 5):
        _, lo, hi = mx.select(total, shard=(i, 4))
        seen.extend(range(lo, hi))
    assert seen == list(range(total))
    idx, _, _ = mx.select(total, sample=50, seed=1)
    idx2, _, _ = mx.select(total, sample=50, seed=1)
    assert list(idx) == list(idx2) and len(set(idx.tolist())) == 50


# -- rotations: SMEP/SMAP in the classic configurations, reserved bits M..51 at every level -----
def test_classic_matrix_runs_under_smep_smap_and_smap_ac():
    # KUT's flags with WP, NX, PKE... fixed: the remaining groups still meet every configuration.
    feat = MatrixFeatures(maxphyaddr=40)
    space = mx.classic_space(feat, extra_invalid=_SHRINK)
    flags = space.flags_array(0, space.size)
    cfg = flags & np.uint64(mx.SMEP | mx.SMAP | mx.ACC_AC)
    want = {0, mx.SMEP, mx.SMAP, mx.SMAP | mx.ACC_AC}
    assert {int(c) for c in np.unique(cfg)} == want
    counts = [int((cfg == np.uint64(c)).sum()) for c in want]
    assert max(counts) - min(counts) <= len(flags) // 20  # a quarter each
    # Every (CPL, access, pte.user, pde.user) combination meets every configuration.
    key = flags & np.uint64(mx.ACC_USER | mx.ACC_WRITE | mx.ACC_FETCH | mx.PTE_USER | mx.PDE_USER)
    pairs = {(int(k), int(c)) for k, c in zip(key, cfg)}
    assert len(pairs) == len({int(k) for k in key}) * len(want)
    # A CPU without SMAP/SMEP gets no configurations it cannot run.
    none = mx.classic_space(MatrixFeatures(maxphyaddr=40, smep=False, smap=False), extra_invalid=_SHRINK)
    assert not (none.flags_array(0, none.size) & np.uint64(mx.SMEP | mx.SMAP | mx.ACC_AC)).any()


@pytest.mark.parametrize("m,levels", [(40, 4), (48, 4), (40, 5), (36, 4)])
def test_reserved_high_bit_reaches_every_bit_from_m_to_51_and_every_level(m, levels):
    feat = MatrixFeatures(maxphyaddr=m, pku=False, la57=levels == 5)
    space = mx.la57_space(feat) if levels == 5 else mx.classic_space(feat)
    flags = space.flags_array(0, space.size)
    seen = set()
    for f in flags[(flags & np.uint64(mx.PTE_51 | mx.PDE_51)) != 0][::7].tolist():
        seen.add(("pte" if f & mx.PTE_51 else mx.hi_at(f), mx.hi_bit(f)))
    ats = ["pte", "pde", "pdpte", "pdpte1g", "pml4e"] + (["pml5e"] if levels == 5 else [])
    assert seen == {(a, b) for a in ats for b in range(m, 52)}


def test_hi_names_round_trip():
    f = mx.flags_from_names("pde.p pde.51 hi.bit=40 hi.at=pml4e")
    assert mx.hi_bit(f) == 40 and mx.hi_at(f) == "pml4e"
    assert mx.flags_from_names(mx.flag_names(f)) == f
    assert mx.hi_bit(mx.PTE_51) == 51 and mx.hi_at(mx.PDE_51) == "pde"
    from x86pt.errors import BadInputError

    for bad in ("hi.bit=53", "hi.at=cr3", "hi.bit=x"):
        with pytest.raises(BadInputError):
            mx.flags_from_names(bad)


def _entries_by_hand(mem, cr3: int, va: int, levels: int) -> list[int]:
    """Raw entries on the walk of va, read straight from the image (SDM §4.5: index = 9 VA bits
    per level, table address = entry bits 39:12 for M=40), stopping at a PS leaf, a non-present
    entry or one with bits 51:40 set (reserved: the walk ends there)."""
    out, table = [], cr3 & ~0xFFF
    for lv in range(levels, 0, -1):
        e = mem.read_u64(table + ((va >> (12 + 9 * (lv - 1))) & 0x1FF) * 8)
        out.append(e)
        if not e & 1 or (lv in (2, 3) and e & 0x80) or e & 0x000FFF0000000000:
            break
        table = e & 0x000000FFFFFFF000
    return out


@pytest.mark.parametrize(
    "at,level_from_top", [("pml5e", 0), ("pml4e", 1), ("pdpte", 2), ("pdpte1g", 2), ("pde", 3)]
)
def test_the_reserved_bit_sits_in_the_named_entry(at, level_from_top):
    levels = 5
    f = mx.flags_from_names(f"la57 pde.p pde.rw pte.p pte.rw pde.51 hi.bit=45 hi.at={at}")
    b = mp.build_batch([("c", f)], MatrixFeatures(maxphyaddr=40, la57=True), profile_named("intel"))
    es = _entries_by_hand(b.memory, b.state.cr3, b.probes[-1].va, levels)
    hit = [k for k, e in enumerate(es) if e >> 45 & 1]
    assert hit == [level_from_top] and len(es) >= level_from_top + 1
    assert all(not (e >> 51) & 1 for e in es)
    if at == "pdpte1g":
        assert es[2] & 0x80  # a 1G leaf
