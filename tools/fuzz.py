# SPDX-License-Identifier: GPL-2.0-or-later
"""Hostile-input fuzzer: random and malformed images (raw, ELF core, LiME), register values and
probe files through the library and the CLI (issue 11).

What counts as a finding:
  * the library raises anything but an X86ptError (a typed, one-line error);
  * the CLI exits 3 (internal error: X86PT_DEBUG=1 is set, so the traceback is kept) or with a
    status outside 0/1/2, or exits 2 without exactly one `x86pt: error:` line on stderr;
  * the CLI changes its input image;
  * one input takes longer than --hang seconds (a hang), or memory runs out (RLIMIT_AS).

The same generators drive tests/test_fuzz_hostile.py through hypothesis (a fixed, small budget in
CI); this driver is the long mode, with plain seeded randomness so it tries far more inputs a
second:

    python tools/fuzz.py --seconds 600 --seed 1 --out fuzz-findings
    X86PT_FUZZ_LONG=1 pytest tests/test_fuzz_hostile.py      # hypothesis, 20,000 examples a test

The driver prints a summary (inputs tried by kind, findings, hangs, peak RSS) and writes each
finding's input and traceback under --out. Exit status: 0 without findings, 1 with.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from x86pt.errors import X86ptError  # noqa: E402

PAGE = 4096
BUDGET = 20_000  # --max-entries of every scan: the fuzzer tests refusal, not throughput
PROFILES = ("intel", "amd", "qemu", "unicorn", "kvm", "kvm-epyc-pvm")
CR4_BITS = (
    1 << 4,
    1 << 7,
    1 << 12,
    1 << 17,
    1 << 20,
    1 << 21,
    1 << 22,
    1 << 24,
)  # PSE PGE LA57 PCIDE SMEP SMAP PKE PKS


# -- a source of choices: seeded randomness here, hypothesis' data in the tests ------------------------
class RandomSource:
    def __init__(self, rnd: random.Random) -> None:
        self.r = rnd

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def coin(self, p: float = 0.5) -> bool:
        return self.r.random() < p

    def choice(self, seq):
        return seq[self.r.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        return self.r.randbytes(n)


# -- generators -------------------------------------------------------------------------------------
@dataclass
class Case:
    image: bytes  # the file's bytes
    kind: str  # tables, same, random, elf, lime
    regs: dict[str, int | None]  # cr0 cr3 cr4 efer pkru maxphyaddr (None: not given)
    profile: str | None
    probes: bytes  # a JSONL probe file (hostile lines included)
    vas: list[int] = field(default_factory=list)


def entry(src, tables: list[int], npages: int) -> int:
    """One page-table entry: a pointer at a table (sharing and loops), a leaf, junk."""
    k = src.int(0, 9)
    low = src.int(0, 0xFFF) if src.coin(0.3) else src.choice((0x3, 0x7, 0x63, 0x67, 0x1, 0x83, 0x87))
    if k <= 4:
        v = src.choice(tables) | (low & ~0x80 if src.coin(0.8) else low)
    elif k <= 6:
        v = src.int(0, npages + 4) * PAGE | low | (0x80 if src.coin(0.5) else 0)
    elif k == 7:
        v = src.int(0, (1 << 64) - 1)
    elif k == 8:
        v = (src.int(0, 1 << 40) << 12) | low
    else:
        v = src.choice(tables) | low | (1 << src.int(40, 63))
    if src.coin(0.1):
        v |= 1 << 63
    if src.coin(0.05):
        v |= src.int(0, 15) << 59
    return v & ((1 << 64) - 1)


def tables_image(src) -> tuple[bytearray, list[int]]:
    npages = src.int(2, 24)
    mem = bytearray(npages * PAGE)
    tables = [PAGE * i for i in range(1, src.int(2, npages))]
    for t in tables:
        n = src.choice((0, 1, 2, 4, 8, 32, 512))
        idx = range(512) if n == 512 else [src.int(0, 511) for _ in range(n)]
        same = entry(src, tables, npages) if n == 512 and src.coin(0.5) else None
        for i in idx:
            struct.pack_into("<Q", mem, t + 8 * i, same if same is not None else entry(src, tables, npages))
    return mem, tables


def registers(src, tables: list[int]) -> dict[str, int | None]:
    regs: dict[str, int | None] = {}
    regs["cr3"] = (
        (src.choice(tables) | src.int(0, 0xFFF) if src.coin(0.2) else src.choice(tables))
        if tables and src.coin(0.97)
        else src.int(0, (1 << 64) - 1)
    )
    cr4 = 0x20
    for b in CR4_BITS:
        if src.coin(0.2):
            cr4 |= b
    if src.coin(0.02):
        cr4 = src.int(0, (1 << 64) - 1)
    regs["cr4"] = cr4 if src.coin(0.8) else None
    cr0 = 0x80010001 | (src.choice((0, 0x20, 0x40000, 0x50032)) if src.coin(0.3) else 0)
    if src.coin(0.02):
        cr0 = src.int(0, (1 << 64) - 1)
    regs["cr0"] = cr0 if src.coin(0.8) else None
    efer = src.choice((0xD00, 0x500, 0xD01, 0xD00, 0x100, 0xD00, 0x1D00))
    if src.coin(0.02):
        efer = src.int(0, (1 << 64) - 1)
    regs["efer"] = efer if src.coin(0.8) else None
    regs["pkru"] = src.int(0, (1 << 32) - 1) if src.coin(0.2) else None
    regs["maxphyaddr"] = src.int(28, 56) if src.coin(0.2) else None
    return regs


def vas(src, n: int) -> list[int]:
    out = []
    for _ in range(n):
        k = src.int(0, 3)
        if k == 0:
            out.append(src.int(0, (1 << 64) - 1))
        elif k == 1:
            out.append(
                src.int(0, 511) << 39
                | src.int(0, 511) << 30
                | src.int(0, 511) << 21
                | src.int(0, 511) << 12
                | src.int(0, 0xFFF)
            )
        elif k == 2:
            out.append(0xFFFF800000000000 | src.int(0, (1 << 47) - 1))
        else:
            out.append(
                src.choice(
                    (
                        0,
                        0x400000,
                        0x7FFFFFFFF000,
                        0x800000000000,
                        0xFFFF800000000000,
                        0xFFFFFFFFFFFFF000,
                        0xFF00000000000000,
                    )
                )
            )
    return out


def probe_line(src) -> bytes:
    k = src.int(0, 14)
    if k <= 6:
        d: dict = {"va": hex(src.choice(vas(src, 1)))}
        if src.coin(0.5):
            d["access"] = src.choice(("read", "write", "fetch"))
        for key in ("user", "ac", "implicit"):
            if src.coin(0.3):
                d[key] = src.coin()
        return json.dumps(d).encode()
    return src.choice(
        (
            lambda: src.bytes(src.int(0, 40)),
            lambda: b"[" * src.int(1, 5000) + b"]" * src.int(0, 5000),
            lambda: b'{"va": ' + b"9" * src.int(1, 6000) + b"}",
            lambda: b'{"va": "' + b"f" * src.int(1, 300) + b'"}',
            lambda: b'{"va": 1.5e300}',
            lambda: b'{"va": -1}',
            lambda: b'{"va": "0x1000", "access": 5}',
            lambda: b'{"va": "0x1000", "user": "yes"}',
            lambda: b'{"va": "0x1000", "bogus": 1}',
            lambda: b'[{"va": 1}]',
            lambda: b'"va"',
            lambda: b'{"va": "\xff\xfe"}',
            lambda: b"# a comment",
            lambda: b"",
        )
    )()


def make_case(src) -> Case:
    from x86pt.memory import write_elf_core, write_lime
    from x86pt.memory.sparse import SparseMemory

    kind = src.choice(("tables", "tables", "tables", "same", "random", "elf", "elf", "lime"))
    if kind == "random":
        data, tables = bytearray(src.bytes(src.int(0, 3 * PAGE))), [0, PAGE, 2 * PAGE]
    elif kind == "same":
        # every entry of every table points at the next table (the 64 KiB image)
        data, tables = bytearray(0x10000), [0x1000]
        for t in range(0x1000, 0x5000, 0x1000):
            for i in range(512):
                struct.pack_into("<Q", data, t + 8 * i, (t + 0x1000) | src.choice((3, 7, 0x83)))
    else:
        data, tables = tables_image(src)
    regs = registers(src, tables)
    profile = src.choice(PROFILES + (None,) * 6 + ("bogus",))
    if kind in ("elf", "lime"):
        mem = SparseMemory()
        mem.write(0, bytes(data))
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "img")
            if kind == "elf":
                write_elf_core(
                    p,
                    mem,
                    cr0=regs["cr0"] or 0x80010001,
                    cr3=regs["cr3"] & ((1 << 64) - 1),
                    cr4=regs["cr4"] or 0x20,
                    efer=regs["efer"] or 0xD00,
                    pkru=regs["pkru"] or 0,
                    maxphyaddr=src.int(0, 255) if src.coin(0.1) else 46,
                    profile=(profile or "") if src.coin(0.97) else "x" * 15,
                )
            else:
                write_lime(p, mem)
            with open(p, "rb") as f:
                data = bytearray(f.read())
        for _ in range(src.choice((0, 0, 1, 4, 16))):  # damage headers and notes
            if data:
                data[src.int(0, min(len(data), 0x600) - 1)] = src.int(0, 255)
        if src.coin(0.1) and data:
            data = data[: src.int(0, len(data))]
    lines = [probe_line(src) for _ in range(src.int(0, 6))]
    return Case(bytes(data), kind, regs, profile, b"\n".join(lines) + b"\n", vas(src, src.int(1, 8)))


# -- targets ----------------------------------------------------------------------------------------
class Hang(Exception):
    pass


def run_library(case: Case, path: str, probes_path: str) -> dict[str, int]:
    """The library calls the CLI makes, without the CLI. Returns counts of what ran."""
    from x86pt.census import census
    from x86pt.cli import read_probes
    from x86pt.diff import diff_images
    from x86pt.aliases import find_aliases
    from x86pt.formats.dump import dump_to
    from x86pt.formats.wx import wx_ranges
    from x86pt.image import open_image
    from x86pt.walk import Access, walk

    n = {"walks": 0, "scans": 0, "probe_files": 0}
    with contextlib.suppress(X86ptError):
        read_probes(probes_path)
        n["probe_files"] += 1
    try:
        img = open_image(path, **case.regs, profile=case.profile)
    except X86ptError:
        return n
    with img:
        for i, va in enumerate(case.vas):
            acc = Access(("read", "write", "fetch")[i % 3], user=bool(i & 4))
            with contextlib.suppress(X86ptError):
                walk(img.state, img.memory, va, acc)
            n["walks"] += 1
        for fmt in ("ptdump", "json", "qemu-tlb", "qemu-mem", "csv"):
            with contextlib.suppress(X86ptError):
                dump_to(io.BytesIO(), img, fmt, max_entries=BUDGET)
            n["scans"] += 1
        for call in (
            lambda: census(img.state, img.memory, None, max_entries=BUDGET),
            lambda: diff_images(img.state, img.memory, img.state, img.memory, max_entries=BUDGET),
            lambda: find_aliases(img.state, img.memory, 0x5000, BUDGET),
            lambda: wx_ranges(img, BUDGET),
        ):
            with contextlib.suppress(X86ptError):
                call()
            n["scans"] += 1
    return n


COMMANDS = (
    ("walk", "VA"),
    ("translate", "VA"),
    ("probe",),
    ("dump", "--format", "ptdump"),
    ("dump", "--format", "json"),
    ("dump", "--format", "qemu-tlb"),
    ("dump", "--format", "qemu-mem"),
    ("census",),
    ("wx",),
    ("find", "0x5000"),
    ("diff", "IMG2"),
)


def cli_argv(src, case: Case, path: str, probes_path: str) -> list[str]:
    cmd = list(src.choice(COMMANDS))
    argv = [cmd[0], path] + [{"VA": hex(case.vas[0]), "IMG2": path}.get(w, w) for w in cmd[1:]]
    if cmd[0] == "probe":
        argv += ["--probes", probes_path] + (["--update-ad"] if src.coin(0.3) else [])
    if cmd[0] == "dump" and src.coin(0.3):  # filters applied while walking
        argv += src.choice(
            (
                ["--has", src.choice(("g", "!a d", "rw !nx", "pat"))],
                ["--range", src.choice(("0-0x800000000000", "0xffff800000000000+1G", "0x400000+0x1000"))],
                ["--level", src.choice(("4k", "2m,1g"))],
                [src.choice(("--user", "--kernel"))],
                ["--writable", "--executable"],
            )
        )
    if cmd[0] in ("walk", "translate", "probe", "find", "census", "wx", "diff") and src.coin(0.3):
        argv.append("--json")
    for reg, v in case.regs.items():
        if v is not None:
            argv += [
                f"--{reg}",
                str(v)
                if reg == "maxphyaddr"
                else (hex(v) if src.coin(0.98) else src.choice(("zz", "-1", "0x", "1" * 30, ""))),
            ]
    if case.profile is not None:
        argv += ["--profile", case.profile]
    if cmd[0] in ("dump", "census", "wx", "find", "diff"):
        argv += ["--max-entries", str(BUDGET)]
    return argv


def run_cli(argv: list[str], path: str) -> tuple[int, str]:
    """main(argv) in this process; returns (status, stderr). Raises what the CLI did not catch."""
    from x86pt.cli import main

    before = _digest(path)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # dump writes to stdout.buffer
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    if _digest(path) != before:
        raise AssertionError(f"the CLI changed its input {path}")
    err.flush()
    text = err.buffer.getvalue().decode("utf-8", "replace")
    if rc not in (0, 1, 2):
        raise AssertionError(f"exit status {rc}: {text[-500:]}")
    if rc == 2 and not text.startswith("usage:"):
        errs = [ln for ln in text.splitlines() if ln.startswith("x86pt: error:")]
        if len(errs) != 1 or not text.rstrip("\n").splitlines()[-1].startswith("x86pt: error:"):
            raise AssertionError(f"exit 2 without exactly one final error line: {text[-500:]!r}")
    return rc, text


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- the long-mode driver -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=600, help="how long to run (default 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="fuzz-findings", help="folder for findings (created on the first)")
    ap.add_argument("--cli-every", type=int, default=4, help="run the CLI on every N-th case (default 4)")
    ap.add_argument("--hang", type=float, default=20.0, help="seconds one case may take (default 20)")
    ap.add_argument("--mem-gib", type=float, default=2.0, help="RLIMIT_AS of this process (default 2)")
    ap.add_argument("--report-every", type=float, default=60.0)
    a = ap.parse_args(argv)
    limit = int(a.mem_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ["X86PT_DEBUG"] = "1"  # the CLI re-raises internal errors: keep the traceback
    rnd = random.Random(a.seed)
    src = RandomSource(rnd)
    counts = {
        "cases": 0,
        "images": 0,
        "register_sets": 0,
        "probe_lines": 0,
        "walks": 0,
        "scans": 0,
        "probe_files": 0,
        "cli_runs": 0,
        "cli_exit": {},
    }
    findings = hangs = 0
    worst = (0.0, "")
    t0 = last = time.monotonic()
    work = tempfile.mkdtemp(prefix="x86pt-fuzz-")
    path, probes_path = os.path.join(work, "img"), os.path.join(work, "probes.jsonl")
    try:
        while time.monotonic() - t0 < a.seconds:
            case = make_case(src)
            with open(path, "wb") as f:
                f.write(case.image)
            with open(probes_path, "wb") as f:
                f.write(case.probes)
            counts["cases"] += 1
            counts["images"] += 1
            counts["register_sets"] += 1
            counts["probe_lines"] += case.probes.count(b"\n")
            argv_cli = cli_argv(src, case, path, probes_path) if counts["cases"] % a.cli_every == 0 else None
            c0 = time.monotonic()
            try:
                with time_limit(a.hang):
                    n = run_library(case, path, probes_path)
                    for k, v in n.items():
                        counts[k] += v
                    if argv_cli is not None:
                        rc, _ = run_cli(argv_cli, path)
                        counts["cli_runs"] += 1
                        counts["cli_exit"][rc] = counts["cli_exit"].get(rc, 0) + 1
            except Hang as e:
                hangs += 1
                findings += 1
                _save(a.out, counts["cases"], case, argv_cli, f"HANG: {e}\n" + traceback.format_exc())
            except (Exception, MemoryError):
                findings += 1
                _save(a.out, counts["cases"], case, argv_cli, traceback.format_exc())
            dt = time.monotonic() - c0
            if dt > worst[0]:
                worst = (dt, case.kind)
            if time.monotonic() - last > a.report_every:
                last = time.monotonic()
                print(
                    f"[{last - t0:6.0f} s] cases {counts['cases']} walks {counts['walks']} "
                    f"cli {counts['cli_runs']} findings {findings} hangs {hangs} "
                    f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB",
                    flush=True,
                )
    finally:
        for p in (path, probes_path):
            with contextlib.suppress(OSError):
                os.unlink(p)
        with contextlib.suppress(OSError):
            os.rmdir(work)
    elapsed = time.monotonic() - t0
    summary = {
        "seconds": round(elapsed, 1),
        "seed": a.seed,
        **counts,
        "inputs_total": counts["images"] + counts["register_sets"] + counts["probe_lines"] + counts["walks"],
        "findings": findings,
        "hangs": hangs,
        "slowest_case_s": round(worst[0], 2),
        "slowest_case_kind": worst[1],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
    }
    print(json.dumps(summary, indent=1))
    return 1 if findings else 0


def _save(out: str, n: int, case: Case, argv_cli, text: str) -> None:
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"case-{n:08d}")
    with open(base + ".img", "wb") as f:
        f.write(case.image)
    with open(base + ".probes.jsonl", "wb") as f:
        f.write(case.probes)
    with open(base + ".txt", "w") as f:
        f.write(
            json.dumps(
                {
                    "kind": case.kind,
                    "regs": case.regs,
                    "profile": case.profile,
                    "vas": [hex(v) for v in case.vas],
                    "cli": argv_cli,
                }
            )
            + "\n"
            + text
        )
    print(f"finding {base}: {text.strip().splitlines()[-1][:300]}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
