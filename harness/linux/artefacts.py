# SPDX-License-Identifier: GPL-2.0-or-later
"""What a run writes per step (write_step: counters, ptdump text, the decoded CPA trace, the table
image) and the checks on what it wrote: a step's fingerprint (two boots recorded a step alike)
and compare_captures (the guest's own table dump against the tables in its RAM)."""

from __future__ import annotations

import json
import os

from harness.linux.collect import parse_counters
from harness.linux.cpa_trace import decode_trace, trace_summary, trace_text
from harness.linux.image import Capture, write_capture
from harness.linux.runfolder import dump_json
from x86pt.memory.atomic import write_text_atomic


def step_fingerprint(s) -> str:
    return json.dumps({k: s.sections.get(k, []) for k in ("MEMINFO", "VMSTAT", "TRACE", "PTDUMP", "TABLES")})


def write_step(
    out_dir: str,
    s,
    title: str,
    cap=None,
    regs: dict[str, int] | None = None,
    boot_seconds: float | None = None,
) -> dict:
    """Write one step's artefacts into out_dir/step-NN and return its summary."""
    d = os.path.join(out_dir, f"step-{s.number:02d}")
    os.makedirs(d, exist_ok=True)
    counters = parse_counters(s.sections.get("MEMINFO", []), s.sections.get("VMSTAT", []))
    dec = decode_trace(s.sections.get("TRACE", []))
    ptdump = "\n".join(s.sections.get("PTDUMP", [])) + "\n"
    write_text_atomic(os.path.join(d, "counters.json"), dump_json(counters))
    write_text_atomic(os.path.join(d, "ptdump.txt"), ptdump)
    write_text_atomic(os.path.join(d, "cpa.trace"), trace_text(dec, f"step {s.number}: {s.name} ({title})"))
    write_text_atomic(
        os.path.join(d, "calls.jsonl"),
        "".join(json.dumps(c.to_json(), sort_keys=True) + "\n" for c in dec.calls),
    )
    write_text_atomic(os.path.join(d, "trace.raw"), "\n".join(s.sections.get("TRACE", [])) + "\n")
    summary = {
        "step": s.number,
        "name": s.name,
        "rc": s.rc,
        "log": s.log,
        "counters": counters,
        "uptime": (s.sections.get("UPTIME") or [""])[0],
        "trace": trace_summary(dec),
        "ptdump_lines": ptdump.count("\n"),
    }
    if cap is not None:
        write_capture(os.path.join(d, "tables.elf"), cap)
        summary["image"] = {
            "file": "tables.elf",
            **cap.layout,
            "cr0": hex(regs["cr0"]),
            "cr4": hex(regs["cr4"]),
            "efer": hex(regs["efer"]),
        }
        if boot_seconds is not None:
            summary["image"]["boot_seconds"] = round(boot_seconds, 2)
    write_text_atomic(os.path.join(d, "step.json"), dump_json(summary))
    return summary


def compare_captures(a: Capture, b: Capture) -> str:
    """ "same" when two captures hold the same table pages with the same bytes and root; else
    what differs (the guest's dump of the last step against the RAM read at the pause after it)."""
    if a.state.cr3 != b.state.cr3:
        return f"root {a.state.cr3:#x} vs {b.state.cr3:#x}"
    pa, pb = a.memory.pages, b.memory.pages
    only = sorted(set(pa) ^ set(pb))
    diff = sorted(k for k in set(pa) & set(pb) if bytes(pa[k]) != bytes(pb[k]))
    if not only and not diff:
        return "same"
    return f"{len(only)} table pages in one only, {len(diff)} differ" + (
        f" (first {(only or diff)[0] << 12:#x})" if only or diff else ""
    )
