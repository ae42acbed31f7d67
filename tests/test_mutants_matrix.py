"""The access matrix's small rules (harness/matrix.py) shown to fail on wrong answers: case names,
the reserved-high-bit fields, KUT's invalid mask and legality rule, run selection (shards, limits,
samples) and the probe cap. Expectations are written by hand from kvm-unit-tests' access test as
docs/paging.md §11 describes it and from the functions' stated contracts, not from their output."""

from __future__ import annotations

import numpy as np
import pytest

from harness import matrix as mx
from harness import matrix_pack as mp
from harness.matrix import (
    F,
    MatrixFeatures,
    flag_names,
    flags_from_names,
    hi_at,
    hi_bit,
    invalid_mask,
    kut_legal,
    select,
)
from harness.matrix_pack import _probe_cuts, probe_cap
from x86pt.errors import BadInputError
from x86pt.state import profile_named

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


# -- group D: packing cases into one image, checked by walking the image by hand ----------------------
ADDR40 = 0x000000FFFFFFF000  # address bits 39:12 of an entry when MAXPHYADDR = 40 (SDM Vol. 3A §4.5)
P, RW, US, A, D, PS, NX = 1, 2, 4, 0x20, 0x40, 0x80, 1 << 63
KEY1, KEY2 = 1 << 59, 2 << 59  # protection key field, bits 62:59 (SDM §4.6.2)


def _walk_image(mem, cr3: int, va: int, levels: int = 4):
    """[(entry address, entry)] from the top down, following address bits 39:12 whatever else is
    set (reserved bits included), to the leaf (PS at PDPTE/PDE level, or the PTE); and the
    physical address the walk ends at (SDM §4.5: 9 VA bits per level, 2M/1G offsets from the VA)."""
    out, table = [], cr3 & ADDR40
    for lv in range(levels, 0, -1):
        addr = table + ((va >> (12 + 9 * (lv - 1))) & 0x1FF) * 8
        e = mem.read_u64(addr)
        out.append((addr, e))
        if lv == 3 and e & PS:
            return out, (e & ADDR40 & ~0x3FFFFFFF) | (va & 0x3FFFFFFF)
        if lv == 2 and e & PS:
            return out, (e & ADDR40 & ~0x1FFFFF) | (va & 0x1FFFFF)
        table = e & ADDR40
    return out, table | (va & 0xFFF)


# (flags, [entry bits outside 39:12 from the top down], VA) — the bits written by hand from the
# flag meanings (docs/paging.md §11.1/§11.4): PML4E/PDPTE P|RW|US (pdpte.ro: no RW), pkey=1 puts key
# 1 in the leaf and key 2 in the PDE above it; the VAs from the layout rule of the module's
# docstring: PML4 index 292 (then 293, 294 for the next top-level variants), PDPT index by the
# order the PDEs/1G leaves are taken, one PDE and one PTE per case in order, the case's frame and
# offset in the low bits of a 2M/1G leaf's VA (case n: frame n % 16, qword n // 16; a 4K case's
# PTE maps its frame).
TOP = 0xFFFF920000000000  # PML4 index 292, sign-extended from bit 47
HAND_CASES = [
    ("pte.p pte.rw pde.p pde.rw", [P | RW | US, P | RW | US, P | RW, P | RW], TOP),
    (
        "pte.p pte.user pte.a pte.d pte.nx pde.p pde.user pde.a pde.d pde.nx pkey=1 user fetch",
        [P | RW | US, P | RW | US, P | US | A | D | NX | KEY2, P | US | A | D | NX | KEY1],
        TOP | 1 << 21 | 1 << 12,  # PDE 1, PTE 1 (the PTE maps frame 1)
    ),
    ("pde.p pde.rw pde.pse write", [P | RW | US, P | RW | US, P | RW | PS], TOP | 2 << 21 | 0x2000),
    (
        "pdpte.1g pde.p pde.rw pde.user twice",
        [P | RW | US, P | RW | US | PS],
        TOP | 1 << 30 | 0x200000 | 0x3000,  # the 1G leaf maps frame 0: VA 29:0 = the PA
    ),
    (
        "pte.p pte.51 hi.bit=45 pde.p",
        [P | RW | US, P | RW | US, P, P | 1 << 45],
        TOP | 3 << 21 | 2 << 12,
    ),
    ("pte.p pde.p pde.51", [P | RW | US, P | RW | US, P | 1 << 51, P], TOP | 4 << 21 | 3 << 12),
    (
        "pte.p pde.p pdpte.ro",
        [P | RW | US, P | US, P, P],
        TOP | 2 << 30 | 0 << 21 | 4 << 12,  # a PDPTE of its own (read-only), its PD's PDE 0
    ),
    ("pte.p pde.p pml4e.ps", [P | RW | US | PS, P | RW | US, P, P], 0xFFFF928000000000 | 5 << 12),
    (
        "pte.p pde.p pml4e.8 implicit ac",
        [P | RW | US | 0x100, P | RW | US, P, P],
        0xFFFF930000000000 | 6 << 12,
    ),
    ("pte.p pde.p pde.13 noncanon", [P | RW | US, P | RW | US, P, P], None),  # bit 13: large leaves only
    ("pdpte.1g pde.p pkey=1", [P | RW | US, P | PS | KEY1], TOP | 3 << 30 | 0x20A000),  # PDPTE 3
    ("pde.p pde.pse pkey=1", [P | RW | US, P | RW | US, P | PS | KEY1], TOP | 6 << 21 | 0xB000),  # PDE 6
    ("pte.rw pde.p", [P | RW | US, P | RW | US, P, RW], TOP | 7 << 21 | 8 << 12),  # a not-present PTE
    ("pdpte.1g pde.rw", [P | RW | US, PS | RW], TOP | 4 << 30 | 0x20D000),  # a not-present 1G leaf
    ("pte.p pde.rw", [P | RW | US, P | RW | US, RW, P], TOP | 8 << 21 | 9 << 12),  # a not-present PDE
    ("pde.rw pde.pse", [P | RW | US, P | RW | US, PS | RW], TOP | 9 << 21 | 0xF000),  # a not-present 2M leaf
]


def _hand_batch():
    feat = MatrixFeatures(maxphyaddr=40)
    cases = [(f"c{n}", flags_from_names(names)) for n, (names, _, _) in enumerate(HAND_CASES)]
    return mp.build_batch(cases, feat, profile_named("intel")), cases


def test_packing_by_hand_entries_vas_and_targets():
    b, cases = _hand_batch()
    assert [c.label for c in b.cases] == [lbl for lbl, _ in cases]
    for n, ((names, bits, want_va), info) in enumerate(zip(HAND_CASES, b.cases)):
        target = 0x200000 + (n % 16) * 4096 + 8 * (n // 16)
        probe = b.probes[info.probes[-1]]
        va = probe.va
        if "noncanon" in names:
            assert va >> 48 == 0xBFFF, names  # bit 62 flipped in an upper-half VA
            va ^= 1 << 62
        elif want_va is not None:
            assert va == want_va, (names, hex(va))
        walk, pa = _walk_image(b.memory, b.state.cr3, va)
        assert [e & ~ADDR40 for _, e in walk] == bits, names
        assert pa == target, names
        assert info.frames == (target & ~0xFFF,) and info.flags == cases[n][1] and info.description == ""
        # the entries a case owns are its leaf and (4K) its PDE, as they stand in the image
        kinds = {"pdpte.1g": ("pdpte1g",), "pde.pse": ("pde2m",)}
        want_kinds = next((k for key, k in kinds.items() if key in names), ("pde", "pte"))
        assert tuple(o.kind for o in info.owned) == want_kinds, names
        assert [(o.addr, o.raw) for o in info.owned] == walk[-len(want_kinds) :], names


def test_pde_13_sets_bit_13_of_a_large_leaf():
    feat = MatrixFeatures(maxphyaddr=40)
    for names, level in (("pde.p pde.pse pde.13", 2), ("pdpte.1g pde.p pde.13", 3)):
        b = mp.build_batch([("c", flags_from_names(names))], feat, profile_named("intel"))
        walk, _ = _walk_image(b.memory, b.state.cr3, b.probes[0].va)
        assert len(walk) == 5 - level and walk[-1][1] & PS and walk[-1][1] >> 13 & 1, names
        b0 = mp.build_batch(
            [("c", flags_from_names(names.replace(" pde.13", "")))], feat, profile_named("intel")
        )
        assert not _walk_image(b0.memory, b0.state.cr3, b0.probes[0].va)[0][-1][1] >> 13 & 1


def test_the_seventeenth_case_takes_the_second_qword():
    """16 frames: case n aims at frame n % 16, qword n // 16, so cases 16 and 17 write the second
    qword of frames 0 and 1 (a 4K and a 2M case), with that qword's tag as the value."""
    shapes = ["pte.p pte.rw pde.p pde.rw write", "pde.p pde.rw pde.pse write"]
    cases = [(f"c{n}", flags_from_names(shapes[n % 2])) for n in range(18)]
    b = mp.build_batch(cases, MatrixFeatures(maxphyaddr=40), profile_named("intel"))
    for n, target in ((0, 0x200000), (1, 0x201000), (15, 0x20F000), (16, 0x200008), (17, 0x201008)):
        p = b.probes[b.cases[n].probes[0]]
        assert _walk_image(b.memory, b.state.cr3, p.va)[1] == target
        assert p.wvalue == target << 8 | 0xC3 and b.cases[n].frames == (target & ~0xFFF,)


def test_the_qword_index_wraps_after_512_rounds_of_16_frames():
    # case 8192 = 16 * 512: frame 0, qword (8192 // 16) % 512 = 0 again (a frame has 512 qwords)
    f = flags_from_names("pte.p pde.p")
    b = mp.build_batch([("c", f)] * 8193, MatrixFeatures(maxphyaddr=40), profile_named("intel"))
    for n, target in ((8191, 0x20FFF8), (8192, 0x200000)):
        assert _walk_image(b.memory, b.state.cr3, b.probes[n].va)[1] == target


def test_hi_at_without_pde_51_puts_no_bit_anywhere():
    # hi.at / hi.bit only say where pde.51's bit goes: without pde.51 the walk has no reserved bit
    f = flags_from_names("pte.p pde.p hi.at=pml4e hi.bit=45")
    b = mp.build_batch([("c", f)], MatrixFeatures(maxphyaddr=40), profile_named("intel"))
    walk, pa = _walk_image(b.memory, b.state.cr3, b.probes[0].va)
    assert [e & ~ADDR40 for _, e in walk] == [P | RW | US, P | RW | US, P, P] and pa == 0x200000


def test_batch_errors_say_why():
    prof = profile_named("intel")
    with pytest.raises(BadInputError) as e:
        mp.build_batch([], MatrixFeatures(), prof)
    assert str(e.value) == "empty batch"
    with pytest.raises(BadInputError) as e:
        mp.build_batch([("a", 0), ("b", mx.EFER_NX)], MatrixFeatures(), prof)
    assert str(e.value) == "cases of one batch must share CR0/CR4/EFER/PKRU"


def test_fill_frames_writes_the_tag_pattern_in_16_pages():
    from x86pt.memory.sparse import SparseMemory

    mem = SparseMemory(32 << 20)
    mp.fill_frames(mem)
    assert sorted(mem.pages) == list(range(0x200, 0x210))  # 16 pages from 0x200000
    assert mem.read_u64(0x200000) == 0x200000C3 and mem.read_u64(0x20FFF8) == 0x20FFF8C3
    mem2 = SparseMemory(32 << 20)
    mp.fill_frames(mem2, 0x5000, 1)
    assert sorted(mem2.pages) == [5] and mem2.read_u64(0x5FF8) == 0x5FF8C3


def test_bit_36_in_the_pde_and_the_pte():
    # M = 36: bit 36 is reserved, and pde.36 / pte.36 set exactly that bit in their own entry
    f = flags_from_names("pte.p pde.p pde.36 pte.36")
    b = mp.build_batch([("c", f)], MatrixFeatures(maxphyaddr=36), profile_named("intel"))
    (pde, pte) = b.cases[0].owned
    assert (pde.kind, pte.kind) == ("pde", "pte")
    assert pde.raw & ~ADDR40 == P and pde.raw >> 36 == 1 and pte.raw == 0x200000 | P | 1 << 36


def test_records_are_as_their_classes_make_them():
    # probes, case infos and owned entries made without __init__ hold exactly their fields
    import dataclasses

    b, _ = _hand_batch()
    for obj in [*b.probes, *b.cases, *(o for c in b.cases for o in c.owned)]:
        assert list(vars(obj)) == [f.name for f in dataclasses.fields(obj)]
        assert type(obj)(**vars(obj)) == obj


def test_probes_of_the_hand_cases():
    b, cases = _hand_batch()
    got = []
    for info in b.cases:
        for i in info.probes:
            p = b.probes[i]
            got.append((info.label, p.access, p.user, p.ac, p.implicit, p.wvalue))
    t2 = 0x202000  # case 2's target: frame 2, qword 0; the rig's tag pattern is (pa << 8) | 0xC3
    assert got == [
        ("c0", "read", False, False, False, 0),
        ("c1", "fetch", True, False, False, 0),
        ("c2", "write", False, False, False, t2 << 8 | 0xC3),
        ("c3", "read", False, False, False, 0),  # twice: a supervisor read first
        ("c3", "read", False, False, False, 0),
        ("c4", "read", False, False, False, 0),
        ("c5", "read", False, False, False, 0),
        ("c6", "read", False, False, False, 0),
        ("c7", "read", False, False, False, 0),
        ("c8", "read", False, True, True, 0),
        ("c9", "read", False, False, False, 0),
        ("c10", "read", False, False, False, 0),
        ("c11", "read", False, False, False, 0),
        ("c12", "read", False, False, False, 0),
        ("c13", "read", False, False, False, 0),
        ("c14", "read", False, False, False, 0),
        ("c15", "read", False, False, False, 0),
    ]
    assert [info.probes for info in b.cases][2:5] == [(2,), (3, 4), (5,)]
    # the frames hold the tag pattern: the qword at pa is (pa << 8) | 0xC3
    for pa in (0x200000, 0x200008, 0x20FFF8):
        assert b.memory.read_u64(pa) == pa << 8 | 0xC3


def test_twice_with_a_user_write_reads_as_supervisor_first():
    b = mp.build_batch(
        [("c", flags_from_names("pte.p pte.rw pte.user pde.p pde.rw pde.user user write twice ac"))],
        MatrixFeatures(maxphyaddr=40),
        profile_named("intel"),
    )
    first, second = b.probes
    assert (first.access, first.user, first.ac, first.wvalue, first.implicit) == (
        "read",
        False,
        False,
        0,
        False,
    )
    assert (second.access, second.user, second.ac) == ("write", True, True)
    assert second.wvalue == 0x200000 << 8 | 0xC3 and first.va == second.va


def test_batch_state_from_the_flags():
    """CR0 = PE|PG (+WP), CR4 = PAE (+PKE, SMEP, SMAP, LA57), EFER = LME|LMA (+NXE), PKRU = 0x30 |
    WD1*8 | AD1*4 with PKE (SDM Vol. 3A §2.5, §4.1.1, §4.6.2; docs/paging.md §11.1)."""
    names = "la57 cr0.wp efer.nx cr4.pke pkru.wd cr4.smep cr4.smap pte.p pde.p"
    feat = MatrixFeatures(maxphyaddr=40, la57=True)
    b = mp.build_batch([("c", flags_from_names(names))], feat, profile_named("amd"))
    st = b.state
    assert st.cr0 == 1 | 1 << 31 | 1 << 16
    assert st.cr4 == 1 << 5 | 1 << 22 | 1 << 20 | 1 << 21 | 1 << 12
    assert st.efer == 1 << 8 | 1 << 10 | 1 << 11
    assert st.pkru == 0x38 and st.maxphyaddr == 40 and st.profile.name == "amd"
    # 5-level: PML5 index 300 then PML4 index 292, sign-extended from bit 56
    assert b.probes[0].va == 0xFF2C920000000000
    walk, pa = _walk_image(b.memory, st.cr3, b.probes[0].va, levels=5)
    assert [e & ~ADDR40 for _, e in walk] == [P | RW | US, P | RW | US, P | RW | US, P, P] and pa == 0x200000
    plain = mp.build_batch([("c", flags_from_names("pte.p pde.p"))], MatrixFeatures(), profile_named("intel"))
    assert (plain.state.cr0, plain.state.cr4, plain.state.efer, plain.state.pkru) == (
        1 | 1 << 31,
        1 << 5,
        1 << 8 | 1 << 10,
        0,
    )
    assert mp.state_key(mx.PKE)[3] == 0x30 and mp.state_key(mx.PKE | mx.PKU_AD | mx.PKU_WD)[3] == 0x3C


# -- group B: the product enumeration (Space, groups, rotations), on small hand spaces -------------------
def _hand_space():
    """Two groups and three rotations whose every case is worked out by hand below."""
    return mx.Space(
        "s",
        (mx.Group("a", (0, 1, 2)), mx.Group("b", (0, 4))),
        (
            mx.Rotation("x", (0, 16, 32)),  # by key = digit_a + digit_b
            mx.Rotation("y", (0, 64, 256), weighted=True, all_of=4),  # wkey = digit_a*1 + digit_b*2
            mx.Rotation("z", (128,), none_of=1),
        ),
    )


# case i: digit_b = i % 2 (the last group varies fastest), digit_a = i // 2
#  i  a b  groups  key  x    wkey  y (b=4 only)  z (no bit 0)  flags
#  0  0 0  0       0    0    0     -             128           128
#  1  0 1  4       1    16   2     256           128           404
#  2  1 0  1       1    16   1     -             -             17
#  3  1 1  5       2    32   3     0             -             37
#  4  2 0  2       2    32   2     -             128           162
#  5  2 1  6       3    0    4     64            128           198
HAND_SPACE_FLAGS = [128, 404, 17, 37, 162, 198]


def test_a_hand_space_case_by_case():
    s = _hand_space()
    assert s.size == 6 and s.rotated_bits == 16 | 32 | 64 | 256 | 128
    assert [s.flags_at(i) for i in range(6)] == HAND_SPACE_FLAGS
    assert s.flags_array(0, 6).tolist() == HAND_SPACE_FLAGS
    assert s.flags_array(2, 5).tolist() == HAND_SPACE_FLAGS[2:5]
    assert s.flags_of(np.array([5, 0, 3])).tolist() == [198, 128, 37]
    assert s.flags_of(np.array([5, 0, 3])).dtype == np.uint64


def test_weights_with_three_groups():
    # wkey = d0*1 + d1*2 + d2*3 for groups in order, choice wkey % 5 of (0, 8, 16, 24, 32)
    s = mx.Space(
        "w",
        (mx.Group("g0", (0, 1)), mx.Group("g1", (0, 2)), mx.Group("g2", (0, 4))),
        (mx.Rotation("r", (0, 8, 16, 24, 32), weighted=True),),
    )
    # i = d0*4 + d1*2 + d2: wkey = 0,3,2,5,1,4,3,6 -> % 5 = 0,3,2,0,1,4,3,1
    want = [0, 4 | 24, 2 | 16, 6 | 0, 1 | 8, 5 | 32, 3 | 24, 7 | 8]
    assert [s.flags_at(i) for i in range(8)] == want and s.flags_array(0, 8).tolist() == want


def test_groups_and_subsets():
    assert list(mx._subsets([1, 2, 4])) == [0, 1, 2, 4, 3, 5, 6, 7]
    g = mx._group("g", [4, 1, 2], lambda c: c != 3, 4)  # bit 4 fixed at zero, 1|2 not ok
    assert g == mx.Group("g", (0, 1, 2))
    assert mx._group("h", [4, 1], lambda c: True, 0).choices == (0, 1, 4, 5)
    # _rsv_ok: KUT's reserved-bit rule alone (one source at most; NX counts without efer.nx)
    ok = mx._rsv_ok
    assert ok(0) and ok(mx.PDE_51) and ok(mx.PTE_NX) and ok(mx.PDE_13 | mx.PDE_PSE)
    assert not ok(mx.PDE_13) and not ok(mx.PTE_NX | mx.PDE_NX) and not ok(mx.PDE_36 | mx.PTE_51)
    assert ok(mx.PTE_NX | mx.PDE_NX | mx.EFER_NX) and not ok(mx.PTE_NX | mx.PDE_51)


def test_config_rotation_per_feature():
    cr = mx.config_rotation
    s, p, ac = mx.SMEP, mx.SMAP, mx.ACC_AC
    assert cr(MatrixFeatures(smep=True, smap=True)) == mx.Rotation("cr4", (0, s, p, p | ac))
    assert cr(MatrixFeatures(smep=True, smap=False)) == mx.Rotation("cr4", (0, s))
    assert cr(MatrixFeatures(smep=False, smap=True)) == mx.Rotation("cr4", (0, p, p | ac))
    assert cr(MatrixFeatures(smep=False, smap=False)) is None


def test_hi_rotations_by_hand():
    b = [n << 40 for n in (48, 49, 50, 51)]  # bits M=48..51 in the hi.bit field
    at = {name: i << 46 for i, name in enumerate(("pde", "pdpte", "pdpte1g", "pml4e", "pml5e"))}
    pte, pde, pde_np = mx.hi_rotations(MatrixFeatures(maxphyaddr=48))
    assert pte == mx.Rotation("pte.hi", tuple(b), weighted=True, all_of=mx.PTE_51)
    assert pde == mx.Rotation(
        "pde.hi",
        tuple(at[a] | x for a in ("pde", "pdpte", "pdpte1g", "pml4e") for x in b),
        weighted=True,
        all_of=mx.PDE_51 | mx.PDE_P,
    )
    assert pde_np == mx.Rotation("pde.hi-np", tuple(b), weighted=True, all_of=mx.PDE_51, none_of=mx.PDE_P)
    five = mx.hi_rotations(MatrixFeatures(maxphyaddr=48), 5)[1]
    assert five.choices[-4:] == tuple(at["pml5e"] | x for x in b) and len(five.choices) == 20
    below = mx.hi_rotations(MatrixFeatures(maxphyaddr=48), above=False)[1]
    assert below.choices == tuple(b)
    assert mx.hi_rotations(MatrixFeatures(maxphyaddr=52)) == ()
    assert mx.hi_rotations(MatrixFeatures(maxphyaddr=51))[0].choices == (51 << 40,)


# -- group C: the spaces and the matrix, counted by hand -------------------------------------------------
def test_extended_space_sizes_by_hand():
    """M = 40, PKU, SMEP, SMAP, 1G pages, implicit reads at CPL0 and CPL3:
    classic+smep+smap = KUT's 19,169,280 x SMEP (2) x SMAP (2) x AC (2);
    1g = PKE/AD/WD (5 legal) x WP (2) x reserved (10: without efer.nx one of none/NX/51/13, with it
         NX free times none/51/13) x access (3) x 8 free bits (256) = 76,800;
    top = WP 2 x NX 2 x PS/bit8 2 x access 3 x user 2 x shape 4 = 192; noncanon = 2 x 3 x 2 x 2 = 24;
    implicit = PKE 3 x SMAP 2 x WP 2 x NX 2 x AC 2 x user 2 x shape 6 x pkey 2 x pde.user 2 x
         pte.user 2 x pte.a 2 = 9,216."""
    m = mx.matrix_for(MatrixFeatures(maxphyaddr=40), extended=True)
    assert m.counts() == {
        "classic+smep+smap": 19_169_280 * 8,
        "1g": 76_800,
        "top": 192,
        "noncanon": 24,
        "implicit": 9_216,
    }
    assert m.size == 19_169_280 * 8 + 76_800 + 192 + 24 + 9_216
    assert mx.matrix_for(MatrixFeatures(maxphyaddr=40)).counts() == {"classic": 19_169_280}


def test_extended_sizes_with_la57_and_without_features():
    # LA57: the classic matrix again without PKU (KUT's no-PKU count) and noncanon x 2 (la57 or not)
    m = mx.matrix_for(MatrixFeatures(maxphyaddr=40, la57=True), extended=True)
    c = m.counts()
    assert c["la57"] == 1_916_928 and c["noncanon"] == 48 and list(c)[-1] == "la57"
    # no implicit reads at all: no implicit space; at CPL0 only: half of it
    assert "implicit" not in mx.matrix_for(MatrixFeatures(implicit_cpl0=False), extended=True).counts()
    assert mx.matrix_for(MatrixFeatures(implicit_cpl3=False), extended=True).counts()["implicit"] == 4_608
    # no PKU, no SMAP, M = 52 (no reserved 51): implicit = WP 2 x NX 2 x AC 2 x user 2 x shape 4 x
    # pde.user 2 x pte.user 2 x pte.a 2 = 512
    f = MatrixFeatures(maxphyaddr=52, pku=False, smap=False)
    assert mx.implicit_space(f).size == 2 * 2 * 2 * 2 * 4 * 2 * 2 * 2
    # without SMEP/SMAP the extended classic space is KUT's count, M = 52 PKU: 9,338,880
    assert mx.classic_space(
        MatrixFeatures(maxphyaddr=52, smep=False, smap=False), smep=True, smap=True
    ).size == (9_338_880)


def test_spaces_set_their_own_flags():
    feat = MatrixFeatures(maxphyaddr=40, la57=True)
    m = mx.matrix_for(feat, extended=True)
    spaces = {s.name: s for s in m.spaces}
    for name, must, never in (
        ("1g", mx.PDPTE_1G, mx.PDE_PSE | mx.PTE_P | mx.PDPTE_RO | mx.LA57),
        ("top", 0, mx.PDPTE_1G | mx.LA57 | mx.NONCANON),
        ("noncanon", mx.NONCANON, mx.PDPTE_1G),
        ("implicit", mx.IMPLICIT, mx.ACC_WRITE | mx.ACC_FETCH | mx.LA57),
        ("la57", mx.LA57, mx.PKE | mx.PKEY | mx.PKU_AD),
    ):
        fl = spaces[name].flags_array(0, min(spaces[name].size, 4000))
        assert ((fl & np.uint64(must)) == np.uint64(must)).all(), name
        assert not (fl & np.uint64(never)).any(), name
    top = spaces["top"].flags_array(0, 192)
    assert ((top & np.uint64(mx.PML4E_PS | mx.PML4E_8)) != 0).all()


def test_matrix_indexes_across_spaces():
    feat = MatrixFeatures()
    s1 = mx.Space("one", (mx.Group("g", (1, 2, 3)),))
    s2 = mx.Space("two", (mx.Group("g", (8, 16, 32, 64)),))
    s3 = mx.Space("three", (mx.Group("g", (128, 256)),))
    m = mx.Matrix((s1, s2, s3), feat)
    every = [1, 2, 3, 8, 16, 32, 64, 128, 256]
    assert m.size == 9 and m.counts() == {"one": 3, "two": 4, "three": 2}
    assert [m.flags_at(i) for i in range(9)] == every
    assert m.flags_range(0, 9).tolist() == every
    assert m.flags_range(2, 4).tolist() == [3, 8] and m.flags_range(6, 9).tolist() == [64, 128, 256]
    assert m.flags_range(1, 2).tolist() == [2] and m.flags_range(8, 9).tolist() == [256]
    empty = m.flags_range(2, 2)
    assert empty.tolist() == [] and empty.dtype == np.uint64
    assert m.flags_of(np.array([8, 4, 0, 3, 2, 7, 6])).tolist() == [256, 16, 1, 8, 3, 128, 64]
    assert m.flags_of(np.array([], dtype=np.int64)).tolist() == []
    for bad in (9, 12, -1):
        with pytest.raises(IndexError) as e:
            m.flags_of(np.array([0, bad]))
        assert e.value.args == (bad,)  # the index out of range
    for bad in (9, 10, -1):  # a negative index is out of range too (it used to wrap into space one)
        with pytest.raises(IndexError) as e:
            m.flags_at(bad)
        assert e.value.args == (bad,)


# -- group E: MatrixSource cuts a selection into batches ----------------------------------------------
def _small_matrix(feat=None):
    """8 cases: i = wp*4 + twice*2 + shape (the last group varies fastest): cases 0-3 without
    CR0.WP, 4-7 with it; odd cases have a present PDE over a non-present PTE; twice on 2, 3, 6, 7."""
    s = mx.Space(
        "m",
        (
            mx.Group("wp", (0, mx.CR0_WP_F)),
            mx.Group("twice", (0, mx.ACC_TWICE)),
            mx.Group("shape", (mx.PTE_P | mx.PDE_P, mx.PDE_P)),
        ),
    )
    return mx.Matrix((s,), feat or MatrixFeatures(maxphyaddr=40))


def _labels(src):
    return [[c.label for c in b.cases] for b in src.batches()]


def test_source_batches_by_cpu_state_and_size():
    m = _small_matrix()
    prof = profile_named("intel")
    src = mp.MatrixSource(m, prof, batch_cases=3, chunk=5, name="m")
    # chunk [0, 5): states 0,0,0,0,WP -> [0 1 2] [3] [4]; chunk [5, 8): all WP -> [5 6 7]
    assert src.total == 8
    assert _labels(src) == [["m#0", "m#1", "m#2"], ["m#3"], ["m#4"], ["m#5", "m#6", "m#7"]]
    # a range: [2, 7) in one chunk -> [2 3] (no WP) then [4 5 6] (WP)
    src = mp.MatrixSource(m, prof, start=2, stop=7, batch_cases=3, chunk=5, name="m")
    assert src.total == 5 and _labels(src) == [["m#2", "m#3"], ["m#4", "m#5", "m#6"]]
    # given indices, in chunks of 2: [7 1] groups as 1 (no WP) then 7 (WP); then [4]
    src = mp.MatrixSource(m, prof, indices=np.array([7, 1, 4]), chunk=2, name="m")
    assert src.total == 3 and _labels(src) == [["m#1"], ["m#7"], ["m#4"]]
    # the defaults: every case, one batch per CPU state, labelled matrix#i
    src = mp.MatrixSource(m, prof)
    assert src.total == 8 and _labels(src) == [
        [f"matrix#{i}" for i in range(4)],
        [f"matrix#{i}" for i in range(4, 8)],
    ]
    assert mp.MatrixSource(m, prof, start=3).total == 5


def test_source_batches_carry_the_cases_features_and_profile():
    m = _small_matrix(MatrixFeatures(maxphyaddr=36))
    batches = list(mp.MatrixSource(m, profile_named("amd"), batch_cases=8).batches())
    assert [c.flags for b in batches for c in b.cases] == [m.flags_at(i) for i in range(8)]
    for b in batches:
        assert b.state.maxphyaddr == 36 and b.state.profile.name == "amd"
        assert {bool(c.flags & mx.CR0_WP_F) for c in b.cases} == {bool(b.state.cr0 & 1 << 16)}


def test_source_batches_by_probe_count():
    """batch_probes = 3: a case costs two probes with `twice` (cases 2, 3, 6, 7), else one; each
    state group is cut greedily: [0 1] (2 probes), [2] (2; 2 more would make 4), [3]."""
    m = _small_matrix()
    src = mp.MatrixSource(m, profile_named("intel"), batch_probes=3, batch_cases=1, name="m")
    assert _labels(src) == [["m#0", "m#1"], ["m#2"], ["m#3"], ["m#4", "m#5"], ["m#6"], ["m#7"]]
    src = mp.MatrixSource(m, profile_named("intel"), batch_probes=4, name="m")
    assert _labels(src) == [["m#0", "m#1", "m#2"], ["m#3"], ["m#4", "m#5", "m#6"], ["m#7"]]
    assert [len(b.probes) for b in src.batches()] == [4, 2, 4, 2]


# -- _Layout: the shared tables of a batch, slot by slot (the module docstring's layout rule) --------------
def _layout(levels=4, limit=32 << 20):
    from x86pt.memory.sparse import SparseMemory

    mem = SparseMemory(32 << 20)
    return mp._Layout(mem, levels, limit), mem


def test_layout_pml4_entries_per_variant():
    lay, mem = _layout()
    t = 0x210000  # TABLE_BASE: right after the 16 frames at 0x200000
    assert (lay.root, lay.pml4, lay.next) == (t, t, t + 0x1000)
    assert lay.pdpte_slot("normal") == (t + 0x1000, 292, 0)
    assert lay.pdpte_slot("normal") == (t + 0x1000, 292, 1)
    assert lay.pdpte_slot("ps") == (t + 0x2000, 293, 0)
    assert lay.pdpte_slot("bit8") == (t + 0x3000, 294, 0)
    assert lay.pdpte_slot(("hi", "pml4e", 45)) == (t + 0x4000, 295, 0)
    assert lay.pdpte_slot(("hi", "pdpte", 45)) == (t + 0x5000, 296, 0)  # an own PML4E, plain
    assert [mem.read_u64(t + i * 8) for i in range(292, 298)] == [
        t + 0x1000 | 7,
        t + 0x2000 | 0x87,  # PS
        t + 0x3000 | 0x107,  # bit 8
        t + 0x4000 | 7 | 1 << 45,
        t + 0x5000 | 7,
        0,
    ]
    assert lay.top_va(292) == 0xFFFF920000000000 and lay.top_va(255) == 255 << 39  # lower half
    with pytest.raises(BadInputError) as e:
        lay.pdpte_slot(("hi", "pml5e", 45))
    assert str(e.value) == "a PML5E reserved bit needs 5-level paging"


def test_layout_leaves_the_harness_slot_free():
    lay, mem = _layout()
    lay.next_top = 510
    assert lay.pdpte_slot("normal")[1] == 510
    with pytest.raises(BadInputError) as e:
        lay.pdpte_slot("ps")  # it would take PML4 index 511, the rig's own slot
    assert str(e.value) == "batch needs too many PML4 entries"
    assert mem.read_u64(lay.root + 511 * 8) == 0


def test_layout_a_full_pdpt_pd_and_pt_go_on_in_a_new_page():
    lay, _ = _layout()
    first = [lay.pdpte_slot("normal") for _ in range(512)]
    assert first[-1][1:] == (292, 511)
    page2 = lay.pdpte_slot("normal")
    assert page2[1:] == (293, 0) and page2[0] != first[0][0]  # a new PDPT under the next PML4E
    lay, _ = _layout()
    pds = [lay.pde_slot("normal", False) for _ in range(513)]
    assert pds[511][1:] == (292, 0, 511) and pds[512][1:] == (292, 1, 0) and pds[512][0] != pds[0][0]
    ptes = [lay.pte_slot() for _ in range(513)]
    assert ptes[511][1] == 511 and ptes[512][1] == 0 and ptes[512][0] != ptes[0][0]


def test_layout_pdptes_of_the_reserved_variants():
    lay, mem = _layout()
    pd, top, pidx, didx = lay.pde_slot(("hi", "pdpte", 40), False)
    pdpt = mem.read_u64(lay.root + top * 8) & ADDR40
    assert (pidx, didx) == (0, 0) and mem.read_u64(pdpt) == pd | P | US | RW | 1 << 40
    _, top2, _, _ = lay.pde_slot(("hi", "pdpte1g", 41), True)
    pdpt2 = mem.read_u64(lay.root + top2 * 8) & ADDR40
    assert mem.read_u64(pdpt2) == PS | P | US | 1 << 41  # a read-only 1G leaf of frame 0
    lay.pde_slot("normal", True)  # read-only: the PDPTE without RW
    pdpt3 = mem.read_u64(lay.root + 294 * 8) & ADDR40
    assert mem.read_u64(pdpt3) & ~ADDR40 == P | US
    _, top4, _, _ = lay.pde_slot(("hi", "pdpte1g", 42), False)  # a writable 1G leaf
    assert mem.read_u64(mem.read_u64(lay.root + top4 * 8) & ADDR40) == PS | P | US | RW | 1 << 42
    # a reserved bit in the PML4E: the PDPTE below it is a plain pointer to the PD
    pd5, top5, _, _ = lay.pde_slot(("hi", "pml4e", 43), False)
    assert mem.read_u64(lay.root + top5 * 8) & ~ADDR40 == P | RW | US | 1 << 43
    assert mem.read_u64(mem.read_u64(lay.root + top5 * 8) & ADDR40 & ~(1 << 43)) == pd5 | P | US | RW


def test_layout_five_levels():
    lay, mem = _layout(levels=5)
    t = 0x210000
    assert (lay.root, lay.pml4) == (t, t + 0x1000)
    assert mem.read_u64(t + 300 * 8) == t + 0x1000 | 7
    assert lay.top_va(292) == 0xFF2C920000000000  # PML5 index 300, sign-extended from bit 56
    _, top, _ = lay.pdpte_slot(("hi", "pml5e", 45))
    _, top2, _ = lay.pdpte_slot(("hi", "pml5e", 46))
    _, top3, pidx3 = lay.pdpte_slot(("hi", "pml5e", 45))  # the same variant: the next PDPTE
    assert (top, top2, top3, pidx3) == (292, 293, 292, 1)
    assert mem.read_u64(t + 301 * 8) == t + 0x1000 | 7 | 1 << 45
    assert mem.read_u64(t + 302 * 8) == t + 0x1000 | 7 | 1 << 46
    assert lay.top_va(top) == 0xFF2D920000000000 and lay.top_va(top2) == 0xFF2E928000000000
    _, top4, _ = lay.pdpte_slot("normal")
    assert lay.top_va(top4) == 0xFF2C930000000000  # PML4 index 294 under the plain PML5E 300


def test_layout_allocation_stops_at_the_ram_end():
    lay, mem = _layout(limit=0x212000)
    mem.write(0x211000, b"\xff" * 8)
    assert lay.alloc() == 0x211000 and mem.read_u64(0x211000) == 0  # a fresh page is zeroed
    with pytest.raises(BadInputError, match=r"batch does not fit in the rig's RAM \(0x212000 bytes\)"):
        lay.alloc()
    # one 4K case needs 4 pages after the frames: root, PDPT, PD, PT (0x210000..0x213fff)
    f = flags_from_names("pte.p pde.p")
    prof = profile_named("intel")
    assert len(mp.build_batch([("c", f)], MatrixFeatures(ram_size=0x214000), prof).cases) == 1
    with pytest.raises(BadInputError):
        mp.build_batch([("c", f)], MatrixFeatures(ram_size=0x213000), prof)
    with pytest.raises(BadInputError, match="empty batch"):
        mp.build_batch([], MatrixFeatures(), prof)


def _values(space, mask):
    fl = space if isinstance(space, np.ndarray) else space.flags_array(0, space.size)
    fl = fl & np.uint64(mask)
    return {int(v) for v in np.unique(fl)}


_LOW = (1 << 18) - 1  # the pte.* and pde.* flags (bits 0..17)


def test_the_lower_shapes_of_the_small_spaces():
    """The lower-level shapes each extension space tries (docs/paging.md §11.3), by flag names:
    top (PS / bit 8 in the PML4E): a user 4K page, a user 2M page, a read-only 4K page with A and D,
    a not-present PTE; noncanon: a user 4K page or nothing present; implicit: a supervisor 4K page,
    a 2M page, a not-present PTE, a 2M page under a read-only PDPTE, then (M < 52) a reserved bit 51
    in the PTE or the PDE; the user bits of the implicit space vary on their own."""
    n = flags_from_names
    feat = MatrixFeatures(maxphyaddr=40)
    assert _values(mx.top_space(feat), _LOW) == {
        n("pde.p pde.rw pde.user pte.p pte.rw pte.user"),
        n("pde.p pde.rw pde.user pde.pse"),
        n("pde.p pde.rw pde.user pte.p pte.user pte.a pte.d"),
        n("pde.p pde.rw pde.user"),
    }
    assert _values(mx.noncanon_space(feat), _LOW) == {n("pde.p pde.rw pde.user pte.p pte.rw pte.user"), 0}
    users = mx.PDE_USER | mx.PTE_USER | mx.PTE_A
    imp = mx.implicit_space(feat)
    assert _values(imp, (_LOW | mx.PDPTE_RO) & ~users) == {
        n("pde.p pde.rw pte.p pte.rw"),
        n("pde.p pde.rw pde.pse"),
        n("pde.p pde.rw"),
        n("pde.p pde.rw pde.pse pdpte.ro"),
        n("pde.p pde.rw pte.p pte.rw pte.51"),
        n("pde.p pde.rw pde.51"),
    }
    assert _values(imp, users) == {0, mx.PDE_USER, mx.PTE_USER, mx.PTE_A} | {
        mx.PDE_USER | mx.PTE_USER,
        mx.PDE_USER | mx.PTE_A,
        mx.PTE_USER | mx.PTE_A,
        users,
    }
    cpu = mx.PKE | mx.PKU_AD | mx.SMAP | mx.CR0_WP_F | mx.EFER_NX | mx.ACC_AC | mx.ACC_USER | mx.PKEY
    assert len(_values(imp, cpu)) == 3 * 2 * 2 * 2 * 2 * 2 * 2  # PKE none/on/on+AD, then 6 on-off bits
    assert _values(imp, mx.PKE | mx.PKU_AD) == {0, mx.PKE, mx.PKE | mx.PKU_AD}
    assert _values(mx.implicit_space(MatrixFeatures(maxphyaddr=40, implicit_cpl3=False)), mx.ACC_USER) == {0}
    assert _values(mx.implicit_space(MatrixFeatures(maxphyaddr=40, pku=False)), mx.PKE | mx.PKEY) == {0}
    # top: both top-level variants, every access, CPL and WP / NX
    top = mx.top_space(feat)
    assert _values(top, mx.PML4E_PS | mx.PML4E_8) == {mx.PML4E_PS, mx.PML4E_8}
    assert _values(top, mx.ACC_WRITE | mx.ACC_FETCH | mx.ACC_USER) == {
        0,
        mx.ACC_WRITE,
        mx.ACC_FETCH,
        mx.ACC_USER,
        mx.ACC_USER | mx.ACC_WRITE,
        mx.ACC_USER | mx.ACC_FETCH,
    }
    assert _values(top, mx.CR0_WP_F | mx.EFER_NX) == {0, mx.CR0_WP_F, mx.EFER_NX, mx.CR0_WP_F | mx.EFER_NX}


def test_extended_classic_space_with_smep_alone():
    # smep=True without smap: SMEP is a group of its own (half the cases), no SMAP/AC anywhere and
    # no CPU-configuration rotation (that is for the classic matrix only)
    feat = MatrixFeatures(maxphyaddr=40)
    shrink = (1 << 18) - 1 & ~(mx.PTE_P | mx.PDE_P) | mx.ACC_TWICE | mx.PKEY | mx.PDPTE_RO
    sp = mx.classic_space(feat, shrink, smep=True)
    fl = sp.flags_array(0, sp.size)
    assert not (fl & np.uint64(mx.SMAP | mx.ACC_AC)).any()
    assert int(((fl & np.uint64(mx.SMEP)) != 0).sum()) * 2 == sp.size
    assert not any(r.name == "cr4" for r in sp.rotations)


def test_the_1g_space_reserved_sources_by_hand():
    """A 1G leaf's reserved-bit sources (one at a time, NX one of them without efer.nx): 51, 13
    (and 36 when M <= 36), the PKU group as in KUT, every free bit both ways."""
    n = flags_from_names
    rsv = mx.EFER_NX | mx.PDE_NX | mx.PDE_51 | mx.PDE_36 | mx.PDE_13
    g40 = mx.gig_space(MatrixFeatures(maxphyaddr=40))
    g40 = g40.flags_array(0, g40.size)  # the whole space, once
    assert _values(g40, rsv) == {
        0,
        n("pde.nx"),
        n("pde.51"),
        n("pde.13"),
        n("efer.nx"),
        n("efer.nx pde.nx"),
        n("efer.nx pde.51"),
        n("efer.nx pde.13"),
        n("efer.nx pde.nx pde.51"),
        n("efer.nx pde.nx pde.13"),
    }
    g36 = mx.gig_space(MatrixFeatures(maxphyaddr=36))
    assert _values(g36, rsv) == _values(g40, rsv) | {
        n("pde.36"),
        n("efer.nx pde.36"),
        n("efer.nx pde.nx pde.36"),
    }
    pk = mx.PKE | mx.PKU_AD | mx.PKU_WD
    assert _values(g40, pk) == {0, mx.PKE, mx.PKE | mx.PKU_AD, mx.PKE | mx.PKU_WD, pk}
    assert _values(mx.gig_space(MatrixFeatures(maxphyaddr=40, pku=False)), pk | mx.PKEY) == {0}
    for bit in (mx.PKEY, mx.ACC_USER, mx.ACC_TWICE, mx.PDE_P, mx.PDE_RW, mx.PDE_USER, mx.PDE_A, mx.PDE_D):
        assert _values(g40, bit) == {0, bit}
    assert _values(g40, mx.CR0_WP_F) == {0, mx.CR0_WP_F}
    assert _values(g40, mx.ACC_WRITE | mx.ACC_FETCH) == {0, mx.ACC_WRITE, mx.ACC_FETCH}
    # the reserved high bit stays in the leaf itself (no hi.at rotation above it)
    assert _values(g40, mx.HI_AT_MASK) == {0}
    assert len(_values(g40, mx.HI_BIT_MASK)) == 1 + 12  # none, or bits 40..51


def test_source_keeps_the_index_order_inside_a_cpu_state():
    # CR0.WP varies fastest: the 64 cases alternate between two states; each state's batch holds
    # its cases in index order (a stable grouping), 0 2 4 ... 62 then 1 3 ... 63
    groups = [mx.Group(n, (0, mx.F[n])) for n in ("pte.rw", "pte.user", "pte.a", "pte.d", "pde.rw")]
    s = mx.Space("alt", (mx.Group("p", (mx.PTE_P | mx.PDE_P,)), *groups, mx.Group("wp", (0, mx.CR0_WP_F))))
    m = mx.Matrix((s,), MatrixFeatures(maxphyaddr=40))
    src = mp.MatrixSource(m, profile_named("intel"), name="a")
    assert _labels(src) == [[f"a#{i}" for i in range(0, 64, 2)], [f"a#{i}" for i in range(1, 64, 2)]]


def test_each_free_flag_is_a_group_named_after_it():
    # a flag that no legality rule couples is a group of its own, (0, flag), under the flag's name
    free = ["pkey=1", "user", "twice", "pdpte.ro"] + [f"pde.{x}" for x in ("p", "rw", "user", "a", "d")]
    free += [f"pte.{x}" for x in ("p", "rw", "user", "a", "d")]
    for space, names in (
        (mx.classic_space(MatrixFeatures(maxphyaddr=40)), free),
        (mx.gig_space(MatrixFeatures(maxphyaddr=40)), ["pkey=1", "user", "twice"] + free[4:9]),
    ):
        by_name = {g.name: g.choices for g in space.groups}
        for n in names:
            assert by_name[n] == (0, mx.F[n]), (space.name, n)
        assert {"pke", "wp", "rsvd", "access"} <= set(by_name)
    assert [g.name for g in mx.la57_space(MatrixFeatures(maxphyaddr=40)).groups][:2] == ["la57", "pke"]
    # without PKU the key flag is fixed at zero: its group keeps the one choice 0
    nopku = {g.name: g.choices for g in mx.classic_space(MatrixFeatures(maxphyaddr=40, pku=False)).groups}
    assert nopku["pkey=1"] == (0,) and nopku["pke"] == (0,)


# the dimensions of every extended space by name, in order (the CPU state first, docs/paging.md §11.3)
SPACE_GROUPS = {
    "classic+smep+smap": [
        "pke",
        "smep",
        "smap",
        "wp",
        "rsvd",
        "access",
        "ac",
        "fep",
        "pkey=1",
        "user",
        "twice",
    ]
    + [
        "pdpte.ro",
        "pde.p",
        "pde.rw",
        "pde.user",
        "pde.a",
        "pde.d",
        "pte.p",
        "pte.rw",
        "pte.user",
        "pte.a",
        "pte.d",
    ],
    "1g": [
        "pke",
        "wp",
        "rsvd",
        "access",
        "1g",
        "pkey=1",
        "user",
        "twice",
        "pde.p",
        "pde.rw",
        "pde.user",
        "pde.a",
    ]
    + ["pde.d"],
    "top": ["wp", "nx", "top", "access", "user", "shape"],
    "noncanon": ["la57", "wp", "access", "user", "nc", "shape"],
    "implicit": [
        "pke",
        "smap",
        "wp",
        "nx",
        "implicit",
        "ac",
        "user",
        "shape",
        "pkey",
        "pde.user",
        "pte.user",
        "pte.a",
    ],
    "la57": [
        "la57",
        "pke",
        "wp",
        "rsvd",
        "access",
        "fep",
        "pkey=1",
        "user",
        "twice",
        "pdpte.ro",
        "pde.p",
        "pde.rw",
    ]
    + ["pde.user", "pde.a", "pde.d", "pte.p", "pte.rw", "pte.user", "pte.a", "pte.d"],
}


def test_the_extended_spaces_dimensions_by_name():
    m = mx.matrix_for(MatrixFeatures(maxphyaddr=40, la57=True), extended=True)
    assert {s.name: [g.name for g in s.groups] for s in m.spaces} == SPACE_GROUPS
    empty = mx.implicit_space(MatrixFeatures(implicit_cpl0=False))
    assert (empty.name, empty.groups, empty.rotations) == ("implicit", (), ())
    # every group's choices: a group named after a flag is (0, flag), the others by hand
    w, f, nc = mx.ACC_WRITE, mx.ACC_FETCH, flags_from_names("pde.p pde.rw pde.user pte.p pte.rw pte.user")
    common = {"wp": (0, mx.CR0_WP_F), "access": (0, w, f), "smap": (0, mx.SMAP), "ac": (0, mx.ACC_AC)}
    common |= {"nx": (0, mx.EFER_NX), "pkey": (0, mx.PKEY), "smep": (0, mx.SMEP), "fep": (0,)}
    by_hand = {
        "1g": {"1g": (mx.PDPTE_1G,)},
        "top": {"top": (mx.PML4E_PS, mx.PML4E_8)},
        "noncanon": {"la57": (0, mx.LA57), "nc": (mx.NONCANON,), "shape": (nc, 0)},
        "implicit": {"pke": (0, mx.PKE, mx.PKE | mx.PKU_AD), "implicit": (mx.IMPLICIT,)},
        "la57": {"la57": (mx.LA57,), "pke": (0,), "pkey=1": (0,)},  # without the PKU dimension
    }
    for sp in m.spaces:
        for g in sp.groups:
            want = by_hand.get(sp.name, {}).get(g.name) or common.get(g.name)
            if want is None and g.name in mx.F:
                want = (0, mx.F[g.name])
            if want is not None:
                assert g.choices == want, (sp.name, g.name)


def test_the_extended_classic_space_is_kut_s_set_times_smep_smap_ac():
    feat = MatrixFeatures(maxphyaddr=40)
    shrink = (1 << 18) - 1 & ~(mx.PTE_P | mx.PDE_P | mx.PDE_PSE | mx.PDE_13) | mx.ACC_TWICE | mx.PKEY
    plain = mx.classic_space(feat, shrink, rotate=False)
    ext = mx.classic_space(feat, shrink, smep=True, smap=True, rotate=False)
    kut = set(plain.flags_array(0, plain.size).tolist())
    got = ext.flags_array(0, ext.size).tolist()
    cfg = mx.SMEP | mx.SMAP | mx.ACC_AC
    assert len(got) == len(set(got)) == 8 * len(kut)
    assert {f & ~cfg for f in got} == kut
    s, p, a = mx.SMEP, mx.SMAP, mx.ACC_AC
    assert {f & cfg for f in got} == {0, s, p, a, s | p, s | a, p | a, s | p | a}


def test_extension_spaces_leave_the_pte_alone_where_they_have_no_pte():
    feat = MatrixFeatures(maxphyaddr=40, la57=True)
    g = mx.gig_space(feat)
    assert _values(g, 0xFF) == {0}  # a 1G leaf: no pte.* flag (bits 0..7)
    nc = mx.noncanon_space(feat)
    assert _values(nc, _LOW) == {flags_from_names("pde.p pde.rw pde.user pte.p pte.rw pte.user"), 0}
    assert _values(nc, mx.LA57) == {0, mx.LA57}
    imp = mx.implicit_space(feat)
    assert len(_values(imp, mx.HI_BIT_MASK)) > 1  # the reserved bit 51 rotates over M..51 here too


def test_leaf_tables_by_hand():
    """_leaf_table's entries (computed once at import, so checked here by calling it): flag bit k
    of the pte.* / pde.* run sets its entry bit (rw -> RW, user -> US, a, d, nx -> XD, p, 36 ->
    bit 36); pde.pse and the '.51' flags set nothing here (PS and the high bit are added apart)."""
    pte = mp._leaf_table(0, mx.FLAG_NAMES[0:8])  # rw user a d nx p 51 36
    assert len(pte) == 256 and pte == mp._PTE_BITS
    assert [pte[1 << k] for k in range(8)] == [RW, US, A, D, NX, P, 0, 1 << 36]
    assert pte[0] == 0 and pte[0xFF] == RW | US | A | D | NX | P | 1 << 36 and pte[0b100001] == RW | P
    pde = mp._leaf_table(8, mx.FLAG_NAMES[8:17])  # rw user a d pse nx p 51 36
    assert len(pde) == 512 and pde == mp._PDE_BITS
    assert [pde[1 << k] for k in range(9)] == [RW, US, A, D, 0, NX, P, 0, 1 << 36]
    assert pde[0x1FF] == RW | US | A | D | NX | P | 1 << 36
    with pytest.raises(AssertionError):
        mp._leaf_table(1, mx.FLAG_NAMES[0:8])  # the names must sit at consecutive bits from `first`
