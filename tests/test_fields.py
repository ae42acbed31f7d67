"""The field table against the manuals' tables, and the construct path against the shift/mask path.

Expectations: Intel SDM Vol. 3A tables 4-15..4-21 and AMD APM Vol. 2 §5.3 as summarised in
docs/paging.md §4 (bit positions written here by hand), never the code under test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from x86pt.errors import BadInputError
from x86pt.fields import (
    Kind,
    Role,
    decode_fast,
    encode_fast,
    field_named,
    fields_for,
    kind_from_name,
    masks_for,
)
from x86pt.layouts import decode, encode, layout

ALL_KINDS = list(Kind)
LEAVES = [Kind.PDPTE_1G, Kind.PDE_2M, Kind.PTE]

# (kind, field, hi, lo, role) straight from docs/paging.md §4's table, M = 40.
SDM_ROWS = [
    (Kind.PTE, "pat", 7, 7, Role.PAT),
    (Kind.PTE, "g", 8, 8, Role.FLAG),
    (Kind.PTE, "d", 6, 6, Role.FLAG),
    (Kind.PTE, "addr", 39, 12, Role.ADDR),
    (Kind.PTE, "rsvd_hi", 51, 40, Role.RSVD),
    (Kind.PTE, "pk", 62, 59, Role.PK),
    (Kind.PTE, "xd", 63, 63, Role.XD),
    (Kind.PDE_2M, "ps", 7, 7, Role.PS),
    (Kind.PDE_2M, "pat", 12, 12, Role.PAT),
    (Kind.PDE_2M, "rsvd_lo", 20, 13, Role.RSVD),
    (Kind.PDE_2M, "addr", 39, 21, Role.ADDR),
    (Kind.PDPTE_1G, "pat", 12, 12, Role.PAT),
    (Kind.PDPTE_1G, "rsvd_lo", 29, 13, Role.RSVD),
    (Kind.PDPTE_1G, "addr", 39, 30, Role.ADDR),
    (Kind.PDPTE_1G, "g", 8, 8, Role.FLAG),
    (Kind.PDE, "ps", 7, 7, Role.PS),
    (Kind.PDE, "ign6", 6, 6, Role.IGN),
    (Kind.PDE, "addr", 39, 12, Role.ADDR),
    (Kind.PDPTE, "ign8", 8, 8, Role.IGN),
    (Kind.PML4E, "ps", 7, 7, Role.RSVD),
    (Kind.PML4E, "ign8", 8, 8, Role.IGN),
    (Kind.PML5E, "ps", 7, 7, Role.RSVD),
    (Kind.PML4E, "ign_hi", 62, 52, Role.IGN),
    (Kind.PDE, "avl", 11, 9, Role.IGN),
]


@pytest.mark.parametrize("kind,name,hi,lo,role", SDM_ROWS)
def test_field_positions_follow_the_sdm_tables(kind, name, hi, lo, role):
    f = field_named(kind, name, 40, "intel")
    assert (f.hi, f.lo, f.role) == (hi, lo, role)


def test_amd_reserves_bit8_of_pml4e_and_pml5e_only():
    for kind in (Kind.PML4E, Kind.PML5E):
        assert field_named(kind, "rsvd8", 40, "amd").role is Role.RSVD
    for kind in (Kind.PDPTE, Kind.PDE):
        assert field_named(kind, "ign8", 40, "amd").role is Role.IGN


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("m", [36, 40, 46, 48, 52])
def test_fields_tile_the_64_bits(kind, m):
    covered = 0
    for f in fields_for(kind, m, "intel"):
        assert covered & f.mask == 0
        covered |= f.mask
    assert covered == (1 << 64) - 1


def test_masks_are_the_reserved_bits_of_paging_md_section_3():
    # M=46: high = bits 51:46. PML4E adds PS (bit 7); 2M leaf adds 20:13; 1G leaf adds 29:13.
    high = ((1 << 52) - 1) & ~((1 << 46) - 1)
    assert masks_for(Kind.PTE, 46).rsvd == high
    assert masks_for(Kind.PDE, 46).rsvd == high
    assert masks_for(Kind.PML4E, 46).rsvd == high | 0x80
    assert masks_for(Kind.PML4E, 46, "amd").rsvd == high | 0x180
    assert masks_for(Kind.PDE_2M, 46).rsvd == high | 0x1FE000
    assert masks_for(Kind.PDPTE_1G, 46).rsvd == high | 0x3FFFE000
    assert masks_for(Kind.PTE, 52).rsvd == 0
    assert masks_for(Kind.PTE, 46).addr == 0x3FFFFFFFF000
    assert masks_for(Kind.PDE_2M, 46).addr == 0x3FFFFFE00000
    assert masks_for(Kind.PDPTE_1G, 46).addr == 0x3FFFC0000000


@settings(max_examples=300, deadline=None)
@given(
    raw=st.integers(0, (1 << 64) - 1),
    kind=st.sampled_from(ALL_KINDS),
    m=st.sampled_from([36, 40, 46, 52]),
    vendor=st.sampled_from(["intel", "amd"]),
)
def test_construct_and_shift_mask_paths_agree(raw, kind, m, vendor):
    d = decode(raw, kind, m, vendor)
    assert d == decode_fast(raw, kind, m, vendor)
    assert encode(d, kind, m, vendor) == raw
    assert encode_fast(d, kind, m, vendor) == raw


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_flipping_every_single_bit_round_trips(kind):
    for bit in range(64):
        raw = 1 << bit
        d = decode(raw, kind, 46, "intel")
        nonzero = [k for k, v in d.items() if v]
        assert len(nonzero) == 1, (kind, bit, nonzero)
        f = field_named(kind, nonzero[0], 46, "intel")
        assert f.lo <= bit <= f.hi
        assert d[nonzero[0]] == 1 << (bit - f.lo)
        assert encode(d, kind, 46, "intel") == raw


def test_round_trip_idiom_on_a_known_pte():
    # XD, key 1, D, A, US, RW, P and frame 0x111 (the example of docs/paging.md §4.3).
    raw = (1 << 63) | (1 << 59) | 0x111067
    data = raw.to_bytes(8, "little")
    lay = layout(Kind.PTE, 52, "intel")
    obj = lay.parse(data)
    assert (obj.xd, obj.pk, obj.addr, obj.d, obj.a, obj.us, obj.rw, obj.p, obj.pat) == (
        True,
        1,
        0x111,
        True,
        True,
        True,
        True,
        True,
        False,
    )
    assert lay.build(obj) == data
    assert lay.sizeof() == 8


def test_encode_rejects_unknown_fields_and_overflow():
    with pytest.raises(BadInputError):
        encode({"nope": 1}, Kind.PTE)
    with pytest.raises(BadInputError):
        encode({"pk": 16}, Kind.PTE)
    with pytest.raises(BadInputError):
        encode({"pk": 1}, Kind.PDE)  # keys only exist in leaves
    with pytest.raises(BadInputError):
        decode(b"\0" * 7, Kind.PTE)


def test_kind_names():
    assert kind_from_name("PDE2M") is Kind.PDE_2M
    assert kind_from_name("pmd") is Kind.PDE
    with pytest.raises(BadInputError):
        kind_from_name("pgd3")


def test_single_bit_masks_are_the_sdm_positions():
    """fields.BIT_* are read off the field table; the positions, by hand from SDM Vol. 3A table
    4-19/4-20 (PTE, PDE 2M): P 0, R/W 1, U/S 2, PWT 3, PCD 4, A 5, D 6, PS/PAT(4K) 7, G 8, PAT(2M)
    12, PK 62:59, XD 63; address 51:12; AMD APM: PML4E bit 8 reserved."""
    from x86pt import fields as f

    assert (f.BIT_P, f.BIT_RW, f.BIT_US, f.BIT_PWT, f.BIT_PCD, f.BIT_A, f.BIT_D) == (1, 2, 4, 8, 16, 32, 64)
    assert (f.BIT_PS, f.BIT_PAT_4K, f.BIT_G, f.BIT_8, f.BIT_PAT_LARGE) == (128, 128, 256, 256, 4096)
    assert (f.BIT_XD, f.PK_MASK, f.PK_SHIFT) == (1 << 63, 0xF << 59, 59)
    assert f.ADDR_MASK_52 == 0x000F_FFFF_FFFF_F000
