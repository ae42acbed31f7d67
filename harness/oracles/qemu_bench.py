# SPDX-License-Identifier: GPL-2.0-or-later
"""Measurements of the QEMU backend (`python3 -m harness.oracles.qemu`, docs/oracles.md §4): launch
cost and probes/s of QemuOracle next to the model walking the same probes, QemuMonitor's launch
and gva2gpa cost, and optionally the monitor on a large direct map."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

from x86pt.build import Builder
from x86pt.errors import BadInputError, OracleError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import RIG_IMAGE_BASE, Probe
from x86pt.state import PagingState, profile_named

from harness.oracles.capability import fill_frame
from harness.oracles.qemu import MAX_PROBES, QemuOracle
from harness.qemu.monitor import QemuMonitor
from harness.qemu.process import QEMU_BINARY, qemu_binary, qemu_version


def _bench_image() -> tuple[SparseMemory, PagingState, list[Probe]]:
    import random

    b = Builder(table_base=RIG_IMAGE_BASE, maxphyaddr=40, vendor="amd")
    for i in range(64):
        pa = 0x400000 + i * 0x1000
        fill_frame(b.memory, pa)
        b.map(0x10000000 + i * 0x1000, pa, 0x1000, flags=("rw us", "rw", "us nx", "rw us nx")[i % 4])
    rng = random.Random(7)
    probes = [
        Probe(
            0x10000000 + rng.randrange(72) * 0x1000 + 8 * rng.randrange(512),
            rng.choice(("read", "write", "fetch")),
            user=rng.random() < 0.5,
            wvalue=0xC3,
        )
        for _ in range(MAX_PROBES)
    ]
    return b.memory, b.state(profile="qemu"), probes


def main(argv: Sequence[str] | None = None) -> int:
    """python3 -m harness.oracles.qemu [--repeat N]: launch cost, probes/s at 8192 probes per
    launch (against the model walking the same probes in the same run), monitor launch and
    gva2gpa cost. Medians of N runs."""
    import argparse
    import statistics
    from x86pt.walk import Access, walk

    ap = argparse.ArgumentParser(prog="python3 -m harness.oracles.qemu", description=main.__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--direct-map-gib",
        type=int,
        default=0,
        metavar="N",
        help="also time the monitor on an N GiB direct map of 4K pages (N/512 GiB of "
        "tables at 1 MiB; 64 gives 128 MiB of tables)",
    )
    args = ap.parse_args(argv)
    if qemu_binary() is None:
        print(f"{QEMU_BINARY} not installed (tools/install_qemu.sh)")
        return 2
    mem, st, probes = _bench_image()
    oracle = QemuOracle()
    print(qemu_version())

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    one = [timed(lambda: oracle.run(mem, st, probes[:1])) for _ in range(args.repeat)]
    launch = []
    full = []
    for _ in range(args.repeat):
        full.append(timed(lambda: oracle.run(mem, st, probes)))
        launch.append(oracle.last_launch_seconds)
    model_mem = mem.copy()
    model = timed(
        lambda: [walk(st, model_mem, p.va, Access(p.access, p.user), update_ad=True) for p in probes]
    )
    med_one, med_full, med_launch = (statistics.median(x) for x in (one, full, launch))
    print(f"(medians of {args.repeat}; minimum in brackets: other load on the machine shows in the medians)")
    print(
        f"guest path, 1 probe: {med_one * 1e3:.1f} [{min(one) * 1e3:.1f}] ms per run() "
        "(prepare RAM, launch, boot, exit, read back)"
    )
    print(
        f"guest path, {len(probes)} probes: {med_full * 1e3:.1f} [{min(full) * 1e3:.1f}] ms per "
        f"run() ({med_launch * 1e3:.1f} [{min(launch) * 1e3:.1f}] ms of it in QEMU), "
        f"{len(probes) / med_full:,.0f} [{len(probes) / min(full):,.0f}] probes/s"
    )
    print(
        f"model (x86pt.walk, update_ad) on the same probes: {model * 1e3:.1f} ms, "
        f"{len(probes) / model:,.0f} probes/s; QEMU/model throughput ratio "
        f"{model / med_full:.2f}"
    )
    mlaunch = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        with QemuMonitor(mem, st) as mon:
            mlaunch.append(time.perf_counter() - t)
            n = 500
            t1 = time.perf_counter()
            for i in range(n):
                mon.gva2gpa(0x10000000 + (i % 72) * 0x1000)
            g = (time.perf_counter() - t1) / n
    print(
        f"monitor: launch {statistics.median(mlaunch) * 1e3:.1f} [{min(mlaunch) * 1e3:.1f}] ms "
        "(to registers set), "
        f"gva2gpa {g * 1e3:.3f} ms"
    )
    if args.direct_map_gib:
        _bench_direct_map(args.direct_map_gib)
    return 0


DIRECT_MAP_BASE = 0xFFFF888000000000


def _direct_map(gib: int) -> tuple[SparseMemory, PagingState]:
    """PML4[273] (Linux's direct map at 0xffff888000000000) -> PDPT -> PDs -> PTs mapping [0, gib GiB) with
    4K pages, tables from 1 MiB up; entries composed with numpy for speed (P|RW|A|D = 0x63)."""
    import numpy as np

    mem = SparseMemory()
    pml4, pdpt, pd = 0x100000, 0x101000, 0x102000
    pt = pd + gib * 0x1000
    idx = np.arange(512, dtype=np.uint64)
    for i in range(gib * 512):
        ents = (np.uint64(i << 21) + idx * np.uint64(0x1000)) | np.uint64(0x63)
        mem.pages[(pt >> 12) + i] = bytearray(ents.astype("<u8").tobytes())
    for j in range(gib):
        ents = (np.uint64(pt + j * 512 * 0x1000) + idx * np.uint64(0x1000)) | np.uint64(0x23)
        mem.pages[(pd >> 12) + j] = bytearray(ents.astype("<u8").tobytes())
    top = np.zeros(512, dtype="<u8")
    top[:gib] = (np.uint64(pd) + np.arange(gib, dtype=np.uint64) * np.uint64(0x1000)) | np.uint64(0x23)
    mem.pages[pdpt >> 12] = bytearray(top.tobytes())
    root = np.zeros(512, dtype="<u8")
    root[(DIRECT_MAP_BASE >> 39) & 511] = pdpt | 0x23
    mem.pages[pml4 >> 12] = bytearray(root.tobytes())
    return mem, PagingState(cr3=pml4, profile=profile_named("qemu"))


def _bench_direct_map(gib: int) -> None:
    if not 1 <= gib <= 512:
        raise BadInputError("--direct-map-gib must be 1..512")
    mem, st = _direct_map(gib)
    base = DIRECT_MAP_BASE
    with QemuMonitor(mem, st) as mon:
        print(
            f"monitor, {gib} GiB direct map ({(mem.end - 0x100000) >> 20} MiB of tables, RAM "
            f"{mon.ram.size >> 20} MiB): launch {mon.launch_seconds * 1e3:.0f} ms"
        )
        last = base + (gib << 30) - 0x1000 + 0x123
        if mon.gva2gpa(last) != (gib << 30) - 0x1000 + 0x123:
            raise OracleError(f"gva2gpa({last:#x}) is wrong on the direct map")
        t = time.perf_counter()
        text = mon.info_mem()
        print(f"  info mem {(time.perf_counter() - t) * 1e3:.0f} ms: {text.strip()}")
        with tempfile.TemporaryDirectory(prefix="x86pt-bench-") as d:
            t = time.perf_counter()
            mon.dump_guest_memory(os.path.join(d, "vm.elf"))
            size = os.path.getsize(os.path.join(d, "vm.elf"))
            print(f"  dump-guest-memory {(time.perf_counter() - t) * 1e3:.0f} ms ({size >> 20} MiB)")
