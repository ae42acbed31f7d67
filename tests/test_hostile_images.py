"""Hostile and malformed images through dump, census, wx, find and diff: typed errors and one
line on stderr, issues reported, never a traceback or a hang (docs/design.md §2.5)."""

from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as hst

from tests.conftest import FIXTURES
from x86pt.build import Builder
from x86pt.cli import main
from x86pt.memory import write_image

DUMP = os.path.join(FIXTURES, "dump")
FORMATS = ("ptdump", "qemu-mem", "qemu-tlb", "json", "csv")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _raw(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_recursive_pml4_slot_is_shown_not_looped(capsys, fmt):
    rc, out, err = run(capsys, "dump", os.path.join(DUMP, "recursive4.elf"), "--format", fmt)
    assert rc == 0
    if fmt == "json":
        assert '"issue":"loop"' in out
    else:
        assert "recursive mapping" in err
    if fmt == "qemu-tlb":
        assert "ffffff7fbfdfe000" in out  # the PML4 itself, seen through slot 510 four times


def test_table_pointer_past_the_end(tmp_path, capsys):
    """A raw image whose PML4 points at a PDPT beyond the file: an issue, no crash."""
    img = bytearray(0x3000)
    struct.pack_into("<Q", img, 0x1000, 0x7FFF0000 | 0x3)  # PML4[0] -> past the end
    struct.pack_into("<Q", img, 0x1000 + 8 * 256, 0x2000 | 0x3)  # PML4[256] -> PDPT at 0x2000
    struct.pack_into("<Q", img, 0x2000, 0x40000000 | 0x83)  # 1G leaf
    path = _raw(tmp_path, "pastend.raw", bytes(img))
    for fmt in FORMATS:
        rc, out, err = run(capsys, "dump", path, "--cr3", "0x1000", "--format", fmt)
        assert rc == 0, err
        if fmt == "qemu-tlb":
            assert out == "ffff800000000000: 0000000040000000 --P-----W\n"
        if fmt != "json":
            assert "past the end of the image" in err
    rc, out, err = run(capsys, "census", path, "--cr3", "0x1000")
    assert rc == 0 and "DirectMap1G:     1048576 kB" in out


def test_reserved_bits_are_reported(tmp_path, capsys):
    b = Builder(levels=4, table_base=0x100000, maxphyaddr=46)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw us")
    a = b.entry_address(0x400000, 1)
    b.memory.write_u64(a, b.memory.read_u64(a) | (1 << 50))
    st = b.state(maxphyaddr=40)
    path = str(tmp_path / "rsvd.elf")
    write_image(b.memory, st, path, "elf")
    rc, out, err = run(capsys, "dump", path, "--format", "json")
    assert rc == 0 and '"reserved":true' in out and '"issue":"reserved"' in out
    rc, out, err = run(capsys, "dump", path, "--format", "ptdump")
    assert rc == 0 and "reserved bits" in err


def test_looping_subtrees_stop_at_the_budget(tmp_path, capsys):
    """Every entry of every table points back at the PML4: 512^3 PTE-level mappings. The scan
    stops at --max-entries with one clear line, quickly."""
    img = bytearray(0x2000)
    for i in range(512):
        struct.pack_into("<Q", img, 0x1000 + 8 * i, 0x1000 | 0x3)
    path = _raw(tmp_path, "loops.raw", bytes(img))
    t = time.monotonic()
    for cmd in (
        ("dump", path, "--format", "qemu-tlb"),
        ("census", path),
        ("wx", path),
        ("find", path, "0x1000"),
        ("diff", path, path),
    ):
        rc, out, err = run(capsys, *cmd, "--cr3", "0x1000", "--max-entries", "100000")
        assert rc == 2, (cmd, err)
        assert (
            err.startswith("x86pt: error: work limit reached: the tables expand to more than 100000")
            and err.count("\n") == 1
        )
    assert time.monotonic() - t < 30


@pytest.mark.parametrize(
    "argv,msg",
    [
        (("dump", "{elf}", "--range", "5-3"), "--range"),
        (("dump", "{elf}", "--range", "zz"), "--range"),
        (("dump", "{elf}", "--level", "3m"), "--level"),
        (("dump", "{elf}", "--has", "bogus"), "unknown flag"),
        (("dump", "{trunc}"), "truncated"),
        (("dump", "{missing}"), "no such image"),
        (("census", "{elf}", "--page-offset", "x"), "--page-offset"),
        (("find", "{elf}", "-1"), "physical address"),
        (("dump", "{empty}", "--cr3", "0"), ""),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, msg):
    elf = os.path.join(DUMP, "mixed4.elf")
    data = open(elf, "rb").read()
    trunc = _raw(tmp_path, "trunc.elf", data[:200])
    empty = _raw(tmp_path, "empty.raw", b"")
    argv = [a.format(elf=elf, trunc=trunc, missing=str(tmp_path / "nope.elf"), empty=empty) for a in argv]
    rc, out, err = run(capsys, *argv)
    if argv[1] == empty:
        # an empty image: the root table is past the end; reported, not fatal
        assert rc == 0 and "past the end" in err
        return
    assert rc == 2, err
    assert err.startswith("x86pt: error: ") and err.count("\n") == 1 and msg in err


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=hst.binary(min_size=0, max_size=3 * 4096),
    cr3=hst.sampled_from([0, 0x1000, 0x2000]),
    la57=hst.booleans(),
    fmt=hst.sampled_from(FORMATS),
)
def test_fuzz_random_images(tmp_path, capsys, data, cr3, la57, fmt):
    """Random bytes as a raw image: dump, census and diff exit 0 or 2 (a typed error), never 3
    (an internal error) and never hang."""
    path = _raw(tmp_path, "fuzz.raw", data)
    cr4 = hex(0x20 | (1 << 12 if la57 else 0))
    t = time.monotonic()
    for cmd in (("dump", path, "--format", fmt), ("census", path), ("diff", path, path)):
        rc, out, err = run(capsys, *cmd, "--cr3", hex(cr3), "--cr4", cr4, "--max-entries", "20000")
        assert rc in (0, 2), (cmd, err)
        if rc == 2:
            assert err.startswith("x86pt: error: ")
    assert time.monotonic() - t < 20


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(flips=hst.lists(hst.tuples(hst.integers(0, 98303), hst.integers(0, 255)), min_size=1, max_size=40))
def test_fuzz_mutated_fixture(tmp_path, capsys, flips):
    """The mixed4 image with random bytes overwritten (tables and ELF headers alike)."""
    data = bytearray(open(os.path.join(DUMP, "mixed4.elf"), "rb").read())
    for off, val in flips:
        data[off % len(data)] = val
    path = _raw(tmp_path, "mut.elf", bytes(data))
    for cmd in (
        ("dump", path, "--format", "ptdump"),
        ("dump", path, "--format", "qemu-mem"),
        ("census", path),
        ("diff", path, os.path.join(DUMP, "mixed4.elf")),
    ):
        rc, out, err = run(capsys, *cmd, "--max-entries", "20000")
        assert rc in (0, 2), (cmd, err)
