#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Measure whether real-kernel runs repeat: run each configuration N times and compare every
artefact of every step (counters, the kernel's ptdump text, the raw and decoded CPA trace, the
page-table image) and the guest's whole output, byte for byte.

    python3 tools/linux_determinism.py 6.1-4l-modules 6.12-4l-modules --runs 3
    python3 tools/linux_determinism.py 6.1-4l-modules --images all     # the old checkpoint boots

A name is KERNEL-LEVELSl-WORKLOAD (e.g. 6.1-5l-bpf). Runs go to a temporary folder, removed after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.linux.run import IMAGE_MODES, RunConfig, run  # noqa: E402
from x86pt.errors import X86ptError  # noqa: E402

ARTEFACTS = ("counters.json", "ptdump.txt", "trace.raw", "cpa.trace", "calls.jsonl", "tables.elf")


def config_named(name: str, images: str) -> RunConfig:
    m = re.fullmatch(r"(6\.1|6\.12)-([45])l-(\w+)", name)
    if not m:
        raise SystemExit(f"linux_determinism: bad name {name!r} (want e.g. 6.1-4l-modules)")
    return RunConfig(kernel=m.group(1), levels=int(m.group(2)), workload=m.group(3), images=images)


def fingerprint(run_dir: str) -> dict[str, str]:
    """sha256 of each artefact of each step, and of the guest's raw output of each boot."""
    out = {}
    for dirpath, _dirs, files in os.walk(run_dir):
        rel = os.path.relpath(dirpath, run_dir)
        for fn in files:
            if fn in ARTEFACTS or rel == "boots":
                with open(os.path.join(dirpath, fn), "rb") as f:
                    out[os.path.join(rel, fn)] = hashlib.sha256(f.read()).hexdigest()
    return out


def measure(name: str, runs: int, images: str) -> dict:
    cfg = config_named(name, images)
    prints, walls = [], []
    with tempfile.TemporaryDirectory(prefix="x86pt-det-") as tmp:
        for i in range(runs):
            t = time.monotonic()
            run(cfg, os.path.join(tmp, str(i)))
            walls.append(round(time.monotonic() - t, 1))
            prints.append(fingerprint(os.path.join(tmp, str(i))))
            print(f"[{name}] run {i + 1}/{runs}: {walls[-1]} s", file=sys.stderr, flush=True)
    keys = sorted(set().union(*prints))
    differ = [k for k in keys if len({p.get(k) for p in prints}) > 1]
    return {
        "name": name,
        "images": images,
        "runs": runs,
        "files": len(keys),
        "identical": not differ,
        "differing_files": differ,
        "wall_seconds": walls,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", metavar="NAME")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--images", choices=IMAGE_MODES, default="guest")
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration")
    args = ap.parse_args(argv)
    bad = 0
    for name in args.names:
        try:
            r = measure(name, args.runs, args.images)
        except X86ptError as e:
            print(f"linux_determinism: {name}: {e}", file=sys.stderr)
            return 3
        bad += not r["identical"]
        if args.json:
            print(json.dumps(r, sort_keys=True), flush=True)
        else:
            what = (
                "identical"
                if r["identical"]
                else f"{len(r['differing_files'])} files differ: " + ", ".join(r["differing_files"][:6])
            )
            print(
                f"{name} ({r['images']}): {r['runs']} runs, {r['files']} files each, {what}; "
                f"wall {r['wall_seconds']} s",
                flush=True,
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
