"""The access matrix: our own implementation of the kvm-unit-tests `x86/access.c` class of test
(docs/paging.md §11), packed into rig images.

A case is an int of flags. Bits 0..30 are KUT's 31 flags in KUT's enum order (docs/paging.md §11.1); bits 31 and
up are our extensions (cases KUT lacks, docs/paging.md §11): SMAP with EFLAGS.AC, 1G leaves, PS and bit 8 in
the PML4E, 5-level paging, non-canonical addresses.

Enumeration. KUT walks flags = 0, 1, 2 ... skipping never-toggled bits (`ac_test_bump`) and
rejects illegal values (`ac_test_legal`). `bump_enumerate` does exactly that (slow: 2^28 values for
a PKU host). `Space` enumerates the same set by construction: the legality rules only couple a few
bits, so the legal set is a product of small groups (the coupled bits enumerated together), and
case i is a mixed-radix number. Tests check that both agree, and the counts against docs/paging.md §11.6.

Packing (docs/paging.md §11.3 adapted to the rig, x86pt/oracle.py): every case gets its own PDE and its
own PTE (PTs are shared: case k of a PT page uses PTE k and VA bits 20:12 = k), PDPTEs are shared
by the cases with the same pdpte.ro, PML4Es by the cases with the same top-level variant. Cases
that need different CR0/CR4/EFER/PKRU go into different batches. Data frames (filled with
`tag_value`, low byte 0xC3 = ret) sit at RIG_IMAGE_BASE, which is 2M-aligned, so 2M leaves point
there and 1G leaves (frame 0) reach them through VA bits 29:21.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from harness.differential import Batch, CaseInfo, OwnedEntry
from x86pt.oracle import RIG_IMAGE_BASE, RIG_RAM_SIZE, Capabilities, Probe, tag_value
from x86pt.errors import BadInputError
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
    PagingState,
    Profile,
)
from x86pt.fields import BIT_8 as _B8, BIT_A as _A, BIT_D as _D, BIT_P as _P, BIT_PS as _PS
from x86pt.fields import BIT_RW as _RW, BIT_US as _US, BIT_XD as _XD, PK_SHIFT

# -- the flags (KUT enum order = bit index, docs/paging.md §11.1) ------------------------------------------
FLAG_NAMES: tuple[str, ...] = (
    "pte.rw",
    "pte.user",
    "pte.a",
    "pte.d",
    "pte.nx",
    "pte.p",
    "pte.51",
    "pte.36",
    "pde.rw",
    "pde.user",
    "pde.a",
    "pde.d",
    "pde.pse",
    "pde.nx",
    "pde.p",
    "pde.51",
    "pde.36",
    "pde.13",
    "pdpte.ro",
    "pkru.ad",
    "pkru.wd",
    "pkey=1",
    "user",
    "write",
    "fetch",
    "twice",
    "efer.nx",
    "cr0.wp",
    "cr4.smep",
    "cr4.pke",
    "fep",
    # our extensions (not in KUT)
    "cr4.smap",
    "ac",
    "pdpte.1g",
    "pml4e.ps",
    "pml4e.8",
    "la57",
    "noncanon",
    "implicit",
)
NR_AC_FLAGS = 31
F: dict[str, int] = {name: 1 << i for i, name in enumerate(FLAG_NAMES)}

PTE_RW, PTE_USER, PTE_A, PTE_D, PTE_NX, PTE_P, PTE_51, PTE_36 = (F[n] for n in FLAG_NAMES[0:8])
(PDE_RW, PDE_USER, PDE_A, PDE_D, PDE_PSE, PDE_NX, PDE_P, PDE_51, PDE_36, PDE_13) = (
    F[n] for n in FLAG_NAMES[8:18]
)
PDPTE_RO, PKU_AD, PKU_WD, PKEY = (F[n] for n in FLAG_NAMES[18:22])
ACC_USER, ACC_WRITE, ACC_FETCH, ACC_TWICE = (F[n] for n in FLAG_NAMES[22:26])
EFER_NX, CR0_WP_F, SMEP, PKE, FEP = (F[n] for n in FLAG_NAMES[26:31])
SMAP, ACC_AC, PDPTE_1G, PML4E_PS, PML4E_8, LA57, NONCANON, IMPLICIT = (F[n] for n in FLAG_NAMES[31:39])

# Two fields above the flags say where the reserved bit of pte.51 / pde.51 goes (KUT always uses
# bit 51): HI_BIT is the bit number (0: bit 51), HI_AT the entry for pde.51 (0: the PDE itself,
# else one above it). Every bit from MAXPHYADDR to 51 is reserved in every present entry (SDM
# Vol. 3A §4.5, Tables 4-15..4-20), so a walker that stops the reserved range one bit short of M is
# caught at every level; the outcome is KUT's either way (the walk faults RSVD before the PDE).
HI_BIT_SHIFT, HI_BIT_MASK = 40, 0x3F << 40
HI_AT_SHIFT, HI_AT_MASK = 46, 0x7 << 46
HI_AT_NAMES = ("pde", "pdpte", "pdpte1g", "pml4e", "pml5e")

# Entry bits KUT sets (its own bit positions: 51, 36, 13 are raw bit numbers, docs/paging.md §11.1).
_B51, _B36, _B13 = 1 << 51, 1 << 36, 1 << 13  # single address bits the cases set as reserved bits
_PK1, _PK2 = 1 << PK_SHIFT, 2 << PK_SHIFT

# Probe VA layout (KUT uses PML4 index 292 in the upper half too: VA 0xffff923400000000).
TOP_INDEX_4 = 292
PML5_INDEX = 300
NR_FRAMES = 16
FRAME_BASE = RIG_IMAGE_BASE  # 2 MiB aligned: a 2M leaf points here
TABLE_BASE = FRAME_BASE + NR_FRAMES * 4096


def hi_bit(flags: int) -> int:
    """The reserved bit number pte.51 / pde.51 set in this case (KUT: 51)."""
    return (flags & HI_BIT_MASK) >> HI_BIT_SHIFT or 51


def hi_at(flags: int) -> str:
    """The entry pde.51 puts its reserved bit in: pde (KUT), pdpte, pdpte1g, pml4e or pml5e."""
    return HI_AT_NAMES[(flags & HI_AT_MASK) >> HI_AT_SHIFT]


def flag_names(flags: int) -> str:
    """KUT's way of naming a case: the set flags, space separated (then hi.bit=N / hi.at=ENTRY
    when pte.51 / pde.51 do not mean KUT's bit 51 in their own entry)."""
    names = [n for i, n in enumerate(FLAG_NAMES) if flags >> i & 1]
    if flags & HI_BIT_MASK:
        names.append(f"hi.bit={hi_bit(flags)}")
    if flags & HI_AT_MASK:
        names.append(f"hi.at={hi_at(flags)}")
    return " ".join(names) or "(none)"


def flags_from_names(text: str) -> int:
    out = 0
    for w in text.replace(",", " ").split():
        if w.startswith("hi.bit="):
            b = w.split("=", 1)[1]
            if not b.isdigit() or not 12 <= int(b) <= 51:
                raise BadInputError(f"bad {w!r} (a bit number 12..51)")
            out |= int(b) << HI_BIT_SHIFT
            continue
        if w.startswith("hi.at="):
            at = w.split("=", 1)[1]
            if at not in HI_AT_NAMES:
                raise BadInputError(f"bad {w!r} (one of {', '.join(HI_AT_NAMES)})")
            out |= HI_AT_NAMES.index(at) << HI_AT_SHIFT
            continue
        if w not in F:
            raise BadInputError(f"unknown matrix flag {w!r}")
        out |= F[w]
    return out


@dataclass(frozen=True)
class MatrixFeatures:
    """What the CPU under test can do (from the oracle's measured Capabilities)."""

    maxphyaddr: int = 40
    pku: bool = True
    smep: bool = True
    smap: bool = True
    gbpages: bool = True
    la57: bool = False
    fep: bool = False  # KVM forced emulation: never here
    vendor: str = "intel"
    ram_size: int = RIG_RAM_SIZE
    implicit_cpl0: bool = True  # the oracle runs implicit supervisor reads (Probe.implicit)
    implicit_cpl3: bool = True

    @classmethod
    def from_caps(cls, caps: Capabilities) -> "MatrixFeatures":
        return cls(
            maxphyaddr=caps.maxphyaddr,
            pku=caps.pku,
            smep=caps.smep,
            smap=caps.smap,
            gbpages=caps.gbpages,
            la57=caps.la57,
            vendor=caps.vendor,
            ram_size=caps.ram_size,
            implicit_cpl0=getattr(caps, "implicit_cpl0", False),
            implicit_cpl3=getattr(caps, "implicit_cpl3", False),
        )

    @classmethod
    def from_profile(cls, profile: Profile, maxphyaddr: int | None = None) -> "MatrixFeatures":
        f = profile.features
        return cls(
            maxphyaddr=maxphyaddr or profile.maxphyaddr,
            pku=f.pku,
            smep=f.smep,
            smap=f.smap,
            gbpages=f.gbpages,
            la57=f.la57,
            vendor=profile.vendor,
        )


# -- KUT's enumeration, literally (docs/paging.md §11.2) ----------------------------------------------------
def invalid_mask(feat: MatrixFeatures) -> int:
    """Bits `ac_test_bump` never toggles."""
    inv = 0
    if feat.maxphyaddr >= 52:
        inv |= PDE_51 | PTE_51
    if feat.maxphyaddr >= 37:
        inv |= PDE_36 | PTE_36
    if not feat.fep:
        inv |= FEP
    if not feat.pku:
        inv |= PKU_AD | PKU_WD | PKEY | PKE
    if not feat.smep:
        inv |= SMEP
    return inv


def kut_legal(flags: int) -> bool:
    """`ac_test_legal` of the current KUT (SMEP excluded since commit 73695c95)."""
    if flags & SMEP:
        return False
    if flags & ACC_FETCH and flags & ACC_WRITE:
        return False
    if flags & (PKU_AD | PKU_WD) and not flags & PKE:
        return False
    if flags & PDE_13 and not flags & PDE_PSE:
        return False
    rsv = flags & (PDE_51 | PDE_36 | PDE_13 | PTE_51 | PTE_36)
    if not flags & EFER_NX:
        rsv |= flags & (PDE_NX | PTE_NX)
    return rsv & (rsv - 1) == 0


def bump_enumerate(feat: MatrixFeatures, extra_invalid: int = 0) -> Iterator[int]:
    """Every legal classic case in KUT's order: flags = ((flags | invalid) + 1) & ~invalid."""
    inv = invalid_mask(feat) | extra_invalid
    flags = 0
    limit = 1 << NR_AC_FLAGS
    while flags < limit:
        if kut_legal(flags):
            yield flags
        flags = ((flags | inv) + 1) & ~inv


# -- the same set, by construction ----------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    name: str
    choices: tuple[int, ...]


@dataclass(frozen=True)
class Rotation:
    """Flags a case gets without adding cases: choice (key % len(choices)), where the key is the
    sum of the case's group digits (`weighted`: digit of group j times j+1). Changing any one
    group's choice moves the key, so over a whole space every combination of a few groups meets
    every choice (the CPU configurations a KUT run on a SMEP/SMAP host would add by doubling).
    Applies only to cases with every flag of `all_of` and none of `none_of`."""

    name: str
    choices: tuple[int, ...]
    weighted: bool = False
    all_of: int = 0
    none_of: int = 0


@dataclass(frozen=True)
class Space:
    """A product of groups: case i picks choice (i // stride_g) % len(g) of every group; then
    each rotation ORs in its choice for the case."""

    name: str
    groups: tuple[Group, ...]
    rotations: tuple[Rotation, ...] = ()

    @property
    def size(self) -> int:
        n = 1
        for g in self.groups:
            n *= len(g.choices)
        return n

    @property
    def rotated_bits(self) -> int:
        out = 0
        for r in self.rotations:
            for c in r.choices:
                out |= c
        return out

    def flags_at(self, i: int) -> int:
        out = 0
        key = wkey = 0
        ng = len(self.groups)
        for j, g in enumerate(reversed(self.groups)):
            i, r = divmod(i, len(g.choices))
            out |= g.choices[r]
            key += r
            wkey += r * (ng - j)
        for rot in self.rotations:
            if out & rot.all_of == rot.all_of and not out & rot.none_of:
                k = wkey if rot.weighted else key
                out |= rot.choices[k % len(rot.choices)]
        return out

    def flags_array(self, start: int, stop: int) -> np.ndarray:
        return self.flags_of(np.arange(start, stop, dtype=np.int64))

    def flags_of(self, indices: np.ndarray) -> np.ndarray:
        """flags_at of every index (int64 array, 0 <= i < size), as one array."""
        idx = np.array(indices, dtype=np.int64)
        out = np.zeros(len(idx), dtype=np.uint64)
        key = np.zeros(len(idx), dtype=np.int64)
        wkey = np.zeros(len(idx), dtype=np.int64)
        ng = len(self.groups)
        for j, g in enumerate(reversed(self.groups)):
            n = len(g.choices)
            table = np.array(g.choices, dtype=np.uint64)
            r = idx % n
            out |= table[r]
            key += r
            wkey += r * (ng - j)
            idx //= n
        for rot in self.rotations:
            k = wkey if rot.weighted else key
            table = np.array(rot.choices, dtype=np.uint64)
            sel = ((out & np.uint64(rot.all_of)) == np.uint64(rot.all_of)) & (
                (out & np.uint64(rot.none_of)) == 0
            )
            out |= np.where(sel, table[k % len(rot.choices)], np.uint64(0))
        return out


def _subsets(bits: Sequence[int]) -> Iterator[int]:
    for r in range(len(bits) + 1):
        for combo in itertools.combinations(bits, r):
            yield sum(combo)


def _group(name: str, bits: Sequence[int], ok, fixed_zero: int) -> Group:
    """All legal combinations of `bits` (those in `fixed_zero` never set), sorted so that the
    CPU-state bits among them (the high ones) vary slowest."""
    usable = [b for b in bits if not b & fixed_zero]
    choices = sorted(c for c in _subsets(usable) if ok(c))
    return Group(name, tuple(choices))


def _rsv_ok(c: int) -> bool:
    if c & PDE_13 and not c & PDE_PSE:
        return False
    rsv = c & (PDE_51 | PDE_36 | PDE_13 | PTE_51 | PTE_36)
    if not c & EFER_NX:
        rsv |= c & (PDE_NX | PTE_NX)
    return rsv & (rsv - 1) == 0


def config_rotation(feat: MatrixFeatures) -> Rotation | None:
    """CR4.SMEP, CR4.SMAP and EFLAGS.AC as CPU configurations of the classic matrix: a quarter of
    the cases each run with none, SMEP, SMAP, SMAP+AC (those the CPU has; SDM Vol. 3A §4.6.1)."""
    choices = [0]
    if feat.smep:
        choices.append(SMEP)
    if feat.smap:
        choices += [SMAP, SMAP | ACC_AC]
    return Rotation("cr4", tuple(choices)) if len(choices) > 1 else None


def hi_rotations(feat: MatrixFeatures, levels: int = 4, *, above: bool = True) -> tuple[Rotation, ...]:
    """Where pte.51 / pde.51 put their reserved bit: any bit from MAXPHYADDR to 51, and for pde.51
    (when the PDE is present, so the outcome stays KUT's) any entry from the PDE up."""
    m = feat.maxphyaddr
    if m >= 52:
        return ()
    bits = tuple(b << HI_BIT_SHIFT for b in range(m, 52))
    ats = ["pde"]
    if above:
        ats += ["pdpte", "pdpte1g", "pml4e"] + (["pml5e"] if levels == 5 else [])
    at_bits = tuple(HI_AT_NAMES.index(a) << HI_AT_SHIFT | b for a in ats for b in bits)
    return (
        Rotation("pte.hi", bits, weighted=True, all_of=PTE_51),
        Rotation("pde.hi", at_bits, weighted=True, all_of=PDE_51 | PDE_P),
        Rotation("pde.hi-np", bits, weighted=True, all_of=PDE_51, none_of=PDE_P),
    )


def classic_space(
    feat: MatrixFeatures,
    extra_invalid: int = 0,
    *,
    smep: bool = False,
    smap: bool = False,
    name: str = "classic",
    rotate: bool = True,
    levels: int = 4,
) -> Space:
    """KUT's legal set as a product. With `smep`/`smap` (extended mode) CR4.SMEP becomes legal and
    CR4.SMAP x EFLAGS.AC is added (AC only for supervisor accesses: it means nothing at CPL 3).
    Without them (`rotate`), SMEP/SMAP/AC come as a rotation of CPU configurations; the reserved
    bit of pte.51/pde.51 rotates over MAXPHYADDR..51 and, for pde.51, over the entries above."""
    inv = invalid_mask(feat) | extra_invalid
    groups = []
    # CPU state first (slowest varying) so that neighbouring indices share a batch.
    groups.append(_group("pke", [PKE, PKU_AD, PKU_WD], lambda c: not (c & (PKU_AD | PKU_WD)) or c & PKE, inv))
    if smep and feat.smep:
        groups.append(Group("smep", (0, SMEP)))
    if smap and feat.smap:
        groups.append(Group("smap", (0, SMAP)))
    groups.append(Group("wp", tuple(c for c in (0, CR0_WP_F) if not c & inv)))
    groups.append(
        _group(
            "rsvd", [EFER_NX, PDE_PSE, PDE_NX, PTE_NX, PDE_51, PDE_36, PDE_13, PTE_51, PTE_36], _rsv_ok, inv
        )
    )
    groups.append(Group("access", tuple(c for c in (0, ACC_WRITE, ACC_FETCH) if not c & inv)))
    if smap and feat.smap:
        groups.append(Group("ac", (0, ACC_AC)))
    groups.append(Group("fep", tuple(c for c in (0, FEP) if not c & inv)))
    for bit in (
        PKEY,
        ACC_USER,
        ACC_TWICE,
        PDPTE_RO,
        PDE_P,
        PDE_RW,
        PDE_USER,
        PDE_A,
        PDE_D,
        PTE_P,
        PTE_RW,
        PTE_USER,
        PTE_A,
        PTE_D,
    ):
        groups.append(Group(FLAG_NAMES[bit.bit_length() - 1], tuple(c for c in (0, bit) if not c & inv)))
    rots: list[Rotation] = []
    if rotate:
        cfg = config_rotation(feat) if not (smep or smap) else None
        if cfg is not None:
            rots.append(cfg)
        rots += hi_rotations(feat, levels)
    return Space(name, tuple(g for g in groups if g.choices), tuple(rots))


def gig_space(feat: MatrixFeatures) -> Space:
    """1G leaves (KUT has none): the pde.* flags describe the PDPTE leaf; pde.13 is bit 13, in the
    reserved 29:13 range of a 1G leaf. Tried whether or not the CPU has 1-GByte pages."""
    inv = invalid_mask(feat) | PDE_PSE | PTE_51 | PTE_36 | PTE_NX | PDPTE_RO
    groups = [
        _group("pke", [PKE, PKU_AD, PKU_WD], lambda c: not (c & (PKU_AD | PKU_WD)) or c & PKE, inv),
        Group("wp", (0, CR0_WP_F)),
        _group("rsvd", [EFER_NX, PDE_NX, PDE_51, PDE_36, PDE_13], lambda c: _rsv_ok(c | PDE_PSE), inv),
        Group("access", (0, ACC_WRITE, ACC_FETCH)),
        Group("1g", (PDPTE_1G,)),
    ]
    for bit in (PKEY, ACC_USER, ACC_TWICE, PDE_P, PDE_RW, PDE_USER, PDE_A, PDE_D):
        groups.append(Group(FLAG_NAMES[bit.bit_length() - 1], tuple(c for c in (0, bit) if not c & inv)))
    return Space("1g", tuple(g for g in groups if g.choices), hi_rotations(feat, above=False))


def top_space(feat: MatrixFeatures) -> Space:
    """PS and bit 8 in the PML4E (PS reserved everywhere; bit 8 reserved on AMD only), over a
    small set of lower-level shapes."""
    return Space(
        "top",
        (
            Group("wp", (0, CR0_WP_F)),
            Group("nx", (0, EFER_NX)),
            Group("top", (PML4E_PS, PML4E_8)),
            Group("access", (0, ACC_WRITE, ACC_FETCH)),
            Group("user", (0, ACC_USER)),
            Group(
                "shape",
                (
                    PDE_P | PDE_RW | PDE_USER | PTE_P | PTE_RW | PTE_USER,
                    PDE_P | PDE_RW | PDE_USER | PDE_PSE,
                    PDE_P | PDE_RW | PDE_USER | PTE_P | PTE_USER | PTE_A | PTE_D,
                    PDE_P | PDE_RW | PDE_USER,
                ),
            ),
        ),
    )


def la57_space(feat: MatrixFeatures) -> Space:
    """The classic matrix under 5-level paging (KUT runs it again when LA57 exists), without the
    PKU dimension to keep it smaller."""
    base = classic_space(feat, PKE | PKU_AD | PKU_WD | PKEY, name="la57", levels=5)
    return Space("la57", (Group("la57", (LA57,)),) + base.groups, base.rotations)


def noncanon_space(feat: MatrixFeatures) -> Space:
    groups = [
        Group("wp", (0, CR0_WP_F)),
        Group("access", (0, ACC_WRITE, ACC_FETCH)),
        Group("user", (0, ACC_USER)),
        Group("nc", (NONCANON,)),
        Group("shape", (PDE_P | PDE_RW | PDE_USER | PTE_P | PTE_RW | PTE_USER, 0)),
    ]
    if feat.la57:
        groups.insert(0, Group("la57", (0, LA57)))
    return Space("noncanon", tuple(groups))


def implicit_space(feat: MatrixFeatures) -> Space:
    """Implicit supervisor-mode reads (descriptor-table reads, SDM Vol. 3A §4.6; KUT has none:
    smap.c lists them as a TODO) at CPL0 and CPL3, with and without SMAP and EFLAGS.AC, through
    user and supervisor pages, with protection keys (they apply: a supervisor access to a user
    page), not-present and reserved-bit walks."""
    if not feat.implicit_cpl0:
        return Space("implicit", ())
    groups = []
    if feat.pku:
        groups.append(Group("pke", (0, PKE, PKE | PKU_AD)))
    if feat.smap:
        groups.append(Group("smap", (0, SMAP)))
    groups.append(Group("wp", (0, CR0_WP_F)))
    groups.append(Group("nx", (0, EFER_NX)))
    groups.append(Group("implicit", (IMPLICIT,)))
    groups.append(Group("ac", (0, ACC_AC)))
    if feat.implicit_cpl3:
        groups.append(Group("user", (0, ACC_USER)))
    shapes = [
        PDE_P | PDE_RW | PTE_P | PTE_RW,
        PDE_P | PDE_RW | PDE_PSE,
        PDE_P | PDE_RW,
        PDE_P | PDE_RW | PDE_PSE | PDPTE_RO,
    ]
    if feat.maxphyaddr < 52:
        shapes += [PDE_P | PDE_RW | PTE_P | PTE_RW | PTE_51, PDE_P | PDE_RW | PDE_51]
    groups.append(Group("shape", tuple(shapes)))
    if feat.pku:
        groups.append(Group("pkey", (0, PKEY)))
    groups += [Group("pde.user", (0, PDE_USER)), Group("pte.user", (0, PTE_USER)), Group("pte.a", (0, PTE_A))]
    return Space("implicit", tuple(groups), hi_rotations(feat))


@dataclass(frozen=True)
class Matrix:
    """A union of spaces, indexed 0..size-1 (classic first)."""

    spaces: tuple[Space, ...]
    features: MatrixFeatures

    @property
    def size(self) -> int:
        return sum(s.size for s in self.spaces)

    def flags_at(self, i: int) -> int:
        j = i
        for s in self.spaces:
            if 0 <= j < s.size:
                return s.flags_at(j)
            j -= s.size
        raise IndexError(i)  # the index asked for (flags_of says the same), also when negative

    def flags_range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        base = 0
        for s in self.spaces:
            lo, hi = max(start - base, 0), min(stop - base, s.size)
            if lo < hi:
                parts.append(s.flags_array(lo, hi))
            base += s.size
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

    def flags_of(self, indices: np.ndarray) -> np.ndarray:
        """flags_at of every index of `indices` (any order), as one array."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.zeros(len(idx), dtype=np.uint64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(int(idx.max() if idx.max() >= self.size else idx.min()))
        base = 0
        for s in self.spaces:
            sel = (idx >= base) & (idx < base + s.size)
            if sel.any():
                out[sel] = s.flags_of(idx[sel] - base)
            base += s.size
        return out

    def counts(self) -> dict[str, int]:
        return {s.name: s.size for s in self.spaces}


def matrix_for(feat: MatrixFeatures, extended: bool = False) -> Matrix:
    """The classic KUT matrix, or (extended) that plus SMEP/SMAP+AC, 1G leaves, PML4E PS/bit 8,
    5-level paging and non-canonical addresses."""
    if not extended:
        return Matrix((classic_space(feat),), feat)
    spaces = [
        classic_space(feat, smep=True, smap=True, name="classic+smep+smap"),
        gig_space(feat),
        top_space(feat),
        noncanon_space(feat),
        implicit_space(feat),
    ]
    if feat.la57:
        spaces.append(la57_space(feat))
    return Matrix(tuple(s for s in spaces if s.groups), feat)


# -- CPU state per case ------------------------------------------------------------------------------------
def state_key(flags: int) -> tuple[int, int, int, int]:
    """(cr0, cr4, efer, pkru) the case needs (docs/paging.md §11.3: PKRU = 0x30 | WD1 | AD1, key 2 denied)."""
    cr0 = CR0_PE | CR0_PG | (CR0_WP if flags & CR0_WP_F else 0)
    cr4 = CR4_PAE
    if flags & PKE:
        cr4 |= CR4_PKE
    if flags & SMEP:
        cr4 |= CR4_SMEP
    if flags & SMAP:
        cr4 |= CR4_SMAP
    if flags & LA57:
        cr4 |= CR4_LA57
    efer = EFER_LME | EFER_LMA | (EFER_NXE if flags & EFER_NX else 0)
    pkru = (0x30 | (8 if flags & PKU_WD else 0) | (4 if flags & PKU_AD else 0)) if flags & PKE else 0
    return cr0, cr4, efer, pkru


_STATE_BITS = CR0_WP_F | PKE | SMEP | SMAP | LA57 | EFER_NX | PKU_WD | PKU_AD


def state_bits(flags: int) -> int:
    return flags & _STATE_BITS


# -- packing cases into one image --------------------------------------------------------------------------
def fill_frames(memory: SparseMemory, base: int = FRAME_BASE, pages: int = NR_FRAMES) -> None:
    """Every qword of the frame pages holds tag_value(its pa) (low byte 0xC3 = ret)."""
    pa = np.arange(base, base + pages * 4096, 8, dtype=np.uint64)
    data = ((pa << np.uint64(8)) | np.uint64(0xC3)).astype("<u8").tobytes()
    memory.write(base, data)


class _Layout:
    """Allocates tables for one batch: shared PML5/PML4/PDPT/PD pages, PT pages in a pool."""

    def __init__(self, memory: SparseMemory, levels: int, limit: int) -> None:
        self.mem = memory
        self.limit = limit
        self.next = TABLE_BASE
        self.levels = levels
        self.root = self.alloc()
        if levels == 5:
            self.pml4 = self.alloc()
            memory.write_u64(self.root + PML5_INDEX * 8, self.pml4 | _P | _RW | _US)
        else:
            self.pml4 = self.root
        self.next_top = TOP_INDEX_4
        self.pdpts: dict[object, list[list[int]]] = {}  # variant -> [[pdpt page, top idx, used]]
        self.pds: dict[tuple[object, bool], list[int]] = {}  # (variant, ro) -> [pd page, pdpt idx, top, used]
        self.pt: list[int] = [0, 512]  # [pt page, used]
        # A variant is "normal", "ps", "bit8" (the PML4E), or ("hi", entry, bit): a reserved bit
        # in the PML5E, PML4E, PDPTE or a 1G PDPTE leaf, shared by the cases that want it there
        # (the walk stops at that entry; what lies below is never read).
        self.top_pml5: dict[int, int] = {}  # PML4 index -> PML5 index (5-level)
        self.pml5_hi: dict[int, int] = {}  # bit -> PML5 index of its PML5E

    def alloc(self) -> int:
        pa = self.next
        if pa + 4096 > self.limit:
            raise BadInputError(f"batch does not fit in the rig's RAM ({self.limit:#x} bytes)")
        self.next += 4096
        self.mem.write(pa, bytes(4096))
        return pa

    def top_va(self, top: int) -> int:
        va = top << 39
        if self.levels == 5:
            va |= self.top_pml5.get(top, PML5_INDEX) << 48
            return _sext(va, 57)
        return _sext(va, 48)

    def pdpte_slot(self, variant) -> tuple[int, int, int]:
        """(pdpt page, top index, pdpt index) of a fresh PDPTE under a PML4E of `variant`."""
        lst = self.pdpts.setdefault(variant, [])
        if not lst or lst[-1][2] == 512:
            if self.next_top >= 511:
                raise BadInputError("batch needs too many PML4 entries")
            page = self.alloc()
            top = self.next_top
            self.next_top += 1
            raw = page | _P | _RW | _US
            if variant == "ps":
                raw |= _PS
            elif variant == "bit8":
                raw |= _B8
            elif isinstance(variant, tuple) and variant[1] == "pml4e":
                raw |= 1 << variant[2]
            elif isinstance(variant, tuple) and variant[1] == "pml5e":
                if self.levels != 5:
                    raise BadInputError("a PML5E reserved bit needs 5-level paging")
                bit = variant[2]
                if bit not in self.pml5_hi:
                    idx = PML5_INDEX + 1 + len(self.pml5_hi)
                    self.pml5_hi[bit] = idx
                    self.mem.write_u64(self.root + idx * 8, self.pml4 | _P | _RW | _US | 1 << bit)
                self.top_pml5[top] = self.pml5_hi[bit]
            self.mem.write_u64(self.pml4 + top * 8, raw)
            lst.append([page, top, 0])
        cur = lst[-1]
        idx = cur[2]
        cur[2] += 1
        return cur[0], cur[1], idx

    def pde_slot(self, variant, ro: bool) -> tuple[int, int, int, int]:
        """(pd page, top idx, pdpt idx, pd idx) of a fresh PDE."""
        cur = self.pds.get((variant, ro))
        if cur is None or cur[3] == 512:
            pdpt, top, pidx = self.pdpte_slot(variant)
            pd = self.alloc()
            raw = pd | _P | _US | (0 if ro else _RW)
            if isinstance(variant, tuple) and variant[1] == "pdpte":
                raw |= 1 << variant[2]
            elif isinstance(variant, tuple) and variant[1] == "pdpte1g":
                # a 1G leaf (frame 0) with the reserved bit; the PD below is never linked
                raw = 0 | _PS | _P | _US | (0 if ro else _RW) | 1 << variant[2]
            self.mem.write_u64(pdpt + pidx * 8, raw)
            cur = self.pds[(variant, ro)] = [pd, top, pidx, 0]
        idx = cur[3]
        cur[3] += 1
        return cur[0], cur[1], cur[2], idx

    def pte_slot(self) -> tuple[int, int]:
        if self.pt[1] == 512:
            self.pt = [self.alloc(), 0]
        idx = self.pt[1]
        self.pt[1] += 1
        return self.pt[0], idx


def _sext(va: int, bits: int) -> int:
    if va >> (bits - 1) & 1:
        va |= ((1 << 64) - 1) & ~((1 << bits) - 1)
    return va


_new = object.__new__
_set = object.__setattr__


def _made(cls, fields: dict):
    """An instance of the frozen dataclass `cls` with these fields (all of them, in field order),
    made without its __init__: equal, hashing and printing as cls(**fields), ~3x cheaper. Only
    for values valid by construction (a matrix case's probe, entry, case info)."""
    obj = _new(cls)
    _set(obj, "__dict__", fields)
    return obj


def _leaf_table(first: int, names: Sequence[str]) -> tuple[int, ...]:
    """Entry bits of every combination of the flags `names` (consecutive flag bits from `first`):
    P/RW/US/A/D/NX/36 from pte.* / pde.* (docs/paging.md §11.1); the reserved bit of '.51' (the case's
    hi_bit, and for pde.51 only when hi_at keeps it in the PDE) and PS are added apart."""
    bit_of = {"rw": _RW, "user": _US, "a": _A, "d": _D, "nx": _XD, "p": _P, "36": _B36}
    out = []
    for v in range(1 << len(names)):
        raw = 0
        for k, n in enumerate(names):
            if v >> k & 1 and n.split(".")[1] in bit_of:
                raw |= bit_of[n.split(".")[1]]
        out.append(raw)
    assert all(F[n] == 1 << (first + k) for k, n in enumerate(names))
    return tuple(out)


_PTE_BITS = _leaf_table(0, FLAG_NAMES[0:8])  # pte.rw .. pte.36
_PDE_BITS = _leaf_table(8, FLAG_NAMES[8:17])  # pde.rw .. pde.36 (pde.pse adds nothing here)


def build_batch(cases: Sequence[tuple[str, int]], feat: MatrixFeatures, profile: Profile) -> Batch:
    """One image + state + probes for cases that share their CPU state (`state_bits`)."""
    if not cases:
        raise BadInputError("empty batch")
    skey = state_bits(cases[0][1])
    if any(state_bits(f) != skey for _, f in cases):
        raise BadInputError("cases of one batch must share CR0/CR4/EFER/PKRU")
    cr0, cr4, efer, pkru = state_key(cases[0][1])
    levels = 5 if cases[0][1] & LA57 else 4
    mem = SparseMemory(feat.ram_size)
    fill_frames(mem)
    lay = _Layout(mem, levels, feat.ram_size)
    probes: list[Probe] = []
    infos: list[CaseInfo] = []
    # the cases' own entries are written after the loop (each slot once, all pages allocated)
    w_addr: list[int] = []
    w_val: list[int] = []
    pte_bits, pde_bits, made = _PTE_BITS, _PDE_BITS, _made
    top_vas: dict[int, int] = {}
    for n, (label, flags) in enumerate(cases):
        j = n % NR_FRAMES
        off = 8 * ((n // NR_FRAMES) % 512)
        frame = FRAME_BASE + j * 4096
        target = frame + off
        variant = "ps" if flags & PML4E_PS else "bit8" if flags & PML4E_8 else "normal"
        if flags & PDE_51 and flags & HI_AT_MASK:
            variant = ("hi", hi_at(flags), hi_bit(flags))
        pk_leaf = _PK1 if flags & PKEY else 0
        pde_leaf = pde_bits[(flags >> 8) & 0x1FF]
        if flags & PDE_51 and not flags & HI_AT_MASK:
            pde_leaf |= 1 << hi_bit(flags)
        if flags & PDPTE_1G:
            pdpt, top, pidx = lay.pdpte_slot(variant)
            raw = _PS | pk_leaf | pde_leaf | (_B13 if flags & PDE_13 else 0)
            addr = pdpt + pidx * 8
            w_addr.append(addr)
            w_val.append(raw)
            owned: tuple[OwnedEntry, ...] = (
                _made(OwnedEntry, {"addr": addr, "raw": raw, "kind": "pdpte1g"}),
            )
            va = lay.top_va(top) | pidx << 30 | frame | off
        else:
            pd, top, pidx, didx = lay.pde_slot(variant, bool(flags & PDPTE_RO))
            tva = top_vas.get(top)
            if tva is None:
                tva = top_vas[top] = lay.top_va(top)
            base_va = tva | pidx << 30 | didx << 21
            pde_addr = pd + didx * 8
            if flags & PDE_PSE:
                raw = FRAME_BASE | _PS | pk_leaf | pde_leaf | (_B13 if flags & PDE_13 else 0)
                w_addr.append(pde_addr)
                w_val.append(raw)
                owned = (_made(OwnedEntry, {"addr": pde_addr, "raw": raw, "kind": "pde2m"}),)
                va = base_va | (frame - FRAME_BASE) | off
            else:
                pt, tidx = lay.pte_slot()
                raw = pt | (_PK2 if flags & PKEY else 0) | pde_leaf
                pte_addr = pt + tidx * 8
                pte = frame | pk_leaf | pte_bits[flags & 0xFF]
                if flags & PTE_51:
                    pte |= 1 << hi_bit(flags)
                w_addr += (pde_addr, pte_addr)
                w_val += (raw, pte)
                owned = (
                    _made(OwnedEntry, {"addr": pde_addr, "raw": raw, "kind": "pde"}),
                    _made(OwnedEntry, {"addr": pte_addr, "raw": pte, "kind": "pte"}),
                )
                va = base_va | tidx << 12 | off
        # the case's probes: with `twice` a supervisor read first, then the case's access
        first = len(probes)
        kind = "write" if flags & ACC_WRITE else "fetch" if flags & ACC_FETCH else "read"
        if flags & NONCANON:
            va ^= 1 << 62
        if flags & ACC_TWICE:
            probes.append(
                made(
                    Probe,
                    {"va": va, "access": "read", "user": False, "ac": False, "wvalue": 0, "implicit": False},
                )
            )
            ids: tuple[int, ...] = (first, first + 1)
        else:
            ids = (first,)
        probes.append(
            made(
                Probe,
                {
                    "va": va,
                    "access": kind,
                    "user": bool(flags & ACC_USER),
                    "ac": bool(flags & ACC_AC),
                    "wvalue": tag_value(target) if kind == "write" else 0,
                    "implicit": bool(flags & IMPLICIT),
                },
            )
        )
        infos.append(
            made(
                CaseInfo,
                {
                    "label": label,
                    "flags": flags,
                    "probes": ids,
                    "owned": owned,
                    "frames": (target & ~0xFFF,),
                    "description": "",
                },
            )
        )
    _scatter(mem, w_addr, w_val)
    state = PagingState(
        cr3=lay.root, cr0=cr0, cr4=cr4, efer=efer, pkru=pkru, profile=profile, maxphyaddr=feat.maxphyaddr
    )
    return Batch(mem, state, probes, infos)


def _scatter(mem: SparseMemory, addrs: list[int], values: list[int]) -> None:
    """Write qwords at distinct 8-aligned addresses of allocated pages, a page at a time."""
    if not addrs:
        return
    a = np.array(addrs, dtype=np.uint64)
    v = np.array(values, dtype=np.uint64)
    order = np.argsort(a, kind="stable")
    a, v = a[order], v[order]
    pns = a >> np.uint64(12)
    slots = ((a >> np.uint64(3)) & np.uint64(511)).astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], pns[1:] != pns[:-1])))
    bounds = starts.tolist() + [len(a)]
    for lo, hi in zip(bounds, bounds[1:]):
        page = mem.pages[int(pns[lo])]
        np.frombuffer(page, dtype="<u8")[slots[lo:hi]] = v[lo:hi]


@dataclass
class MatrixSource:
    """Cases of a matrix selected by index (a shard, a limit or a seeded sample), in batches."""

    matrix: Matrix
    profile: Profile
    indices: np.ndarray | None = None  # None: all, in order
    start: int = 0
    stop: int | None = None
    batch_cases: int = 4096
    chunk: int = 1 << 16
    name: str = "matrix"
    # With batch_probes, a batch takes the next cases of its group while their probes (two for a
    # `twice` case, else one) fit in batch_probes, however many cases that is: an oracle that
    # starts a VM per max_probes probes (QEMU, Bochs) then starts one per batch, all of it used.
    batch_probes: int | None = None

    @property
    def total(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        return (self.stop if self.stop is not None else self.matrix.size) - self.start

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.indices is not None:
            for lo in range(0, len(self.indices), self.chunk):
                idx = self.indices[lo : lo + self.chunk]
                yield idx, self.matrix.flags_of(idx)
            return
        stop = self.stop if self.stop is not None else self.matrix.size
        for lo in range(self.start, stop, self.chunk):
            hi = min(stop, lo + self.chunk)
            yield np.arange(lo, hi), self.matrix.flags_range(lo, hi)

    def _cut(self, grp: np.ndarray, flags: np.ndarray) -> Iterator[np.ndarray]:
        """The batches of one CPU-state group (indices into the chunk), in order."""
        if self.batch_probes is None:
            for lo in range(0, len(grp), self.batch_cases):
                yield grp[lo : lo + self.batch_cases]
            return
        per = 1 + ((flags[grp] & np.uint64(ACC_TWICE)) != 0).astype(np.int64)
        for lo, hi in _probe_cuts(per, self.batch_probes):
            yield grp[lo:hi]

    def batches(self) -> Iterator[Batch]:
        feat = self.matrix.features
        for idx, flags in self._chunks():
            keys = flags & np.uint64(_STATE_BITS)
            # stable grouping by CPU state inside the chunk, then batches of batch_cases
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            bounds = np.flatnonzero(np.diff(sk)) + 1
            for grp in np.split(order, bounds):
                for sel in self._cut(grp, flags):
                    name = self.name
                    cases = [(f"{name}#{i}", f) for i, f in zip(idx[sel].tolist(), flags[sel].tolist())]
                    yield build_batch(cases, feat, self.profile)


def probe_cap(oracle) -> int | None:
    """The probes an oracle runs per VM start (its `max_probes`), None when it has no such cap."""
    cap = getattr(oracle, "max_probes", None)
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 1 else None


def _probe_cuts(per_case: np.ndarray, most: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of cases whose probe counts (`per_case`) sum to at most `most` each (a case
    alone may exceed it), greedily from the front."""
    cum = np.concatenate(([0], np.cumsum(per_case)))
    out = []
    lo, n = 0, len(per_case)
    while lo < n:
        hi = int(np.searchsorted(cum, cum[lo] + most, side="right")) - 1
        hi = min(n, max(hi, lo + 1))
        out.append((lo, hi))
        lo = hi
    return out


def select(
    total: int,
    *,
    shard: tuple[int, int] | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray | None, int, int]:
    """(indices or None, start, stop) for a shard I/N (1-based), a seeded sample, a limit."""
    start, stop = 0, total
    if shard is not None:
        i, n = shard
        start, stop = (i - 1) * total // n, i * total // n
    if sample is not None:
        rng = np.random.default_rng(seed)
        k = min(sample, stop - start)
        idx = np.sort(rng.choice(stop - start, size=k, replace=False)) + start
        if limit is not None:
            idx = idx[:limit]
        return idx, 0, 0
    if limit is not None:
        stop = min(stop, start + limit)
    return None, start, stop
