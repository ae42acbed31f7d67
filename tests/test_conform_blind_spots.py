# SPDX-License-Identifier: GPL-2.0-or-later
"""Conformance where the rig used to be blind (issue 12): on every oracle present here,

* a reserved bit from MAXPHYADDR to 51 in every kind of entry (PML5E, PML4E, PDPTE, 1G PDPTE,
  PDE, 2M PDE, PTE), for the MAXPHYADDR the oracle measured (SDM Vol. 3A §4.5, Tables 4-15..4-20:
  bits 51:M are reserved in every present entry);
* implicit supervisor-mode reads (descriptor-table reads, SDM Vol. 3A §4.6) at CPL0 and CPL3,
  with and without SMAP and EFLAGS.AC, error code and CR2 included (the whole implicit space of
  the extended matrix);
* the classic matrix's SMAP and SMAP+AC configurations.

Zero mismatches allowed: every difference must be a named profile field (x86pt/state.py).
Skips (or, with X86PT_REQUIRE_ORACLES, fails) with the registry's reason when an oracle is absent;
an oracle that cannot run implicit reads skips that test with the reason it measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from harness import matrix as mx
from harness import matrix_pack as mp
from harness.differential import run_conformance
from harness.matrix import MatrixFeatures, matrix_for
from harness.matrix_pack import MatrixSource
from x86pt.state import as_profile


def _setup(o):
    caps = o.capabilities()
    return caps, as_profile(o.profile), MatrixFeatures.from_caps(caps)


def _check(o, src):
    mms = []
    summ = run_conformance(o, src, on_mismatch=mms.append)
    detail = "\n\n".join(m.render() for m in mms[:4])
    assert summ.mismatches == 0, f"{summ.mismatches} mismatches in {summ.cases} cases on {o.name}:\n{detail}"
    return summ


@dataclass
class FlagSource:
    """Hand-picked matrix cases, batched by CPU state."""

    cases: list[int]
    feat: MatrixFeatures
    profile: object
    name: str = "blind"

    @property
    def total(self) -> int:
        return len(self.cases)

    def batches(self):
        by_state: dict[int, list[tuple[str, int]]] = {}
        for k, f in enumerate(self.cases):
            by_state.setdefault(mp.state_bits(f), []).append((f"{self.name}#{k}", f))
        for cases in by_state.values():
            for lo in range(0, len(cases), 2048):
                yield mp.build_batch(cases[lo : lo + 2048], self.feat, self.profile)


def high_bit_cases(feat: MatrixFeatures) -> list[int]:
    """Bit b (M <= b <= 51) in each kind of entry, for reads, writes and fetches at CPL0 and CPL3.
    The rest of the walk is a plain user RW mapping, so only the reserved bit can fault."""
    m = feat.maxphyaddr
    out = []
    ok = mx.PDE_P | mx.PDE_RW | mx.PDE_USER | mx.PTE_P | mx.PTE_RW | mx.PTE_USER
    shapes = [
        ("pte", ok | mx.PTE_51, 0),
        ("pde", ok | mx.PDE_51, 0),
        ("pde", (ok & ~(mx.PTE_P | mx.PTE_RW | mx.PTE_USER)) | mx.PDE_PSE | mx.PDE_51, 0),
    ]
    shapes += [
        (at, ok | mx.PDE_51, mx.HI_AT_NAMES.index(at) << mx.HI_AT_SHIFT)
        for at in ("pdpte", "pdpte1g", "pml4e")
    ]
    if feat.la57:
        shapes.append(("pml5e", ok | mx.PDE_51 | mx.LA57, mx.HI_AT_NAMES.index("pml5e") << mx.HI_AT_SHIFT))
    for _, flags, at in shapes:
        for b in range(m, 52):
            for acc in (0, mx.ACC_WRITE, mx.ACC_FETCH):
                for user in (0, mx.ACC_USER):
                    out.append(flags | at | b << mx.HI_BIT_SHIFT | acc | user | mx.EFER_NX | mx.CR0_WP_F)
    return out


def test_high_bit_cases_cover_every_entry_kind_and_bit():
    feat = MatrixFeatures(maxphyaddr=40, la57=True)
    seen = {
        ("pte" if f & mx.PTE_51 else mx.hi_at(f), bool(f & mx.PDE_PSE), mx.hi_bit(f))
        for f in high_bit_cases(feat)
    }
    kinds = {
        ("pte", False),
        ("pde", False),
        ("pde", True),
        ("pdpte", False),
        ("pdpte1g", False),
        ("pml4e", False),
        ("pml5e", False),
    }
    assert seen == {(k, ps, b) for k, ps in kinds for b in range(40, 52)}


def test_bit_m_to_51_is_reserved_at_every_level(oracle):
    caps, prof, feat = _setup(oracle)
    if feat.maxphyaddr >= 52:
        pytest.skip(f"{oracle.name}: MAXPHYADDR 52 leaves no reserved address bits")
    cases = high_bit_cases(feat)
    summ = _check(oracle, FlagSource(cases, feat, prof, "maxphyaddr"))
    assert summ.cases == len(cases) >= 6 * 6 * (52 - feat.maxphyaddr)


def test_implicit_supervisor_reads(oracle):
    caps, prof, feat = _setup(oracle)
    if not caps.implicit_cpl0:
        pytest.skip(f"{oracle.name} cannot run implicit reads: {caps.implicit_note}")
    m = matrix_for(feat, extended=True)
    base = 0
    for space in m.spaces:
        if space.name == "implicit":
            break
        base += space.size
    assert space.name == "implicit"
    # every case of the space (9,216 with PKU and M=40; ~6 s on QEMU, under 1 s elsewhere)
    summ = _check(oracle, MatrixSource(m, prof, start=base, stop=base + space.size, name="implicit"))
    assert summ.cases == space.size
    if not caps.implicit_cpl3:
        pytest.skip(f"{oracle.name}: CPL3 implicit reads not run: {caps.implicit_note}")


def test_classic_matrix_smap_configurations(oracle):
    caps, prof, feat = _setup(oracle)
    if not feat.smap:
        pytest.skip(f"{oracle.name} has no SMAP")
    m = matrix_for(feat)
    idx = np.sort(np.random.default_rng(77).choice(m.size, 6000, replace=False))
    flags = np.array([m.flags_at(int(i)) for i in idx], dtype=np.uint64)
    smap = idx[(flags & np.uint64(mx.SMAP)) != 0][:1500]
    assert len(smap) >= 1000
    _check(oracle, MatrixSource(m, prof, indices=smap, name="smap"))


def test_random_tables_carry_implicit_reads_at_both_cpls():
    from harness.random_tables import RandomSource
    from x86pt.state import profile_named

    prof = profile_named("unicorn")
    feat = MatrixFeatures.from_profile(prof)
    probes = [p for b in RandomSource(feat, prof, seed=3, cases=3000).batches() for p in b.probes]
    impl = [p for p in probes if p.implicit]
    assert len(impl) > 50 and {p.user for p in impl} == {False, True}
    assert all(p.access == "read" for p in impl)
    off = MatrixFeatures(maxphyaddr=40, implicit_cpl0=False, implicit_cpl3=False)
    assert not any(p.implicit for b in RandomSource(off, prof, seed=3, cases=500).batches() for p in b.probes)
