"""PagingState: the architectural inputs of a walk, and Profiles: the named, tested ways an
implementation (a vendor's manual, or an oracle we compare with) behaves.

Control-register bits: SDM Vol. 3A §2.5 (CR0/CR4), §2.2.1 (EFER); docs/paging.md §2.1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from x86pt.errors import BadInputError, StateError
from x86pt.fields import BIT_8, BIT_PS, BIT_XD, Kind, Level, levels_for, masks_for

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31

CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_PKS = 1 << 24

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

RFLAGS_AC = 1 << 18

# Bits a CPU accepts (anything else is reserved and #GPs on MOV/WRMSR). CR0: PE MP EM TS ET NE WP AM
# NW CD PG (SDM Vol. 3A §2.5). CR4: bits 0-14 (VME..SMXE), 16-25 (FSGSBASE PCIDE OSXSAVE KL SMEP
# SMAP PKE CET PKS UINTR), 27 LASS, 28 LAM_SUP; 15, 26 and 63:29 are reserved. EFER: SCE LME LMA NXE
# on Intel (§2.2.1); AMD adds SVME LMSLE FFXSR TCE (12-15), MCOMMIT 17, INTWB 18, UAIE 20,
# AIBRSE 21 (APM Vol. 2 §3.1.7).
CR0_DEFINED = 0x1F | CR0_NE | CR0_WP | (1 << 18) | (1 << 29) | (1 << 30) | CR0_PG
CR4_DEFINED = 0x7FFF | (0x3FF << 16) | (1 << 27) | (1 << 28)
EFER_DEFINED_INTEL = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
EFER_DEFINED_AMD = EFER_DEFINED_INTEL | (0xF << 12) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21)

# #PF error code bits (SDM Vol. 3A §4.7).
PF_P = 1 << 0
PF_W = 1 << 1
PF_U = 1 << 2
PF_RSVD = 1 << 3
PF_ID = 1 << 4
PF_PK = 1 << 5


@dataclass(frozen=True)
class Features:
    """What the modelled CPU supports (CPUID). Only `gbpages` changes a walk by itself (PDPTE.PS is
    reserved without it); the others say which CR4 bits the CPU would accept."""

    gbpages: bool = True
    la57: bool = True
    pku: bool = True
    pks: bool = False
    smep: bool = True
    smap: bool = True
    nx: bool = True


@dataclass(frozen=True)
class Profile:
    """A named set of behaviours. `intel` and `amd` follow the manuals; `qemu`, `unicorn` and `kvm`
    carry the deviations measured on those oracles (spec/oracle-*.md), each with a test that shows
    the oracle still deviates that way (tests/test_oracle_{qemu,unicorn,kvm}.py, `test_profile_*`
    or the `profile` proofs there), so an oracle upgrade that fixes one is noticed."""

    name: str
    vendor: str = "intel"
    maxphyaddr: int = 46
    features: Features = field(default_factory=Features)
    # RSVD faults carry P=1 (SDM). QEMU >= 7.2 TCG reports 0x08 without P (docs/paging.md §12.1).
    rsvd_sets_p: bool = True
    # PDPTE.PS is honoured even when the CPU lacks 1-GByte pages (QEMU/unicorn, docs/paging.md §12.1).
    ps_1g_without_gbpages: bool = False
    # AMD reserves bit 8 of PML4E/PML5E; QEMU's AMD models do not check it (docs/paging.md §12.1).
    amd_top_bit8_reserved: bool = True
    # A 1G leaf gets A=1 before its reserved-bit and rights checks (QEMU/unicorn, docs/paging.md §12.1).
    a_on_1g_leaf_before_checks: bool = False
    # A faulting walk: 'used' sets A in the non-leaf entries it used (hardware may), 'none' leaves
    # every entry alone (KVM's software walker). Tests treat this as don't-care (KUT does too).
    a_on_faulting_walk: str = "used"
    # Implicit supervisor accesses at CPL<3 honour EFLAGS.AC for SMAP (QEMU/unicorn, docs/paging.md §12.1).
    implicit_smap_honours_ac: bool = False
    # ... at CPL3 too (with implicit_smap_honours_ac; Bochs 2.7, docs/paging.md §12.1).
    implicit_smap_honours_ac_cpl3: bool = False
    # PKRU is applied by the CPL of the access, not by the page's U/S bit (Bochs 2.7, docs/paging.md
    # §12.1): a user-mode access obeys AD and WD on every page; a supervisor-mode access ignores AD
    # and obeys WD on writes when CR0.WP=1, on every page. (SDM §4.6.2: keys of user pages only.)
    pkru_by_cpl: bool = False
    # MOV to CR4 clearing PCIDE invalidates every TLB and paging-structure-cache entry, globals
    # included (SDM §4.10.4.1). QEMU's TCG (7.2, and unicorn's 5.0) flushes nothing for it and
    # keeps using the stale translation (docs/tlb.md; tests/test_tlb_oracles_pcid.py).
    pcide_off_flushes: bool = True
    # A non-canonical access writes CR2 (predicted for QEMU by code reading; not seen on 7.2.22).
    gp_writes_cr2: bool = False
    # What a read of an unbacked physical address returns: 'error', 'zero' (unicorn D6), 'ones'.
    unbacked_read: str = "error"
    # Linear ranges [start, end) where CPL3 accesses never reach the guest's tables and always
    # #PF with U (+W on writes, +I/D on fetches whatever EFER.NXE says: the host's code leaks
    # through). Whether P|RSVD is also set varies from run to run on the host, so those two bits
    # are don't-care there (walk.error_code_dont_care); the model reports them clear.
    cpl3_blind_ranges: tuple[tuple[int, int], ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.vendor not in ("intel", "amd"):
            raise BadInputError(f"vendor must be intel or amd, not {self.vendor!r}")
        if self.a_on_faulting_walk not in ("used", "none"):
            raise BadInputError("a_on_faulting_walk must be 'used' or 'none'")
        if self.unbacked_read not in ("error", "zero", "ones"):
            raise BadInputError("unbacked_read must be 'error', 'zero' or 'ones'")

    @property
    def top_bit8_reserved(self) -> bool:
        return self.vendor == "amd" and self.amd_top_bit8_reserved


PROFILES: dict[str, Profile] = {
    "intel": Profile("intel", note="Intel SDM Vol. 3A ch. 4"),
    "amd": Profile(
        "amd",
        vendor="amd",
        maxphyaddr=48,
        features=Features(pks=False),
        note="AMD APM Vol. 2 ch. 5: PML4E/PML5E bit 8 reserved",
    ),
    # QEMU 7.2 TCG, -cpu max (AuthenticAMD, phys-bits 40): docs/oracles.md §4.2, docs/paging.md §12.1.
    "qemu": Profile(
        "qemu",
        vendor="amd",
        maxphyaddr=40,
        features=Features(gbpages=True, la57=True, pku=True, smep=True, smap=True),
        rsvd_sets_p=False,
        ps_1g_without_gbpages=True,
        amd_top_bit8_reserved=False,
        a_on_1g_leaf_before_checks=True,
        implicit_smap_honours_ac=True,
        pcide_off_flushes=False,
        note="QEMU 7.2.22 TCG -cpu max",
    ),
    # unicorn 2.1.4 (QEMU 5.0 MMU inside), Icelake-Server model: docs/oracles.md §2.4.
    "unicorn": Profile(
        "unicorn",
        vendor="intel",
        maxphyaddr=40,
        features=Features(gbpages=True, la57=True, pku=True, smep=True, smap=True),
        ps_1g_without_gbpages=True,
        a_on_1g_leaf_before_checks=True,
        implicit_smap_honours_ac=True,
        unbacked_read="zero",
        pcide_off_flushes=False,
        note="unicorn 2.1.4, UC_CPU_X86_ICELAKE_SERVER",
    ),
    # KVM as first measured, on an AMD EPYC host under kvm_pvm with shadow paging (2026-11).
    # A record of that host, for the model tests of its tables (tests/test_walk_measured.py); the
    # live `kvm` oracle measures the host it runs on (harness/oracles/kvm.py: host_profile) and
    # never uses this entry. kvm_pvm kept PML4 slot 256 (0xffff800000000000, 512 GiB) for the
    # host: a CPL3 access there faulted whatever the guest's tables said (CPL0 was exact).
    "kvm-epyc-pvm": Profile(
        "kvm-epyc-pvm",
        vendor="amd",
        maxphyaddr=48,
        features=Features(gbpages=False, la57=False, pku=False, smep=True, smap=True),
        a_on_faulting_walk="none",
        cpl3_blind_ranges=((0xFFFF800000000000, 0xFFFF808000000000),),
        note="KVM on an AMD EPYC host (kvm_pvm, shadow paging), 2026-11",
    ),
    # Bochs 2.7 (Debian 12), cpu model tigerlake: docs/oracles.md "Bochs"; the proofs are in
    # tests/test_oracle_bochs.py.
    "bochs": Profile(
        "bochs",
        vendor="intel",
        maxphyaddr=40,
        features=Features(gbpages=True, la57=False, pku=True, smep=True, smap=True),
        implicit_smap_honours_ac=True,
        implicit_smap_honours_ac_cpl3=True,
        pkru_by_cpl=True,
        note="Bochs 2.7, cpu model tigerlake",
    ),
    # `kvm` names whatever KVM this machine runs. Its facts (vendor, MAXPHYADDR, 1G pages, LA57,
    # PKU, the RSVD error code, PML4E bit 8, CPL3 blind ranges) are measured by the kvm oracle
    # when it starts (harness/oracles/kvm.py: host_profile), which hands the model that profile.
    # This entry only stands in where a file names `kvm` and no oracle runs (a repro replayed on
    # the model): the SDM's rules, with KVM's software walker leaving A alone on faults.
    "kvm": Profile(
        "kvm",
        a_on_faulting_walk="none",
        note="stand-in: the kvm oracle measures its host's profile at start-up",
    ),
}


def as_profile(p: "str | Profile") -> Profile:
    """A Profile from a name or a Profile (an oracle may carry either: `kvm` carries the profile
    it measured on its host)."""
    return p if isinstance(p, Profile) else profile_named(p)


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise BadInputError(f"unknown profile {name!r} (one of {', '.join(PROFILES)})") from None


# one level of PagingState.walk_plan: (level, reserved mask when PS=0, leaf kind or None,
# reserved mask of the leaf kind)
WalkStep = tuple[Level, int, Kind | None, int]


@dataclass(frozen=True)
class PagingState:
    """The architectural state a walk depends on. Defaults: 4-level IA-32e paging, WP=1, NXE=1."""

    cr3: int = 0
    cr0: int = CR0_PE | CR0_PG | CR0_WP
    cr4: int = CR4_PAE
    efer: int = EFER_LME | EFER_LMA | EFER_NXE
    pkru: int = 0
    pkrs: int = 0
    profile: Profile = field(default_factory=lambda: PROFILES["intel"])
    maxphyaddr: int | None = None  # None: the profile's

    def __post_init__(self) -> None:
        for name in ("cr0", "cr3", "cr4", "efer"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < (1 << 64):
                raise BadInputError(f"{name} must be a 64-bit unsigned integer, not {v!r}")
        for name in ("pkru", "pkrs"):
            v = getattr(self, name)
            if not 0 <= v < (1 << 32):
                raise BadInputError(f"{name} must be a 32-bit unsigned integer, not {v!r}")
        if self.maxphyaddr is not None and not 32 <= self.maxphyaddr <= 52:
            raise BadInputError(f"MAXPHYADDR must be between 32 and 52, not {self.maxphyaddr}")
        self._check_reserved()

    def _check_reserved(self) -> None:
        """Refuse values a MOV to CR0/CR3/CR4 or WRMSR to EFER would not accept: the CPU raises
        #GP for reserved bits set (SDM Vol. 3A §2.5: CR0 63:32 and CR4 63:32 and its reserved
        bits; §4.5: CR3 bits 63:M; EFER, §2.2.1 and AMD APM Vol. 2 §3.1.7, per vendor). Only
        architecturally reserved bits are refused; a feature bit the profile's CPU lacks (say
        LA57) is left to the walk, which follows the register. CR3 bits 11:0 are never refused:
        with CR4.PCIDE=0 bits 2:0 and 11:5 are ignored and 4:3 are PWT/PCD; with PCIDE=1 they are
        the PCID (§4.5.2), so CR3=0x1001 names the table at 0x1000."""
        bad = []
        if self.cr0 & ~CR0_DEFINED:
            bad.append(f"cr0 bits {self.cr0 & ~CR0_DEFINED:#x}")
        if self.cr4 & ~CR4_DEFINED:
            bad.append(f"cr4 bits {self.cr4 & ~CR4_DEFINED:#x}")
        efer_ok = EFER_DEFINED_AMD if self.profile.vendor == "amd" else EFER_DEFINED_INTEL
        if self.efer & ~efer_ok:
            bad.append(f"efer bits {self.efer & ~efer_ok:#x} ({self.profile.vendor})")
        if self.cr3 >> self.m:
            bad.append(
                f"cr3 bits 63:{self.m} ({self.cr3 & ~((1 << self.m) - 1):#x}, above MAXPHYADDR {self.m})"
            )
        if bad:
            raise BadInputError(
                "reserved register bits set: "
                + "; ".join(bad)
                + " (a CPU would refuse these values with #GP)"
            )

    def replace(self, **kw: Any) -> "PagingState":
        return dataclasses.replace(self, **kw)

    # -- derived facts ---------------------------------------------------------------------------
    @cached_property
    def m(self) -> int:
        return self.maxphyaddr if self.maxphyaddr is not None else self.profile.maxphyaddr

    @property
    def vendor(self) -> str:
        return self.profile.vendor

    @property
    def wp(self) -> bool:
        return bool(self.cr0 & CR0_WP)

    @property
    def nxe(self) -> bool:
        return bool(self.efer & EFER_NXE)

    @property
    def la57(self) -> bool:
        return bool(self.cr4 & CR4_LA57)

    @property
    def smep(self) -> bool:
        return bool(self.cr4 & CR4_SMEP)

    @property
    def smap(self) -> bool:
        return bool(self.cr4 & CR4_SMAP)

    @property
    def pke(self) -> bool:
        return bool(self.cr4 & CR4_PKE)

    @property
    def pks(self) -> bool:
        return bool(self.cr4 & CR4_PKS)

    @property
    def paging_levels(self) -> int:
        return 5 if self.la57 else 4

    @property
    def levels(self) -> tuple[Level, ...]:
        return levels_for(self.paging_levels)

    @cached_property
    def va_bits(self) -> int:
        return 57 if self.la57 else 48

    @cached_property
    def _canonical_tops(self) -> tuple[int, int]:
        return self.va_bits - 1, (1 << (65 - self.va_bits)) - 1

    @cached_property
    def phys_mask(self) -> int:
        """Bits M-1:12: what CR3 and table entries contribute to an address."""
        return ((1 << self.m) - 1) & ~0xFFF

    @cached_property
    def walk_plan(self) -> tuple[WalkStep, ...]:
        """Per level, top down: (level, reserved mask when PS=0, leaf kind or None, reserved mask
        of the leaf kind). Computed once per state from rsvd_mask (the one definition)."""
        plan = []
        for lv in self.levels:
            leaf = lv.leaf_kind
            plan.append(
                (
                    lv,
                    rsvd_mask(self, lv, lv.table_kind),
                    leaf,
                    rsvd_mask(self, lv, leaf) if leaf is not None else 0,
                )
            )
        return tuple(plan)

    @property
    def root(self) -> int:
        """Physical address of the PML4 (or PML5) table (SDM §4.5.2: CR3 bits M-1:12)."""
        return self.cr3 & self.phys_mask

    @property
    def gbpages_ok(self) -> bool:
        return self.profile.features.gbpages or self.profile.ps_1g_without_gbpages

    def check(self) -> None:
        """Raise StateError unless the registers describe IA-32e (4- or 5-level) paging."""
        missing = [
            n
            for n, ok in (
                ("CR0.PG", self.cr0 & CR0_PG),
                ("CR0.PE", self.cr0 & CR0_PE),
                ("CR4.PAE", self.cr4 & CR4_PAE),
                ("EFER.LME", self.efer & EFER_LME),
            )
            if not ok
        ]
        if missing:
            raise StateError(
                "not IA-32e paging: " + ", ".join(missing) + " clear "
                f"(cr0={self.cr0:#x} cr4={self.cr4:#x} efer={self.efer:#x})"
            )

    def canonical(self, va: int) -> bool:
        """SDM §3.3.7.1: bits 63:47 (or 63:56 with LA57) all equal."""
        shift, ones = self._canonical_tops
        top = va >> shift
        return top == 0 or top == ones

    def sign_extend(self, va: int) -> int:
        bits = self.va_bits
        va &= (1 << bits) - 1
        if va >> (bits - 1):
            va |= ((1 << 64) - 1) & ~((1 << bits) - 1)
        return va

    def describe(self) -> str:
        bits = []
        for name, on in (
            ("WP", self.wp),
            ("NXE", self.nxe),
            ("LA57", self.la57),
            ("SMEP", self.smep),
            ("SMAP", self.smap),
            ("PKE", self.pke),
            ("PKS", self.pks),
        ):
            if on:
                bits.append(name)
        return (
            f"cr0={self.cr0:#x} cr3={self.cr3:#x} cr4={self.cr4:#x} efer={self.efer:#x} "
            f"pkru={self.pkru:#x} M={self.m} {self.vendor} profile={self.profile.name} "
            f"[{' '.join(bits)}]"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "cr0": hex(self.cr0),
            "cr3": hex(self.cr3),
            "cr4": hex(self.cr4),
            "efer": hex(self.efer),
            "pkru": hex(self.pkru),
            "pkrs": hex(self.pkrs),
            "maxphyaddr": self.m,
            "profile": self.profile.name,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PagingState":
        from x86pt.numbers import parse_int

        prof = profile_named(d.get("profile", "intel"))
        return cls(
            cr0=parse_int(d.get("cr0", cls.cr0), "cr0"),
            cr3=parse_int(d.get("cr3", 0), "cr3"),
            cr4=parse_int(d.get("cr4", CR4_PAE), "cr4"),
            efer=parse_int(d.get("efer", cls.efer), "efer"),
            pkru=parse_int(d.get("pkru", 0), "pkru"),
            pkrs=parse_int(d.get("pkrs", 0), "pkrs"),
            profile=prof,
            maxphyaddr=parse_int(d["maxphyaddr"], "maxphyaddr", lo=32, hi=52) if "maxphyaddr" in d else None,
        )


def rsvd_mask(state: PagingState, level: Level, kind: Kind) -> int:
    """The reserved bits of a present entry of `kind` at `level` under `state` (SDM §4.5, table 4-
    14..4-21 'Reserved'; docs/paging.md §5): the field table's RSVD fields (51:M, PS in PML4E/PML5E,
    large-frame holes, AMD bit 8), plus bit 63 when EFER.NXE=0 and PS in a PDPTE without 1-GByte
    pages."""
    m = masks_for(kind, state.m, state.vendor).rsvd
    if kind in (Kind.PML5E, Kind.PML4E) and state.vendor == "amd" and not state.profile.top_bit8_reserved:
        m &= ~BIT_8
    if not state.nxe:
        m |= BIT_XD
    if level.number == 3 and not state.gbpages_ok:
        m |= BIT_PS
    return m
