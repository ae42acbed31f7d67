"""The kvm oracle's profile is measured on its host, never assumed: capability discovery
(harness/oracles/kvm.py: _discover) run against stand-in oracles that behave like an AMD host and
like an Intel host, and host_profile's rules checked against the manuals. No /dev/kvm needed: the
stand-ins are the x86pt model under a profile of the other vendor, with CPUID facts faked.

Expectations: PML4E bit 8 is reserved on AMD (APM Vol. 2 §5.3.3, "MBZ") and ignored on Intel
(SDM Vol. 3A Table 4-15); a PDPTE's PS is reserved without 1-GByte pages (SDM §4.5); bits M..51
of an entry are reserved (SDM §4.5); the kvm_pvm blind range is PML4 slot 256.
"""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import dataclasses

import pytest

from harness.oracles.kvm import PVM_BLIND_RANGE, HostFacts, _discover, host_profile
from harness.oracles.kvm_vm import CpuidInfo
from harness.oracles.model import ModelOracle
from x86pt.build import Builder
from x86pt.state import PROFILES, Features, Profile
from x86pt.walk import Access, PageFault, Translation, walk


class FakeKvm:
    """A stand-in for KvmOracle: runs batches on the model under `profile`, advertises `cpuid`."""

    def __init__(self, profile: Profile, cpuid: CpuidInfo) -> None:
        self.model = ModelOracle(profile=profile)
        self.cpuid_advertised = cpuid
        self.ram_size = self.model.ram_size
        self.runs = 0

    def run(self, memory, state, probes, **kw):
        self.runs += 1
        return self.model.run(memory, state, probes)


AMD_HOST = Profile(
    "fake-amd-pvm",
    vendor="amd",
    maxphyaddr=48,
    features=Features(gbpages=False, la57=False, pku=False, smep=True, smap=True),
    a_on_faulting_walk="none",
    cpl3_blind_ranges=(PVM_BLIND_RANGE,),
)
AMD_CPUID = CpuidInfo(
    vendor="AuthenticAMD",
    maxphyaddr=48,
    nx=True,
    gbpages=False,
    la57=False,
    pku=False,
    smep=False,
    smap=False,
)
INTEL_HOST = Profile(
    "fake-intel",
    vendor="intel",
    maxphyaddr=46,
    features=Features(gbpages=True, la57=False, pku=False, smep=True, smap=True),
)
INTEL_CPUID = CpuidInfo(
    vendor="GenuineIntel", maxphyaddr=46, nx=True, gbpages=True, la57=False, pku=False, smep=True, smap=True
)


def test_discovery_on_an_amd_host_finds_its_facts():
    caps, facts = _discover(FakeKvm(AMD_HOST, AMD_CPUID))
    assert facts == HostFacts(
        vendor="amd",
        maxphyaddr=48,
        gbpages=False,
        la57=False,
        pku=False,
        smep=True,
        smap=True,
        nx=True,
        rsvd_sets_p=True,
        top_bit8_reserved=True,
        cpl3_blind_slot256=True,
    )
    assert (caps.vendor, caps.maxphyaddr, caps.gbpages) == ("amd", 48, False)
    prof = host_profile(facts)
    assert prof.vendor == "amd" and prof.top_bit8_reserved
    assert prof.cpl3_blind_ranges == (PVM_BLIND_RANGE,)


def test_discovery_on_an_intel_host_finds_its_facts():
    caps, facts = _discover(FakeKvm(INTEL_HOST, INTEL_CPUID))
    assert facts == HostFacts(
        vendor="intel",
        maxphyaddr=46,
        gbpages=True,
        la57=False,
        pku=False,
        smep=True,
        smap=True,
        nx=True,
        rsvd_sets_p=True,
        top_bit8_reserved=False,
        cpl3_blind_slot256=False,
    )
    prof = host_profile(facts)
    assert prof.vendor == "intel" and not prof.top_bit8_reserved
    assert prof.cpl3_blind_ranges == () and prof.features.gbpages and prof.maxphyaddr == 46


def test_discovery_reads_the_rsvd_error_code_of_the_host():
    """A host whose RSVD faults lack P (as QEMU TCG's do) is measured so, not assumed."""
    no_p = dataclasses.replace(INTEL_HOST, name="fake-intel-nop", rsvd_sets_p=False)
    _, facts = _discover(FakeKvm(no_p, INTEL_CPUID))
    assert facts.rsvd_sets_p is False and host_profile(facts).rsvd_sets_p is False


def test_discovery_refuses_an_unknown_vendor():
    from x86pt.errors import OracleUnavailable

    odd = dataclasses.replace(INTEL_CPUID, vendor="HygonGenuine")
    with pytest.raises(OracleUnavailable, match="neither Intel nor AMD"):
        _discover(FakeKvm(INTEL_HOST, odd))


def _facts(**kw) -> HostFacts:
    base = dict(
        vendor="intel",
        maxphyaddr=48,
        gbpages=False,
        la57=False,
        pku=False,
        smep=True,
        smap=True,
        nx=True,
        rsvd_sets_p=True,
        top_bit8_reserved=False,
        cpl3_blind_slot256=False,
    )
    base.update(kw)
    return HostFacts(**base)


@pytest.mark.parametrize("vendor,bit8,expect_rsvd", [("amd", True, True), ("intel", False, False)])
def test_model_under_the_host_profile_treats_pml4e_bit8_by_vendor(vendor, bit8, expect_rsvd):
    prof = host_profile(_facts(vendor=vendor, top_bit8_reserved=bit8))
    b = Builder(maxphyaddr=48, vendor=vendor, table_base=0x200000)
    b.map(0x8000000000, 0x400000, 0x1000, 0x1000, "p rw")
    a = b.entry_address(0x8000000000, 4, create=False)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << 8)
    r = walk(b.state(profile=prof), b.memory, 0x8000000000, Access("read"))
    if expect_rsvd:
        assert isinstance(r, PageFault) and r.error_code == 0x09  # P|RSVD
    else:
        assert isinstance(r, Translation) and r.pa == 0x400000


def test_model_under_the_host_profile_uses_the_measured_maxphyaddr():
    prof = host_profile(_facts(maxphyaddr=39))
    b = Builder(maxphyaddr=39, table_base=0x200000)
    b.map(0x400000, 0x400000, 0x1000, 0x1000, "p rw")
    a = b.entry_address(0x400000, 1, create=False)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << 39)
    r = walk(b.state(profile=prof), b.memory, 0x400000, Access("read"))
    assert isinstance(r, PageFault) and r.error_code == 0x09


def test_no_live_profile_is_hard_coded_to_a_vendor():
    """The static `kvm` entry only stands in for replays without an oracle: it follows the SDM."""
    stand_in = PROFILES["kvm"]
    assert stand_in.vendor == "intel" and stand_in.cpl3_blind_ranges == ()
    assert PROFILES["kvm-epyc-pvm"].vendor == "amd"  # the record of the first host
