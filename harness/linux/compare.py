# SPDX-License-Identifier: GPL-2.0-or-later
"""Compare two collected runs of the same configuration: byte for byte when they come from the
same kernel build, QEMU and guest pieces; otherwise on what does not depend on the exact build.

A Debian kernel update (6.1.192-2 -> 6.1.192-3) moves the kernel image and so which pages the
allocator hands out: addresses in the trace and in the direct map's 4K pages change. What stays
is what the workload does to the page tables:

* counters: each step's change of DirectMap4k/2M/1G and direct_map_level{2,3}_splits (and the
  baseline values, which depend on RAM size and the image's 2M alignment only);
* the direct map in the kernel's ptdump, as kB per (level, rights): how much is mapped at which
  size with which rights (RW/ro, USR, NX, PWT/PCD), not where. Which pages lack G is left out of
  that and only noted: a module page that lands on a page an earlier unload left without G
  loses nothing new, so the count follows page placement (seen: pause-mode and one-boot runs of
  the same kernel differ by one such 4K page);
* the trace: each workload step's top-level CPA calls as (API, numpages, set mask, clear mask,
  flags, primary, address region); the boot's calls (step 0) are left out, their page counts
  follow the image's section sizes;
* the model's replay: every step agrees.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field

from harness.linux.runfolder import load_json, read_artifact, run_meta
from harness.linux.report import direct_map_span, parse_ptdump

# the files a step's byte compare covers
STEP_FILES = ("counters.json", "ptdump.txt", "cpa.trace", "tables.elf")
COUNTERS = (
    "DirectMap4k",
    "DirectMap2M",
    "DirectMap1G",
    "direct_map_level2_splits",
    "direct_map_level3_splits",
)


def step_dirs(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "step-[0-9]*")))


def source_key(meta: dict) -> tuple:
    """What must match for two runs to be byte-identical (icount makes a run a function of these)."""
    return (meta.get("kernel_package_version"), meta.get("qemu_version"), meta.get("guest_digest"))


def _region(va: int | None, layout: dict) -> str:
    if va is None:
        return "?"
    lo, hi = direct_map_span(layout)
    if lo <= va < hi:
        return "direct"
    if va >= 0xFFFF_FFFF_8000_0000:
        # MODULES_VADDR follows the 1 GiB kernel image area (KERNEL_IMAGE_SIZE with KASLR)
        return "module" if va >= 0xFFFF_FFFF_C000_0000 else "highmap"
    return "other"


def step_signature(run_dir: str, step_dir: str, layout: dict) -> dict:
    """The build-independent facts of one step (see the module doc)."""
    span = direct_map_span(layout)
    dm: dict[str, int] = {}
    no_glb = 0
    for r in parse_ptdump(read_artifact(step_dir, "ptdump.txt").decode()):
        a, b = max(r.start, span[0]), min(r.end, span[1])
        if a < b:
            key = " ".join(x for x in r.attrs if x != "GLB") or "(unmapped)"
            dm[key] = dm.get(key, 0) + (b - a) // 1024
            if r.attrs and "GLB" not in r.attrs and ("RW" in r.attrs or "ro" in r.attrs):
                no_glb += (b - a) // 1024
    calls = []
    for line in read_artifact(step_dir, "calls.jsonl").decode().splitlines():
        c = json.loads(line)
        if c.get("depth"):
            continue
        va = int(c["vaddr"], 16) if c.get("vaddr") else None
        calls.append(
            (
                c.get("api", "").split(" ")[0],
                c["numpages"],
                c["mask_set"],
                c["mask_clr"],
                c["flags"],
                c["primary"],
                c["force_split"],
                _region(va, layout),
            )
        )
    return {
        "counters": load_json(os.path.join(step_dir, "counters.json")),
        "direct_map_kB": dm,
        "no_glb_kB": no_glb,
        "calls": calls,
    }


def _deltas(sigs: list[dict]) -> list[tuple]:
    out = []
    for prev, cur in zip(sigs, sigs[1:]):
        out.append(tuple(cur["counters"].get(k, 0) - prev["counters"].get(k, 0) for k in COUNTERS))
    return out


@dataclass
class Comparison:
    mode: str  # "bytes" (same build) or "build-independent"
    differences: list[str]
    notes: list[str] = field(default_factory=list)  # placement-dependent, not differences

    @property
    def same(self) -> bool:
        return not self.differences


def compare_bytes(a: str, b: str) -> list[str]:
    da, db = step_dirs(a), step_dirs(b)
    if len(da) != len(db):
        return [f"{len(da)} steps vs {len(db)}"]
    out = []
    for x, y in zip(da, db):
        for fn in STEP_FILES:
            if read_artifact(x, fn) != read_artifact(y, fn):
                out.append(f"{os.path.basename(x)}/{fn} differs")
    return out


def compare_independent(a: str, b: str, replay: bool = True, notes: list[str] | None = None) -> list[str]:
    """Differences between runs a and b in what does not depend on the exact kernel build
    (placement-dependent observations are appended to `notes` when given)."""
    la, lb = load_json(os.path.join(a, "layout.json")), load_json(os.path.join(b, "layout.json"))
    sa = [step_signature(a, d, la) for d in step_dirs(a)]
    sb = [step_signature(b, d, lb) for d in step_dirs(b)]
    if len(sa) != len(sb):
        return [f"{len(sa)} steps vs {len(sb)}"]
    out = []
    if sa[0]["counters"] != sb[0]["counters"]:
        out.append(f"baseline counters {sa[0]['counters']} vs {sb[0]['counters']}")
    for k, (x, y) in enumerate(zip(_deltas(sa), _deltas(sb)), 1):
        if x != y:
            out.append(f"step {k}: counter deltas {dict(zip(COUNTERS, x))} vs {dict(zip(COUNTERS, y))}")
    for k, (x, y) in enumerate(zip(sa, sb)):
        if x["direct_map_kB"] != y["direct_map_kB"]:
            keys = sorted(set(x["direct_map_kB"]) | set(y["direct_map_kB"]))
            d = [
                f"{key}: {x['direct_map_kB'].get(key, 0)} vs {y['direct_map_kB'].get(key, 0)} kB"
                for key in keys
                if x["direct_map_kB"].get(key) != y["direct_map_kB"].get(key)
            ]
            out.append(f"step {k}: direct map " + "; ".join(d))
        if x["no_glb_kB"] != y["no_glb_kB"] and notes is not None:
            notes.append(f"step {k}: direct-map pages without G {x['no_glb_kB']} vs {y['no_glb_kB']} kB")
        if k and x["calls"] != y["calls"]:
            out.append(
                f"step {k}: {len(x['calls'])} vs {len(y['calls'])} top-level CPA calls, first "
                f"difference at call {_first_diff(x['calls'], y['calls'])}"
            )
    if replay:
        for name, run in (("first", a), ("second", b)):
            out += [f"{name} run: {m}" for m in replay_disagreements(run)]
    return out


def _first_diff(x: list, y: list) -> str:
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q:
            return f"{i}: {p} vs {q}"
    return f"{min(len(x), len(y))} (one list is longer)"


def replay_disagreements(run_dir: str) -> list[str]:
    """Steps where the CPA model replaying the kernel's trace does not reach the kernel's state."""
    from harness.linux.replay import replay_run

    return [
        f"step {r.step} ({r.name}): model replay differs ({len(r.divergences)} leaves, "
        f"DirectMap {r.meminfo_model} vs {r.meminfo_kernel}, splits {r.splits_model} vs {r.splits_kernel})"
        for r in replay_run(run_dir)
        if not r.identical
    ]


def compare_runs(a: str, b: str, replay: bool = True) -> Comparison:
    """Byte compare when a and b share kernel build, QEMU and guest pieces; else the
    build-independent compare (the byte compare would fail on every kernel update)."""
    if source_key(run_meta(a)) == source_key(run_meta(b)) and None not in source_key(run_meta(a)):
        return Comparison("bytes", compare_bytes(a, b))
    notes: list[str] = []
    return Comparison("build-independent", compare_independent(a, b, replay, notes), notes)


def guest_digest(parts: list[bytes]) -> str:
    """A short digest of what the run put into the guest besides the kernel (module source,
    /init, helpers, workload): byte compares need it equal too."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()[:16]
