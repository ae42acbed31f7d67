"""ELF cores as QEMU's `dump-guest-memory` writes them (docs/formats.md §4), read and written.

Reading: ELF64 ET_CORE; one PT_LOAD per RAM block keyed by **p_paddr** (p_vaddr may equal it and
means nothing); bytes past p_filesz up to p_memsz read as zero. PT_NOTE holds per CPU a "CORE"
NT_PRSTATUS note and a "QEMU" note (type 0) whose payload is QEMUCPUState:
  u32 version, u32 size, 16 GPRs + rip + rflags (u64), 10 segments x 24 bytes
  (cs ds es fs gs ss ldt tr gdt idt), cr[0..4] (u64), [kernel_gs_base] -> CR3 at offset 416.
QEMUCPUState has no EFER; x86pt's own writer adds an "X86PT" note with EFER, PKRU, PKRS,
MAXPHYADDR and the profile name, and the reader uses it when present.
"""

from __future__ import annotations

import bisect
import os
import struct
from typing import Iterable

import numpy as np

from x86pt.errors import ImageError
from x86pt.memory.base import PAGE, MemoryBase, Segment
from x86pt.memory.raw import MappedFile

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_NHDR = struct.Struct("<III")
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
NT_PRSTATUS = 1
QEMU_NOTE_TYPE = 0
X86PT_NOTE_TYPE = 0x5850
QEMU_CPUSTATE_CR_OFFSET = 8 + 18 * 8 + 10 * 24  # 392: cr[0]
_X86PT_NOTE = struct.Struct("<IIQIIII16s")  # version, size, efer, pkru, pkrs, M, vendor, profile


def _align4(n: int) -> int:
    return (n + 3) & ~3


class ElfCore(MemoryBase):
    def __init__(self, path: str) -> None:
        self.path = path
        self.file = f = MappedFile(path)
        self.control_registers: dict[str, int] = {}
        self.notes: list[tuple[str, int, bytes]] = []
        if f.size < _EHDR.size:
            raise ImageError(f"{path}: truncated ELF header ({f.size} bytes)")
        (
            ident,
            e_type,
            e_machine,
            _ver,
            _entry,
            phoff,
            shoff,
            _flags,
            _ehsize,
            phentsize,
            phnum,
            shentsize,
            _shnum,
            _shstrndx,
        ) = _EHDR.unpack_from(f.data, 0)
        if ident[:4] != b"\x7fELF":
            raise ImageError(f"{path}: not an ELF file")
        if ident[4] != 2:
            raise ImageError(f"{path}: only ELF64 cores are supported (x86pt models IA-32e paging)")
        if ident[5] != 1:
            raise ImageError(f"{path}: not a little-endian ELF file")
        if e_type != ET_CORE:
            raise ImageError(f"{path}: ELF type {e_type} is not a core file (ET_CORE=4)")
        if e_machine != EM_X86_64:
            raise ImageError(f"{path}: ELF machine {e_machine} is not x86-64 (62)")
        if phnum == PN_XNUM:  # the real count is in section header 0's sh_info
            if shoff == 0 or shoff + _SHDR.size > f.size:
                raise ImageError(f"{path}: e_phnum is PN_XNUM but section header 0 is missing")
            phnum = _SHDR.unpack_from(f.data, shoff)[7]
        if phnum and phentsize != _PHDR.size:
            raise ImageError(f"{path}: bad program header size {phentsize}")
        if phoff + phnum * _PHDR.size > f.size:
            raise ImageError(f"{path}: program headers past the end of the file")
        loads: list[tuple[int, int, int, int]] = []  # (paddr, memsz, offset, filesz)
        for i in range(phnum):
            p_type, _pf, off, _vaddr, paddr, filesz, memsz, _al = _PHDR.unpack_from(
                f.data, phoff + i * _PHDR.size
            )
            if p_type == PT_LOAD:
                if filesz > memsz:
                    raise ImageError(f"{path}: PT_LOAD {i} has p_filesz > p_memsz")
                if off + filesz > f.size:
                    raise ImageError(
                        f"{path}: PT_LOAD {i} (paddr {paddr:#x}) is truncated: needs "
                        f"file bytes up to {off + filesz:#x}, file has {f.size:#x}"
                    )
                if paddr + memsz > 1 << 64:
                    raise ImageError(
                        f"{path}: PT_LOAD {i} (paddr {paddr:#x}, memsz {memsz:#x}) "
                        "runs past the end of the 64-bit physical address space"
                    )
                if memsz:
                    loads.append((paddr, memsz, off, filesz))
            elif p_type == PT_NOTE:
                if off + filesz > f.size:
                    raise ImageError(f"{path}: PT_NOTE is truncated")
                self._parse_notes(bytes(f.data[off : off + filesz]))
        loads.sort()
        for a, b in zip(loads, loads[1:]):
            if a[0] + a[1] > b[0]:
                raise ImageError(f"{path}: PT_LOAD segments overlap at {b[0]:#x}")
        self._loads = loads
        self._starts = [l[0] for l in loads]

    def _parse_notes(self, data: bytes) -> None:
        off = 0
        while off + _NHDR.size <= len(data):
            namesz, descsz, ntype = _NHDR.unpack_from(data, off)
            off += _NHDR.size
            name_end = off + _align4(namesz)
            desc_end = name_end + _align4(descsz)
            if name_end + descsz > len(data):
                raise ImageError(f"{self.path}: truncated ELF note")
            name = data[off : off + namesz].rstrip(b"\0").decode("ascii", "replace")
            desc = data[name_end : name_end + descsz]
            self.notes.append((name, ntype, desc))
            off = desc_end
            if name == "QEMU" and ntype == QEMU_NOTE_TYPE and "cr3" not in self.control_registers:
                self._qemu_state(desc)
            elif name == "X86PT" and ntype == X86PT_NOTE_TYPE:
                self._x86pt_state(desc)

    def _qemu_state(self, desc: bytes) -> None:
        if len(desc) < 8:
            raise ImageError(f"{self.path}: QEMU CPU-state note too short")
        _version, size = struct.unpack_from("<II", desc, 0)
        if size < QEMU_CPUSTATE_CR_OFFSET + 40 or len(desc) < QEMU_CPUSTATE_CR_OFFSET + 40:
            raise ImageError(f"{self.path}: QEMU CPU-state note too short ({len(desc)} bytes)")
        cr = struct.unpack_from("<5Q", desc, QEMU_CPUSTATE_CR_OFFSET)
        self.control_registers.update(cr0=cr[0], cr2=cr[2], cr3=cr[3], cr4=cr[4])
        self.control_registers["rip"], self.control_registers["rflags"] = struct.unpack_from(
            "<QQ", desc, 8 + 16 * 8
        )

    def _x86pt_state(self, desc: bytes) -> None:
        if len(desc) < _X86PT_NOTE.size:
            raise ImageError(f"{self.path}: X86PT note too short")
        _v, _s, efer, pkru, pkrs, m, vendor, prof = _X86PT_NOTE.unpack_from(desc)
        self.control_registers.update(efer=efer, pkru=pkru, pkrs=pkrs, maxphyaddr=m)
        self.profile_name = prof.rstrip(b"\0").decode("ascii", "replace") or None

    # -- reads -----------------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        return [Segment(p, p + m) for p, m, _, _ in self._loads]

    def _find(self, pa: int, n: int) -> tuple[int, int, int]:
        i = bisect.bisect_right(self._starts, pa) - 1
        if i >= 0:
            p, m, off, filesz = self._loads[i]
            if pa + n <= p + m:
                return p, off, filesz
        raise self._outside(pa, n)

    def read(self, pa: int, n: int) -> bytes:
        p, off, filesz = self._find(pa, n)
        rel = pa - p
        if rel + n <= filesz:
            return self.file.data[off + rel : off + rel + n]
        have = max(0, filesz - rel)
        return (self.file.data[off + rel : off + rel + have] if have else b"") + bytes(n - have)

    def table(self, pa: int) -> np.ndarray:
        pa &= ~0xFFF
        p, off, filesz = self._find(pa, PAGE)
        rel = pa - p
        if rel + PAGE <= filesz and (off + rel) % 8 == 0:
            return self.file.u64[(off + rel) // 8 : (off + rel) // 8 + 512]
        return np.frombuffer(self.read(pa, PAGE), dtype="<u8")

    def contains(self, pa: int, n: int = 1) -> bool:
        try:
            self._find(pa, n)
            return True
        except Exception:
            return False

    def gather_u64(self, pas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pas = np.asarray(pas, dtype=np.uint64)
        n = len(pas)
        if not self._loads:
            return np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=bool)
        starts = np.array([l[0] for l in self._loads], dtype=np.uint64)
        ends = np.array([l[0] + l[1] for l in self._loads], dtype=np.uint64)
        offs = np.array([l[2] for l in self._loads], dtype=np.uint64)
        fsz = np.array([l[3] for l in self._loads], dtype=np.uint64)
        i = np.searchsorted(starts, pas, side="right").astype(np.int64) - 1
        ic = np.maximum(i, 0)
        valid = (i >= 0) & (pas + np.uint64(8) <= ends[ic])
        rel = pas - starts[ic]
        infile = valid & (rel + np.uint64(8) <= fsz[ic])
        fo = offs[ic] + rel
        aligned = infile & (fo % np.uint64(8) == 0)
        vals = np.zeros(n, dtype=np.uint64)
        if aligned.any():
            vals[aligned] = self.file.u64[(fo[aligned] >> np.uint64(3)).astype(np.int64)]
        rest = np.nonzero(valid & ~aligned & (rel < fsz[ic]))[0]
        for k in rest.tolist():
            vals[k] = self.read_u64(int(pas[k]))
        return vals, valid

    def close(self) -> None:
        self.file.close()


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name0 = name + b"\0"
    return (
        _NHDR.pack(len(name0), len(desc), ntype)
        + name0.ljust(_align4(len(name0)), b"\0")
        + desc.ljust(_align4(len(desc)), b"\0")
    )


def qemu_cpustate(cr0: int, cr3: int, cr4: int, cr2: int = 0, rip: int = 0, rflags: int = 2) -> bytes:
    """A QEMUCPUState payload (version 1, size 440) with the given control registers."""
    gprs = bytes(16 * 8)
    body = (
        gprs
        + struct.pack("<QQ", rip, rflags)
        + bytes(10 * 24)
        + struct.pack("<5Q", cr0, 0, cr2, cr3, cr4)
        + struct.pack("<Q", 0)
    )
    return struct.pack("<II", 1, 8 + len(body)) + body


def write_elf_core(
    path: str,
    memory: MemoryBase,
    *,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    pkru: int = 0,
    pkrs: int = 0,
    maxphyaddr: int = 52,
    vendor: str = "intel",
    profile: str = "",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Write `memory` as an ELF core with the note layout QEMU uses, plus an X86PT note."""
    segs = memory.segments()
    prstatus = bytearray(336)
    struct.pack_into("<I", prstatus, 32, 1)  # pr_pid
    notes = (
        _note(b"CORE", NT_PRSTATUS, bytes(prstatus))
        + _note(b"QEMU", QEMU_NOTE_TYPE, qemu_cpustate(cr0, cr3, cr4))
        + _note(
            b"X86PT",
            X86PT_NOTE_TYPE,
            _X86PT_NOTE.pack(
                1,
                _X86PT_NOTE.size,
                efer,
                pkru,
                pkrs,
                maxphyaddr,
                1 if vendor == "amd" else 0,
                profile.encode()[:16],
            ),
        )
    )
    phnum = 1 + len(segs)
    if phnum >= PN_XNUM:
        raise ImageError(f"too many segments for one ELF core ({len(segs)})")
    off = _EHDR.size + phnum * _PHDR.size
    note_off = off
    data_off = (note_off + len(notes) + PAGE - 1) & ~(PAGE - 1)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    from x86pt.memory.atomic import atomic_writer  # tempfile: only when writing

    with atomic_writer(path, inputs=inputs) as f:
        f.write(
            _EHDR.pack(
                ident, ET_CORE, EM_X86_64, 1, 0, _EHDR.size, 0, 0, _EHDR.size, _PHDR.size, phnum, 0, 0, 0
            )
        )
        f.write(_PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(notes), len(notes), 0))
        cur = data_off
        for s in segs:
            f.write(_PHDR.pack(PT_LOAD, 0, cur, s.start, s.start, s.size, s.size, 0))
            cur += s.size
        f.write(notes)
        f.write(bytes(data_off - note_off - len(notes)))
        for s in segs:
            step = 1 << 24
            for a in range(s.start, s.end, step):
                f.write(memory.read(a, min(step, s.end - a)))
