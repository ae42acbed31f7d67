# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests that kill the surviving mutants of x86pt/fields.py (tools/mutate.py x86pt/fields.py).

Expectations are written by hand from Intel SDM Vol. 3A §4.5 (tables 4-15..4-21: which VA bits
index each level, which entries have a PS bit, where PAT sits) and the Linux level names
(arch/x86/include/asm/pgtable_types.h: pgd/p4d/pud/pmd/pte), never from the code's output."""

from __future__ import annotations

import pytest

from x86pt.errors import BadInputError
from x86pt.fields import (
    LEVELS,
    Field,
    Kind,
    Role,
    decode_fast,
    encode_fast,
    field_named,
    kind_from_name,
    levels_for,
)


def test_level_index_takes_nine_va_bits_at_the_level_shift():
    va = (0x1A5 << 48) | (0x0FF << 39) | (0x123 << 30) | (0x0AB << 21) | (0x1FE << 12) | 0xABC
    assert LEVELS[5].index(va) == 0x1A5
    assert LEVELS[4].index(va) == 0x0FF
    assert LEVELS[3].index(va) == 0x123
    assert LEVELS[2].index(va) == 0x0AB
    assert LEVELS[1].index(va) == 0x1FE


def test_ps_selects_the_leaf_format_only_at_the_pdpt_and_pd_levels():
    # SDM 4.5: PS (bit 7) maps a 1G page in a PDPTE and a 2M page in a PDE; in a PTE bit 7 is PAT
    # and in a PML4E/PML5E it is reserved, so the kind does not change there.
    assert LEVELS[3].kind_of(0x80 | 1) is Kind.PDPTE_1G
    assert LEVELS[3].kind_of(0x01) is Kind.PDPTE
    assert LEVELS[2].kind_of(0x80 | 1) is Kind.PDE_2M
    assert LEVELS[2].kind_of(0x7F) is Kind.PDE
    assert LEVELS[2].kind_of(0x01) is Kind.PDE
    assert LEVELS[1].kind_of(0x80 | 1) is Kind.PTE
    assert LEVELS[4].kind_of(0x80 | 1) is Kind.PML4E
    assert LEVELS[5].kind_of(0x80 | 1) is Kind.PML5E
    assert LEVELS[4].kind_of(0x01) is Kind.PML4E


def test_linux_level_names_with_four_and_five_levels():
    # 4-level: p4d folds into pgd, so the PML4 is the pgd; 5-level: the PML5 is the pgd, PML4 the p4d.
    assert LEVELS[4].linux_name(4) == "pgd"
    assert LEVELS[4].linux_name(5) == "p4d"
    assert LEVELS[5].linux_name(5) == "pgd"
    assert LEVELS[3].linux_name(4) == "pud"
    assert LEVELS[2].linux_name(5) == "pmd"


def test_levels_for_lists_the_walk_top_down():
    assert [lv.number for lv in levels_for(4)] == [4, 3, 2, 1]
    assert [lv.number for lv in levels_for(5)] == [5, 4, 3, 2, 1]
    for bad in (3, 6, 0):
        with pytest.raises(BadInputError, match=f"paging levels must be 4 or 5, not {bad}"):
            levels_for(bad)


def test_field_get_extracts_in_place_bits():
    f = Field("pk", 62, 59, Role.PK)
    assert f.get(0xB << 59 | (1 << 63) | (1 << 58)) == 0xB
    assert Field("p", 0, 0, Role.FLAG).get(0b11) == 1
    assert Field("avl", 11, 9, Role.IGN).get(0xE00 | 0x1FF) == 0x7


def test_defaults_are_maxphyaddr_52_and_intel():
    # M=52: a PTE's address field is bits 51:12 with no reserved bits above it; Intel ignores bit 8
    # of a PML4E (AMD reserves it).
    assert (field_named(Kind.PTE, "addr").hi, field_named(Kind.PTE, "addr").lo) == (51, 12)
    assert field_named(Kind.PML4E, "ign8").role is Role.IGN
    d = decode_fast(1 << 51 | 1, Kind.PTE)
    assert d["addr"] == 1 << 39 and d["p"] == 1
    assert "ign8" in decode_fast(0, Kind.PML4E)
    assert encode_fast({"addr": 1 << 39, "p": 1}, Kind.PTE) == 1 << 51 | 1
    assert encode_fast({"ign8": 1}, Kind.PML4E) == 1 << 8


def test_error_messages_name_the_kind_and_the_fields():
    with pytest.raises(
        BadInputError,
        match=r"^pte has no field 'zz' \(fields: xd, pk, ign_hi, addr, avl, g, "
        r"pat, d, a, pcd, pwt, us, rw, p\)$",
    ):
        field_named(Kind.PTE, "zz")
    with pytest.raises(
        BadInputError,
        match=r"^pde has no field 'zz' \(fields: xd, ign_hi, rsvd_hi, addr, avl, "
        r"ign8, ps, ign6, a, pcd, pwt, us, rw, p\)$",
    ):
        field_named(Kind.PDE, "zz", 40, "intel")
    with pytest.raises(BadInputError, match=r"^pte has no field 'zz'$"):
        encode_fast({"zz": 1}, Kind.PTE)
    with pytest.raises(BadInputError, match=r"^pte\.rw=0x2 does not fit in 1 bits$"):
        encode_fast({"rw": 2}, Kind.PTE)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("pud", Kind.PDPTE),
        ("PMD", Kind.PDE),
        ("pdpte_1g", Kind.PDPTE_1G),
        ("pde_2m", Kind.PDE_2M),
        ("PDPE", Kind.PDPTE),
        ("1G", Kind.PDPTE_1G),
        ("2m", Kind.PDE_2M),
        ("4k", Kind.PTE),
        (" pte ", Kind.PTE),
        ("pml5e", Kind.PML5E),
    ],
)
def test_kind_aliases(name, kind):
    assert kind_from_name(name) is kind


def test_unknown_kind_lists_the_choices():
    with pytest.raises(
        BadInputError,
        match=r"^unknown entry kind 'zz' \(one of pml5e, pml4e, pdpte, pdpte1g, "
        r"pde, pde2m, pte\)$",
    ):
        kind_from_name("zz")


def test_unknown_field_message_uses_the_vendor_table():
    # AMD: bit 8 of a PML4E is reserved (rsvd8), not ignored (ign8) — APM Vol. 2 §5.3.
    with pytest.raises(
        BadInputError, match=r"\(fields: xd, ign_hi, rsvd_hi, addr, avl, rsvd8, ps, ign6, a, "
    ):
        field_named(Kind.PML4E, "zz", 40, "amd")
