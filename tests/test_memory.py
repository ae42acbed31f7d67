"""Physical memory sources: raw, ELF core (QEMU dump-guest-memory layout), LiME, sparse; and the
bad-input cases (truncated, overlapping, past the end, malformed). Byte layouts here are written by
hand from the formats (ELF64 gABI, QEMUCPUState as in docs/formats.md §4, LiME's header)."""

from __future__ import annotations

import os
import stat
import struct

import numpy as np
import pytest

from x86pt.errors import ImageError, PhysicalAddressError
from x86pt.memory import ElfCore, LimeFile, RawFile, SparseMemory, open_memory, write_elf_core, write_lime


def hand_elf(loads, notes=b"", phnum_override=None, machine=62, etype=4, eclass=2):
    """ELF64 core: header, PT_NOTE, PT_LOADs (paddr, data, memsz, vaddr)."""
    phnum = 1 + len(loads)
    off = 64 + 56 * phnum
    parts = []
    note_off = off
    off += len(notes)
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(notes), len(notes), 0)]
    for paddr, data, memsz, vaddr in loads:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(data), memsz, 0))
        parts.append(data)
        off += len(data)
    ident = b"\x7fELF" + bytes([eclass, 1, 1]) + bytes(9)
    hdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        ident,
        etype,
        machine,
        1,
        0,
        64,
        0,
        0,
        64,
        56,
        phnum if phnum_override is None else phnum_override,
        64,
        0,
        0,
    )
    return hdr + b"".join(phdrs) + notes + b"".join(parts)


def qemu_note(cr0, cr3, cr4):
    desc = (
        struct.pack("<II", 1, 440)
        + bytes(18 * 8)
        + bytes(240)
        + struct.pack("<5Q", cr0, 0, 0, cr3, cr4)
        + bytes(8)
    )
    name = b"QEMU\0\0\0\0"
    return struct.pack("<III", 5, len(desc), 0) + name + desc


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_elf_core_reads_paddr_zero_fill_and_qemu_registers(tmp_path):
    seg1 = bytes(range(256)) * 16
    seg2 = b"\xaa" * 4096
    data = hand_elf(
        [(0x100000, seg1, 0x2000, 0xDEAD0000), (0x400000, seg2, 0x1000, 0)],
        qemu_note(0x80050033, 0x1234000, 0x3406F0),
    )
    path = write(tmp_path, "c.elf", data)
    with open_memory(path) as m:
        assert isinstance(m, ElfCore)
        assert m.read(0x100000, 4) == b"\x00\x01\x02\x03"  # keyed by p_paddr, not p_vaddr
        assert m.read(0x101000 + 0x10, 2) == bytes(2)  # p_filesz < p_memsz: zeros
        assert m.read_u64(0x400000) == 0xAAAAAAAAAAAAAAAA
        assert m.control_registers["cr3"] == 0x1234000
        assert m.control_registers["cr0"] == 0x80050033
        assert m.control_registers["cr4"] == 0x3406F0
        assert "efer" not in m.control_registers  # QEMUCPUState has no EFER
        assert [(s.start, s.end) for s in m.segments()] == [(0x100000, 0x102000), (0x400000, 0x401000)]
        with pytest.raises(PhysicalAddressError):
            m.read(0x200000, 8)
        vals, valid = m.gather_u64(np.array([0x100000, 0x101008, 0x400000, 0x300000], dtype=np.uint64))
        assert valid.tolist() == [True, True, True, False]
        assert int(vals[2]) == 0xAAAAAAAAAAAAAAAA and int(vals[1]) == 0


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d[:40], "truncated ELF header"),
        (lambda d: b"\x7fELG" + d[4:], "not an ELF"),
        (lambda d: d[:4] + b"\x01" + d[5:], "ELF64"),
        (lambda d: d[:16] + struct.pack("<H", 2) + d[18:], "not a core"),
        (lambda d: d[:18] + struct.pack("<H", 3) + d[20:], "not x86-64"),
        (lambda d: d[:-100], "truncated"),
    ],
)
def test_malformed_elf_cores(tmp_path, mutate, message):
    data = hand_elf([(0x0, b"\1" * 4096, 4096, 0)], qemu_note(0x80000011, 0x1000, 0x20))
    path = write(tmp_path, "bad.elf", mutate(data))
    with pytest.raises(ImageError, match=message):
        ElfCore(path)


def test_load_segment_past_2_64_is_an_error(tmp_path):
    # paddr 2^64 - 0x1000 with memsz 0x2000 ends at 2^64 + 0x1000: no physical address is there
    data = hand_elf([((1 << 64) - 0x1000, b"\1" * 4096, 0x2000, 0)])
    with pytest.raises(ImageError, match="past the end of the 64-bit physical address space"):
        ElfCore(write(tmp_path, "wrap.elf", data))
    # ending exactly at 2^64 is fine
    data = hand_elf([((1 << 64) - 0x1000, b"\1" * 4096, 0x1000, 0)])
    with ElfCore(write(tmp_path, "top.elf", data)) as m:
        assert m.read((1 << 64) - 8, 8) == b"\1" * 8


def test_overlapping_load_segments_are_an_error(tmp_path):
    data = hand_elf([(0x0, b"\1" * 8192, 8192, 0), (0x1000, b"\2" * 4096, 4096, 0)])
    with pytest.raises(ImageError, match="overlap"):
        ElfCore(write(tmp_path, "ov.elf", data))


def test_elf_writer_round_trip_carries_registers(tmp_path):
    mem = SparseMemory()
    mem.write_u64(0x1000, 0x2003)
    mem.write(0x5000, b"hello")
    path = str(tmp_path / "out.elf")
    write_elf_core(
        path,
        mem,
        cr0=0x80010001,
        cr3=0x1000,
        cr4=0x1020,
        efer=0xD00,
        pkru=0x55,
        maxphyaddr=40,
        vendor="amd",
        profile="qemu",
    )
    with ElfCore(path) as m:
        assert m.read_u64(0x1000) == 0x2003 and m.read(0x5000, 5) == b"hello"
        assert m.control_registers == {
            "cr0": 0x80010001,
            "cr2": 0,
            "cr3": 0x1000,
            "cr4": 0x1020,
            "rip": 0,
            "rflags": 2,
            "efer": 0xD00,
            "pkru": 0x55,
            "pkrs": 0,
            "maxphyaddr": 40,
        }
        assert m.profile_name == "qemu"
        # the QEMU note sits where QEMU puts it: CR3 at payload offset 416
        desc = next(d for n, t, d in m.notes if n == "QEMU")
        assert struct.unpack_from("<Q", desc, 416)[0] == 0x1000
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".x86pt-")]  # no temp left behind


def test_raw_file_is_read_only_and_bounded(tmp_path):
    path = write(tmp_path, "m.raw", b"\x11" * 8192)
    with RawFile(path) as m:
        assert m.read_u64(0x1FF8) == 0x1111111111111111
        with pytest.raises(PhysicalAddressError, match="outside"):
            m.read_u64(0x1FFC)
        with pytest.raises(PhysicalAddressError):
            m.write(0, b"x")
        assert m.table(0x1000).shape == (512,)
        with pytest.raises(PhysicalAddressError):
            m.table(0x2000)
    os.chmod(path, stat.S_IRUSR)  # opening needs read permission only
    RawFile(path).close()


def test_lime_round_trip_and_errors(tmp_path):
    mem = SparseMemory()
    mem.write(0x3000, b"\x42" * 4096)
    mem.write(0x10000, b"\x43" * 8192)
    path = str(tmp_path / "m.lime")
    write_lime(path, mem)
    raw = open(path, "rb").read()
    # header by hand: magic, version 1, start, end (inclusive), reserved
    assert raw[:32] == struct.pack("<IIQQQ", 0x4C694D45, 1, 0x3000, 0x3FFF, 0)
    with open_memory(path) as m:
        assert isinstance(m, LimeFile)
        assert m.read(0x10000 + 8190, 2) == b"\x43\x43"
        with pytest.raises(PhysicalAddressError):
            m.read(0x5000, 1)
    with pytest.raises(ImageError, match="truncated"):
        LimeFile(write(tmp_path, "t.lime", raw[:-10]))
    bad = struct.pack("<IIQQQ", 0x4C694D45, 1, 0x5000, 0x4000, 0)
    with pytest.raises(ImageError, match="ends before"):
        LimeFile(write(tmp_path, "b.lime", bad))


def test_sparse_memory_zero_fill_and_bounds():
    m = SparseMemory(size=0x10000)
    assert m.read_u64(0x8000) == 0
    m.write(0xFFC, b"\1\2\3\4\5\6\7\x08")  # across a page boundary
    assert m.read(0xFFC, 8) == b"\1\2\3\4\5\6\7\x08"
    with pytest.raises(PhysicalAddressError):
        m.read(0xFFFC, 8)
    vals, valid = m.gather_u64(np.array([0xFF8, 0x1000, 0x9000], dtype=np.uint64))
    assert vals.tolist() == [0x04030201 << 32, 0x08070605, 0] and valid.all()


def test_missing_and_non_regular_inputs(tmp_path):
    with pytest.raises(ImageError, match="no such image"):
        open_memory(str(tmp_path / "nope"))
    with pytest.raises(ImageError, match="not a regular file"):
        RawFile(str(tmp_path))
