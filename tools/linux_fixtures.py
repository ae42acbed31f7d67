#!/usr/bin/env python3
"""Regenerate fixtures/linux/ from real runs: Debian kernels booted under QEMU TCG (icount), one
boot per checkpoint, collected by `x86pt linux run`, then packed small (the kernel itself is never
committed; large artefacts are xz-compressed, the raw ring-buffer text of boot-time traces too).

  python3 tools/linux_fixtures.py                  # every run in RUNS
  python3 tools/linux_fixtures.py 6.1-4l-modules   # only the named ones
  python3 tools/linux_fixtures.py --list

Each fixture directory gets a meta.json naming the source (kernel package + QEMU version); runs go
to $X86PT_CACHE/linux/runs/NAME first (kept, so packing can be redone without booting).

Before a fixture is replaced, the new run is compared with it and what changed is printed: byte
for byte when kernel build, QEMU and guest pieces are the same, else what does not depend on the
build (counter deltas, the direct map's kB per level and rights, the trace's calls and masks, the
model's replay; harness/linux/compare.py). A kernel package update that changes only addresses
prints "build-independent: same".
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness.linux import cache_dir  # noqa: E402
from harness.linux.run import RunConfig, run  # noqa: E402
from x86pt.memory.atomic import write_bytes_atomic, write_text_atomic  # noqa: E402

FIXTURES = os.path.join(ROOT, "fixtures", "linux")
# images="guest": one boot; the guest dumps its page tables after every step and QEMU pauses only
# after the last one, so each step's image, trace and counters belong to one history and the whole
# run repeats byte for byte (a pause mid-run perturbs icount; one boot per checkpoint moves steps
# with the step count it is given)
P = "guest"
RUNS: dict[str, RunConfig] = {
    "6.1-4l-modules": RunConfig(kernel="6.1", workload="modules", levels=4, images=P),
    "6.1-5l-modules": RunConfig(kernel="6.1", workload="modules", levels=5, images=P),
    "6.1-4l-bpf": RunConfig(kernel="6.1", workload="bpf", levels=4, images=P),
    "6.1-4l-secretmem": RunConfig(kernel="6.1", workload="secretmem", levels=4, images=P),
    # not a fixture: its ~500k CPA calls overflow the 32M trace ring buffer and take minutes
    # over the serial port (run it by hand: x86pt linux run --workload secretmem1g)
    "6.1-4l-kaslr-boot": RunConfig(
        kernel="6.1", workload="boot", levels=4, images=P, kaslr=True, info_mem=True
    ),
    "6.1-5l-kaslr-boot": RunConfig(kernel="6.1", workload="boot", levels=5, images=P, kaslr=True),
    "6.12-4l-modules": RunConfig(kernel="6.12", workload="modules", levels=4, images=P),
    "6.12-5l-modules": RunConfig(kernel="6.12", workload="modules", levels=5, images=P),
    "6.12-4l-bpf": RunConfig(kernel="6.12", workload="bpf", levels=4, images=P),
    "6.12-4l-secretmem": RunConfig(kernel="6.12", workload="secretmem", levels=4, images=P),
}
COMPRESS_OVER = 16 * 1024  # bytes; smaller files stay plain text for easy diffs


def pack(run_dir: str, dest: str, name: str) -> int:
    """Copy a run into fixtures, compressing big files; returns bytes written."""
    shutil.rmtree(dest, ignore_errors=True)
    total = 0
    for dirpath, _dirs, files in os.walk(run_dir):
        rel = os.path.relpath(dirpath, run_dir)
        if rel.split(os.sep)[0] == "boots":  # raw per-boot output: diagnosis only, large
            continue
        for fn in sorted(files):
            if fn.endswith(".png"):
                continue
            src = os.path.join(dirpath, fn)
            out_dir = os.path.join(dest, rel)
            os.makedirs(out_dir, exist_ok=True)
            with open(src, "rb") as f:
                data = f.read()
            if len(data) > COMPRESS_OVER or fn.endswith(".elf") or fn == "trace.raw":
                data = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
                fn += ".xz"
            write_bytes_atomic(os.path.join(out_dir, fn), data)
            total += len(data)
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
        meta = json.load(f)
    write_text_atomic(
        os.path.join(dest, "meta.json"),
        json.dumps(
            {
                "name": name,
                "source": "real Linux kernel: Debian package booted under QEMU TCG (-icount), CPA kprobes, "
                "/proc counters, the kernel's own ptdump (x86pt_ptdump module), page tables read "
                "from guest RAM",
                "kernel_release": meta["kernel_release"],
                "kernel_package_version": meta["kernel_package_version"],
                "qemu_version": meta["qemu_version"],
                "config": meta["config"],
                "guest_digest": meta.get("guest_digest"),
                "generated_by": "python3 tools/linux_fixtures.py " + name,
                "compressed": "files ending in .xz are lzma (xz) compressed; harness.linux.collect.read_artifact "
                "opens either form",
            },
            indent=1,
            sort_keys=True,
        )
        + "\n",
    )
    return total


def what_changed(old: str, new: str) -> str:
    """One paragraph: versions before -> after, then the comparison's verdict and differences."""
    from harness.linux.collect import run_meta
    from harness.linux.compare import compare_runs, source_key

    a, b = run_meta(old), run_meta(new)
    head = []
    for label, i in (("kernel package", 0), ("QEMU", 1), ("guest pieces", 2)):
        if source_key(a)[i] != source_key(b)[i]:
            head.append(f"{label} {source_key(a)[i]} -> {source_key(b)[i]}")
    c = compare_runs(old, new)
    verdict = f"{c.mode}: " + ("same" if c.same else f"{len(c.differences)} differences")
    lines = [("; ".join(head) or "same sources") + f"; {verdict}"]
    lines += [f"    {d}" for d in c.differences[:20]]
    lines += [f"    note: {d}" for d in c.notes[:20]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--pack-only", action="store_true", help="re-pack kept runs without booting")
    args = ap.parse_args()
    if args.list:
        for n, c in RUNS.items():
            print(n, c)
        return 0
    names = args.names or list(RUNS)
    for n in names:
        if n not in RUNS:
            print(f"unknown run {n!r}", file=sys.stderr)
            return 2
    for n in names:
        run_dir = os.path.join(cache_dir(), "runs", n)
        if not args.pack_only:
            shutil.rmtree(run_dir, ignore_errors=True)
            t = time.monotonic()
            meta = run(RUNS[n], run_dir, log=lambda m: print(f"[{n}] {m}", file=sys.stderr, flush=True))  # noqa: B023 (called in this iteration)
            print(f"{n}: wall {time.monotonic() - t:.1f} s, deterministic {meta['deterministic_steps']}")
        dest = os.path.join(FIXTURES, n)
        if os.path.isdir(dest):
            print(f"{n}: " + what_changed(dest, run_dir))
        size = pack(run_dir, dest, n)
        print(f"{n}: packed {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
