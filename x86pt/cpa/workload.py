"""Workload generator: the realistic operation sequences of docs/cpa.md §10 as trace ops.

Scenarios (mixable with weights): `modules` (pre-ROX module load/unload churn: vmalloc 4K pages
with scattered frames, ro/x/nx, unload through vm_reset_perms), `modules-rox` (6.15 ROX cache:
2M huge vmalloc chunks made ROX, per-module nx+rw then rox), `bpf` (bpf_prog_pack: one ROX 2M pack,
programs inside need no CPA), `bpf-nopack` (each program its own vmalloc + rox, freed through
vm_reset_perms), `kfence` (set_memory_4k where the pool is not yet 4K, then out-of-band PRESENT toggles),
`secretmem` (per-page set_direct_map_invalid/default), `hotplug` (128 MiB blocks added/removed).
"""

from __future__ import annotations

import random
import typing
from typing import Iterator

from x86pt.cpa.kernel import P, kernel_version
from x86pt.cpa.layout import Layout
from x86pt.cpa.trace import Op
from x86pt.cpa.traceops import Hotplug, OnePage, Oob, PageRange, Vmap
from x86pt.errors import BadInputError

SCENARIOS = ("modules", "modules-rox", "bpf", "bpf-nopack", "kfence", "secretmem", "hotplug")
MIXES = {
    "mixed": {"modules": 4, "bpf-nopack": 3, "secretmem": 2, "kfence": 1},
    "mixed-rox": {"modules-rox": 4, "bpf": 3, "secretmem": 2, "kfence": 1},
}


class Frames:
    """Page frames for vmalloc/secretmem: random RAM pages above the reserved low area."""

    def __init__(self, layout: Layout, rng: random.Random) -> None:
        self.rng = rng
        self.ranges = [
            (max(s, layout.reserved_below) >> 12, e >> 12)
            for s, e in layout.ram
            if e > layout.reserved_below + (4 << 20)
        ]
        if not self.ranges:
            raise BadInputError(
                f"layout {layout.name}: no RAM above {layout.reserved_below:#x} for workloads"
            )
        self.weights = [e - s for s, e in self.ranges]
        self.used: set[int] = set()
        # kfence / hotplug keep their own areas
        self.reserved: list[tuple[int, int]] = []

    def page(self) -> int:
        for _ in range(1000):
            s, e = self.rng.choices(self.ranges, self.weights)[0]
            pfn = self.rng.randrange(s, e)
            if pfn not in self.used and not any(a <= pfn < b for a, b in self.reserved):
                self.used.add(pfn)
                return pfn << 12
        raise BadInputError("workload: out of free frames")

    def huge(self) -> int:
        for _ in range(1000):
            s, e = self.rng.choices(self.ranges, self.weights)[0]
            base = (self.rng.randrange(s, e) >> 9) << 9
            if base < s or base + 512 > e:
                continue
            if any(p in self.used for p in range(base, base + 512, 37)) or any(
                a < base + 512 and base < b for a, b in self.reserved
            ):
                continue
            self.used.update(range(base, base + 512))
            return base << 12
        raise BadInputError("workload: no free 2M frame")

    def free(self, pa: int, n: int = 1) -> None:
        for k in range(n):
            self.used.discard((pa >> 12) + k)


class VA:
    """A bump allocator in the module area with a free list per size (like vmalloc's)."""

    def __init__(self, start: int, end: int) -> None:
        self.next, self.end = start, end
        self.free: dict[tuple[int, int], list[int]] = {}  # (pages, alignment) -> freed addresses

    def alloc(self, n: int, align: int = 4096) -> int:
        lst = self.free.get((n, align))
        if lst:
            return lst.pop()
        a = -(-self.next // align) * align
        if a + n * 4096 > self.end:
            raise BadInputError("workload: module area exhausted")
        self.next = a + n * 4096 + 4096  # guard page, as vmalloc
        return a

    def release(self, a: int, n: int, align: int = 4096) -> None:
        self.free.setdefault((n, align), []).append(a)


class Generator:
    def __init__(self, layout: Layout, kernel: str, seed: int = 1) -> None:
        self.lay = layout
        self.v = kernel_version(kernel)
        self.rng = random.Random(seed)
        self.frames = Frames(layout, self.rng)
        self.va = VA(layout.modules_vaddr + (4 << 20), layout.modules_end)  # past loaded modules
        self.po = layout.page_offset
        self.loaded: list[tuple[int, list[int], int, int, int]] = []  # (va, frames, text, ro, data)
        self.packs: list[list[int]] = []  # [va, used programs, pa]
        self.progs: list[tuple[int, list[int]]] = []  # (va, frames)
        self.secret: list[int] = []
        self.kfence: tuple[int, int] | None = None
        self.kfence_down: set[int] = set()
        self.hot: list[int] = []
        self.hot_next = -(-layout.ram[-1][1] // (1 << 30)) * (1 << 30)
        self.rox_chunks: list[list[int]] = []  # [va, next free page, pa]

    def dm(self, pa: int) -> int:
        return self.po + pa

    # -- scenarios: each call yields the ops of one event ----------------------------------------
    def _reset_perms(self, pages: list[int]) -> Iterator[Op]:
        for pa in pages:
            yield OnePage("set_direct_map_invalid_noflush", self.dm(pa))
        for pa in pages:
            yield OnePage("set_direct_map_default_noflush", self.dm(pa))

    def modules(self) -> Iterator[Op]:
        r = self.rng
        if self.loaded and (len(self.loaded) > 40 or r.random() < 0.45):
            va, pages, text, ro, data = self.loaded.pop(r.randrange(len(self.loaded)))
            yield from self._reset_perms(pages)
            yield PageRange("vunmap", va, len(pages))
            self.va.release(va, len(pages))
            for pa in pages:
                self.frames.free(pa)
            return
        text, ro, data = r.randint(1, 12), r.randint(1, 6), r.randint(1, 8)
        n = text + ro + data
        va = self.va.alloc(n)
        pages = [self.frames.page() for _ in range(n)]
        for k, pa in enumerate(pages):
            yield Vmap("vmap", va + k * 4096, pa, 1, False)
        if self.v.native_rox:
            yield PageRange("set_memory_rox", va, text)
            yield PageRange("set_memory_ro", va + text * 4096, ro)
        else:
            yield PageRange("set_memory_ro", va, text + ro)
            yield PageRange("set_memory_x", va, text)
        yield PageRange("set_memory_nx", va + text * 4096, ro + data)
        self.loaded.append((va, pages, text, ro, data))

    def _new_huge_rox(self) -> typing.Generator[Op, None, list[int]]:
        """A fresh 2M-aligned vmap of a huge page made ROX (a module or BPF pack chunk):
        [va, pages used, pa]."""
        va = self.va.alloc(512, 1 << 21)
        pa = self.frames.huge()
        yield Vmap("vmap", va, pa, 512, True)
        yield PageRange("set_memory_rox", va, 512)
        return [va, 0, pa]

    def _free_huge_rox(self, va: int, pa: int) -> Iterator[Op]:
        """A fully free 2M chunk goes back through vfree (vm_reset_perms)."""
        yield from self._reset_perms([pa + k * 4096 for k in range(512)])
        yield PageRange("vunmap", va, 512)
        self.va.release(va, 512, 1 << 21)
        self.frames.free(pa, 512)

    def _temp_rw(self, va: int, n: int) -> Iterator[Op]:
        """Text made writable for patching, then ROX again (execmem_make_temp_rw ... restore_rox)."""
        yield PageRange("set_memory_nx", va, n)
        yield PageRange("set_memory_rw", va, n)
        yield PageRange("set_memory_rox", va, n)

    def modules_rox(self) -> Iterator[Op]:
        r = self.rng
        if not self.rox_chunks or self.rox_chunks[-1][1] > 480:
            if len(self.rox_chunks) > 48:
                # a fully free 2M piece goes back through vfree (vm_reset_perms)
                ova, _, opa = self.rox_chunks.pop(0)
                yield from self._free_huge_rox(ova, opa)
            self.rox_chunks.append((yield from self._new_huge_rox()))
        ch = self.rox_chunks[-1]
        n = r.randint(1, 24)
        n = min(n, 512 - ch[1])
        sub = ch[0] + ch[1] * 4096
        ch[1] += n
        # execmem_make_temp_rw, relocations/alternatives, execmem_restore_rox
        yield from self._temp_rw(sub, n)
        data = r.randint(1, 6)
        dva = self.va.alloc(data)
        pages = [self.frames.page() for _ in range(data)]
        for k, pa in enumerate(pages):
            yield Vmap("vmap", dva + k * 4096, pa, 1, False)
        yield PageRange("set_memory_nx", dva, data)
        if r.random() < 0.4:
            # unload of the data part; text pieces go back to the cache (rw, INT3 fill, rox)
            yield from self._reset_perms(pages)
            yield PageRange("vunmap", dva, data)
            self.va.release(dva, data)
            yield from self._temp_rw(sub, n)

    def bpf(self) -> Iterator[Op]:
        r = self.rng
        if not self.packs or self.packs[-1][1] >= 32:
            if self.packs and (r.random() < 0.3 and len(self.packs) > 2 or len(self.packs) > 32):
                va, _, pa = self.packs.pop(0)
                yield from self._free_huge_rox(va, pa)
            self.packs.append((yield from self._new_huge_rox()))
        self.packs[-1][1] += 1  # a program from the pack: text_poke only, no CPA

    def bpf_nopack(self) -> Iterator[Op]:
        r = self.rng
        if self.progs and (len(self.progs) > 60 or r.random() < 0.5):
            va, pages = self.progs.pop(r.randrange(len(self.progs)))
            yield from self._reset_perms(pages)
            yield PageRange("vunmap", va, len(pages))
            self.va.release(va, len(pages))
            for pa in pages:
                self.frames.free(pa)
            return
        n = r.randint(1, 3)
        va = self.va.alloc(n)
        pages = [self.frames.page() for _ in range(n)]
        for k, pa in enumerate(pages):
            yield Vmap("vmap", va + k * 4096, pa, 1, False)
        if self.v.native_rox:
            yield PageRange("set_memory_rox", va, n)
        else:
            yield PageRange("set_memory_ro", va, n)
            yield PageRange("set_memory_x", va, n)
        self.progs.append((va, pages))

    def kfence_ops(self) -> Iterator[Op]:
        r = self.rng
        if self.kfence is None:
            base = self.frames.huge() + 0x81000  # memblock: not 2M aligned
            self.frames.used.update(range((base >> 12) + 512 - 0x81, (base >> 12) + 512 + 0x100))
            self.kfence = (base, 512)
            # arch_kfence_init_pool walks the pool page by page but calls set_memory_4k(addr, 1)
            # only where lookup_address() finds a level other than 4K: once per 2M region of
            # the pool (the call splits that whole 2M). On 6.15+ only those pages get
            # _PAGE_KERNEL_4K; every other pool page keeps the plain kernel prot.
            for k in range(512):
                pa = base + k * 4096
                if k == 0 or not pa & 0x1FFFFF:
                    yield PageRange("set_memory_4k", self.dm(pa), 1)
            return
        base, n = self.kfence
        k = r.randrange(1, n, 2)  # object pages; guard pages stay protected
        a = self.dm(base + k * 4096)
        if a in self.kfence_down:
            self.kfence_down.discard(a)
            yield Oob("oob", a, P, 0)
        else:
            self.kfence_down.add(a)
            yield Oob("oob", a, 0, P)

    def secretmem(self) -> Iterator[Op]:
        r = self.rng
        if self.secret and (len(self.secret) > 200 or r.random() < 0.45):
            pa = self.secret.pop(r.randrange(len(self.secret)))
            yield OnePage("set_direct_map_default_noflush", self.dm(pa))
            self.frames.free(pa)
            return
        pa = self.frames.page()
        self.secret.append(pa)
        yield OnePage("set_direct_map_invalid_noflush", self.dm(pa))

    def hotplug(self) -> Iterator[Op]:
        block = 128 << 20
        if self.hot and (len(self.hot) > 16 or self.rng.random() < 0.4):
            pa = self.hot.pop()
            yield Hotplug("memory_remove", pa, block)
            return
        pa = self.hot_next + len(self.hot) * block
        self.hot.append(pa)
        yield Hotplug("memory_add", pa, block)

    def run(self, scenario: str, n_ops: int) -> list[Op]:
        weights = MIXES.get(scenario, {scenario: 1})
        for s in weights:
            if s not in SCENARIOS:
                raise BadInputError(
                    f"unknown workload {scenario!r} (one of {', '.join(SCENARIOS + tuple(MIXES))})"
                )
        fns = {
            "modules": self.modules,
            "modules-rox": self.modules_rox,
            "bpf": self.bpf,
            "bpf-nopack": self.bpf_nopack,
            "kfence": self.kfence_ops,
            "secretmem": self.secretmem,
            "hotplug": self.hotplug,
        }
        names = list(weights)
        w = [weights[k] for k in names]
        out: list[Op] = []
        guard = 0
        while len(out) < n_ops:
            before = len(out)
            out.extend(fns[self.rng.choices(names, w)[0]]())
            guard = guard + 1 if len(out) == before else 0
            if guard > 10000:
                break
        return out[:n_ops]


def generate(
    layout: Layout, kernel: str, scenario: str = "mixed", n_ops: int = 1000, seed: int = 1
) -> list[Op]:
    return Generator(layout, kernel, seed).run(scenario, n_ops)
