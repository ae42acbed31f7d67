#!/usr/bin/env python3
"""A reference adapter for x86pt's command-oracle protocol, version 1 (docs/oracle-protocol.md).

    x86pt conform --oracle 'cmd:python examples/cmd_oracle_adapter.py' --cases random --limit 200
    x86pt conform --oracle 'cmd:python examples/cmd_oracle_adapter.py --oracle model'

It answers with one of x86pt's built-in oracles (unicorn by default: in-process and fast), so the
result must equal `x86pt conform --oracle unicorn`. An emulator project copies its shape and
replaces the three marked places (EMULATOR: ...) with its own emulator:

    PROGRAM ARGS capabilities        -> one JSON object on stdout, then exit 0
    PROGRAM ARGS run CASE_DIR        -> read CASE_DIR/case.json, the image and the probes it names;
                                        write one result line per probe to case["results"] and
                                        (if capabilities say memory_after) the image after the run
                                        to case["memory_after"]; exit 0
    PROGRAM ARGS serve               -> only if capabilities say "serve": true (--serve here): one
                                        process for the whole session; for each CASE_DIR line on
                                        stdin, do what `run` does and print {"status": "done"}
                                        (or {"status": "error", "message": ...}) on stdout; exit
                                        at the end of stdin

Anything else on stdout during `run` and anything on stderr is free-form log; the tail of stderr
is what x86pt shows when the adapter fails. Exit non-zero on any error. The protocol files are
read and written below with the standard json module, so the shape does not depend on x86pt (x86pt's
own side of them is x86pt/cmdprotocol.py: write_case, read_case and the schema check); the image (an
ELF core, docs/formats.md §4.3) is read with x86pt's reader to keep this file short.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PROTOCOL = 1


def _u64(v):
    """A protocol number: a JSON integer or a 0x-hex string."""
    return v if isinstance(v, int) else int(v, 16)


# -- EMULATOR: start the emulator ---------------------------------------------------------------------
def open_emulator(name: str, *, self_test: bool):
    from x86pt.registry import get_oracle

    if name == "unicorn":
        return get_oracle("unicorn", self_test=self_test)
    if name == "model":
        return get_oracle("model", profile="intel")
    raise SystemExit(f"cmd_oracle_adapter: unknown --oracle {name!r} (unicorn or model)")


# -- capabilities ----------------------------------------------------------------------------------------
def capabilities(name: str, serve: bool = False, raw: bool = False) -> dict:
    emu = open_emulator(name, self_test=True)
    try:
        # EMULATOR: measure what it does (CPU features as it really behaves, not as CPUID says).
        caps = emu.capabilities().to_json()
        profile = emu.profile if isinstance(emu.profile, str) else emu.profile.name
    finally:
        emu.close()
    caps["notes"] = list(caps.get("notes", ())) + [f"through examples/cmd_oracle_adapter.py ({name})"]
    return {
        "protocol": PROTOCOL,
        **caps,
        "name": f"adapter:{caps['name']}",
        "profile": profile,
        "max_probes": 8192,
        "memory_after": True,
        "image_format": "raw" if raw else "elf",
        "serve": serve,
    }


# -- run ---------------------------------------------------------------------------------------------------
def read_case(case_dir: str):
    from x86pt.memory import open_memory
    from x86pt.memory.sparse import SparseMemory
    from x86pt.oracle import Probe
    from x86pt.state import PagingState

    with open(os.path.join(case_dir, "case.json"), encoding="utf-8") as f:
        case = json.load(f)
    if case.get("protocol") != PROTOCOL:
        raise SystemExit(
            f"cmd_oracle_adapter: case protocol {case.get('protocol')!r}, this adapter speaks {PROTOCOL}"
        )
    state = PagingState.from_json(case["state"])
    memory = SparseMemory(case["ram_size"])
    image = open_memory(case["image"], case["image_format"])
    try:
        for seg in image.segments():
            memory.write(seg.start, image.read(seg.start, seg.size))
    finally:
        image.close()
    probes = []
    with open(case["probes"], encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                probes.append(
                    Probe(
                        _u64(d["va"]),
                        d.get("access", "read"),
                        d.get("user", False),
                        d.get("ac", False),
                        _u64(d.get("wvalue", 0)),
                        d.get("implicit", False),
                    )
                )
    return case, memory, state, probes


def result_line(r) -> dict:
    return {
        "outcome": r.outcome,
        "error_code": r.error_code,
        "cr2": None if r.cr2 is None else hex(r.cr2),
        "pa": None if r.pa is None else hex(r.pa),
        "value": None if r.value is None else hex(r.value),
        "vector": r.vector,
        **({"detail": r.detail} if r.detail else {}),
    }


def run(case_dir: str, name: str, transform=None, emu=None) -> None:
    """Run one case (on `emu`, or on an emulator started for it). `transform(probe, result_dict)
    -> result_dict` rewrites answers (the tests use it to play a buggy emulator)."""
    from x86pt.memory import write_image

    case, memory, state, probes = read_case(case_dir)
    own = emu is None
    emu = open_emulator(name, self_test=False) if own else emu
    try:
        # EMULATOR: run the probes in order on the image, each with a fresh walk.
        got = emu.run(memory, state, probes)
    finally:
        if own:
            emu.close()
    with open(case["results"], "w", encoding="utf-8") as f:
        for p, r in zip(probes, got.results):
            d = result_line(r)
            if transform is not None:
                d = transform(p, d)
            f.write(json.dumps(d, separators=(",", ":")) + "\n")
    # EMULATOR: the guest-physical memory after the run, as an ELF core.
    write_image(got.memory_after, state, case["memory_after"], "elf")


def serve(name: str, transform=None) -> None:
    """Serve mode: the emulator starts once; one reply line per CASE_DIR line."""
    emu = open_emulator(name, self_test=False)
    try:
        for line in sys.stdin:
            case_dir = line.strip()
            if not case_dir:
                continue
            try:
                run(case_dir, name, transform, emu)
                reply = {"status": "done"}
            except Exception as e:  # this batch failed; the next one may not
                reply = {"status": "error", "message": f"{type(e).__name__}: {e}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        emu.close()


def main(argv=None, transform=None) -> int:
    ap = argparse.ArgumentParser(prog="cmd_oracle_adapter.py", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--oracle",
        default="unicorn",
        choices=("unicorn", "model"),
        help="the built-in oracle to answer with (default unicorn)",
    )
    ap.add_argument(
        "--serve",
        action="store_true",
        help="announce serve mode in the capabilities (one process for the session)",
    )
    ap.add_argument(
        "--raw",
        action="store_true",
        help="ask for raw images (the registers then come from case.json's state)",
    )
    ap.add_argument("verb", choices=("capabilities", "run", "serve"))
    ap.add_argument("case_dir", nargs="?")
    args = ap.parse_args(argv)
    try:
        if args.verb == "capabilities":
            json.dump(capabilities(args.oracle, args.serve, args.raw), sys.stdout)
            sys.stdout.write("\n")
            return 0
        if args.verb == "serve":
            serve(args.oracle, transform)
            return 0
        if not args.case_dir:
            ap.error("run needs CASE_DIR")
        run(args.case_dir, args.oracle, transform)
        return 0
    except Exception as e:  # one line on stderr: x86pt shows the tail of stderr
        print(f"cmd_oracle_adapter: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
