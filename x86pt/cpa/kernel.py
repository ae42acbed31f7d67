"""Linux x86-64 page-table bits, CPA flags, struct cpa_data and the kernel versions the model knows
(docs/cpa.md §2, §3, §6). Values are the kernel's; names are the kernel's (_PAGE_RW -> RW ...).

A kernel version is a row of behaviour switches, not a branch scattered through the code: every
difference the model makes between 6.1 and 6.15+ is a field of `KernelVersion`.
"""

from __future__ import annotations

from dataclasses import dataclass

from x86pt.errors import BadInputError
from x86pt.fields import (
    ADDR_MASK_52,
    BIT_A,
    BIT_D,
    BIT_G,
    BIT_P,
    BIT_PAT_4K,
    BIT_PAT_LARGE,
    BIT_PCD,
    BIT_PS,
    BIT_PWT,
    BIT_RW,
    BIT_US,
    BIT_XD,
)

U64 = (1 << 64) - 1
# The kernel's names for the entry bits (arch/x86/include/asm/pgtable_types.h), taken from the one
# field table (x86pt/fields.py); only the software bits are the kernel's own.
P = BIT_P
RW = BIT_RW
USER = BIT_US
PWT = BIT_PWT
PCD = BIT_PCD
ACCESSED = BIT_A
DIRTY = BIT_D
PSE = BIT_PS  # PSE on PMD/PUD leaves, PAT on 4K PTEs (same bit, docs/cpa.md §2.2)
PAT = BIT_PAT_4K
GLOBAL = BIT_G  # PROTNONE when P=0
SOFTW1 = 1 << 9  # _PAGE_SOFTW1: an ignored bit the kernel uses (not a paging field)
SOFTW3 = 1 << 11  # _PAGE_SOFTW3
KERNEL_4K = SOFTW3  # _PAGE_KERNEL_4K, v6.15+ (set_memory_4k marks pages never to collapse)
PAT_LARGE = BIT_PAT_LARGE
NX = BIT_XD
CACHE_MASK = PWT | PCD | PAT

PTE_PFN_MASK = ADDR_MASK_52  # __PHYSICAL_MASK_SHIFT = 52
PMD_PFN_MASK = ADDR_MASK_52 & ~((1 << 21) - 1)  # PHYSICAL_PMD_PAGE_MASK
PUD_PFN_MASK = ADDR_MASK_52 & ~((1 << 30) - 1)  # PHYSICAL_PUD_PAGE_MASK
PFN_MASK_OF_LEVEL = {1: PTE_PFN_MASK, 2: PMD_PFN_MASK, 3: PUD_PFN_MASK}

PAGE_KERNEL = P | RW | ACCESSED | DIRTY | GLOBAL | NX  # 0x8000000000000163
PAGE_KERNEL_EXEC = P | RW | ACCESSED | DIRTY | GLOBAL  # 0x163
PAGE_KERNEL_LARGE = PAGE_KERNEL | PSE
PAGE_KERNEL_LARGE_EXEC = PAGE_KERNEL_EXEC | PSE  # head_64.S highmap
KERNPG_TABLE = P | RW | ACCESSED | DIRTY  # 0x63, parent entries

# struct cpa_data flags (docs/cpa.md §3)
CPA_FLUSHTLB = 1
CPA_ARRAY = 2
CPA_PAGES_ARRAY = 4
CPA_NO_CHECK_ALIAS = 8
CPA_COLLAPSE = 16

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
PAGE = 4096
PMD_SIZE = 1 << 21
PUD_SIZE = 1 << 30
TLB_SINGLE_PAGE_FLUSH_CEILING = 33

EFAULT = -14
ENOMEM = -12

BIT_NAMES = {
    P: "P",
    RW: "RW",
    USER: "US",
    PWT: "PWT",
    PCD: "PCD",
    ACCESSED: "A",
    DIRTY: "D",
    PSE: "PSE",
    GLOBAL: "G",
    SOFTW1: "SW1",
    1 << 10: "SW2",
    SOFTW3: "SW3",
    PAT_LARGE: "PAT_L",
    NX: "NX",
}


def flag_names(value: int) -> str:
    return "|".join(n for b, n in BIT_NAMES.items() if value & b) or "0"


def large_2_4k(prot: int) -> int:
    """pgprot_large_2_4k: drop PSE, move the PAT bit from 12 to 7."""
    return (prot & ~(PSE | PAT_LARGE)) | ((prot & PAT_LARGE) >> 5)


def k4_2_large(prot: int) -> int:
    """pgprot_4k_2_large: move the PAT bit from 7 to 12 (PSE is OR-ed in by the caller)."""
    return (prot & ~(PSE | PAT_LARGE)) | ((prot & PAT) << 5)


def flags_of(entry: int, level: int) -> int:
    """pte_flags/pmd_flags/pud_flags: everything but the PFN field. The PFN mask of a PMD/PUD
    depends on PSE (pmd_pfn_mask): without PSE, bit 12.. is PFN as in a PTE."""
    if level > 1 and entry & PSE:
        return entry & ~PFN_MASK_OF_LEVEL[level] & U64
    return entry & ~PTE_PFN_MASK & U64


@dataclass(frozen=True)
class KernelVersion:
    """Behaviour switches of one kernel release (docs/cpa.md §6)."""

    name: str
    ro_clears_dirty: bool  # 6.6: set_memory_ro / __set_pages_np clear _PAGE_DIRTY
    native_rox: bool  # 6.2: set_memory_rox is one CPA call (before: ro then x)
    nx_alias_strip: bool  # 6.2: NX removed from alias masks (before: NX-only skips alias)
    kernel_4k_bit: bool  # 6.15: set_memory_4k sets _PAGE_KERNEL_4K
    collapse: bool  # 6.15: CPA_COLLAPSE on set_memory_rox
    verify_rwx: bool  # 6.2: W^X warning (warn only)
    set_pages_primary: bool  # __set_pages_np/p as primary=1 + CPA_NO_CHECK_ALIAS (6.1: primary=0)
    flush_kernel_range: bool  # 6.18: cpa_flush via flush_tlb_kernel_range (same 33-page rule)

    @property
    def set_memory_ro_clr(self) -> int:
        return RW | (DIRTY if self.ro_clears_dirty else 0)

    @property
    def set_pages_np_clr(self) -> int:
        return P | RW | (DIRTY if self.ro_clears_dirty else 0)


VERSIONS: dict[str, KernelVersion] = {
    "6.1": KernelVersion("6.1", False, False, False, False, False, False, False, False),
    "6.6": KernelVersion("6.6", True, True, True, False, False, True, True, False),
    "6.15": KernelVersion("6.15", True, True, True, True, True, True, True, False),
    "6.18": KernelVersion("6.18", True, True, True, True, True, True, True, True),
}


def kernel_version(name: str) -> KernelVersion:
    """6.1, 6.6, 6.15 or 6.18 (also 6.15+ / 6.16 / 6.17 -> 6.15 rules, 6.19+ -> 6.18)."""
    s = str(name).strip().lstrip("v").rstrip("+")
    if s in VERSIONS:
        return VERSIONS[s]
    try:
        major, minor = (int(x) for x in s.split(".")[:2])
    except ValueError:
        raise BadInputError(f"unknown kernel version {name!r} (6.1, 6.6, 6.15, 6.18)") from None
    if major != 6 or minor < 1:
        raise BadInputError(f"kernel version {name!r} is not modelled (6.1 .. 6.18+)")
    if 2 <= minor < 6:  # native rox and the NX alias strip, not yet the D-bit rule
        return KernelVersion(f"6.{minor}", False, True, True, False, False, True, False, False)
    for cut, key in ((18, "6.18"), (15, "6.15"), (6, "6.6"), (1, "6.1")):
        if minor >= cut:
            return VERSIONS[key]
    raise BadInputError(f"unknown kernel version {name!r}")


@dataclass
class Call:
    """struct cpa_data, the parts that vary per call: the masks, the CPA_* flags, whether this
    is the primary call or an alias, and what the steps report back (flushtlb, pfn of the page
    last looked at, force_flush_all, force_static_prot)."""

    __slots__ = (
        "set",
        "clr",
        "force_split",
        "flags",
        "primary",
        "flushtlb",
        "force_flush_all",
        "pfn",
        "force_static_prot",
    )
    set: int
    clr: int
    force_split: bool
    flags: int
    primary: bool
    flushtlb: bool
    force_flush_all: bool
    pfn: int
    force_static_prot: bool
