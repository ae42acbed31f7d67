"""The help people read: for every command, a description and 2-4 examples (shown as the epilog of
`x86pt COMMAND --help`), and help texts for the options every command shares. Kept in one table,
apart from the parsers, so a command's module need not be imported to document it; `apply`
fills in what a parser left empty and never overrides a help text written next to its option.
"""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import argparse

# Option help shared by many commands (by dest); a command's own entry below wins.
COMMON = {
    "json": "print JSON instead of text",
    "image": "the image: a raw memory file (offset = physical address), a LiME file or an ELF core",
    "quiet": "print only the summary",
    "access": "the access: read, write or fetch (default read)",
    "maxphyaddr": "MAXPHYADDR: physical address width in bits (32-52)",
    "vendor": "whose reserved-bit rules: intel or amd (AMD reserves PML4E/PML5E bit 8)",
    "seed": "seed of the random choices (the same seed gives the same run)",
    "kernel": "kernel version whose rules apply",
    "layout": "a preset (laptop-4g, server-64g, server-64g-nogb, server-1t, demo) or FILE.json",
    "oracle_seed": "seed of the --oracle-sample choice of steps",
    "minimise_seconds": "time budget for shrinking a failing trace to a minimal one (default 30)",
    "dump_out": "where --dump-at writes the image (ELF core; .raw for a raw file)",
    "trace": "a CPA trace file (`x86pt cpa generate` writes one; grammar in docs/formats.md)",
}

# path -> (description, examples, {dest: help})
COMMANDS: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "decode": (
        "Decode one paging-structure entry: every field with its bits, reserved bits "
        "flagged for the given MAXPHYADDR and vendor.",
        (
            "x86pt decode 0x80000000400000e3 --kind pde",
            "x86pt decode 0x8000000001234067 --kind pte --maxphyaddr 46 --json",
        ),
        {"value": "the entry's 64-bit value (decimal or 0x-hex)"},
    ),
    "encode": (
        "Encode one entry from flag names and FIELD=VALUE pairs; the reverse of decode.",
        (
            "x86pt encode --kind pde2m p rw a d g xd pa=0x40000000",
            "x86pt encode --kind pte p rw us pa=0x1234000 --json",
        ),
        {
            "kind": "pml5e pml4e pdpte pdpte1g pde pde2m pte",
            "verbose": "also decode the result field by field",
        },
    ),
    "translate": (
        "Translate virtual addresses through an image's page tables with the full "
        "rights checks; a fault prints its #PF error code and CR2.",
        (
            "x86pt translate image.elf 0xffff888012345678 --access write",
            "x86pt translate image.raw 0x400000 0x401000 --cr3 0x100000 --user --json",
        ),
        {"va": "one or more virtual addresses"},
    ),
    "walk": (
        "Walk the page tables for each address step by step, every entry decoded, and say "
        "why an access faults.",
        (
            "x86pt walk image.elf 0x500000 --access fetch --user",
            "x86pt walk image.elf 0xffff888000001000 --json",
        ),
        {"va": "one or more virtual addresses"},
    ),
    "probe": (
        "Run a JSONL probe list (one access per line) through the model and print one "
        "outcome per probe, in input order: the interface other tools call.",
        (
            "x86pt probe image.raw --probes probes.jsonl --cr3 0x100000 --json",
            "x86pt probe image.elf --probes - --update-ad --json",
        ),
        {},
    ),
    "build": (
        "Build an image (ELF core, raw or LiME) from a TOML spec of mappings and raw "
        "entries; the spec format is in docs/formats.md.",
        ("x86pt build spec.toml -o image.elf", "x86pt build spec.toml -o image.raw --json"),
        {
            "spec": "the TOML spec",
            "output": "the image to write (never over an input)",
            "out_format": "elf, raw or lime (default: from the name; .raw/.bin/.img/.mem are raw)",
        },
    ),
    "demo": (
        "Build the embedded Linux-like address space and show x86pt at work on it: walks, "
        "dumps, census, a diff and the CPA model. Exits 1 if any section's verdict fails.",
        ("x86pt demo", "x86pt demo --out demo --json"),
        {},
    ),
    "dump": (
        "Dump every mapping of an image: Linux ptdump, QEMU `info mem`/`info tlb`, JSON or "
        "CSV, byte-compatible with the originals.",
        (
            "x86pt dump image.elf --format ptdump --markers linux",
            "x86pt dump image.elf --format qemu-mem",
            "x86pt dump image.elf --user --writable --range 0x400000-0x800000 --has 'd !g'",
        ),
        {},
    ),
    "census": (
        "Count an image's direct map as /proc/meminfo does (DirectMap4k/2M/1G), leaves per "
        "level and table pages.",
        ("x86pt census image.elf", "x86pt census image.elf --page-offset 0xff11000000000000 --json"),
        {},
    ),
    "wx": (
        "Find every writable and executable mapping, as the kernel's W+X check reports them, "
        "over the whole address space (regions the kernel skips are checked too and named). "
        "Exits 1 when there are any.",
        ("x86pt wx image.elf", "x86pt wx image.elf --json"),
        {},
    ),
    "find": (
        "Find every virtual address that maps a physical address (aliases of a frame).",
        ("x86pt find image.elf 0x1234000", "x86pt find image.elf 0x3a000123 --json"),
        {"pa": "the physical address"},
    ),
    "diff": (
        "The semantic difference of two images' translations: a split that changed no "
        "translation is '=', a change of rights '~rights', mappings added '+' or removed '-'.",
        ("x86pt diff before.elf after.elf", "x86pt diff before.elf after.elf --json"),
        {"image_a": "the image before", "image_b": "the image after"},
    ),
    "cpa": (
        "The Linux CPA (change_page_attr) model of the direct map: replay a trace of "
        "set_memory_* calls under a merge policy, compare policies, generate workloads.",
        (),
        {},
    ),
    "cpa replay": (
        "Replay a CPA trace on the model of a kernel's direct map under one merge "
        "policy; with --validate, prove after every op that no translation changed "
        "that the op did not ask for. Exits 1 on a violation.",
        (
            "x86pt cpa replay w.trace --policy nr-same-prot --kernel 6.1 --layout server-64g --validate",
            "x86pt cpa replay w.trace --policy upstream --validate --oracle unicorn --json",
            "x86pt cpa replay w.trace --dump-at 100 --dump-out after.elf --quiet",
        ),
        {},
    ),
    "cpa compare": (
        "Replay one trace under several merge policies side by side: splits, "
        "collapses, DirectMap counters, table pages, flushes; --plot draws them.",
        (
            "x86pt cpa compare w.trace --policies none,upstream,nr-same-prot,ideal --plot cmp.png",
            "x86pt cpa compare w.trace --policies none,ideal --kernel 6.6 --json",
        ),
        {"policies": "comma list of none, upstream, nr-same-prot, ideal"},
    ),
    "cpa generate": (
        "Generate a CPA trace from a workload model (module loading, BPF, kfence, secretmem, hotplug, ...).",
        (
            "x86pt cpa generate mixed-rox --ops 100000 -o w.trace --kernel 6.15",
            "x86pt cpa generate modules --ops 2000 --seed 3 -o m.trace --layout laptop-4g",
        ),
        {
            "output": "the trace file to write",
            "ops": "number of ops (default 10000)",
            "kernel": "kernel version whose call patterns the workload follows",
        },
    ),
    "conform": (
        "Run the x86pt model and an oracle (unicorn, QEMU, KVM) on the same cases and "
        "report every difference with a minimal repro. Exits 1 on a mismatch.",
        (
            "x86pt conform --oracle all --cases matrix --limit 5000",
            "x86pt conform --oracle unicorn --cases random --seed 7 --json",
            "x86pt conform --oracle kvm --shard 2/8 --progress",
        ),
        {
            "cases": "matrix (kvm-unit-tests access.c class) or random page tables",
            "seed": "seed of the sample and of random tables (default 0)",
        },
    ),
    "linux": (
        "Ground truth from a real Linux kernel: Debian's kernels booted under QEMU, their "
        "CPA calls traced, page tables and counters captured after every step.",
        (),
        {},
    ),
    "linux fetch": (
        "Download (with apt-get) and unpack a Debian kernel and what the capture needs, "
        "into the cache (~/.cache/x86pt/linux, or $X86PT_CACHE).",
        ("x86pt linux fetch --kernel 6.1", "x86pt linux fetch --kernel 6.12 --json"),
        {"kernel": "kernel line: 6.1 (bookworm) or 6.12 (bookworm-security LTS)"},
    ),
    "linux run": (
        "Boot a Debian kernel under QEMU, run a workload, and capture the CPA calls, "
        "page tables and counters of every step into a run folder.",
        (
            "x86pt linux run --kernel 6.1 --workload modules --out run/",
            "x86pt linux run --kernel 6.12 --workload bpf --levels 5 --out run5/",
        ),
        {
            "kernel": "kernel line: 6.1 or 6.12",
            "workload": "what the guest does",
            "out": "the run folder to write",
            "ram": "guest RAM in MiB",
        },
    ),
    "linux report": (
        "Report what the kernel did in a run folder, step by step, and where the "
        "CPA model agrees (the model column replays every step).",
        ("x86pt linux report run/", "x86pt linux report run/ --json"),
        {"dir": "a run folder written by `x86pt linux run`"},
    ),
}


def _dest_help(dest: str, own: dict[str, str]) -> str | None:
    return own.get(dest) or COMMON.get(dest)


def apply(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Fill descriptions, example epilogs and missing option help of `parser`'s subcommands."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            key = " ".join(path + (name,))
            desc, examples, own = COMMANDS.get(key, ("", (), {}))
            if desc and not sub.description:
                sub.description = desc
            if examples and not sub.epilog:
                sub.epilog = "examples:\n" + "\n".join("  " + e for e in examples)
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
            for a in sub._actions:
                if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                if not (a.help and a.help.strip()):
                    text = _dest_help(a.dest, own)
                    if text:
                        a.help = text
            apply(sub, path + (name,))
