"""The access matrix: counts against kvm-unit-tests' (spec/paging.md §10.6, counted there by a C port
of ac_test_bump/ac_test_legal), the product enumeration against the literal bump enumeration, and
the packing of cases into rig images."""
from __future__ import annotations

import numpy as np
import pytest

from harness import matrix as mx
from harness.matrix import MatrixFeatures, MatrixSource, matrix_for
from harness.oracles.base import HARNESS_SLOT, RIG_IMAGE_BASE, RIG_RAM_SIZE
from x86pt.state import profile_named

# (features, §10.6 count)
KUT_COUNTS = [
    (MatrixFeatures(maxphyaddr=40, pku=True), 19_169_280),     # PKU, 37 <= M <= 51
    (MatrixFeatures(maxphyaddr=51, pku=True), 19_169_280),
    (MatrixFeatures(maxphyaddr=37, pku=True), 19_169_280),
    (MatrixFeatures(maxphyaddr=48, pku=False), 1_916_928),     # no PKU, 37 <= M <= 51
    (MatrixFeatures(maxphyaddr=36, pku=True), 28_999_680),     # PKU, M <= 36
    (MatrixFeatures(maxphyaddr=36, pku=False), 2_899_968),     # IvyBridge, phys-bits=36
    (MatrixFeatures(maxphyaddr=52, pku=True), 9_338_880),      # PKU, M = 52
    (MatrixFeatures(maxphyaddr=40, pku=True, fep=True), 38_338_560),   # force_emulation
]


@pytest.mark.parametrize("feat,count", KUT_COUNTS)
def test_matrix_counts_match_kvm_unit_tests(feat, count):
    assert matrix_for(feat).size == count


def test_smep_absent_or_present_gives_the_same_classic_count():
    # SMEP is excluded from the classic matrix either way (commit 73695c95).
    assert matrix_for(MatrixFeatures(smep=False)).size == matrix_for(MatrixFeatures(smep=True)).size


# Fix most free bits so the literal enumeration walks ~2^17 values instead of 2^28.
_SHRINK = (mx.PTE_A | mx.PTE_D | mx.PDE_A | mx.PDE_D | mx.PTE_RW | mx.PDE_RW | mx.PDE_USER
           | mx.ACC_TWICE | mx.PDPTE_RO)


@pytest.mark.parametrize("feat", [MatrixFeatures(maxphyaddr=40, pku=True), MatrixFeatures(maxphyaddr=36, pku=False),
                                  MatrixFeatures(maxphyaddr=52, pku=True), MatrixFeatures(maxphyaddr=48, pku=False)])
def test_product_enumeration_equals_kut_bump_enumeration(feat):
    literal = set(mx.bump_enumerate(feat, extra_invalid=_SHRINK))
    space = mx.classic_space(feat, extra_invalid=_SHRINK)
    ours = space.flags_array(0, space.size).tolist()
    assert len(ours) == len(set(ours)) == len(literal)
    assert set(ours) == literal


def test_every_case_is_legal_and_distinct_on_a_sample():
    feat = MatrixFeatures(maxphyaddr=40)
    m = matrix_for(feat)
    rng = np.random.default_rng(7)
    idx = rng.choice(m.size, 5000, replace=False)
    flags = [m.flags_at(int(i)) for i in idx]
    assert len(set(flags)) == len(flags)
    inv = mx.invalid_mask(feat)
    for f in flags:
        assert mx.kut_legal(f) and not f & inv, mx.flag_names(f)


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
    assert not mx.kut_legal(mx.PTE_NX | mx.PTE_51)                 # NX is reserved without efer.nx
    assert mx.kut_legal(mx.PTE_NX | mx.PTE_51 | mx.EFER_NX)
    assert not mx.kut_legal(mx.SMEP)


def test_flag_names_round_trip():
    f = mx.PTE_RW | mx.PDE_PSE | mx.ACC_TWICE | mx.PKEY
    assert mx.flag_names(f) == "pte.rw pde.pse pkey=1 twice"
    assert mx.flags_from_names("pte.rw pde.pse pkey=1 twice") == f


def test_state_key_pkru_follows_kut():
    cr0, cr4, efer, pkru = mx.state_key(mx.PKE | mx.PKU_AD | mx.CR0_WP_F | mx.EFER_NX)
    assert pkru == 0x34 and cr0 & (1 << 16) and cr4 & (1 << 22) and efer & (1 << 11)
    assert mx.state_key(mx.PKE | mx.PKU_WD)[3] == 0x38
    assert mx.state_key(0)[3] == 0


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
        keys = {mx.state_bits(c.flags) for c in b.cases}
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
        mx.build_batch([("a", 0), ("b", mx.CR0_WP_F)], MatrixFeatures(), profile_named("intel"))


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
