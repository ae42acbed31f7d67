# SPDX-License-Identifier: GPL-2.0-or-later
"""Hostile values at the library's edge (issue 11): numbers, register values, --has and --range
words. Expected masks and limits are written out from the manuals, not taken from the code."""

from __future__ import annotations

import pytest

from x86pt.errors import BadInputError
from x86pt.formats.cli import parse_range
from x86pt.numbers import parse_int, parse_size
from x86pt.scan import parse_has
from x86pt.state import PROFILES, PagingState


@pytest.mark.parametrize(
    "text,what",
    [
        ("9" * 5000, "5000 digits: Python's int() refuses past 4300"),
        ("0x" + "f" * 17, "above 2^64 - 1"),
        ("-1", "negative"),
        ("1.5", "not an integer"),
        ("", "empty"),
    ],
)
def test_parse_int_refuses_with_a_short_message(text, what):
    with pytest.raises(BadInputError) as ei:
        parse_int(text, "x")
    assert len(str(ei.value)) < 120, what


def test_parse_int_shows_a_huge_int_by_its_size():
    with pytest.raises(BadInputError, match="a 16610-bit integer"):
        parse_int(10**5000, "x")  # 5000 decimal digits = 16610 bits


@pytest.mark.parametrize(
    "text,hi,ok",
    [
        ("1G", 1 << 31, True),
        ("2G", 1 << 31, True),
        ("1T", 1 << 31, False),
        ("16777216T", 1 << 64, True),  # 2^24 * 2^40 = 2^64 exactly
        ("16777217T", 1 << 64, False),
        ("99999999999999999999999T", 1 << 64, False),
    ],
)
def test_parse_size_upper_bound(text, hi, ok):
    if ok:
        assert parse_size(text, "s", hi=hi) <= hi
    else:
        with pytest.raises(BadInputError, match="is above"):
            parse_size(text, "s", hi=hi)


# -- registers: SDM Vol. 3A §2.5 (CR0, CR4), §2.2.1 (EFER), §4.5 (CR3); AMD APM Vol. 2 §3.1.7 ---------
@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"cr0": 1 << 32 | 0x80010001}, "cr0 bits 0x100000000"),  # 63:32 reserved
        ({"cr0": 1 << 6 | 0x80010001}, "cr0 bits 0x40"),  # 15:6 reserved
        ({"cr0": 1 << 17 | 0x80010001}, "cr0 bits 0x20000"),  # 17 reserved (16 WP, 18 AM)
        ({"cr4": 1 << 15 | 0x20}, "cr4 bits 0x8000"),  # 15 reserved
        ({"cr4": 1 << 26 | 0x20}, "cr4 bits 0x4000000"),  # 26 reserved
        ({"cr4": (1 << 64) - 1}, "cr4 bits 0xffffffffe4008000"),  # 63:29, 26, 15
        ({"efer": 0xD00 | 1 << 12}, "efer bits 0x1000 (intel)"),  # SVME: AMD only
        ({"efer": 0xD00 | 1 << 9}, "efer bits 0x200"),  # 9 reserved on both
        ({"cr3": 1 << 46 | 0x1000}, "cr3 bits 63:46"),  # intel profile: M = 46
        ({"cr3": 1 << 63 | 0x1000}, "cr3 bits 63:46"),  # no-flush bit is not CR3
    ],
)
def test_reserved_register_bits_are_refused(kw, needle):
    with pytest.raises(BadInputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        PagingState(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"cr3": 0x1001},  # bit 0 ignored (PCIDE=0) or PCID 1
        {"cr3": 0x1FFF, "cr4": 0x20 | 1 << 17},  # PCID 0xfff
        {"cr3": 0x1018},  # PWT | PCD
        {"cr0": 0xE005003F},  # every defined CR0 bit
        {"cr4": 0x1BFF7FFF},  # every defined CR4 bit, LA57 included
        {"efer": 0xD01 | 0xF << 12 | 1 << 17 | 1 << 18 | 1 << 20 | 1 << 21, "profile": PROFILES["amd"]},
        {"cr3": (1 << 46) - 0x1000},  # the highest frame under M = 46
    ],
)
def test_defined_register_bits_are_accepted(kw):
    st = PagingState(**kw)
    assert st.root == kw.get("cr3", 0) & ~0xFFF  # every cr3 here lies below 2^M


def test_cr3_low_bits_do_not_move_the_root():
    assert PagingState(cr3=0x1001).root == 0x1000
    assert PagingState(cr3=0x2FFF, cr4=0x20 | 1 << 17).root == 0x2000


# -- --has and --range words ----------------------------------------------------------------------------
@pytest.mark.parametrize("words", ["!!g", "--g", "!", "g !g", "pat !pat", "bogus"])
def test_has_refuses_doubled_or_contradictory_words(words):
    with pytest.raises(BadInputError):
        parse_has(words)


def test_has_accepts_one_negation():
    # bit 8 = G must be set, bit 5 = A must be clear (SDM Table 4-19)
    assert parse_has("g !a") == (1 << 8, 1 << 5, None)


@pytest.mark.parametrize("text", ["5", "0x400000", "5-3", "0x10-0x10", "0+0x10000000000000001"])
def test_range_refuses_a_bare_address_and_empty_or_wrapping_ranges(text):
    with pytest.raises(BadInputError, match="--range"):
        parse_range(text)


def test_range_forms():
    assert parse_range("0x400000-0x800000") == (0x400000, 0x800000)
    assert parse_range("0xffff800000000000+1G") == (0xFFFF800000000000, 0xFFFF800040000000)
