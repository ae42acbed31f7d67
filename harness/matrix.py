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

Packing the cases into oracle batches (build_batch, MatrixSource) is harness/matrix_pack.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from x86pt.oracle import RIG_IMAGE_BASE, RIG_RAM_SIZE, Capabilities
from x86pt.errors import BadInputError
from x86pt.state import Profile

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
