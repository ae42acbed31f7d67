"""The access matrix's small rules (harness/matrix.py) shown to fail on wrong answers: case names,
the reserved-high-bit fields, KUT's invalid mask and legality rule, run selection (shards, limits,
samples) and the probe cap. Expectations are written by hand from kvm-unit-tests' access test as
docs/paging.md §11 describes it and from the functions' stated contracts, not from their output."""

from __future__ import annotations

import numpy as np
import pytest

from harness import matrix as mx
from harness.matrix import (
    F,
    MatrixFeatures,
    _probe_cuts,
    flag_names,
    flags_from_names,
    hi_at,
    hi_bit,
    invalid_mask,
    kut_legal,
    probe_cap,
    select,
)
from x86pt.errors import BadInputError

HB, HA = 1 << 40, 1 << 46  # one unit of the hi.bit field (bits 45:40) and of hi.at (48:46)


def test_the_flag_bits_are_kut_s_order():
    assert (F["pte.rw"], F["pte.user"], F["pde.p"], F["efer.nx"], F["fep"], F["cr4.smap"], F["implicit"]) == (
        1,
        2,
        1 << 14,
        1 << 26,
        1 << 30,
        1 << 31,
        1 << 38,
    )


@pytest.mark.parametrize(
    "flags,name",
    [
        (0, "(none)"),
        (1 | 1 << 14, "pte.rw pde.p"),
        (1 << 38 | 1 << 22, "user implicit"),
        (1 << 6 | 40 * HB, "pte.51 hi.bit=40"),
        (1 << 15 | 3 * HA, "pde.51 hi.at=pml4e"),
        (45 * HB | 4 * HA, "hi.bit=45 hi.at=pml5e"),
    ],
)
def test_flag_names(flags, name):
    assert flag_names(flags) == name
    assert flags_from_names(name if flags else "") == flags


def test_hi_fields():
    assert hi_bit(0) == 51 and hi_bit(12 * HB) == 12 and hi_bit(51 * HB | 1 << 6) == 51
    assert [hi_at(i * HA) for i in range(5)] == ["pde", "pdpte", "pdpte1g", "pml4e", "pml5e"]


def test_flags_from_names_accepts_commas_and_the_bit_range_ends():
    assert flags_from_names("pte.rw, pde.p") == 1 | 1 << 14
    assert flags_from_names("hi.bit=12") == 12 * HB and flags_from_names("hi.bit=51") == 51 * HB
    assert flags_from_names("hi.at=pde") == 0 and flags_from_names("hi.at=pdpte") == HA


@pytest.mark.parametrize(
    "text,msg",
    [
        ("hi.bit=11", "bad 'hi.bit=11' (a bit number 12..51)"),
        ("hi.bit=52", "bad 'hi.bit=52' (a bit number 12..51)"),
        ("hi.bit=x", "bad 'hi.bit=x' (a bit number 12..51)"),
        ("hi.at=pt", "bad 'hi.at=pt' (one of pde, pdpte, pdpte1g, pml4e, pml5e)"),
        ("pte.rw bogus", "unknown matrix flag 'bogus'"),
    ],
)
def test_bad_flag_names(text, msg):
    with pytest.raises(BadInputError) as e:
        flags_from_names(text)
    assert str(e.value) == msg


def test_invalid_mask_per_feature():
    """ac_test_bump never toggles a flag the CPU cannot test: bit 51 when M >= 52 (not reserved),
    bit 36 when M >= 37, FEP without forced emulation, PKU flags without PKU, SMEP without SMEP."""
    b36 = F["pde.36"] | F["pte.36"]
    b51 = F["pde.51"] | F["pte.51"]
    pku = F["pkru.ad"] | F["pkru.wd"] | F["pkey=1"] | F["cr4.pke"]
    assert invalid_mask(MatrixFeatures()) == b36 | F["fep"]
    assert invalid_mask(MatrixFeatures(maxphyaddr=36)) == F["fep"]
    assert invalid_mask(MatrixFeatures(maxphyaddr=37)) == b36 | F["fep"]
    assert invalid_mask(MatrixFeatures(maxphyaddr=51)) == b36 | F["fep"]
    assert invalid_mask(MatrixFeatures(maxphyaddr=52)) == b51 | b36 | F["fep"]
    assert invalid_mask(MatrixFeatures(maxphyaddr=36, fep=True)) == 0
    assert invalid_mask(MatrixFeatures(maxphyaddr=36, pku=False)) == F["fep"] | pku
    assert invalid_mask(MatrixFeatures(maxphyaddr=36, smep=False)) == F["fep"] | F["cr4.smep"]


@pytest.mark.parametrize(
    "names,legal",
    [
        ("", True),
        ("cr4.smep", False),  # excluded since KUT commit 73695c95
        ("fetch write", False),
        ("fetch", True),
        ("write", True),
        ("pkru.ad", False),
        ("pkru.wd", False),
        ("pkru.ad cr4.pke", True),
        ("pkru.wd cr4.pke", True),
        ("pde.13", False),
        ("pde.13 pde.pse", True),
        ("pde.51", True),
        ("pde.51 pte.36", False),
        ("pte.51 pte.36", False),
        ("pde.36 pde.13 pde.pse", False),
        ("pte.nx", True),
        ("pte.nx pde.51", False),
        ("pte.nx pde.51 efer.nx", True),
        ("pte.nx pde.nx", False),
        ("pte.nx pde.nx efer.nx", True),
    ],
)
def test_kut_legal(names, legal):
    assert kut_legal(flags_from_names(names)) is legal


def test_select_shards_limits_and_samples():
    assert select(10) == (None, 0, 10)
    assert select(10, shard=(1, 3)) == (None, 0, 3)
    assert select(10, shard=(2, 3)) == (None, 3, 6)
    assert select(10, shard=(3, 3)) == (None, 6, 10)
    assert select(10, shard=(2, 3), limit=2) == (None, 3, 5)
    assert select(10, shard=(2, 3), limit=9) == (None, 3, 6)
    assert select(10, limit=4) == (None, 0, 4)
    idx, a, b = select(10, shard=(2, 3), sample=10, seed=3)  # the sample is the whole shard
    assert (idx.tolist(), a, b) == ([3, 4, 5], 0, 0)
    idx, _, _ = select(1000, sample=50, seed=7)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50 and idx.tolist() == sorted(idx.tolist())
    assert 0 <= idx.min() and idx.max() < 1000
    assert select(1000, sample=50, seed=7)[0].tolist() == idx.tolist()
    assert select(1000, sample=50, seed=8)[0].tolist() != idx.tolist()
    assert select(1000, sample=50, seed=7, limit=5)[0].tolist() == idx.tolist()[:5]
    idx2, _, _ = select(1000, shard=(2, 2), sample=20, seed=1)
    assert idx2.min() >= 500 and idx2.max() < 1000


def test_probe_cap():
    class O:
        pass

    o = O()
    assert probe_cap(o) is None
    for v, want in ((5, 5), (2, 2), (1, None), (0, None), (True, None), ("5", None), (None, None)):
        o.max_probes = v
        assert probe_cap(o) == want


def test_probe_cuts():
    assert _probe_cuts(np.array([3, 2, 4, 1]), 5) == [(0, 2), (2, 4)]
    assert _probe_cuts(np.array([7, 1]), 5) == [(0, 1), (1, 2)]  # a case alone may exceed
    assert _probe_cuts(np.array([1, 1, 1]), 3) == [(0, 3)]
    assert _probe_cuts(np.array([1, 1, 1]), 1) == [(0, 1), (1, 2), (2, 3)]
    assert _probe_cuts(np.array([], dtype=np.int64), 4) == []


def test_module_constants():
    assert (mx.HI_BIT_SHIFT, mx.HI_AT_SHIFT, mx.NR_AC_FLAGS) == (40, 46, 31)


# -- group A of the mutation runs (tools/mutate.py harness/matrix.py --only ...): names, features,
# KUT's enumeration, selection -----------------------------------------------------------------------
def test_a_second_equals_sign_is_part_of_the_value():
    # "hi.bit=40=40" is not a bit number, "hi.at=pde=pde" not an entry name: both are rejected whole
    for text in ("hi.bit=40=40", "hi.at=pde=pde"):
        with pytest.raises(BadInputError) as e:
            flags_from_names(text)
        assert str(e.value).startswith(f"bad {text!r}")


def test_names_after_the_hi_fields_are_still_read():
    assert flags_from_names("hi.at=pdpte pte.rw") == HA | 1
    assert flags_from_names("hi.bit=40 pte.user") == 40 * HB | 2


def test_features_from_capabilities():
    from x86pt.oracle import Capabilities

    caps = Capabilities(
        name="t",
        vendor="amd",
        maxphyaddr=43,
        gbpages=False,
        la57=True,
        pku=False,
        smep=False,
        smap=True,
        implicit_cpl0=True,
        implicit_cpl3=False,
        ram_size=1 << 26,
    )
    assert MatrixFeatures.from_caps(caps) == MatrixFeatures(
        maxphyaddr=43,
        pku=False,
        smep=False,
        smap=True,
        gbpages=False,
        la57=True,
        fep=False,
        vendor="amd",
        ram_size=1 << 26,
        implicit_cpl0=True,
        implicit_cpl3=False,
    )
    caps2 = Capabilities(
        name="t",
        vendor="intel",
        maxphyaddr=40,
        gbpages=True,
        la57=False,
        pku=True,
        smep=True,
        smap=False,
        implicit_cpl0=False,
        implicit_cpl3=True,
    )
    f2 = MatrixFeatures.from_caps(caps2)
    assert (f2.implicit_cpl0, f2.implicit_cpl3, f2.smap, f2.pku, f2.gbpages, f2.la57) == (
        False,
        True,
        False,
        True,
        True,
        False,
    )

    # an oracle's Capabilities without the implicit fields (an older plugin): no implicit cases
    class Old:
        name, vendor, maxphyaddr, gbpages, la57, pku, smep, smap = (
            "o",
            "intel",
            40,
            True,
            True,
            True,
            True,
            True,
        )
        ram_size = 1 << 27

    f3 = MatrixFeatures.from_caps(Old())  # type: ignore[arg-type]
    assert (f3.implicit_cpl0, f3.implicit_cpl3) == (False, False)


def test_features_from_a_profile():
    from x86pt.state import Features, Profile

    p = Profile(
        name="t",
        vendor="amd",
        maxphyaddr=39,
        features=Features(gbpages=False, la57=True, pku=False, smep=False, smap=True),
    )
    assert MatrixFeatures.from_profile(p) == MatrixFeatures(
        maxphyaddr=39, pku=False, smep=False, smap=True, gbpages=False, la57=True, vendor="amd"
    )
    q = Profile(name="q", features=Features(gbpages=True, la57=False, pku=True, smep=True, smap=False))
    fq = MatrixFeatures.from_profile(q, maxphyaddr=45)
    assert (fq.maxphyaddr, fq.gbpages, fq.la57, fq.pku, fq.smep, fq.smap, fq.vendor) == (
        45,
        True,
        False,
        True,
        True,
        False,
        "intel",
    )


def test_bump_enumeration_starts_like_kut():
    """KUT's first cases with M = 40 and no PKU: every value of the low 7 flags (pte.rw .. pte.51)
    except NX together with bit 51 (two reserved bits: NX is reserved without efer.nx); pte.36
    (bit 7) is never toggled for M >= 37, so after 127 comes 256 (pde.rw)."""
    import itertools

    want = [x for x in range(128) if x & 0x50 != 0x50] + [256]
    got = list(itertools.islice(mx.bump_enumerate(MatrixFeatures(maxphyaddr=40, pku=False)), len(want)))
    assert got == want


def test_select_default_seed_is_zero():
    assert select(1000, sample=30)[0].tolist() == select(1000, sample=30, seed=0)[0].tolist()
