"""A minimal reader of the kernel's BTF (.BTF section of vmlinux): struct member offsets.

The CPA probes read `struct cpa_data` fields by offset; the offsets
differ between kernel lines, so they come from the kernel's own type information. Format:
Documentation/bpf/btf.rst (header, type section of btf_type records with kind-specific tails,
string section).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from x86pt.errors import ImageError

BTF_MAGIC = 0xEB9F
KIND_STRUCT, KIND_UNION = 4, 5
# bytes that follow the 12-byte btf_type, per kind: fixed part and per-vlen part
_TAIL = {
    1: (4, 0),
    2: (0, 0),
    3: (12, 0),
    4: (0, 12),
    5: (0, 12),
    6: (0, 8),
    7: (0, 0),
    8: (0, 0),
    9: (0, 0),
    10: (0, 0),
    11: (0, 0),
    12: (0, 0),
    13: (0, 8),
    14: (4, 0),
    15: (0, 12),
    16: (0, 0),
    17: (4, 0),
    18: (0, 0),
    19: (0, 12),
}


@dataclass(frozen=True)
class Member:
    name: str
    bit_offset: int
    bitfield_size: int  # 0 when not a bitfield

    @property
    def byte_offset(self) -> int:
        return self.bit_offset // 8


def _section(elf: bytes, wanted: str) -> bytes:
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ImageError("vmlinux is not an ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sh = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    stroff = sh[shstrndx][4]
    for name, _t, _f, _a, off, size, *_ in sh:
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name : end].decode() == wanted:
            return elf[off : off + size]
    raise ImageError(f"vmlinux has no {wanted} section")


def struct_members(vmlinux: str, struct_name: str) -> dict[str, Member]:
    """Members of `struct struct_name` from vmlinux's BTF, by name."""
    with open(vmlinux, "rb") as f:
        btf = _section(f.read(), ".BTF")
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from("<HBBIIIII", btf)
    if magic != BTF_MAGIC:
        raise ImageError("bad BTF magic")
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name_at(off: int) -> str:
        return btf[strings + off : btf.index(b"\0", strings + off)].decode()

    pos = types
    while pos < types + type_len:
        name_off, info, _size = struct.unpack_from("<III", btf, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        fixed, per = _TAIL.get(kind, (None, None))
        if fixed is None:
            raise ImageError(f"unknown BTF kind {kind}")
        body = pos + 12
        if kind == KIND_STRUCT and name_off and name_at(name_off) == struct_name:
            out: dict[str, Member] = {}
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", btf, body + 12 * i)
                bits, size = (m_off & 0xFFFFFF, m_off >> 24) if kflag else (m_off, 0)
                out[name_at(m_name) if m_name else f"<anon{i}>"] = Member(
                    name_at(m_name) if m_name else "", bits, size
                )
            return out
        pos = body + fixed + per * vlen
    raise ImageError(f"struct {struct_name} not in BTF")
