# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests that kill the surviving mutants of x86pt/state.py (tools/mutate.py x86pt/state.py).

Register rules by hand from Intel SDM Vol. 3A §2.5 (CR0: bits PE MP EM TS ET NE WP AM NW CD PG are
defined, bit 6 is not; CR4 bit 15 is reserved), §2.2.1 (EFER: SCE LME LMA NXE on Intel) and AMD APM
Vol. 2 §3.1.7 (EFER bit 12 SVME exists on AMD, bit 16 on neither), §4.5.2 (CR3 bits 63:M) and
§3.3.7.1 (canonical: bits 63:47 equal); never from the code's output."""

from __future__ import annotations

import dataclasses

import pytest

from x86pt.errors import BadInputError, StateError
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PROFILES,
    PagingState,
    Profile,
    as_profile,
    profile_named,
)

CR0 = CR0_PE | CR0_PG | CR0_WP  # 0x80010001
EFER = EFER_LME | EFER_LMA | EFER_NXE  # 0xd00
TAIL = " (a CPU would refuse these values with #GP)"


def test_register_width_checks():
    PagingState()  # cr3 = 0 is a valid value
    PagingState(cr3=0x1000, pkru=(1 << 32) - 1, pkrs=(1 << 32) - 1)
    with pytest.raises(
        BadInputError, match=r"^cr0 must be a 64-bit unsigned integer, not 18446744073709551616$"
    ):
        PagingState(cr0=1 << 64)
    with pytest.raises(BadInputError, match=r"^cr3 must be a 64-bit unsigned integer, not -1$"):
        PagingState(cr3=-1)
    with pytest.raises(BadInputError, match=r"^cr3 must be a 64-bit unsigned integer, not '4096'$"):
        PagingState(cr3="4096")
    with pytest.raises(BadInputError, match=r"^pkru must be a 32-bit unsigned integer, not 4294967296$"):
        PagingState(pkru=1 << 32)
    with pytest.raises(BadInputError, match=r"^pkrs must be a 32-bit unsigned integer, not 4294967296$"):
        PagingState(pkrs=1 << 32)


def test_maxphyaddr_range():
    assert PagingState(cr3=0x1000, maxphyaddr=32).m == 32
    assert PagingState(cr3=0x1000, maxphyaddr=52).m == 52
    for bad in (31, 53):
        with pytest.raises(BadInputError, match=f"^MAXPHYADDR must be between 32 and 52, not {bad}$"):
            PagingState(maxphyaddr=bad)


def test_reserved_register_bits_messages():
    with pytest.raises(
        BadInputError,
        match=r"^reserved register bits set: cr0 bits 0x40"
        + TAIL.replace("(", r"\(").replace(")", r"\)")
        + "$",
    ):
        PagingState(cr0=CR0 | 1 << 6)
    with pytest.raises(
        BadInputError, match=r"^reserved register bits set: cr0 bits 0x40; cr4 bits 0x8000 \("
    ):
        PagingState(cr0=CR0 | 1 << 6, cr4=CR4_PAE | 1 << 15)
    with pytest.raises(BadInputError, match=r"^reserved register bits set: efer bits 0x1000 \(intel\) \("):
        PagingState(efer=EFER | 1 << 12)
    PagingState(efer=EFER | 1 << 12, profile=PROFILES["amd"])  # SVME exists on AMD
    with pytest.raises(BadInputError, match=r"^reserved register bits set: efer bits 0x10000 \(amd\) \("):
        PagingState(efer=EFER | 1 << 16, profile=PROFILES["amd"])
    with pytest.raises(
        BadInputError,
        match=r"^reserved register bits set: cr3 bits 63:46 \(0xc00000000000, above "
        r"MAXPHYADDR 46\) \(a CPU",
    ):
        PagingState(cr3=(3 << 46) | 0x1000)


def test_check_names_every_missing_ia32e_bit():
    PagingState().check()
    with pytest.raises(
        StateError, match=r"^not IA-32e paging: CR0.PG clear \(cr0=0x10001 cr4=0x20 efer=0xd00\)$"
    ):
        PagingState(cr0=CR0_PE | CR0_WP).check()
    with pytest.raises(
        StateError,
        match=r"^not IA-32e paging: CR0.PG, CR0.PE, CR4.PAE, EFER.LME clear "
        r"\(cr0=0x0 cr4=0x0 efer=0x0\)$",
    ):
        PagingState(cr0=0, cr4=0, efer=0).check()
    for kw, name in (
        ({"cr0": CR0_PG | CR0_WP}, "CR0.PE"),
        ({"cr4": 0}, "CR4.PAE"),
        ({"efer": EFER_NXE}, "EFER.LME"),
    ):
        with pytest.raises(StateError, match=f"^not IA-32e paging: {name} clear"):
            PagingState(**kw).check()


def test_sign_extend_48_and_57_bits():
    s = PagingState()
    assert s.sign_extend(1 << 47) == 0xFFFF800000000000
    assert s.sign_extend(0x7FFFFFFFF001) == 0x7FFFFFFFF001
    assert s.sign_extend(1 << 46 | 1) == 1 << 46 | 1  # bit 46 is not the sign bit
    assert s.sign_extend((1 << 48) | 0x1235) == 0x1235  # bits above 47 are dropped first
    assert s.sign_extend(0xFFFF800000000001) == 0xFFFF800000000001
    s5 = PagingState(cr4=CR4_PAE | CR4_LA57)
    assert s5.sign_extend(1 << 56) == 0xFF00000000000000
    assert s5.sign_extend(1 << 55) == 1 << 55


def test_describe_and_json():
    s = PagingState(cr3=0x1000, cr4=CR4_PAE | CR4_SMEP | CR4_PKE, pkru=0x4)
    assert s.describe() == (
        "cr0=0x80010001 cr3=0x1000 cr4=0x500020 efer=0xd00 pkru=0x4 M=46 intel "
        "profile=intel [WP NXE SMEP PKE]"
    )
    assert PagingState(
        cr0=CR0_PE | CR0_PG,
        efer=EFER_LME | EFER_LMA,
        cr4=CR4_PAE | CR4_LA57 | (1 << 21) | (1 << 24),
        profile=PROFILES["qemu"],
    ).describe() == (
        "cr0=0x80000001 cr3=0x0 cr4=0x1201020 efer=0x500 pkru=0x0 M=40 amd profile=qemu [LA57 SMAP PKS]"
    )
    assert s.to_json() == {
        "cr0": "0x80010001",
        "cr3": "0x1000",
        "cr4": "0x500020",
        "efer": "0xd00",
        "pkru": "0x4",
        "pkrs": "0x0",
        "maxphyaddr": 46,
        "profile": "intel",
    }


def test_from_json_defaults_and_values():
    s = PagingState.from_json({})
    assert (s.cr0, s.cr3, s.cr4, s.efer, s.pkru, s.pkrs, s.profile.name, s.maxphyaddr, s.m) == (
        CR0,
        0,
        CR4_PAE,
        EFER,
        0,
        0,
        "intel",
        None,
        46,
    )
    s = PagingState.from_json(
        {
            "cr0": "0x80000011",
            "cr3": "0x2000",
            "cr4": "0x1020",
            "efer": "0x500",
            "pkru": "0xc",
            "pkrs": "0x3",
            "profile": "amd",
            "maxphyaddr": 40,
        }
    )
    assert (s.cr0, s.cr3, s.cr4, s.efer, s.pkru, s.pkrs, s.profile.name, s.m) == (
        0x80000011,
        0x2000,
        0x1020,
        0x500,
        0xC,
        0x3,
        "amd",
        40,
    )
    assert PagingState.from_json({"maxphyaddr": "32"}).m == 32
    assert PagingState.from_json({"maxphyaddr": 52}).m == 52
    for bad in (31, 53):
        with pytest.raises(BadInputError):
            PagingState.from_json({"maxphyaddr": bad})
    t = PagingState(cr3=0x5000, pkrs=7, profile=PROFILES["unicorn"], maxphyaddr=44)
    assert PagingState.from_json(t.to_json()) == t


def test_profiles_validate_their_choices():
    Profile("x", vendor="amd", a_on_faulting_walk="none", unbacked_read="zero")
    Profile("x", unbacked_read="ones")
    with pytest.raises(BadInputError, match=r"^vendor must be intel or amd, not 'AMD'$"):
        Profile("x", vendor="AMD")
    with pytest.raises(BadInputError, match=r"^a_on_faulting_walk must be 'used' or 'none'$"):
        Profile("x", a_on_faulting_walk="all")
    with pytest.raises(BadInputError, match=r"^unbacked_read must be 'error', 'zero' or 'ones'$"):
        Profile("x", unbacked_read="random")


def test_profile_lookup():
    assert as_profile("qemu") is PROFILES["qemu"]
    p = dataclasses.replace(PROFILES["intel"], name="mine")
    assert as_profile(p) is p
    with pytest.raises(BadInputError, match=r"^unknown profile 'nope' \(one of intel, amd, qemu, unicorn, "):
        profile_named("nope")


def test_from_json_errors_name_the_field():
    for name in ("cr0", "cr3", "cr4", "efer", "pkru", "pkrs"):
        with pytest.raises(BadInputError, match=f"^bad {name}: "):
            PagingState.from_json({name: "zz"})
    with pytest.raises(BadInputError, match=r"^bad maxphyaddr: .*53.* is above 0x34$"):
        PagingState.from_json({"maxphyaddr": 53})
    with pytest.raises(BadInputError, match=r"^bad maxphyaddr: .*31.* is below 0x20$"):
        PagingState.from_json({"maxphyaddr": 31})


def test_cr3_message_shows_only_the_bits_above_m():
    # CR3 bit 0 is ignored (not reserved): it must not appear among "bits 63:46".
    with pytest.raises(BadInputError, match=r"cr3 bits 63:46 \(0xc00000000000, above MAXPHYADDR 46\)"):
        PagingState(cr3=(3 << 46) | 0x1001)


# -- rsvd_mask (moved here from walk.py) -----------------------------------------------------------
# By hand from SDM Vol. 3A tables 4-15 ff. (bits 51:M reserved; PS, bit 7, reserved in a PML4E;
# XD reserved when EFER.NXE=0) and AMD APM Vol. 2 §5.3 (PML4E bit 8 reserved on AMD); QEMU's AMD
# model does not check bit 8 (docs/paging.md §12.1).
def _rsvd(profile: str, kind, level: int, efer: int = EFER) -> int:
    from x86pt.fields import LEVELS
    from x86pt.state import rsvd_mask

    return rsvd_mask(PagingState(cr3=0x1000, efer=efer, profile=PROFILES[profile]), LEVELS[level], kind)


def test_rsvd_mask_of_a_pml4e_per_vendor():
    from x86pt.fields import Kind

    above = lambda m: ((1 << 52) - 1) & ~((1 << m) - 1)  # noqa: E731  bits 51:M
    assert _rsvd("intel", Kind.PML4E, 4) == above(46) | 0x80
    assert _rsvd("amd", Kind.PML4E, 4) == above(48) | 0x80 | 0x100
    assert _rsvd("qemu", Kind.PML4E, 4) == above(40) | 0x80  # bit 8 not checked
    assert _rsvd("qemu", Kind.PDE, 2) == above(40)  # bit 8 of a PDE: ignored


def test_rsvd_mask_adds_xd_without_nxe():
    from x86pt.fields import Kind

    above46 = ((1 << 52) - 1) & ~((1 << 46) - 1)
    assert _rsvd("intel", Kind.PTE, 1, efer=EFER_LME | EFER_LMA) == above46 | (1 << 63)
    assert _rsvd("intel", Kind.PTE, 1) == above46
