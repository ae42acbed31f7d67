# SPDX-License-Identifier: GPL-2.0-or-later
"""Packing access-matrix cases (harness/matrix.py) into oracle batches: the CPU state a case needs,
one image with its tables, probes and case infos per batch (build_batch), and MatrixSource, the
cases of a matrix selected by index, in batches.

Packing (docs/paging.md §11.3 adapted to the rig, x86pt/oracle.py): every case gets its own PDE and its
own PTE (PTs are shared: case k of a PT page uses PTE k and VA bits 20:12 = k), PDPTEs are shared
by the cases with the same pdpte.ro, PML4Es by the cases with the same top-level variant. Cases
that need different CR0/CR4/EFER/PKRU go into different batches. Data frames (filled with
`tag_value`, low byte 0xC3 = ret) sit at RIG_IMAGE_BASE, which is 2M-aligned, so 2M leaves point
there and 1G leaves (frame 0) reach them through VA bits 29:21.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from harness.differential import Batch, CaseInfo, OwnedEntry
from harness.matrix import (
    ACC_AC,
    ACC_FETCH,
    ACC_TWICE,
    ACC_USER,
    ACC_WRITE,
    CR0_WP_F,
    EFER_NX,
    F,
    FLAG_NAMES,
    FRAME_BASE,
    HI_AT_MASK,
    IMPLICIT,
    LA57,
    NONCANON,
    NR_FRAMES,
    PDE_13,
    PDE_51,
    PDE_PSE,
    PDPTE_1G,
    PDPTE_RO,
    PKE,
    PKEY,
    PKU_AD,
    PKU_WD,
    PML4E_8,
    PML4E_PS,
    PML5_INDEX,
    PTE_51,
    SMAP,
    SMEP,
    TABLE_BASE,
    TOP_INDEX_4,
    Matrix,
    MatrixFeatures,
    hi_at,
    hi_bit,
)
from x86pt.oracle import Probe, tag_value
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

# Entry bits KUT sets (its own bit positions: 51, 36, 13 are raw bit numbers, docs/paging.md §11.1).
_B51, _B36, _B13 = 1 << 51, 1 << 36, 1 << 13  # single address bits the cases set as reserved bits
_PK1, _PK2 = 1 << PK_SHIFT, 2 << PK_SHIFT


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
