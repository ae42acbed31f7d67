# SPDX-License-Identifier: GPL-2.0-or-later
"""The guest side of the unicorn oracle (harness/oracles/unicorn_oracle.py): the harness's
guest-physical layout, the hand-assembled instructions, and the probe program, one fixed
interpreter (`_interpreter`) fed a table of 64-byte records per chunk (`_assemble`, `_chunks`).
Nothing here touches unicorn: the engine that runs the program is harness/oracles/unicorn_engine.py.

* memory hooks see RIP synced at TB starts only, so every access instruction starts a TB;
* TCG translating code costs more than running it (docs/matrix-speed.md): the probes run on one
  fixed interpreter (a dispatcher and one stub per access kind, the VA in rbx, the write value in
  rdx, AC through popfq, all read from a table of 64-byte records), translated once per engine;
  the hooks read the probe's index from r12;
* a CR3 reload flushes the TLB before each stretch of probes and again before any probe whose
  page the stretch already touched, which gives every probe a fresh walk (the INVLPG-per-probe
  convention of base.py); a stretch of CPL3 probes is entered by IRETQ and ends in `hlt`;
* an implicit probe (Probe.implicit) writes an LDT descriptor based at its VA into the GDT, LLDT,
  then `mov es, eax` with LDT selector 4 (CPL0) or 7 (CPL3): QEMU 5.0's helper_load_seg reads the
  descriptor with the kernel MMU index (an implicit supervisor access), and the frame's qword is no
  valid descriptor, so a read that goes through ends in #GP(4), taken as "ok". LLDT is CPL0-only:
  a CPL3 implicit probe gets a stretch (an IRETQ) of its own.

Guest-physical layout of the harness, all below RIG_IMAGE_BASE and mapped through HARNESS_SLOT of
the caller's root table (in the engine's copy only):

    0x01000 GDT (+0x28: the LDT descriptor of implicit probes)   0x03000 harness PDPT   0x04000 harness PD   0x05000 PT (supervisor view)
    0x02000 harness PML4 (LA57 only)                          0x06000 PT (user view)
    0x08000-0x10000 kernel stack   0x10000-0x18000 user stack   0x18000 set-up stubs
    0x20000 results (one qword per probe of a chunk)   0x40000 the probe interpreter
    0x48000-0x200000 the chunk's records (_assemble)

The whole 2 MiB is mapped twice: supervisor at K_BASE (CPL0 code, stacks, results) and user at
U_BASE (CPL3 code, stack, results). The user view carries a protection key that the state's
PKRU leaves fully open, so the harness's own CPL3 stack and result stores never fault.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Sequence

from x86pt.oracle import RIG_IMAGE_BASE, Probe
from x86pt.state import RFLAGS_AC

# -- harness layout (guest-physical) -------------------------------------------------------------
H_GDT = 0x1000
H_PML4 = 0x2000
H_PDPT = 0x3000
H_PD = 0x4000
H_PT_K = 0x5000
H_PT_U = 0x6000
H_KSTACK_TOP = 0x10000
H_USTACK_TOP = 0x18000
H_STUB = 0x18000
H_RESULTS = 0x20000
H_CODE = 0x40000
H_END = RIG_IMAGE_BASE
CHUNK = (H_CODE - H_RESULTS) // 8  # probes per code chunk (one result qword each)

# PML5[511] PML4[511] PDPT[511] PD[0] / PD[1]: the same VA with 4 and 5 levels.
K_BASE = 0xFFFFFFFFC0000000
U_BASE = K_BASE + 0x200000

SEL_KCODE, SEL_KDATA, SEL_UDATA, SEL_UCODE = 0x08, 0x10, 0x1B, 0x23
# null, 64-bit code DPL0, data DPL0, data DPL3, 64-bit code DPL3; type bits with A already set,
# so loading a selector does not write the descriptor. Then a 16-byte LDT descriptor (selector
# 0x28) that the code of an implicit probe fills in (base = the probe's VA) before LLDT.
GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF, 0, 0)
SEL_LDT = 0x28
# An implicit probe loads ES with LDT entry 0 (TI=1; RPL 0 at CPL0, 3 at CPL3): the descriptor
# read is an implicit supervisor-mode read of the probe's qword (SDM Vol. 3A docs/oracles.md §2). The frames
# hold no valid descriptor (access byte 0, a system type), so a read that goes through ends in
# #GP(selector & ~3) = #GP(4) (SDM Vol. 2B MOV); that is the "ok" of an implicit probe.
SEL_IMPLICIT_K, SEL_IMPLICIT_U, IMPLICIT_GP_CODE = 0x4, 0x7, 0x4

_Q = struct.Struct("<Q")

# -- instruction encodings (hand-assembled; tests check them against capstone) -------------------
INSN = {
    "read": bytes.fromhex("488b03"),  # mov rax, qword ptr [rbx]
    "write": bytes.fromhex("488913"),  # mov qword ptr [rbx], rdx
    "fetch": bytes.fromhex("ffd3"),  # call rbx  (the target's 0xC3 returns)
}
_MOV_ES_EAX = bytes.fromhex("8ec0")  # mov es, eax (implicit probes)
_JMP_NEXT = bytes.fromhex("eb00")  # jmp $+2: ends the TB (pitfall P4)
_PUSHFQ, _POPFQ = b"\x9c", b"\x9d"
_OR_RSP_IMM = bytes.fromhex("48810c24")  # or qword ptr [rsp], imm32
_AND_RSP_IMM = bytes.fromhex("48812424")  # and qword ptr [rsp], imm32 (sign-extended)
_IRETQ = bytes.fromhex("48cf")
_RELOAD_CR3 = bytes.fromhex(
    "0f20d80f22d8"
)  # mov rax, cr3; mov cr3, rax: flushes the TLB (docs/oracles.md §2)
_INT3 = b"\xcc"
_HLT = b"\xf4"  # ends a CPL3 stretch: #GP(0) at CPL3, the hook goes back to CPL0


def _movabs(reg: str, imm: int) -> bytes:
    op = {"rax": b"\x48\xb8", "rcx": b"\x48\xb9", "rdx": b"\x48\xba", "rbx": b"\x48\xbb", "r15": b"\x49\xbf"}[
        reg
    ]
    return op + _Q.pack(imm & (2**64 - 1))


def ldt_descriptor(base: int) -> tuple[int, int]:
    """(low, high) qwords of a 64-bit LDT descriptor (SDM Vol. 3A docs/oracles.md §2 / Figure 8-4): type 2,
    present, limit 7 (one entry), the given base."""
    lo = 7 | (base & 0xFFFFFF) << 16 | 0x82 << 40 | ((base >> 24) & 0xFF) << 56
    return lo, (base >> 32) & 0xFFFFFFFF


def _ldt_setup(va: int) -> bytes:
    """CPL0 code: write the LDT descriptor (base va) into the GDT, then lldt."""
    lo, hi = ldt_descriptor(va)
    return (
        _movabs("rcx", K_BASE + H_GDT + SEL_LDT)
        + _movabs("rax", lo)
        + bytes.fromhex("488901")
        + _movabs("rax", hi)
        + bytes.fromhex("48894108")
        + b"\xb8"
        + struct.pack("<I", SEL_LDT)
        + bytes.fromhex("0f00d0")
    )  # mov eax; lldt ax


def _wrpkru(value: int) -> bytes:
    """mov eax, imm32; xor ecx, ecx; xor edx, edx; wrpkru"""
    return b"\xb8" + struct.pack("<I", value) + bytes.fromhex("31c931d20f01ef")


# -- the generated program -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Segment:
    begin: int  # VA where emu_start begins (CPL0)
    until: int  # VA where it must end
    parts: tuple[tuple[int, int, int], ...]  # (phys start, phys end, VA base) for listings
    has_fetch: bool


@dataclass(frozen=True)
class _Program:
    first: int  # index of the chunk's first probe in the batch
    probes: tuple[Probe, ...]
    code: bytes  # placed at H_CODE
    segments: tuple[_Segment, ...]
    access_at: dict[int, int]  # VA of the access instruction -> probe index
    ret_at: dict[int, int]  # return address of a fetch probe's call -> index
    resume: tuple[int, ...]  # VA where probe i's block continues after a fault
    # (VA of the next access, its rbx[, its rdx]) when probe i's tail only loads rbx (and rdx, for
    # a write): a fault then resumes on that TB start directly, the hook loading the registers,
    # instead of translating the tail as a new TB (~2x faster faults).
    skip: tuple[tuple[int, ...] | None, ...]
    block_at: tuple[tuple[int, int], ...]  # (phys start of its set-up, index), for listings
    # VA of the `hlt` ending a CPL3 stretch (user view) -> VA where CPL0 code goes on (kernel view)
    back_at: dict[int, int] = field(default_factory=dict)
    table: bool = False  # the interpreter's records (the probe index in r12), not straight-line code


def _pages(p: Probe) -> tuple[int, int]:
    """The 4 KiB linear pages an access touches (QEMU's TLB is 4K-granular even for large pages)."""
    last = p.va + (0 if p.access == "fetch" else 7)
    return p.va >> 12, (last & (2**64 - 1)) >> 12


def _stretches(probes: Sequence[Probe]) -> list[tuple[int, int, set[int]]]:
    """Split probes into stretches (start, end, flush-before indexes): same CPL, and for CPL3 no
    page touched twice (a CPL3 stretch can only be flushed from CPL0, before its IRETQ). A CPL0
    stretch flushes again in line before a probe whose page it already touched."""
    out = []
    i, n = 0, len(probes)
    while i < n:
        user = probes[i].user
        seen: set[int] = set()
        flush_at: set[int] = set()
        j = i
        while j < n and probes[j].user == user:
            if user and j > i and (probes[j].implicit or probes[j - 1].implicit):
                break  # a CPL3 implicit probe needs its own LLDT, made at CPL0
            lo, hi = _pages(probes[j])
            if lo in seen or hi in seen:
                if user:
                    break
                flush_at.add(j)
                seen = set()
            seen.add(lo)
            seen.add(hi)
            j += 1
        out.append((i, j, flush_at))
        i = j
    return out


_M64 = 2**64 - 1

# -- the probe interpreter ---------------------------------------------------------------------
# One fixed piece of code at H_CODE runs every probe of every chunk: a dispatcher reads the next
# 64-byte record of the chunk's table (r14) into registers and jumps to the stub of the record's
# kind; the stub's first instruction is the access (so it starts a TB) and it jumps back. The
# code's bytes never depend on a probe, so TCG translates each stub once per engine (per CPL,
# AC) instead of one TB per probe (docs/matrix-speed.md). Record fields (qwords):
#   0 va (rbx)  1 write value (rdx)  2 RFLAGS (popfq: AC)  3 entry  4 rcx (a stub's next jump)
#   5 probe index in the chunk (r12: the hooks read it; a read stores at r15 + 8 * r12)
#   6, 7 the LDT descriptor of an implicit probe
REC = 64
H_TABLE = 0x48000  # the chunk's records, up to H_END
_DELTA = U_BASE - K_BASE


def _interpreter() -> tuple[bytes, dict[str, int]]:
    """The interpreter's code (placed at H_CODE) and its entry points' offsets from H_CODE."""
    code = bytearray()
    at: dict[str, int] = {}
    jumps: list[int] = []  # offsets of `jmp D` rel32 fields

    def label(name: str) -> None:
        at[name] = len(code)

    def jmp_d() -> None:
        code.extend(b"\xe9")
        jumps.append(len(code))
        code.extend(b"\0\0\0\0")

    label("D")  # rbx, rdx, RFLAGS, rcx, r12 from the record; on to its entry
    code += bytes.fromhex("498b1e 498b5608 41ff7610 9d 498b4e20 4d8b6628 498b4618 4983c640 ffe0")
    label("read")
    code += INSN["read"] + bytes.fromhex("4b8904e7")  # mov [r15 + r12*8], rax
    jmp_d()
    label("write")
    code += INSN["write"]
    jmp_d()
    label("fetch")
    code += INSN["fetch"]
    label("fetch_ret")
    jmp_d()
    label("implicit")
    code += _MOV_ES_EAX
    jmp_d()
    label("implicit_u")  # CPL3: the selector, then the access as its own TB
    code += b"\xb8" + struct.pack("<I", SEL_IMPLICIT_U) + bytes.fromhex("ffe1")
    label("ldt")  # CPL0: the LDT descriptor (fields 6, 7) into the GDT, lldt, then rcx
    code += _movabs("rax", K_BASE + H_GDT + SEL_LDT)
    code += bytes.fromhex("498b76f0 488930 498b76f8 48897008")
    code += b"\xb8" + struct.pack("<I", SEL_LDT) + bytes.fromhex("0f00d0")
    code += b"\xb8" + struct.pack("<I", SEL_IMPLICIT_K) + bytes.fromhex("ffe1")
    label("flush")  # a CR3 reload (the TLB), then rcx
    code += _RELOAD_CR3 + bytes.fromhex("ffe1")
    label("to3")  # IRETQ to the user view of rcx, r14/r15 moved to the user view
    code += b"\x6a" + bytes([SEL_UDATA]) + _movabs("rax", U_BASE + H_USTACK_TOP) + b"\x50"
    code += b"\x6a\x02\x6a" + bytes([SEL_UCODE])
    code += _movabs("rax", _DELTA) + bytes.fromhex("4901c6 4901c7 4801c8 50") + _IRETQ
    label("hlt")  # (user view) back to CPL0 through the hook
    code += _HLT
    label("end")  # emu_start's `until`
    code += _INT3
    for j in jumps:
        code[j : j + 4] = struct.pack("<i", at["D"] - (j + 4))
    return bytes(code), at


_INTERP, _AT = _interpreter()
_K = {k: K_BASE + H_CODE + off for k, off in _AT.items()}  # kernel-view addresses
_U = {k: U_BASE + H_CODE + off for k, off in _AT.items()}  # user-view addresses
# rip of an access -> -1: the probe index is in r12 (a hand-made _Program maps rip -> index)
_ACCESS_AT = {v[k]: -1 for v in (_K, _U) for k in ("read", "write", "fetch", "implicit")}
_RET_AT = {_K["fetch_ret"]: -1, _U["fetch_ret"]: -1}
_BACK_AT = {_U["hlt"]: _K["D"]}
# the control records: a CR3 reload and the IRETQ to CPL3 (both on at the CPL0 dispatcher),
# the `hlt` back to CPL0, the end
_CTL = {
    name: struct.pack("<8Q", 0, 0, 0x2, entry, rcx, 0, 0, 0)
    for name, entry, rcx in (
        ("flush", _K["flush"], _K["D"]),
        ("to3", _K["to3"], _K["D"]),
        ("hlt", _U["hlt"], 0),
        ("end", _K["end"], 0),
    )
}
# where the interpreter goes on after a fault at an access (or a fetch returning to fetch_ret)
_RESUME = {v[k]: v["D"] for v in (_K, _U) for k in ("read", "write", "fetch", "implicit", "fetch_ret")}


def _assemble(probes: Sequence[Probe], first: int = 0) -> _Program:
    """The chunk's record table for the interpreter (code: the interpreter, padded to H_TABLE,
    then the records).

    Each probe is one record; control records (a CR3 reload, the LDT set-up of a CPL3 implicit
    probe, the IRETQ to CPL3, the `hlt` back, the end) sit between them. The TLB is flushed by a
    CR3 reload at the start of each stretch and before any probe whose page the stretch already
    touched, so every probe walks from CR3 (base.py convention). A CPL3 stretch is entered with
    IRETQ from CPL0 and left by `hlt` (#GP at CPL3), which the hook turns back into CPL0.
    """
    recs = bytearray()
    pack = struct.Struct("<8Q").pack
    blocks: list[tuple[int, int]] = []
    has_fetch = False

    flush_rec, to3_rec = _CTL["flush"], _CTL["to3"]
    for start, end, flush in _stretches(probes):
        user = probes[start].user
        v = _U if user else _K
        if user:
            if probes[start].implicit:
                lo, hi = ldt_descriptor(probes[start].va)
                recs.extend(pack(0, 0, 0x2, _K["ldt"], _K["D"], 0, lo, hi))
            recs += flush_rec
            recs += to3_rec
        else:
            recs += flush_rec
        for i in range(start, end):
            p = probes[i]
            if i in flush:
                recs += flush_rec
            blocks.append((H_TABLE + len(recs), first + i))
            fl = 0x2 | (RFLAGS_AC if p.ac else 0)
            lo = hi = 0
            if p.implicit:
                if user:
                    entry, rcx = v["implicit_u"], v["implicit"]
                else:
                    entry, rcx = v["ldt"], v["implicit"]
                    lo, hi = ldt_descriptor(p.va)
            else:
                entry, rcx = v[p.access], 0
                has_fetch = has_fetch or p.access == "fetch"
            recs.extend(pack(p.va & _M64, p.wvalue & _M64, fl, entry, rcx, i, lo, hi))
        if user:
            recs += _CTL["hlt"]
    recs += _CTL["end"]
    if H_TABLE + len(recs) > H_END:
        raise _TooBig(len(recs))
    code = _INTERP + bytes(H_TABLE - H_CODE - len(_INTERP)) + bytes(recs)
    seg = _Segment(_K["D"], _K["end"], ((H_CODE, H_CODE + len(_INTERP), K_BASE),), has_fetch)
    return _Program(
        first,
        tuple(probes),
        code,
        (seg,),
        _ACCESS_AT,
        _RET_AT,
        (),
        (),
        tuple(blocks),
        _BACK_AT,
        table=True,
    )


class _TooBig(Exception):
    pass


def _chunks(probes: Sequence[Probe]) -> list[_Program]:
    """Split a batch so each chunk's results and code fit the harness; a chunk of CPL3 probes that
    each need their own segment can outgrow the code area, and is then halved."""
    out = []
    start = 0
    while start < len(probes):
        k = CHUNK
        while True:
            try:
                prog = _assemble(probes[start : start + k], start)
                break
            except _TooBig:
                k //= 2
        out.append(prog)
        start += len(prog.probes)
    return out
