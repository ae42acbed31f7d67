# SPDX-License-Identifier: GPL-2.0-or-later
"""The hand-derived cases both probe-guest oracles answer alike (tests/test_oracle_qemu.py,
tests/test_oracle_bochs.py), on the image of tests/hand_image.py. Expectations come from Intel SDM
Vol. 3A §4.5-4.8 and §6.15; error codes are numbers built from the §4.7 bits P=0x1 W=0x2 U=0x4
RSVD=0x8 I/D=0x10 PK=0x20. Where an oracle deviates, the case list takes a parameter (and the
oracle's own file proves the deviation)."""

from __future__ import annotations

import struct

import pytest

from tests.hand_image import (
    CR0,
    EFER,
    AD_R,
    AD_W,
    FRAMES,
    G1,
    KRO,
    KRW,
    M2,
    NONCANON,
    NP,
    RSV,
    UNX,
    UPK,
    URO,
    URW,
    P,
    frame,
    run_cases,
)
from x86pt.errors import BadInputError
from x86pt.oracle import Probe, tag_value
from x86pt.state import CR4_PAE


def state_for(profile: str):
    """state(b, cr0=..., cr4=..., efer=..., pkru=...): the hand image's PagingState under `profile`
    (CR0.PE|PG|WP, CR4.PAE, EFER.LME|LMA|NXE, PKRU 0 unless given)."""

    def state(b, cr0: int = CR0, cr4: int = CR4_PAE, efer: int = EFER, pkru: int = 0):
        return b.state(cr0=cr0, cr4=cr4, efer=efer, pkru=pkru, profile=profile)

    return state


def rsvd_cases(p_bit: int) -> list:
    """A PTE with a reserved bit set: RSVD, with P as the oracle reports it (§4.7: P=1; QEMU 0)."""
    return [
        (P(RSV), ("pf", 0x08 | p_bit)),
        (P(RSV, "write", user=True), ("pf", 0x0E | p_bit)),
        (P(RSV, "fetch"), ("pf", 0x18 | p_bit)),
    ]


def base_wp_nxe(with_rsvd: bool) -> list:
    """CR0.WP=1, EFER.NXE=1, no SMEP/SMAP/PKE; `with_rsvd` adds the SDM's RSVD cases."""
    return [
        (P(KRW + 0x18), ("ok", frame(0) + 0x18)),
        (P(KRW + 0x18, user=True), ("pf", 0x05)),  # U on S page: P|U
        (P(URO, "write"), ("pf", 0x03)),  # WP=1: P|W
        (P(URO, "write", user=True), ("pf", 0x07)),  # P|W|U
        (P(URO + 8, user=True), ("ok", frame(2) + 8)),
        (P(UNX, "fetch"), ("pf", 0x11)),  # XD with NXE: P|I/D
        (P(UNX, "fetch", user=True), ("pf", 0x15)),
        (P(URW + 0x40, "fetch", user=True), "ok"),
        (P(KRW + 0x40, "fetch"), "ok"),
        (P(NP), ("pf", 0x00)),
        (P(NP, "write", user=True), ("pf", 0x06)),
        (P(NP, "fetch"), ("pf", 0x10)),  # I/D reported since NXE=1
        (P(KRO, "write"), ("pf", 0x03)),
        *(rsvd_cases(0x1) if with_rsvd else []),
        (P(M2 + 0x1008), ("ok", 0x601008)),  # 2M: offset bits 20:0
        (P(G1 + FRAMES + 0x10), ("ok", FRAMES + 0x10)),  # 1G: offset bits 29:0
        (P(G1 + FRAMES + 0x10, user=True), ("ok", FRAMES + 0x10)),
        (P(NONCANON), ("gp", 0)),  # §6.15: #GP(0), CR2 untouched
        (P(NONCANON, "write", user=True), ("gp", 0)),
    ]


def wp0() -> list:
    """CR0.WP=0."""
    return [
        (P(URO + 8, "write"), "ok"),  # supervisor write ignores RO if WP=0
        (P(KRO + 8, "write"), "ok"),
        (P(URO + 8, "write", user=True), ("pf", 0x07)),
    ]


def smep() -> list:
    """CR4.SMEP=1."""
    return [
        (P(URW + 0x40, "fetch"), ("pf", 0x11)),  # SMEP: supervisor fetch from U page
        (P(KRW + 0x40, "fetch"), "ok"),
        (P(URW + 0x40, "fetch", user=True), "ok"),
        (P(URW + 0x40), "ok"),  # data access unaffected
    ]


def smap_and_ac() -> list:
    """CR4.SMAP=1, explicit accesses with and without EFLAGS.AC."""
    return [
        (P(URW + 8), ("pf", 0x01)),  # SMAP: P only
        (P(URW + 8, ac=True), ("ok", frame(1) + 8)),  # explicit access with AC=1 allowed
        (P(URW + 8, "write"), ("pf", 0x03)),
        (P(URW + 8, "write", ac=True), "ok"),
        (P(URO + 8, "write", ac=True), ("pf", 0x03)),  # AC does not override WP
        (P(URW + 8, user=True), "ok"),
        (P(KRW + 8), "ok"),
    ]


def pkru_ad1(supervisor_read: bool) -> list:
    """CR4.PKE=1, PKRU.AD1 (bit 2); `supervisor_read` adds the SDM's CPL0 read of the keyed user
    page (Bochs decides keys by CPL instead: tests/test_oracle_bochs.py PK_TABLE)."""
    return [
        (P(UPK + 8, user=True), ("pf", 0x25)),  # P|U|PK
        *([(P(UPK + 8), ("pf", 0x21))] if supervisor_read else []),  # supervisor data access to a U page
        (P(UPK + 0x40, "fetch", user=True), "ok"),  # keys do not apply to fetches
        (P(URW + 8, user=True), "ok"),  # key 0 allowed
    ]


def pkru_wd1() -> list:
    """CR4.PKE=1, PKRU.WD1 (bit 3)."""
    return [
        (P(UPK + 8, user=True), ("ok", frame(4) + 8)),
        (P(UPK + 8, "write", user=True), ("pf", 0x27)),
        (P(UPK + 8, "write"), ("pf", 0x23)),  # WP=1: supervisor writes checked too
    ]


def check_accessed_dirty(oracle, b, st) -> None:
    """§4.8: A set on every entry used by a successful access, D on the leaf of a write; a
    not-present walk writes nothing to the leaf; the write lands; the harness slot of the root
    table comes back clear and the caller's image is not changed."""
    pte_r = b.entry_address(AD_R, 1, create=False)
    pte_w = b.entry_address(AD_W, 1, create=False)
    assert b.memory.read_u64(pte_r) == frame(7) | 0x3  # P|RW, A=D=0
    assert b.memory.read_u64(pte_w) == frame(8) | 0x7  # P|RW|US
    res = run_cases(
        oracle,
        b,
        st,
        [
            (P(AD_R + 8), "ok"),
            (Probe(AD_W + 8, "write", user=True, wvalue=0x1234), "ok"),
            (P(NP), ("pf", 0x00)),
        ],
    )
    after = res.memory_after
    assert after.read_u64(pte_r) == frame(7) | 0x23  # +A
    assert after.read_u64(pte_w) == frame(8) | 0x67  # +A +D
    assert after.read_u64(b.entry_address(NP, 1, create=False)) == 0
    assert after.read_u64(frame(8) + 8) == 0x1234  # the write landed
    assert after.read_u64(frame(8) + 16) == tag_value(frame(8) + 16)
    # The harness slot is the backend's: the caller's root table comes back unchanged.
    assert after.read_u64(b.root + 511 * 8) == 0
    assert b.memory.read_u64(pte_r) == frame(7) | 0x3


def check_big_batch_split(oracle, b, st, max_probes: int) -> None:
    """MAX_PROBES + 4 probes take two launches; A/D set by the first carry into the second."""
    probes = [P(KRW + 8)] * (max_probes + 3) + [P(AD_W, "write", user=True)]
    launches = oracle.launches
    res = oracle.run(b.memory, st, probes)
    assert oracle.launches == launches + 2
    assert len(res.results) == max_probes + 4
    assert all(r.outcome == "ok" for r in res.results)
    assert res.memory_after.read_u64(b.entry_address(AD_W, 1, create=False)) & 0x60 == 0x60


def check_bad_image_refused(oracle, b, st) -> None:
    b.memory.write_u64(0x100000, 1)  # harness area
    with pytest.raises(BadInputError, match="harness area"):
        oracle.run(b.memory, st, [P(KRW)])


def user_idt(ram) -> None:
    """A ram_hook: the page holding the harness IDT becomes a user page, so delivering an exception
    reads the IDT with an implicit supervisor access to a user page, which SMAP forbids (§4.6.1)."""
    from harness import guest

    a = guest.HPT_PT + (guest.IDT_GPA >> 12) * 8
    v = struct.unpack_from("<Q", ram, a)[0]
    struct.pack_into("<Q", ram, a, v | 0x4)
