"""The dump, census, wx, find and diff commands end to end. Expected values are hand-derived from
how the fixture images were built (tools/capture_qemu_goldens.py, x86pt/demo.py's RAM layout),
never from x86pt's output."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys


from tests.conftest import FIXTURES, ROOT
from x86pt.build import Builder
from x86pt.cli import main
from x86pt.memory import write_image

DUMP = os.path.join(FIXTURES, "dump")
LINUX = os.path.join(DUMP, "linuxlike4.elf")
MIXED = os.path.join(DUMP, "mixed4.elf")
PAGE_OFFSET = 0xFFFF888000000000


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_census_meminfo_lines(capsys):
    """demo RAM: 4K over [0, 0x9f000) and [1M, 2M) = 159 + 256 pages = 1660 kB; 2M pages from 2M
    to 1G = 511 x 2048 kB; 1G pages for [1G, 3G) and [4G, 6G) = 4 GiB. The kernel also counts each
    page table under its image mapping as a 2M -> 512 x 4K split (docs/cpa.md §5): with a 512M
    KERNEL_IMAGE_SIZE that is the kernel data PT at 0xffffffff81c00000 (+2048 kB 4K, -2048 kB 2M);
    with 1G the module PT at 0xffffffffa0000000 is inside the range too (another 2048 kB)."""
    rc, out, err = run(capsys, "census", LINUX, "--kernel-image-size", "512M")
    assert rc == 0
    assert out.startswith(
        "DirectMap4k:        3708 kB\nDirectMap2M:     1044480 kB\nDirectMap1G:     4194304 kB\n"
    )
    rc, out, err = run(capsys, "census", LINUX)
    assert out.startswith("DirectMap4k:        5756 kB\nDirectMap2M:     1042432 kB\n")
    rc, out, err = run(capsys, "census", LINUX, "--kernel-image-size", "0")
    assert out.startswith("DirectMap4k:        1660 kB\nDirectMap2M:     1046528 kB\n")
    assert "PAGE_OFFSET detected" in out and f"{PAGE_OFFSET:#018x}" in out
    rc, out, _ = run(
        capsys,
        "census",
        LINUX,
        "--page-offset",
        hex(PAGE_OFFSET),
        "--no-gbpages",
        "--json",
        "--kernel-image-size",
        "0",
    )
    d = json.loads(out)
    assert d["DirectMap4k_kB"] == 1660 and d["page_offset_detected"] is False
    # whole tree: + kernel data 2M in 4K (512) + module 5 + user 4 PTEs; 2M: +4 text, +2 rodata
    assert d["leaves"] == {"4K": 415 + 512 + 5 + 4, "2M": 511 + 6, "1G": 4}


def test_find_aliases(capsys):
    """Module text frame 0x3a000000 is mapped by MODULES (4K) and by the direct map (2M page)."""
    rc, out, _ = run(capsys, "find", LINUX, "0x3a000123")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"0x{PAGE_OFFSET + 0x3A000123:016x}  2M  -rw-")
    assert lines[1].startswith("0xffffffffa0000123  4K  -r-x")
    rc, out, err = run(capsys, "find", LINUX, "0x9f000")  # the 640K hole is not mapped
    assert rc == 1 and out == "" and "no virtual address maps 0x9f000" in err


def test_json_and_csv_rows(capsys):
    rc, out, _ = run(capsys, "dump", LINUX, "--format", "json", "--user")
    rows = [json.loads(l) for l in out.splitlines()]
    assert [(r["va"], r["size"], r["pa"], r["writable"], r["executable"]) for r in rows] == [
        ("0x0000000000400000", 0x2000, "0x5000000", False, True),
        ("0x0000000000600000", 0x1000, "0x5002000", True, False),
        ("0x00007ffffffde000", 0x1000, "0x5003000", True, False),
    ]
    rc, out, _ = run(capsys, "dump", LINUX, "--format", "csv", "--level", "1g", "--coalesce", "none")
    recs = list(csv.DictReader(io.StringIO(out)))
    assert [r["va"] for r in recs] == [f"{PAGE_OFFSET + g * (1 << 30):#018x}" for g in (1, 2, 4, 5)]
    assert all(r["flags"] == "p rw a d ps g xd" for r in recs)


def test_filters(capsys):
    # kernel text: ROX 2M pages only are executable+supervisor in the kernel half
    rc, out, _ = run(capsys, "dump", LINUX, "--format", "json", "--kernel", "--executable")
    assert [(json.loads(l)["va"], json.loads(l)["size"]) for l in out.splitlines()] == [
        ("0xffffffff81000000", 8 << 20),
        ("0xffffffffa0000000", 0x3000),
    ]
    rc, out, _ = run(capsys, "dump", LINUX, "--format", "json", "--has", "us !d")
    assert [json.loads(l)["va"] for l in out.splitlines()] == ["0x0000000000400000"]
    rc, out, _ = run(capsys, "dump", LINUX, "--format", "qemu-tlb", "--range", "0xffffffffa0000000+0x4000")
    assert out == (
        "ffffffffa0000000: 000000003a000000 -G--A----\n"
        "ffffffffa0001000: 000000003a001000 -G--A----\n"
        "ffffffffa0002000: 000000003a002000 -G--A----\n"
        "ffffffffa0003000: 000000003a003000 XG-DA---W\n"
    )


def test_output_file_is_written_whole(tmp_path, capsys):
    dest = tmp_path / "tlb.txt"
    rc, _, _ = run(capsys, "dump", MIXED, "--format", "qemu-tlb", "--crlf", "-o", dest)
    assert rc == 0
    assert dest.read_bytes() == open(os.path.join(DUMP, "mixed4.qemu-tlb.txt"), "rb").read()
    assert [p.name for p in tmp_path.iterdir()] == ["tlb.txt"]  # no temp files left


def _pair(tmp_path, change):
    """Image A: 4 MiB of 2M pages at 0xffff888000000000; B: the same after `change`."""

    def build(split: bool, mutate):
        b = Builder(levels=4, table_base=0x100000)
        if split:
            b.map(PAGE_OFFSET, 0, 2 << 20, 4096, "p rw a d g nx")
            b.map(PAGE_OFFSET + (2 << 20), 2 << 20, 2 << 20, 2 << 20, "p rw a d g nx")
        else:
            b.map(PAGE_OFFSET, 0, 4 << 20, 2 << 20, "p rw a d g nx")
        if mutate:
            mutate(b)
        p = tmp_path / f"{'b' if mutate or split else 'a'}.elf"
        write_image(b.memory, b.state(), str(p), "elf")
        return str(p)

    return build(False, None), build(True, change)


def test_diff_split_vs_merged_is_identical(tmp_path, capsys):
    a, b = _pair(tmp_path, None)
    rc, out, _ = run(capsys, "diff", a, b, "--strict")
    assert rc == 0
    assert out == (
        "summary: = 0x400000 bytes\n"
        "shape: A leaves 4K:0 2M:2 1G:0, 3 table pages; B leaves 4K:512 2M:1 1G:0, "
        "4 table pages (translations identical)\n"
    )


def test_diff_rights_frames_added_removed(tmp_path, capsys):
    def change(b):
        a = b.entry_address(PAGE_OFFSET + 0x5000, 1)
        b.memory.write_u64(a, b.memory.read_u64(a) & ~2)  # RO
        a = b.entry_address(PAGE_OFFSET + 0x6000, 1)
        b.memory.write_u64(a, (b.memory.read_u64(a) & ~0xFFFFF000) | 0x9000000)  # other frame
        a = b.entry_address(PAGE_OFFSET + 0x7000, 1)
        b.memory.write_u64(a, 0)  # unmapped
        b.map(0x400000, 0x5000000, 4096, 4096, "p rw us")  # new

    a, b = _pair(tmp_path, change)
    rc, out, _ = run(capsys, "diff", a, b, "--json", "--strict")
    assert rc == 1
    recs = [json.loads(l) for l in out.splitlines()]
    changes = [(r["change"], r["start"], r["size"]) for r in recs if "change" in r]
    assert changes == [
        ("+", "0x0000000000400000", 0x1000),
        ("~rights", f"{PAGE_OFFSET + 0x5000:#018x}", 0x1000),
        ("~frame", f"{PAGE_OFFSET + 0x6000:#018x}", 0x1000),
        ("-", f"{PAGE_OFFSET + 0x7000:#018x}", 0x1000),
    ]
    assert recs[2]["pa_a"] == "0x6000" and recs[2]["pa_b"] == "0x9000000"
    assert recs[-1]["summary"]["="] == (4 << 20) - 0x3000


def test_wx_command(capsys):
    rc, out, _ = run(capsys, "wx", LINUX)
    assert rc == 0 and out == "x86/mm: Checked W+X mappings: passed, no W+X pages found.\n"
    rc, out, _ = run(capsys, "wx", MIXED, "--strict")
    # mixed4: W+X = RW without XD on every level: the 4K "p rw" page, the 2M "rw us pat pwt" page,
    # the 2 PTEs under the supervisor PDE, the "p rw a" reserved-bit page, the 3 top-of-space
    # pages, and the non-present PTE 0x123456780e2: effective_prot() and note_wx() look at RW
    # and NX only, not P = 1 + 512 + 2 + 1 + 3 + 1
    assert rc == 1
    assert out.endswith("FAILED, 520 W+X pages found.\n")
    assert out.count("Found insecure W+X mapping") == 6


def test_demo_shows_dump_census_diff(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "x86pt", "demo", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    for head in ("== Dump", "== Census", "== Diff"):
        assert head in p.stdout
    assert "DirectMap1G:     4194304 kB" in p.stdout
    assert "~rights       0xffff888003005000-0xffff888003006000" in p.stdout
