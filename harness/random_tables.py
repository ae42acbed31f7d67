"""Random page tables for the differential runner: seedable trees where every level's flags are
random, reserved bits show up now and then (51:M, PS in the PML4E/PML5E, AMD bit 8, the large-
frame holes 20:13 / 29:13, XD without NXE), 2M and 1G leaves, 5-level paging where the oracle has
LA57, and probes at several offsets of every mapping (plus holes and non-canonical addresses).

Rig conventions (x86pt/oracle.py): tables and frames in [RIG_IMAGE_BASE, ram_size), the
root's slot 511 left to the harness. Frames are the tagged pages of harness.matrix (2 MiB aligned,
so a 2M leaf can point at them and a 1G leaf, whose frame is 0, reaches them through VA bits 29:12).
Each probe is one case; batch b of seed s is generated from Random(f"{s}:{b}") alone, so shards
and limits reproduce the same cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from harness.differential import Batch, CaseInfo
from harness.matrix import FRAME_BASE, NR_FRAMES, TABLE_BASE, MatrixFeatures
from harness.matrix_pack import fill_frames
from x86pt.oracle import HARNESS_SLOT, Probe
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
from x86pt.fields import BIT_A as _A, BIT_D as _D, BIT_G as _G, BIT_P as _P, BIT_PCD as _PCD
from x86pt.fields import BIT_PS as _PS, BIT_PWT as _PWT, BIT_RW as _RW, BIT_US as _US, BIT_XD as _XD


@dataclass(frozen=True)
class _Leaf:
    va: int  # first VA of the mapping
    size: int  # 4K, 2M or 1G
    reach: int  # how many bytes from `va` land in the tagged frames


class _Tree:
    def __init__(
        self,
        rng: random.Random,
        feat: MatrixFeatures,
        state_nxe: bool,
        levels: int,
        mem: SparseMemory,
        rsvd_rate: float,
    ) -> None:
        self.rng, self.feat, self.nxe, self.levels, self.mem = rng, feat, state_nxe, levels, mem
        self.rsvd_rate = rsvd_rate
        self.next = TABLE_BASE
        self.leaves: list[_Leaf] = []
        self.holes: list[int] = []

    def alloc(self) -> int:
        pa = self.next
        if pa + 4096 > self.feat.ram_size:
            raise BadInputError("random tree does not fit in the rig's RAM")
        self.next += 4096
        self.mem.write(pa, bytes(4096))
        return pa

    def flags(self, leaf: bool) -> int:
        r = self.rng
        raw = _P if r.random() < 0.9 else 0
        for bit, p in ((_RW, 0.7), (_US, 0.7), (_A, 0.5), (_PWT, 0.1), (_PCD, 0.1)):
            if r.random() < p:
                raw |= bit
        if leaf:
            if r.random() < 0.4:
                raw |= _D
            if r.random() < 0.2:
                raw |= _G
            if self.feat.pku and r.random() < 0.4:
                raw |= r.randrange(16) << 59
        else:
            if r.random() < 0.05:
                raw |= r.randrange(16) << 59  # ignored in non-leaves (SDM §4.6.2)
            if r.random() < 0.1:
                raw |= _D  # bit 6 is ignored in non-leaves
        if r.random() < (0.25 if self.nxe else 0.04):
            raw |= _XD  # reserved when EFER.NXE=0
        if r.random() < 0.1:
            raw |= r.randrange(8) << 9  # software-available 11:9
        if r.random() < 0.05:
            raw |= r.randrange(1 << 7) << 52  # ignored 58:52
        return raw

    def reserved(self, level: int, kind: str) -> int:
        """A reserved bit for an entry of `kind`, now and then."""
        r = self.rng
        if r.random() >= self.rsvd_rate:
            return 0
        choices = []
        m = self.feat.maxphyaddr
        if m < 52:
            choices += [1 << 51, 1 << r.randrange(m, 52)]
        if kind == "top":
            choices += [_PS, _G]  # PS reserved; bit 8 reserved on AMD only
        if kind == "2m":
            choices.append(1 << r.randrange(13, 21))
        if kind == "1g":
            choices.append(1 << r.randrange(13, 30))
        return r.choice(choices) if choices else 0

    def build(self) -> int:
        root = self.alloc()
        r = self.rng
        top_shift = 48 if self.levels == 5 else 39
        for idx in r.sample(range(HARNESS_SLOT), r.randint(1, 3)):
            self._table_entry(root, idx, self.levels, idx << top_shift)
        return root

    def _table_entry(self, table: int, idx: int, level: int, va: int) -> None:
        r = self.rng
        addr = table + idx * 8
        if level == 1:
            frame = FRAME_BASE + r.randrange(NR_FRAMES) * 4096
            raw = frame | self.flags(True) | self.reserved(1, "pte")
            if r.random() < 0.15:
                raw |= 1 << 7  # PAT in a PTE: not a size bit
            self.mem.write_u64(addr, raw)
            self.leaves.append(_Leaf(va, 4096, 4096))
            return
        big = (level == 2 and r.random() < 0.3) or (level == 3 and r.random() < 0.2)
        if big:
            size = 1 << (21 if level == 2 else 30)
            frame = FRAME_BASE if level == 2 else 0
            kind = "2m" if level == 2 else "1g"
            raw = frame | _PS | self.flags(True) | self.reserved(level, kind)
            if r.random() < 0.2:
                raw |= 1 << 12  # PAT in a large leaf
            self.mem.write_u64(addr, raw)
            reach = NR_FRAMES * 4096
            self.leaves.append(_Leaf(va + (FRAME_BASE if level == 3 else 0), size, reach))
            return
        child = self.alloc()
        kind = "top" if level >= 4 else "mid"
        raw = child | self.flags(False) | self.reserved(level, kind)
        self.mem.write_u64(addr, raw)
        shift = 12 + 9 * (level - 2)
        n = r.randint(1, 4)
        for cidx in r.sample(range(512), n):
            self._table_entry(child, cidx, level - 1, va | cidx << shift)
        # an index nobody filled: a not-present entry to probe
        for _ in range(3):
            h = r.randrange(512)
            if self.mem.read_u64(child + h * 8) == 0:
                self.holes.append(va | h << shift)
                break


def _sext(va: int, bits: int) -> int:
    if va >> (bits - 1) & 1:
        va |= ((1 << 64) - 1) & ~((1 << bits) - 1)
    return va


def random_state(
    rng: random.Random, feat: MatrixFeatures, profile: Profile, levels: int, root: int
) -> PagingState:
    cr0 = CR0_PE | CR0_PG | (CR0_WP if rng.random() < 0.6 else 0)
    cr4 = CR4_PAE | (CR4_LA57 if levels == 5 else 0)
    if feat.smep and rng.random() < 0.4:
        cr4 |= CR4_SMEP
    if feat.smap and rng.random() < 0.4:
        cr4 |= CR4_SMAP
    pkru = 0
    if feat.pku and rng.random() < 0.5:
        cr4 |= CR4_PKE
        # Key 0 stays open: the probe guest's own CPL3 stack and stubs (QEMU/KVM backends) are
        # user pages with key 0, and a closed key 0 faults the harness instead of the probe.
        pkru = rng.getrandbits(32) & ~3
    efer = EFER_LME | EFER_LMA | (EFER_NXE if rng.random() < 0.8 else 0)
    return PagingState(
        cr3=root, cr0=cr0, cr4=cr4, efer=efer, pkru=pkru, profile=profile, maxphyaddr=feat.maxphyaddr
    )


def random_batch(
    seed: int,
    index: int,
    feat: MatrixFeatures,
    profile: Profile,
    n_probes: int,
    rsvd_rate: float = 0.08,
    name: str = "random",
) -> Batch:
    rng = random.Random(f"{seed}:{index}")
    levels = 5 if feat.la57 and rng.random() < 0.3 else 4
    nxe_pick = rng.random() < 0.8
    mem = SparseMemory(feat.ram_size)
    fill_frames(mem)
    tree = _Tree(rng, feat, nxe_pick, levels, mem, rsvd_rate)
    root = tree.build()
    state = random_state(rng, feat, profile, levels, root)
    if state.nxe != nxe_pick:
        state = state.replace(efer=state.efer ^ EFER_NXE)
    bits = 57 if levels == 5 else 48
    # Implicit supervisor reads (descriptor-table reads, SDM Vol. 3A §4.6) for a tenth of the
    # canonical reads, drawn from their own stream so the rest of a seed's cases stay as they were.
    irng = random.Random(f"{seed}:{index}:implicit")
    probes: list[Probe] = []
    cases: list[CaseInfo] = []
    for i in range(n_probes):
        x = rng.random()
        if tree.leaves and x < 0.85:
            leaf = rng.choice(tree.leaves)
            va = leaf.va + 8 * rng.randrange(min(leaf.reach, leaf.size) // 8)
        elif tree.holes and x < 0.95:
            va = rng.choice(tree.holes) + 8 * rng.randrange(512)
        else:
            va = rng.getrandbits(bits - 1) & ~7
        va = _sext(va, bits)
        if rng.random() < 0.02:
            va ^= 1 << 62  # non-canonical
        access = rng.choice(("read", "read", "write", "fetch"))
        user = rng.random() < 0.5
        ac = state.smap and not user and rng.random() < 0.5
        canonical = (va >> (bits - 1)) in (0, (1 << (65 - bits)) - 1)
        implicit = (
            access == "read"
            and canonical
            and irng.random() < 0.1
            and (feat.implicit_cpl3 if user else feat.implicit_cpl0)
        )
        if implicit and user and irng.random() < 0.5:
            ac = True  # EFLAGS.AC at CPL3: SMAP still applies
        probes.append(Probe(va, access, user, ac, implicit=implicit))
        cases.append(
            CaseInfo(
                f"{name}#{seed}:{index}:{i}",
                None,
                (i,),
                (),
                (FRAME_BASE,),
                f"random tree seed {seed} batch {index} probe {i}",
            )
        )
    return Batch(mem, state, probes, cases)


@dataclass
class RandomSource:
    """`total` random cases (one probe each) in batches of `per_batch` probes over one tree."""

    features: MatrixFeatures
    profile: Profile
    seed: int = 0
    cases: int = 2000
    per_batch: int = 64
    first_batch: int = 0
    name: str = "random"

    @property
    def total(self) -> int:
        return self.cases

    def batches(self) -> Iterator[Batch]:
        done = 0
        b = self.first_batch
        while done < self.cases:
            n = min(self.per_batch, self.cases - done)
            yield random_batch(self.seed, b, self.features, self.profile, n, name=self.name)
            done += n
            b += 1
