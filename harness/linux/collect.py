# SPDX-License-Identifier: GPL-2.0-or-later
"""Turn what one guest boot wrote (its ttyS1 file, its registers, its RAM file) into per-step
artefacts: this module splits the ttyS1 stream into header and steps and reads the registers and
layout; the CPA trace is decoded in cpa_trace.py, the page-table image made in image.py, and a run
folder read back by runfolder.py (their names stay importable from here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from x86pt.errors import OracleError

from harness.linux.cpa_trace import (
    CPA_ARRAY,
    CPA_PAGES_ARRAY,
    CpaCall,
    Flush,
    TraceDecode,
    decode_trace,
    trace_summary,
    trace_text,
)
from harness.linux.image import (
    Capture,
    capture,
    capture_from_dump,
    collect_tables,
    guest_state,
    kernel_pa,
    parse_tables,
    read_kernel_u64,
    write_capture,
)
from harness.linux.runfolder import (
    START_KERNEL_MAP,
    cpa_layout,
    dump_json,
    load_json,
    materialize,
    read_artifact,
    run_meta,
)

__all__ = [
    "CPA_ARRAY",
    "CPA_PAGES_ARRAY",
    "START_KERNEL_MAP",
    "BootText",
    "Capture",
    "CpaCall",
    "Flush",
    "StepText",
    "TraceDecode",
    "capture",
    "capture_from_dump",
    "collect_tables",
    "cpa_layout",
    "decode_trace",
    "dump_json",
    "guest_state",
    "kernel_pa",
    "layout_of",
    "load_json",
    "materialize",
    "parse_counters",
    "parse_iomem",
    "parse_kallsyms",
    "parse_output",
    "parse_registers",
    "parse_tables",
    "read_artifact",
    "read_kernel_u64",
    "run_meta",
    "trace_summary",
    "trace_text",
    "write_capture",
]


# -- the ttyS1 stream -------------------------------------------------------------------------------
@dataclass
class StepText:
    number: int
    name: str
    sections: dict[str, list[str]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    rc: int | None = None


@dataclass
class BootText:
    header: dict[str, list[str]]
    steps: list[StepText]
    ended: int | None  # number of steps the guest says it ran (@@END n), None if cut off
    pauses: list[int] = field(default_factory=list)  # checkpoints at which it asked for a pause


def parse_output(text: str) -> BootText:
    """Split the guest's ttyS1 output into its header sections and its steps."""
    header: dict[str, list[str]] = {}
    steps: list[StepText] = []
    logs: dict[int, list[str]] = {}
    rcs: dict[int, int] = {}
    cur: list[str] | None = None
    step: StepText | None = None
    ended = None
    pauses: list[int] = []
    log_no = None
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("@@"):
            word, _, rest = line[2:].partition(" ")
            if word == "STEP":
                no, _, name = rest.partition(" ")
                step = StepText(int(no), name)
                steps.append(step)
                cur = None
            elif word == "ENDSTEP":
                step, cur = None, None
            elif word == "LOG":
                log_no = int(rest)
                cur = logs.setdefault(log_no, [])
            elif word == "RC":
                if log_no is not None:
                    rcs[log_no] = int(rest)
                cur = None
            elif word == "PAUSE":
                pauses.append(int(rest))
                cur = None
            elif word == "END":
                ended = int(rest)
                cur = None
            elif step is not None:
                cur = step.sections.setdefault(word, [])
            else:
                cur = header.setdefault(word, [])
            continue
        if cur is not None:
            cur.append(line)
    for s in steps:
        s.log = logs.get(s.number, [])
        s.rc = rcs.get(s.number)
    return BootText(header, steps, ended, pauses)


def parse_kallsyms(lines: list[str]) -> dict[str, int]:
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            out.setdefault(parts[2], int(parts[0], 16))
    return out


def parse_counters(meminfo: list[str], vmstat: list[str]) -> dict[str, int]:
    """DirectMap4k/2M/1G in kB (as /proc/meminfo prints them) and the vmstat split counters."""
    out: dict[str, int] = {}
    for line in meminfo:
        m = re.match(r"(DirectMap\w+):\s+(\d+)\s*kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    for line in vmstat:
        k, _, v = line.partition(" ")
        if k.startswith("direct_map"):
            out[k] = int(v)
    return out


# -- registers and layout ---------------------------------------------------------------------------
def parse_registers(info: str) -> dict[str, int]:
    """CR0/CR2/CR3/CR4/EFER from HMP `info registers`."""
    regs = {}
    for name in ("CR0", "CR2", "CR3", "CR4", "EFER"):
        m = re.search(rf"\b{name}=([0-9a-fA-F]+)", info)
        if not m:
            raise OracleError(f"`info registers` has no {name}")
        regs[name.lower()] = int(m.group(1), 16)
    return regs


def parse_iomem(lines: list[str]) -> list[dict]:
    """Top-level /proc/iomem ranges (the guest's physical memory map)."""
    out = []
    for line in lines:
        if line.startswith(" "):
            continue
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) : (.*)", line)
        if m:
            out.append(
                {"start": hex(int(m.group(1), 16)), "end": hex(int(m.group(2), 16) + 1), "name": m.group(3)}
            )
    return out


def layout_of(boot: BootText) -> dict:
    """What the header of the output says: release, cmdline, gbpages/la57, symbols, memory map."""
    ks = parse_kallsyms(boot.header.get("KALLSYMS", []))
    flags = (boot.header.get("CPUFLAGS") or [""])[0].split()
    out = {
        "release": (boot.header.get("UNAME") or [""])[0].strip(),
        "cmdline": (boot.header.get("CMDLINE") or [""])[0].strip(),
        "gbpages": "pdpe1gb" in flags,
        "la57": "la57" in flags,
        "symbols": {k: hex(v) for k, v in ks.items()},
        "iomem": parse_iomem(boot.header.get("IOMEM", [])),
        "probes": boot.header.get("PROBES", []),
    }
    for a, b, name in (("_text", "_etext", "text"), ("__start_rodata", "__end_rodata", "rodata")):
        if a in ks and b in ks:
            out[name] = [hex(ks[a]), hex(ks[b])]
    return out
