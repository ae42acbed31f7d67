# SPDX-License-Identifier: GPL-2.0-or-later
"""KVM oracle: the probe guest (harness/guest) in a fresh VM per batch, driven through /dev/kvm
(the API layer, `_Vm`, is harness/oracles/kvm_vm.py). docs/oracles.md §6 (ioctls, measured
results, pitfalls). Long mode is set directly through KVM_SET_SREGS; the guest then loads
the test registers itself.

On this project's host (kvm_pvm, AMD, shadow paging) CPL0 probes exercise KVM's software walker
and CPL3 probes the hardware through shadow PTEs (docs/oracles.md §6). What the oracle really does is found
by running a tiny batch (`capabilities()`), not by trusting CPUID (docs/oracles.md §6).
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import harness.guest as guest
from x86pt.oracle import RIG_RAM_SIZE, BatchResult, Capabilities, Probe, tag_value
from harness.oracles.base import implicit_support
from x86pt.errors import OracleError, OracleUnavailable
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PF_P,
    PF_RSVD,
    Features,
    PagingState,
    Profile,
    profile_named,
)
from harness.oracles.kvm_vm import (
    API_VERSION,
    CPUID_MAX_ENTRIES,
    DEV,
    KVM_GET_API_VERSION,
    KVM_GET_SUPPORTED_CPUID,
    KvmCpuid2,
    _ioctl,
    _leaf,
    _Vm,
    cpuid_info,
    kvm_usable,
)


class KvmOracle:
    """The `kvm` oracle (profile 'kvm'). One /dev/kvm fd per oracle; a fresh VM per batch, so no
    state (busy TSS, TLB, A/D) leaks from one batch into the next."""

    available = staticmethod(kvm_usable)

    name = "kvm"

    def __init__(self, ram_size: int = RIG_RAM_SIZE, timeout: float = 20.0, patch_cpuid: bool = True) -> None:
        self.ram_size = ram_size
        self.timeout = timeout
        self._caps: Capabilities | None = None
        self._facts: HostFacts | None = None
        self._profile: Profile | None = None
        self.last_notes: tuple[str, ...] = ()
        try:
            self.fd = os.open(DEV, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise OracleUnavailable(f"kvm: cannot open {DEV}: {e.strerror}") from None
        try:
            ver = fcntl.ioctl(self.fd, KVM_GET_API_VERSION)
            if ver != API_VERSION:
                raise OracleUnavailable(f"kvm: API version {ver}, expected {API_VERSION}")
            self.cpuid = self._supported_cpuid()
            self.cpuid_advertised = cpuid_info(self.cpuid)
            if patch_cpuid:
                # SMAP is enforced only with the CPUID bit present (docs/oracles.md §6.4); SMEP works either
                # way on kvm_pvm. Advertise both so CR4 writes are accepted.
                l7 = _leaf(self.cpuid, 7)
                if l7 is not None:
                    l7.ebx |= (1 << 7) | (1 << 20)
        except BaseException:
            os.close(self.fd)
            raise

    def _supported_cpuid(self) -> KvmCpuid2:
        c = KvmCpuid2()
        c.nent = CPUID_MAX_ENTRIES
        _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, c, "KVM_GET_SUPPORTED_CPUID")
        return c

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "KvmOracle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- running -------------------------------------------------------------------------------
    def run(
        self,
        memory: SparseMemory,
        state: PagingState,
        probes: Sequence[Probe],
        *,
        invlpg: bool = True,
        user_pkey: int = 0,
    ) -> BatchResult:
        if self.fd < 0:
            raise OracleError("kvm: oracle is closed")
        t0 = time.perf_counter()
        with _Vm(self.fd, self.ram_size, self.cpuid) as vm:
            ram = vm.ram
            guest.prepare_ram(
                ram,
                memory,
                state,
                probes,
                clear=False,
                ram_size=self.ram_size,
                invlpg=invlpg,
                user_pkey=user_pkey,
            )
            vm.enter_long_mode(
                guest.boot_registers(state), guest.ENTRY_VA, guest.KBASE + guest.KSTACK_TOP_GPA
            )
            notes = vm.run_to_exit_port(guest.DEBUG_EXIT_PORT, self.timeout)
            guest.check_status(ram, "kvm")
            results = guest.read_results(ram, len(probes), probes)
            after = guest.image_after(ram, memory, state, ram_size=self.ram_size)
        self.last_notes = tuple(notes)
        return BatchResult(results, after, time.perf_counter() - t0)

    def time_vm_creation(self, n: int = 20) -> float:
        """Mean seconds to create VM + memslot + vCPU + CPUID, and tear them down."""
        t0 = time.perf_counter()
        for _ in range(n):
            with _Vm(self.fd, self.ram_size, self.cpuid):
                pass
        return (time.perf_counter() - t0) / n

    # -- capabilities ----------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            self._caps, self._facts = _discover(self)
        return self._caps

    @property
    def profile(self) -> Profile:
        """The model's profile for this host's KVM, from what capabilities() measured."""
        if self._profile is None:
            self.capabilities()
            self._profile = host_profile(self._facts)
        return self._profile


# The capability image: every mapping below RIG_IMAGE_BASE + 1 MiB, frames tagged.
_CAP_VA_4K = 0x400000  # S RW 4K
_CAP_VA_USER = 0x401000  # U RW 4K
_CAP_VA_NX = 0x402000  # S RW XD 4K
_CAP_VA_1G = 0x40000000  # PDPTE.PS -> PA 0 (harness area: readable if mapped)
_CAP_VA_BIT8 = 0x8000000000  # PML4[1] with bit 8 (AMD: reserved) -> 4K page
_CAP_VA_MBIT = 0x600000  # PTEs at 0x600000 + 0x1000*k carry address bit 36+k
_CAP_FRAME = 0x300000
# kvm_pvm keeps PML4 slot 256 for its host: CPL3 accesses there never reach the guest's tables.
# Both slots below map a U RW page; a host is "blind" at 256 when that read faults and 257's works.
PVM_BLIND_RANGE = (0xFFFF800000000000, 0xFFFF808000000000)
_CAP_VA_SLOT256 = PVM_BLIND_RANGE[0]
_CAP_VA_SLOT257 = PVM_BLIND_RANGE[1]


def _cap_image() -> tuple[SparseMemory, int]:
    """A hand-written image (raw entries, no builder) for capability discovery."""
    m = SparseMemory(RIG_RAM_SIZE)
    pml4, pdpt, pd, pt, pdpt1, pd1, pt1, pt_m = (0x200000 + i * 0x1000 for i in range(8))
    from x86pt.fields import BIT_A as A, BIT_P as P, BIT_PS as PS, BIT_RW as RW, BIT_US as US

    t = P | RW | US | A
    m.write_u64(pml4 + 0 * 8, pdpt | t)
    m.write_u64(pdpt + 0 * 8, pd | t)
    m.write_u64(pd + 2 * 8, pt | t)  # VA 0x400000
    m.write_u64(pd + 3 * 8, pt_m | t)  # VA 0x600000
    m.write_u64(pt + 0 * 8, _CAP_FRAME | P | RW)
    m.write_u64(pt + 1 * 8, _CAP_FRAME | P | RW | US)
    m.write_u64(pt + 2 * 8, _CAP_FRAME | P | RW | (1 << 63))
    m.write_u64(pdpt + 1 * 8, 0 | P | RW | PS)  # 1G leaf at VA 0x40000000
    m.write_u64(pml4 + 1 * 8, pdpt1 | t | (1 << 8))  # VA 0x8000000000: PML4E bit 8
    m.write_u64(pdpt1, pd1 | t)
    m.write_u64(pd1, pt1 | t)
    m.write_u64(pt1, _CAP_FRAME | P | RW)
    for k in range(16):
        m.write_u64(pt_m + k * 8, (_CAP_FRAME | (1 << (36 + k))) | P | RW)
    # PML4 slots 256 and 257 share one PDPT -> PD -> PT chain ending in a U RW page at offset 0.
    pdpt_hi, pd_hi, pt_hi = (0x200000 + i * 0x1000 for i in range(8, 11))
    m.write_u64(pml4 + 256 * 8, pdpt_hi | t)
    m.write_u64(pml4 + 257 * 8, pdpt_hi | t)
    m.write_u64(pdpt_hi, pd_hi | t)
    m.write_u64(pd_hi, pt_hi | t)
    m.write_u64(pt_hi, _CAP_FRAME | P | RW | US)
    for off in range(0, 0x1000, 8):
        m.write_u64(_CAP_FRAME + off, tag_value(_CAP_FRAME + off))
    m.write(_CAP_FRAME, b"\xc3")
    return m, pml4


@dataclass(frozen=True)
class HostFacts:
    """What one KVM does, measured by running the capability image (and CPUID's vendor). The
    input of host_profile; tests fake it to stand for a host of the other vendor."""

    vendor: str  # "intel" | "amd" (CPUID leaf 0)
    maxphyaddr: int  # the lowest PTE address bit that faults RSVD
    gbpages: bool  # a PDPTE with PS=1 translates
    la57: bool
    pku: bool
    smep: bool
    smap: bool
    nx: bool
    rsvd_sets_p: bool  # a reserved-bit #PF carries P
    top_bit8_reserved: bool  # PML4E bit 8 faults RSVD
    cpl3_blind_slot256: bool  # CPL3 reads of PML4 slot 256 fault although mapped (kvm_pvm)


def host_profile(f: HostFacts) -> Profile:
    """The model's profile for a KVM with facts `f`: the manual of its CPUID vendor, with each
    fact the host measured; what the manual does not allow for is a named profile field."""
    notes = [f"KVM on this host ({f.vendor}, M={f.maxphyaddr})"]
    if f.vendor == "intel" and f.top_bit8_reserved:
        notes.append("PML4E bit 8 reserved although the vendor is Intel (not modelled)")
    return Profile(
        "kvm",
        vendor=f.vendor,
        maxphyaddr=f.maxphyaddr,
        features=Features(gbpages=f.gbpages, la57=f.la57, pku=f.pku, smep=f.smep, smap=f.smap, nx=f.nx),
        rsvd_sets_p=f.rsvd_sets_p,
        amd_top_bit8_reserved=f.vendor == "amd" and f.top_bit8_reserved,
        # KVM's software walker (paging_tmpl.h) sets A only on a walk that succeeds;
        # the hardware may do either, and the compare treats faulting-walk A as
        # don't-care (as KUT does), so this is the safe choice on every host.
        a_on_faulting_walk="none",
        cpl3_blind_ranges=(PVM_BLIND_RANGE,) if f.cpl3_blind_slot256 else (),
        note="; ".join(notes),
    )


def _discover(oracle: KvmOracle) -> tuple[Capabilities, HostFacts]:
    mem, root = _cap_image()
    base = PagingState(
        cr3=root,
        cr0=CR0_PE | CR0_PG | CR0_WP,
        cr4=CR4_PAE | CR4_SMEP | CR4_SMAP,
        efer=EFER_LME | EFER_LMA | EFER_NXE,
        profile=profile_named("intel"),
    )
    probes = [
        Probe(_CAP_VA_4K),
        Probe(_CAP_VA_1G),
        Probe(_CAP_VA_BIT8),
        Probe(_CAP_VA_USER, "fetch"),
        Probe(_CAP_VA_USER, "read"),
        Probe(_CAP_VA_NX, "fetch"),
    ]
    probes += [Probe(_CAP_VA_MBIT + k * 0x1000) for k in range(16)]
    probes += [Probe(_CAP_VA_SLOT256 + 8, user=True), Probe(_CAP_VA_SLOT257 + 8, user=True)]
    probes += [Probe(va, user=u, implicit=True) for u in (False, True) for va in (_CAP_VA_USER, _CAP_VA_4K)]
    res = oracle.run(mem, base, probes).results
    impl0, impl3, impl_note = implicit_support(res[24:28], "kvm")
    notes: list[str] = []
    if res[0].outcome != "ok" or res[0].pa != _CAP_FRAME:
        raise OracleError(f"kvm: capability self-test: a plain 4K read gave {res[0]}")
    gbpages = res[1].outcome == "ok"
    rsvd_code = res[1].error_code if res[1].outcome == "page_fault" else None
    bit8_reserved = res[2].outcome == "page_fault" and bool((res[2].error_code or 0) & PF_RSVD)
    smep = res[3].outcome == "page_fault" and res[3].error_code == 0x11
    smap = res[4].outcome == "page_fault" and res[4].error_code == 0x01
    nx = res[5].outcome == "page_fault" and res[5].error_code == 0x11
    m = 52
    for k in range(16):
        r = res[6 + k]
        if r.outcome == "page_fault" and (r.error_code or 0) & PF_RSVD:
            m = 36 + k
            break
    rsvd_sets_p = bool(rsvd_code is not None and rsvd_code & PF_P) if rsvd_code is not None else True
    if rsvd_code is None:
        # 1G pages work: take the RSVD code from the MAXPHYADDR probe instead.
        r = res[6 + m - 36] if m < 52 else None
        rsvd_sets_p = bool(r and r.error_code and r.error_code & PF_P)
    s256, s257 = res[22], res[23]
    if s257.outcome != "ok" or s257.pa not in (None, _CAP_FRAME + 8):
        raise OracleError(f"kvm: capability self-test: a CPL3 read of PML4 slot 257 gave {s257}")
    blind = s256.outcome != "ok"
    adv = oracle.cpuid_advertised
    vendor = "amd" if "AMD" in adv.vendor else ("intel" if "Intel" in adv.vendor else adv.vendor)
    if vendor not in ("intel", "amd"):
        raise OracleUnavailable(f"kvm: CPUID vendor {adv.vendor!r} is neither Intel nor AMD")
    if (vendor == "amd") != bit8_reserved:
        notes.append(
            f"PML4E bit 8 {'reserved' if bit8_reserved else 'not reserved'} with vendor {adv.vendor}"
        )
    if adv.maxphyaddr != m:
        notes.append(f"CPUID says MAXPHYADDR {adv.maxphyaddr}, walks say {m}")
    if adv.gbpages != gbpages:
        notes.append(f"CPUID pdpe1gb={adv.gbpages}, 1G leaves {'work' if gbpages else 'fault RSVD'}")
    if not adv.smep and smep:
        notes.append("SMEP enforced although KVM_GET_SUPPORTED_CPUID lacks it (patched in)")
    if blind:
        notes.append(
            f"CPL3 accesses to PML4 slot 256 fault although mapped ({s256.outcome} "
            f"{s256.error_code if s256.error_code is not None else ''}): kvm_pvm's host range"
        )
    la57 = adv.la57 and _try_la57(oracle)
    pku = adv.pku and _try_pku(oracle, mem, base)
    caps = Capabilities(
        name="kvm",
        vendor=vendor,
        maxphyaddr=m,
        gbpages=gbpages,
        la57=la57,
        pku=pku,
        smep=smep,
        smap=smap,
        nx=nx,
        rsvd_sets_p=rsvd_sets_p,
        implicit_cpl0=impl0,
        implicit_cpl3=impl3,
        implicit_note=impl_note,
        ram_size=oracle.ram_size,
        version=_kernel_version(),
        notes=tuple(notes),
    )
    facts = HostFacts(
        vendor=vendor,
        maxphyaddr=m,
        gbpages=gbpages,
        la57=la57,
        pku=pku,
        smep=smep,
        smap=smap,
        nx=nx,
        rsvd_sets_p=rsvd_sets_p,
        top_bit8_reserved=bit8_reserved,
        cpl3_blind_slot256=blind,
    )
    return caps, facts


def _try_la57(oracle: KvmOracle) -> bool:
    m = SparseMemory(RIG_RAM_SIZE)
    pml5, pml4, pdpt, pd, pt = (0x200000 + i * 0x1000 for i in range(5))
    t = 0x27
    m.write_u64(pml5, pml4 | t)
    m.write_u64(pml4, pdpt | t)
    m.write_u64(pdpt, pd | t)
    m.write_u64(pd + 2 * 8, pt | t)
    m.write_u64(pt, _CAP_FRAME | 3)
    m.write_u64(_CAP_FRAME, tag_value(_CAP_FRAME))
    st = PagingState(cr3=pml5, cr4=CR4_PAE | CR4_LA57, profile=profile_named("intel"))
    try:
        r = oracle.run(m, st, [Probe(_CAP_VA_4K)]).results[0]
    except OracleError:
        return False
    return r.outcome == "ok" and r.pa == _CAP_FRAME


def _try_pku(oracle: KvmOracle, mem: SparseMemory, base: PagingState) -> bool:
    m = mem.copy()
    pte = 0x200000 + 3 * 0x1000 + 1 * 8  # the PTE of the U page at _CAP_VA_USER: key 1
    m.write_u64(pte, m.read_u64(pte) | (1 << 59))
    st = base.replace(cr4=CR4_PAE | CR4_PKE, pkru=0b0100)  # AD for key 1
    try:
        r = oracle.run(m, st, [Probe(_CAP_VA_USER, user=True)]).results[0]
    except OracleError:
        return False
    return r.outcome == "page_fault" and bool((r.error_code or 0) & (1 << 5))


@lru_cache(maxsize=1)
def _kernel_version() -> str:
    u = os.uname()
    return f"Linux {u.release}"


@lru_cache(maxsize=1)
def _cached() -> tuple[Capabilities, Profile]:
    with KvmOracle() as o:
        return o.capabilities(), o.profile


def cached_capabilities() -> Capabilities:
    """Capabilities of this host's KVM, discovered once per process."""
    return _cached()[0]


def cached_profile() -> Profile:
    """The profile of this host's KVM (host_profile of what it measured), once per process."""
    return _cached()[1]


def bench(n: int = 8192, repeat: int = 3) -> dict[str, float]:
    """Measured here, same run: VM creation (ms) and probes/s for CPL0 ok, CPL0 #PF, CPL3 ok,
    CPL3 #PF (best of `repeat` batches of `n` probes on one 4K page)."""
    mem = SparseMemory(RIG_RAM_SIZE)
    pml4, pdpt, pd, pt = (0x200000 + i * 0x1000 for i in range(4))
    for a, v in (
        (pml4, pdpt | 0x27),
        (pdpt, pd | 0x27),
        (pd + 2 * 8, pt | 0x27),
        (pt, _CAP_FRAME | 0x27),
        (pt + 8, 0),
    ):
        mem.write_u64(a, v)
    mem.write_u64(_CAP_FRAME, tag_value(_CAP_FRAME))
    st = PagingState(cr3=pml4, profile=profile_named("intel"))
    out: dict[str, float] = {}
    with KvmOracle() as o:
        out["vm_create_ms"] = o.time_vm_creation(50) * 1e3
        for label, probe in (
            ("cpl0_ok", Probe(0x400000)),
            ("cpl0_fault", Probe(0x401000)),
            ("cpl3_ok", Probe(0x400000, user=True)),
            ("cpl3_fault", Probe(0x401000, user=True)),
        ):
            best = min(o.run(mem, st, [probe] * n).seconds for _ in range(repeat))
            out[label + "_per_s"] = n / best
            out[label + "_batch_ms"] = best * 1e3
    return out


if __name__ == "__main__":
    import json
    import sys

    ok, why = kvm_usable()
    if not ok:
        print(f"kvm: error: {why}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps({"capabilities": cached_capabilities().to_json(), "bench": bench()}, indent=1))
