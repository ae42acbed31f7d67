#!/usr/bin/env python3
"""Benchmark `x86pt dump` / `census` against QEMU's own monitor commands on the same images.

Shapes (a Linux-like direct map at 0xffff888000000000, tables from 1 MiB, raw image on tmpfs):
  all-4K      64 GiB in 4K pages: 16,777,216 PTEs, 32,834 table pages (128 MiB of tables)
  fragmented  64 GiB in 2M pages with 10% of the 2M regions split into 4K PTs, one page of
              each split region read-only (as set_memory_ro() leaves it)
For each shape, in one run:
  * raw read: reading the table bytes into memory (one readinto), the floor for any dumper;
  * x86pt as a user runs it (a new process, start-up included; wall time and peak RSS from
    wait4): dump --format qemu-mem, qemu-tlb, ptdump, and census;
  * QEMU 7.2 (qemu-system-x86_64, paused, RAM = the image; harness/qemu/monitor.py):
    `info mem` and `info tlb` through QMP, timed around the monitor command only;
  * outputs compared byte for byte (QEMU's CR LF line ends normalised).

    python3 tools/bench_dump.py [--gib 64] [--shapes all-4K fragmented] [--skip-qemu-tlb]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAGE_OFFSET_PML4 = 273  # 0xffff888000000000
TABLE = np.uint64(0x63)  # _KERNPG_TABLE: P RW A D
KERNEL = np.uint64(0x8000000000000163)  # __PAGE_KERNEL: P RW A D G NX
KERNEL_LARGE = np.uint64(0x80000000000001E3)  # __PAGE_KERNEL_LARGE: + PSE
BASE = 0x100000
STATE = ["--cr3", hex(BASE), "--cr0", "0x80010011", "--cr4", "0xa0", "--efer", "0xd00"]


def build_all4k(path: str, gib: int) -> int:
    n_pd, n_pt = gib, gib * 512
    pdpt, pds = BASE + 0x1000, BASE + 0x2000
    pts = pds + n_pd * 0x1000
    img = np.zeros((pts + n_pt * 0x1000) // 8, dtype=np.uint64)
    img[BASE // 8 + PAGE_OFFSET_PML4] = np.uint64(pdpt) | TABLE
    img[pdpt // 8 : pdpt // 8 + n_pd] = (
        np.uint64(pds) + np.arange(n_pd, dtype=np.uint64) * np.uint64(4096)
    ) | TABLE
    img[pds // 8 : pds // 8 + n_pt] = (
        np.uint64(pts) + np.arange(n_pt, dtype=np.uint64) * np.uint64(4096)
    ) | TABLE
    img[pts // 8 :] = (np.arange(n_pt * 512, dtype=np.uint64) << np.uint64(12)) | KERNEL
    img.tofile(path)
    return (1 + 1 + n_pd + n_pt) * 4096


def build_fragmented(path: str, gib: int, fraction: float = 0.10, seed: int = 1) -> int:
    n_pd, n_2m = gib, gib * 512
    rng = np.random.default_rng(seed)
    split = np.sort(rng.choice(n_2m, int(n_2m * fraction), replace=False))
    pdpt, pds = BASE + 0x1000, BASE + 0x2000
    pts = pds + n_pd * 0x1000
    img = np.zeros((pts + len(split) * 0x1000) // 8, dtype=np.uint64)
    img[BASE // 8 + PAGE_OFFSET_PML4] = np.uint64(pdpt) | TABLE
    img[pdpt // 8 : pdpt // 8 + n_pd] = (
        np.uint64(pds) + np.arange(n_pd, dtype=np.uint64) * np.uint64(4096)
    ) | TABLE
    pde = (np.arange(n_2m, dtype=np.uint64) << np.uint64(21)) | KERNEL_LARGE
    pde[split] = (np.uint64(pts) + np.arange(len(split), dtype=np.uint64) * np.uint64(4096)) | TABLE
    img[pds // 8 : pds // 8 + n_2m] = pde
    pte = (
        (split.astype(np.uint64)[:, None] << np.uint64(21))
        + (np.arange(512, dtype=np.uint64) << np.uint64(12))[None, :]
    ) | KERNEL
    ro = rng.integers(0, 512, len(split))
    pte[np.arange(len(split)), ro] &= ~np.uint64(2)
    img[pts // 8 :] = pte.reshape(-1)
    img.tofile(path)
    return (1 + 1 + n_pd + len(split)) * 4096


def raw_read(path: str, nbytes: int) -> float:
    buf = bytearray(nbytes)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.seek(BASE)
        f.readinto(buf)
    return time.perf_counter() - t


def run_x86pt(args: list[str], out_path: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one x86pt process writing stdout to out_path."""
    with open(out_path, "wb") as out:
        t = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", _CHILD, *args], cwd=ROOT, stdout=out, stderr=subprocess.PIPE
        )
        wall = time.perf_counter() - t
    err = p.stderr.decode()
    if p.returncode:
        raise SystemExit(f"x86pt {' '.join(args)} failed: {err}")
    return wall, int(err.rsplit("VmHWM", 1)[1].split()[0])


# `python -m x86pt ARGS`, then the process's own peak RSS. ru_maxrss from wait4 would also count
# the pages of this (large) parent that the child held between fork and exec.
_CHILD = (
    "import sys; from x86pt.cli import main; rc = main(sys.argv[1:]); sys.stdout.flush(); "
    "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], "
    "file=sys.stderr); sys.exit(rc)"
)


def hmp_timed(mon, command: str, timeout: float = 1800.0) -> tuple[str, float]:
    """Run an HMP command through the monitor's QMP session (harness/qemu/qmp.py); returns (text,
    seconds from sending to the parsed answer)."""
    t = time.perf_counter()
    text = mon.qmp.hmp(command, timeout=timeout)
    return text, time.perf_counter() - t


class _Null:
    def write(self, b) -> int:
        return len(b)


def in_process(img: str) -> dict:
    """The library calls alone (image opened, scan, render; no interpreter start-up): best of 3."""
    from x86pt.census import census
    from x86pt.formats.dump import dump_to
    from x86pt.image import open_image

    out = {}
    for name in ("qemu-mem", "qemu-tlb", "ptdump", "census"):
        best = None
        for _ in range(3):
            t = time.perf_counter()
            with open_image(img, cr3=BASE, cr0=0x80010011, cr4=0xA0, efer=0xD00) as im:
                if name == "census":
                    census(im.state, im.memory)
                else:
                    dump_to(_Null(), im, name, markers="linux")
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        out[f"lib_{name}_s"] = round(best, 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=64)
    ap.add_argument("--shapes", nargs="*", default=["all-4K", "fragmented"])
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--skip-qemu-tlb", action="store_true", help="QEMU's info tlb takes ~1 minute on all-4K")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers here")
    args = ap.parse_args(argv)
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = tempfile.mkdtemp(prefix=f"x86pt-bench-{os.getpid()}-", dir=base)
    results = {}
    try:
        for shape in args.shapes:
            img = os.path.join(work, f"{shape}.raw")
            tables = (build_all4k if shape == "all-4K" else build_fragmented)(img, args.gib)
            r = {"tables_bytes": tables, "image_bytes": os.path.getsize(img)}
            raw_read(img, tables)  # warm the page cache like the others
            r["raw_read_s"] = min(raw_read(img, tables) for _ in range(3))
            outs = {}
            for name, cmd in (
                ("qemu-mem", ["dump", img, "--format", "qemu-mem"]),
                ("qemu-tlb", ["dump", img, "--format", "qemu-tlb"]),
                ("ptdump", ["dump", img, "--format", "ptdump", "--markers", "linux"]),
                ("census", ["census", img]),
            ):
                outs[name] = os.path.join(work, f"{shape}.{name}.txt")
                wall, rss = run_x86pt(cmd + STATE, outs[name])
                r[f"x86pt_{name}_s"] = round(wall, 3)
                r[f"x86pt_{name}_peak_rss_kib"] = rss
                r[f"x86pt_{name}_lines"] = (
                    sum(1 for _ in open(outs[name], "rb"))
                    if name != "qemu-tlb"
                    else os.path.getsize(outs[name]) // 45
                )
            r.update(in_process(img))
            if not args.skip_qemu:
                from harness.qemu.monitor import QemuMonitor
                from x86pt.memory import RawFile
                from x86pt.state import PagingState

                st = PagingState(cr3=BASE, cr0=0x80010011, cr4=0xA0, efer=0xD00)
                mem = RawFile(img)
                try:
                    with QemuMonitor(
                        mem, st, ram_size=((r["image_bytes"] >> 21) + 1) << 21, timeout=600, strict=False
                    ) as mon:  # [0xc0000, 1M) is zeros
                        r["qemu_version"] = mon.version
                        text, secs = hmp_timed(mon, "info mem")
                        r["qemu_info_mem_s"] = round(secs, 3)
                        r["qemu_mem_identical"] = (
                            text.replace("\r\n", "\n").encode() == open(outs["qemu-mem"], "rb").read()
                        )
                        del text
                        if not args.skip_qemu_tlb:
                            text, secs = hmp_timed(mon, "info tlb")
                            r["qemu_info_tlb_s"] = round(secs, 3)
                            r["qemu_tlb_identical"] = (
                                text.replace("\r\n", "\n").encode() == open(outs["qemu-tlb"], "rb").read()
                            )
                            del text
                finally:
                    mem.close()
            results[shape] = r
            for f in os.listdir(work):
                os.unlink(os.path.join(work, f))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for shape, r in results.items():
        print(f"== {shape}: {r['tables_bytes'] / 2**20:.1f} MiB of tables; raw read {r['raw_read_s']:.3f} s")
        for name in ("qemu-mem", "qemu-tlb", "ptdump", "census"):
            line = (
                f"  x86pt {name:<9} {r[f'x86pt_{name}_s']:7.3f} s  peak RSS "
                f"{r[f'x86pt_{name}_peak_rss_kib'] / 1024:6.1f} MiB "
                f"({r[f'x86pt_{name}_peak_rss_kib'] * 1024 / r['tables_bytes']:.2f}x tables)  "
                f"{r[f'x86pt_{name}_lines']} lines"
            )
            q = {"qemu-mem": "qemu_info_mem_s", "qemu-tlb": "qemu_info_tlb_s"}.get(name)
            if q and q in r:
                ident = r["qemu_mem_identical" if name == "qemu-mem" else "qemu_tlb_identical"]
                line += (
                    f"  | QEMU {r[q]:.3f} s -> QEMU/x86pt = {r[q] / r[f'x86pt_{name}_s']:.2f}x, "
                    f"output {'identical' if ident else 'DIFFERENT'}"
                )
            if name in ("ptdump", "census"):
                line += f"  | {r[f'x86pt_{name}_s'] / r['raw_read_s']:.1f}x the raw read"
            print(line)
            lib = r[f"lib_{name}_s"]
            extra = f"    in-process (no start-up): {lib:.3f} s"
            if name in ("ptdump", "census"):
                extra += f" = {lib / r['raw_read_s']:.1f}x the raw read"
            q = {"qemu-mem": "qemu_info_mem_s", "qemu-tlb": "qemu_info_tlb_s"}.get(name)
            if q and q in r:
                extra += f"; QEMU/x86pt = {r[q] / lib:.1f}x"
            print(extra)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [
        s
        for s, r in results.items()
        if r.get("qemu_mem_identical") is False or r.get("qemu_tlb_identical") is False
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
