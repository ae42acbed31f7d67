# SPDX-License-Identifier: GPL-2.0-or-later
"""A brute-force reference for the CPA validator (issue 12 item 2): after an operation, walk
*every* 4K page of the direct map with the core batch walker (x86pt.batch, the SDM's rules) on the
model's exported image and compare what the hardware would do — present or not, the physical
address, writable, executable — with what the operation sequence asks for.

It shares no code with x86pt/cpa/validate.py: the expectation is a flat per-page array of the
hardware-visible bits (P, RW, NX), updated from each trace op by the APIs' definitions
(docs/cpa.md §3: masks; §4.6: rodata stays read-only; §4.7: the direct-map alias of a vmalloc or
kernel-image page gets the masks with NX stripped since 6.2, and NX-only calls skip it before),
and the observation is the walker's, never the model's lookup. Bits the hardware ignores for
translation and supervisor rights (A, D, G, cache bits, software bits) are out of its reach; the
validator's (b) covers them.

Ops it understands: the set_memory_* API, set_direct_map_*, kernel_map_pages, `cpa`, `oob`,
vmap/vunmap. Hot-plug ops are refused (the direct map's extent changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from x86pt.batch import OK, translate_batch
from x86pt.errors import BadInputError
from x86pt.fields import BIT_P, BIT_RW, BIT_XD

if TYPE_CHECKING:
    import numpy.typing as npt

    from x86pt.cpa.ops import CpaModel
    from x86pt.cpa.trace import Op

_P, _RW, _NX = BIT_P, BIT_RW, BIT_XD
_NO_ALIAS = 8  # CPA_NO_CHECK_ALIAS


@dataclass(frozen=True)
class Difference:
    va: int
    what: str  # "present" | "frame" | "writable" | "executable"
    got: object
    want: object

    def __str__(self) -> str:
        return f"{self.va:#x}: {self.what} is {self.got}, the op sequence asks for {self.want}"


class BruteForce:
    """Expected hardware view of the direct map, page by page, and the walker's actual one."""

    def __init__(self, model: CpaModel) -> None:
        m = model
        self.po = m.page_offset
        self.version = m.version
        lay = m.layout
        self.ram = [(s, e) for s, e in m.ram]  # pfn ranges mapped at boot
        self.pfns = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in self.ram])
        self.vas = (self.pfns.astype(np.uint64) << np.uint64(12)) + np.uint64(self.po)
        k = lay.kernel
        self.rodata = (k.start_rodata >> 12, (k.end_rodata >> 12) - 1)
        self.skm = lay.start_kernel_map
        self.phys_base = lay.phys_base
        self.kimg_size = lay.kernel_image_size
        self.vm: dict[int, int] = {}  # vmalloc page va -> pfn (from vmap ops)
        present, writable, executable, pa = self.observe(m)
        self.present = present.copy()
        self.rw = writable.copy()  # RW as the op sequence leaves it
        self.nx = ~executable  # (only meaningful while present)
        bad = present & (pa != (self.pfns.astype(np.uint64) << np.uint64(12)))
        if bad.any():
            raise BadInputError(f"direct map does not map its own frame at start: {int(self.vas[bad][0]):#x}")
        # where a non-present page's RW/NX are unknown at start, the first P=1 change tells
        self.unknown = ~present

    # -- the walker's view -------------------------------------------------------------------
    def observe(
        self, m: CpaModel
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], npt.NDArray[np.bool_], npt.NDArray[np.uint64]]:
        """(present, writable, executable, pa) of every direct-map page on the exported image,
        supervisor accesses, CR0.WP=1, EFER.NXE=1 (the model's paging state)."""
        mem, st = m.export(), m.paging_state()
        r = translate_batch(st, mem, self.vas, "read")
        w = translate_batch(st, mem, self.vas, "write")
        x = translate_batch(st, mem, self.vas, "fetch")
        present = r.outcome == OK
        return present, w.outcome == OK, x.outcome == OK, r.pa

    def leaf_is_4k(self, m: CpaModel, va: int) -> bool:
        """Whether `va` ends at a PTE (present or not): the walk's level is 1."""
        mem, st = m.export(), m.paging_state()
        r = translate_batch(st, mem, np.array([va], dtype=np.uint64), "read")
        return int(r.level[0]) == 1

    # -- the expectation -----------------------------------------------------------------------
    def _dm_index(self, pfn: int) -> int | None:
        i = int(np.searchsorted(self.pfns, pfn))
        if i < len(self.pfns) and int(self.pfns[i]) == pfn:
            return i
        return None

    def _in_dm(self, va: int) -> bool:
        return self.po <= va < self.po + (1 << 46)

    def _apply(self, i: int, pfn: int, set_: int, clr: int) -> None:
        p = bool(self.present[i])
        rw = bool(self.rw[i])
        nx = bool(self.nx[i])
        if clr & _P:
            p = False
        if set_ & _P:
            p = True
        if clr & _RW:
            rw = False
        if set_ & _RW:
            rw = True
        if clr & _NX:
            nx = False
        if set_ & _NX:
            nx = True
        if p and self.rodata[0] <= pfn <= self.rodata[1]:
            rw = False  # protect_rodata (by PFN, every alias)
        self.present[i], self.rw[i], self.nx[i] = p, rw, nx

    def _frame_of(self, va: int) -> int | None:
        if self._in_dm(va):
            return (va - self.po) >> 12
        if self.skm <= va < self.skm + self.kimg_size:
            return (va - self.skm + self.phys_base) >> 12
        return self.vm.get(va)

    def _call(self, addr: int, n: int, set_: int, clr: int, flags: int = 0, primary: bool = True) -> None:
        strip = self.version.nx_alias_strip
        nx_only = (set_ | clr) == _NX
        alias = primary and not flags & _NO_ALIAS and not (nx_only and not strip)
        aset, aclr = (set_ & ~_NX, clr & ~_NX) if strip else (set_, clr)
        for k in range(n):
            va = (addr & ~0xFFF) + (k << 12)
            pfn = self._frame_of(va)
            if pfn is None:
                if primary:
                    return  # __cpa_process_fault: -EFAULT ends the call
                continue
            i = self._dm_index(pfn)
            if i is None:
                continue
            if self._in_dm(va):
                self._apply(i, pfn, set_, clr)
            elif alias:
                self._apply(i, pfn, aset, aclr)

    def apply(self, op: Op, model_before: CpaModel | None = None) -> None:
        """Advance the expectation by one trace op. `model_before` (the model before the op) is
        needed for `oob`, which only lands on a page mapped by a 4K PTE."""
        v = self.version
        name = op[0]
        ro_clr = _RW
        masks = {
            "set_memory_ro": (0, ro_clr, 0),
            "set_memory_rw": (_RW, 0, 0),
            "set_memory_x": (0, _NX, 0),
            "set_memory_nx": (_NX, 0, 0),
            "set_memory_np": (0, _P, 0),
            "set_memory_np_noalias": (0, _P, _NO_ALIAS),
            "set_memory_p": (_P, 0, 0),
            "set_memory_4k": (0, 0, 0),
            "set_memory_global": (0, 0, 0),
            "set_memory_nonglobal": (0, 0, 0),
        }
        if name == "set_memory_rox":
            if v.native_rox:
                self._call(op[1], op[2], 0, _RW | _NX)
            else:  # generic: ro, then x
                self._call(op[1], op[2], 0, _RW)
                self._call(op[1], op[2], 0, _NX)
        elif name in masks:
            s, c, f = masks[name]
            self._call(op[1], op[2], s, c, f)
        elif name in ("set_direct_map_invalid_noflush", "set_direct_map_default_noflush"):
            on = name.endswith("default_noflush")
            self._call(op[1], 1, _P | _RW if on else 0, 0 if on else _P | _RW, _NO_ALIAS)
        elif name == "kernel_map_pages":
            self._call(op[1], op[2], _P | _RW if op[3] else 0, 0 if op[3] else _P | _RW, _NO_ALIAS)
        elif name == "cpa":
            _, addr, n, s, c, fl, primary, _fs = op
            self._call(addr, n, s, c, fl, primary)
        elif name == "oob":
            va = op[1] & ~0xFFF
            if model_before is None:
                raise BadInputError("an oob op needs the model before the op")
            if self._in_dm(va) and self.leaf_is_4k(model_before, va):
                pfn = (va - self.po) >> 12
                i = self._dm_index(pfn)
                if i is not None:
                    # a raw PTE write: no static protections
                    p = (bool(self.present[i]) and not op[3] & _P) or bool(op[2] & _P)
                    self.present[i] = p
                    self.rw[i] = (bool(self.rw[i]) and not op[3] & _RW) or bool(op[2] & _RW)
                    self.nx[i] = (bool(self.nx[i]) and not op[3] & _NX) or bool(op[2] & _NX)
        elif name == "vmap":
            _, addr, pa, n, _huge = op
            for k in range(n):
                self.vm[addr + (k << 12)] = (pa >> 12) + k
        elif name == "vunmap":
            for k in range(op[2]):
                self.vm.pop(op[1] + (k << 12), None)
        else:
            raise BadInputError(f"the brute-force reference does not model {name!r}")

    # -- the comparison ------------------------------------------------------------------------
    def differences(self, m: CpaModel, limit: int = 16) -> list[Difference]:
        """Pages whose walk disagrees with the expectation (at most `limit`, lowest VA first)."""
        present, writable, executable, pa = self.observe(m)
        want_pa = self.pfns.astype(np.uint64) << np.uint64(12)
        known = ~self.unknown
        bad = np.zeros(len(self.vas), dtype=bool)
        bad |= present != self.present
        both = present & self.present
        bad |= both & (pa != want_pa)
        bad |= both & known & (writable != self.rw)
        bad |= both & known & (executable != ~self.nx)
        out = []
        for i in np.flatnonzero(bad)[:limit]:
            va = int(self.vas[i])
            if present[i] != self.present[i]:
                out.append(Difference(va, "present", bool(present[i]), bool(self.present[i])))
            elif pa[i] != want_pa[i]:
                out.append(Difference(va, "frame", hex(int(pa[i])), hex(int(want_pa[i]))))
            elif writable[i] != self.rw[i]:
                out.append(Difference(va, "writable", bool(writable[i]), bool(self.rw[i])))
            else:
                out.append(Difference(va, "executable", bool(executable[i]), not self.nx[i]))
        # a page seen present with known rights from now on
        newly = present & self.unknown
        if newly.any():
            self.rw[newly] = writable[newly]
            self.nx[newly] = ~executable[newly]
            self.unknown &= ~newly
        return out

    def pages_differing(self, m: CpaModel) -> npt.NDArray[np.uint64]:
        """VAs (uint64) of every page that disagrees."""
        d = self.differences(m, limit=1 << 40)
        return np.array([x.va for x in d], dtype=np.uint64)


def brute_force_replay(model: CpaModel, ops: list[Op]) -> tuple[int, list[Difference]] | None:
    """Replay `ops` on `model` (no validator), walking the whole direct map after each op; the
    first op whose result differs from the expectation, with its differences, or None."""
    from x86pt.cpa.trace import apply_op

    bf = BruteForce(model)
    for idx, op in enumerate(ops):
        bf.apply(op, model)
        apply_op(model, op)
        d = bf.differences(model)
        if d:
            return idx, d
    return None
