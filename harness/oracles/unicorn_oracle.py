"""The unicorn backend of the comparison rig: real IA-32e walks from CR3 inside an in-process
unicorn 2.1.4 engine (QEMU 5.0's x86 MMU), many probes per `emu_start`.

Facts this file relies on were measured on this machine (docs/oracles.md docs/oracles.md §2):
* mem_map / mem_read / memory hooks use guest-physical addresses once paging is on (docs/oracles.md §2);
* exceptions never reach a guest IDT, they reach UC_HOOK_INTR; the #PF error code only lives in
  the saved context blob (CPUX86State.error_code, byte 5424 in 2.1.4), and `old_exception` must be
  reset after every fault or the next one becomes #DF and then a silent stop (docs/oracles.md §2, P2);
* CPL3 is only reachable through a guest IRETQ (docs/oracles.md §2), and the guest has no way back (no IDT
  is ever used); so a stretch of CPL3 probes ends in `hlt`, whose #GP(0) (privileged at CPL3)
  reaches UC_HOOK_INTR, and the hook restores the saved CPL0 context and resumes at the CPL0 code after the stretch: one
  `emu_start` per chunk however the probes alternate between CPL0 and CPL3;
* `context_restore` and `mem_write` do not flush the TLB (docs/oracles.md §2): a CR3 reload flushes it before
  each stretch of probes and again before any probe whose page the stretch already touched, which
  gives every probe a fresh walk (the INVLPG-per-probe convention of base.py);
* memory hooks see RIP synced at TB starts only, so every access instruction starts a TB;
* TCG translating code costs more than running it (docs/matrix-speed.md): the probes run on one
  fixed interpreter (a dispatcher and one stub per access kind, the VA in rbx, the write value in
  rdx, AC through popfq, all read from a table of 64-byte records), translated once per engine;
  the hooks read the probe's index from r12;
* a fetch fault from `call rbx` leaves the return address pushed (P5);
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

import ctypes
import dataclasses
import functools
import struct
import time
from dataclasses import dataclass, field
from typing import Sequence

from x86pt.oracle import (
    HARNESS_SLOT,
    RIG_IMAGE_BASE,
    RIG_RAM_SIZE,
    BatchResult,
    Capabilities,
    Probe,
    ProbeResult,
    tag_value,
)
from harness.oracles.base import implicit_support, made_result
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.base import PAGE
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    RFLAGS_AC,
    PagingState,
)
from x86pt.fields import BIT_A as _PTE_A, BIT_D as _PTE_D, BIT_P as _PTE_P, BIT_RW as _PTE_RW
from x86pt.fields import BIT_US as _PTE_US

try:  # the rig imports this module even where unicorn is missing; run() then says why
    import unicorn as _uc
    from unicorn.unicorn_py3 import unicorn as _ucpy
    from unicorn import x86_const as _x86

    _IMPORT_ERROR = ""
except ImportError as e:  # pragma: no cover - depends on the machine
    _uc = _ucpy = _x86 = None
    _IMPORT_ERROR = f"unicorn is not installed ({e})"

PINNED_VERSION = (2, 1, 4)
# bytes(UcContext) offset of CPUX86State.error_code for unicorn 2.1.4 x86-64: the 48-byte
# uc_context header + offsetof(CPUX86State, error_code) (docs/oracles.md docs/oracles.md §2). The
# self-test re-checks it; old_exception sits 112 bytes further.
ERROR_CODE_OFFSET = 5424
OLD_EXCEPTION_OFFSET = ERROR_CODE_OFFSET + 112

MODELS = ("icelake", "haswell")

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
MSR_EFER = 0xC0000080

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


def _version_of_lib() -> tuple[int, int, int]:
    combined = _uc.uc_version()[2]
    return (combined >> 24) & 0xFF, (combined >> 16) & 0xFF, (combined >> 8) & 0xFF


def check_version() -> str:
    """'' when unicorn 2.1.4 is importable (binding and library), else why not."""
    if _uc is None:
        return _IMPORT_ERROR
    bind = tuple(int(x) for x in _uc.__version__.split(".")[:3])
    lib = _version_of_lib()
    if bind != PINNED_VERSION or lib != PINNED_VERSION:
        return (
            f"unicorn {'.'.join(map(str, lib))} (binding {_uc.__version__}) found; this backend "
            f"reads the #PF error code at a context offset only verified for "
            f"{'.'.join(map(str, PINNED_VERSION))}"
        )
    return ""


def available() -> tuple[bool, str]:
    """(usable, reason) for tests' need_oracle()."""
    why = check_version()
    return not why, why


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


# -- engine --------------------------------------------------------------------------------------
@dataclass
class _Fault:
    vector: int
    error_code: int
    cr2: int | None
    old_exception: int
    detail: str = ""


class _Raw:
    """Direct libunicorn calls for the hook hot paths: the binding's reg_read costs ~6 us (a
    register-class lookup per call); these cost well under 1 us. Holds the handle, not the Uc, so
    hooks built on it form no reference cycle with the engine."""

    def __init__(self, uc) -> None:
        self.lib = _ucpy.uclib
        self.uch = uc._uch
        self.buf = ctypes.c_uint64()
        self.addr = ctypes.addressof(self.buf)
        self.mbuf = ctypes.create_string_buffer(8)
        self._read, self._write = self.lib.uc_reg_read, self.lib.uc_reg_write
        self.ctx_save, self.ctx_restore = self.lib.uc_context_save, self.lib.uc_context_restore
        self._batch: tuple | None = None

    def fault_regs(self) -> tuple[int, int, int]:
        """(RIP, R12, CR2) in one uc_reg_read_batch call (what the hooks read first)."""
        if self._batch is None:
            regs = (ctypes.c_int * 3)(_x86.UC_X86_REG_RIP, _x86.UC_X86_REG_R12, _x86.UC_X86_REG_CR2)
            bufs = (ctypes.c_uint64 * 3)()
            ptrs = (ctypes.c_void_p * 3)(*(ctypes.addressof(bufs) + 8 * k for k in range(3)))
            self._batch = (regs, ptrs, bufs)
        regs, ptrs, bufs = self._batch
        self.lib.uc_reg_read_batch(self.uch, regs, ptrs, 3)
        return bufs[0], bufs[1], bufs[2]

    def reg(self, reg: int) -> int:
        self._read(self.uch, reg, self.addr)
        return self.buf.value

    def set_reg(self, reg: int, value: int) -> None:
        self.buf.value = value & (2**64 - 1)
        self._write(self.uch, reg, self.addr)

    def u64(self, pa: int) -> int:
        if self.lib.uc_mem_read(self.uch, pa, self.mbuf, 8) != 0:
            raise OracleError(f"cannot read harness memory at {pa:#x}")
        return _Q.unpack(self.mbuf.raw)[0]

    def stop(self) -> None:
        self.lib.uc_emu_stop(self.uch)


@dataclass
class _Scratch:
    """What the hooks fill in. It never references the engine."""

    ctx: object
    ec: ctypes.c_int32
    old: ctypes.c_int32
    prog: _Program | None = None
    faults: dict[int, _Fault] = field(default_factory=dict)
    pa: dict[int, int] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)
    stray: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    error: BaseException | None = None
    last_cr2: int = 0
    ram_size: int = RIG_RAM_SIZE
    ctx_k: object = None  # the saved CPL0 context a CPL3 stretch's hlt goes back to


def _harness_pa(va: int) -> int:
    if K_BASE <= va < U_BASE + H_END:
        return (va - K_BASE) % H_END
    raise OracleError(f"stack pointer {va:#x} is outside the harness")


def _on_intr(raw: _Raw, st: _Scratch, intno: int) -> None:
    x = _x86
    rip, r12, cr2_now = raw.fault_regs()
    prog = st.prog
    if intno == 13 and prog is not None and rip in prog.back_at and st.ctx_k is not None:
        # the end of a CPL3 stretch: the CPL0 context as run_segment starts it (kernel stack,
        # AC=0, CR2 and old_exception as saved), then on at the CPL0 code after the hlt, the
        # interpreter's record pointer kept (in the kernel view)
        r14 = raw.reg(x.UC_X86_REG_R14)
        raw.ctx_restore(raw.uch, st.ctx_k.context)
        st.last_cr2 = raw.reg(x.UC_X86_REG_CR2)
        if prog.table:
            raw.set_reg(x.UC_X86_REG_R14, r14 - _DELTA)
            raw.set_reg(x.UC_X86_REG_R15, K_BASE + H_RESULTS)
        raw.set_reg(x.UC_X86_REG_RIP, prog.back_at[rip])
        return
    ctx = st.ctx.context
    raw.ctx_save(raw.uch, ctx)
    code = st.ec.value & 0xFFFFFFFF
    old = st.old.value
    # Pitfall P1: unicorn never delivers the exception, so QEMU's double-fault tracking must be
    # reset by hand, else the next #PF becomes #DF and the one after a silent triple-fault stop.
    st.old.value = -1
    raw.ctx_restore(raw.uch, ctx)
    if prog is None:
        raise OracleError(f"vector {intno} (error code {code:#x}) at rip {rip:#x} during the harness set-up")
    if intno == 8:
        raise OracleError("unicorn raised #DF: old_exception was not reset (context layout changed?)")
    i = prog.access_at.get(rip)
    if i is not None and i < 0:
        i = prog.first + r12
    pop = False
    if i is not None and prog.probes[i - prog.first].access == "fetch" and intno != 13:
        raise OracleError(
            f"fault {intno} on the harness's call for probe #{i} (its CPL3 stack push?): error code {code:#x}"
        )
    ret = None
    if i is None:
        rsp = raw.reg(x.UC_X86_REG_RSP)
        ret = raw.u64(_harness_pa(rsp))
        i = prog.ret_at.get(ret)
        if i is not None and i < 0:
            i = prog.first + r12
        if i is None or (prog.probes[i - prog.first].va != rip):
            where = (
                ""
                if i is None
                else f" (after the call of probe #{i}, va {prog.probes[i - prog.first].va:#x})"
            )
            raise OracleError(
                f"vector {intno} error code {code:#x} at rip {rip:#x}{where}: not a "
                "probe access; a fetch target must hold 0xC3 (ret)"
            )
        pop = True  # pitfall P5: the call pushed its return address before the fetch faulted
    detail = ""
    cr2: int | None = cr2_now
    if intno == 14:
        st.last_cr2 = cr2_now
    elif intno == 13:
        if cr2 != st.last_cr2:
            detail = "CR2 written by #GP"
            st.last_cr2 = cr2
        else:
            cr2 = None
    else:
        raise OracleError(
            f"probe #{i} va {prog.probes[i - prog.first].va:#x}: unexpected vector "
            f"{intno} (error code {code:#x}) at rip {rip:#x}"
        )
    if i in st.faults:
        raise OracleError(f"probe #{i} faulted twice (rip {rip:#x})")
    st.faults[i] = _Fault(intno, code, cr2, old, detail)
    if pop:
        raw.set_reg(x.UC_X86_REG_RSP, raw.reg(x.UC_X86_REG_RSP) + 8)
    if prog.table:  # back to the dispatcher (of the view the access ran in)
        raw.set_reg(x.UC_X86_REG_RIP, _RESUME[ret if pop else rip])
        return
    fast = prog.skip[i - prog.first]
    if fast is None:
        raw.set_reg(x.UC_X86_REG_RIP, prog.resume[i - prog.first])
    else:
        raw.set_reg(x.UC_X86_REG_RBX, fast[1])
        if len(fast) == 3:
            raw.set_reg(x.UC_X86_REG_RDX, fast[2])
        raw.set_reg(x.UC_X86_REG_RIP, fast[0])


def _on_mem(raw: _Raw, st: _Scratch, access: int, address: int, size: int) -> None:
    if access == _uc.UC_MEM_WRITE:
        st.written.add(address >> 12)
        st.written.add((address + size - 1) >> 12)
    if st.prog is None:
        return
    rip, r12, _ = raw.fault_regs()
    i = st.prog.access_at.get(rip)
    if i is None:
        st.stray.append(f"access to {address:#x} from rip {rip:#x}")
        return
    if i < 0:
        i = st.prog.first + r12
    if i not in st.pa:
        st.pa[i] = address


def _on_unmapped(raw: _Raw, st: _Scratch, address: int) -> None:
    rip = raw.reg(_x86.UC_X86_REG_RIP)
    i = st.prog.access_at.get(rip) if st.prog else None
    what = f"probe #{i}" if i is not None else f"rip {rip:#x}"
    st.unmapped.append(
        f"{what} reached unbacked physical address {address:#x} (RAM ends at {st.ram_size:#x})"
    )


def _guarded(raw: _Raw, st: _Scratch, fn, *args):
    """ctypes prints and drops exceptions raised in callbacks: keep the first and stop the run."""
    try:
        fn(raw, st, *args)
    except BaseException as e:  # noqa: BLE001 - re-raised by _Engine.run_segment
        if st.error is None:
            st.error = e
        raw.stop()


def _intr_hook(raw: _Raw, st: _Scratch):
    """The UC_HOOK_INTR callback: _on_intr, guarded as _guarded does (one frame less per fault)."""

    def cb(h, intno, user):
        try:
            _on_intr(raw, st, intno)
        except BaseException as e:  # noqa: BLE001 - re-raised by _Engine.run_segment
            if st.error is None:
                st.error = e
            raw.stop()

    return cb


class _Engine:
    """One unicorn instance set up for one image and state. Hooks are registered on the raw
    library with callbacks that only see `_Raw` and `_Scratch`, so nothing cycles back to the Uc
    and dropping it frees the engine at once (a dead engine kept alive until the GC makes the next
    one ~7 ms to create, measured)."""

    def __init__(self, model: str, ram_size: int) -> None:
        cpu = {"icelake": _x86.UC_CPU_X86_ICELAKE_SERVER, "haswell": _x86.UC_CPU_X86_HASWELL}[model]
        uc = _uc.Uc(_uc.UC_ARCH_X86, _uc.UC_MODE_64)
        # P6: the model must be chosen before anything initialises the engine.
        uc.ctl_set_cpu_model(cpu)
        uc.ctl_set_tlb_mode(_uc.UC_TLB_CPU)
        if hasattr(uc, "ctl_set_tcg_buffer_size"):
            uc.ctl_set_tcg_buffer_size(
                8 << 20
            )  # 1 ms engines instead of 5 (docs/oracles.md docs/oracles.md §2)
        uc.mem_map(0, ram_size, _uc.UC_PROT_ALL)
        self.uc = uc
        ctx = uc.context_save()
        base = ctx.context.value
        self.st = st = _Scratch(
            ctx,
            ctypes.c_int32.from_address(base + ERROR_CODE_OFFSET),
            ctypes.c_int32.from_address(base + OLD_EXCEPTION_OFFSET),
            ram_size=ram_size,
        )
        self.raw = raw = _Raw(uc)
        self._cbs = (
            (_uc.UC_HOOK_INTR, 1, 0, _ucpy.HOOK_INTR_CFUNC(_intr_hook(raw, st))),
            (
                _uc.UC_HOOK_MEM_READ | _uc.UC_HOOK_MEM_WRITE,
                RIG_IMAGE_BASE,
                ram_size - 1,
                _ucpy.HOOK_MEM_ACCESS_CFUNC(
                    lambda h, acc, addr, size, value, user: _guarded(raw, st, _on_mem, acc, addr, size)
                ),
            ),
            (
                _uc.UC_HOOK_MEM_UNMAPPED,
                1,
                0,
                _ucpy.HOOK_MEM_INVALID_CFUNC(
                    lambda h, acc, addr, size, value, user: (_guarded(raw, st, _on_unmapped, addr), False)[1]
                ),
            ),
        )
        self.hooks = []
        for htype, begin, end, cb in self._cbs:
            handle = _ucpy.uc_hook_h()
            if (
                raw.lib.uc_hook_add(
                    raw.uch,
                    ctypes.byref(handle),
                    htype,
                    cb,
                    None,
                    ctypes.c_uint64(begin),
                    ctypes.c_uint64(end),
                )
                != 0
            ):
                raise OracleError(f"uc_hook_add({htype}) failed")
            self.hooks.append(handle)
        self.ctx_k = None
        self.interp = False  # the interpreter's code is at H_CODE (translations kept)

    def flush_tlb(self) -> None:
        # The binding has no TLB-flush wrapper (docs/oracles.md docs/oracles.md §2); ctl_flush_tb is the TB cache only.
        self.uc.ctl(_uc.UC_CTL_TLB_FLUSH, _uc.UC_CTL_IO_WRITE)

    def close(self) -> None:
        if self.uc is None:
            return
        for handle in self.hooks:
            self.raw.lib.uc_hook_del(self.raw.uch, handle)
        self.hooks = []
        self._cbs = ()
        self.ctx_k = None
        self.st.prog = None
        self.st.ctx_k = None
        self.uc = None

    def emu(self, begin: int, until: int, timeout: int = 0) -> None:
        st = self.st
        st.error = None
        try:
            self.uc.emu_start(begin, until, timeout=timeout)
        except _uc.UcError as e:
            why = "; ".join(st.unmapped) or f"{e} at rip {self.raw.reg(_x86.UC_X86_REG_RIP):#x}"
            if st.error is None:
                raise OracleError(f"unicorn stopped: {why}") from None
        if st.error is not None:
            err, st.error = st.error, None
            raise err
        rip = self.raw.reg(_x86.UC_X86_REG_RIP)
        if rip != until:
            # P1: a triple fault stops emu_start silently; so does a timeout.
            raise OracleError(
                f"unicorn stopped at rip {rip:#x}, not at {until:#x} (silent triple fault or timeout)"
            )

    def run_segment(self, seg: _Segment, n_probes: int, table: bool = False) -> None:
        self.uc.context_restore(self.ctx_k)
        if table:  # the interpreter's record pointer and results, kernel view
            self.raw.set_reg(_x86.UC_X86_REG_R14, K_BASE + H_TABLE)
            self.raw.set_reg(_x86.UC_X86_REG_R15, K_BASE + H_RESULTS)
        self.flush_tlb()
        # CR2 came back with the context: a #GP is said to write CR2 only if it changes it.
        self.st.last_cr2 = self.raw.reg(_x86.UC_X86_REG_CR2)
        # A timer thread costs ~170 us per emu_start; only caller-controlled code (fetch targets)
        # can loop, so only segments with fetches get one.
        self.emu(seg.begin, seg.until, (2_000_000 + 100 * n_probes) if seg.has_fetch else 0)


def _check_image(memory: SparseMemory, ram_size: int) -> None:
    if not isinstance(memory, SparseMemory):
        raise BadInputError(f"the unicorn oracle takes a SparseMemory image, not {type(memory).__name__}")
    for pn in memory.pages:
        pa = pn * PAGE
        if not RIG_IMAGE_BASE <= pa < ram_size:
            raise BadInputError(
                f"image page {pa:#x} is outside the rig's image region [{RIG_IMAGE_BASE:#x}, {ram_size:#x})"
            )


@functools.lru_cache(maxsize=32)
def _harness_pt(flags: int) -> bytes:
    """A PT mapping the harness's 2 MiB (PA 0..H_END) with `flags` (immutable: safe to cache)."""
    return b"".join(_Q.pack((k << 12) | flags) for k in range(512))


def _runs(pages) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs, so engine memory moves in few large calls."""
    out: list[tuple[int, int]] = []
    for pn in sorted(pages):
        if out and out[-1][0] + out[-1][1] == pn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pn, 1))
    return out


def _harness_tables(state: PagingState, user_key: int) -> list[tuple[int, bytes]]:
    """(pa, bytes) writes that install the harness, and its slot in the caller's root."""
    table = _PTE_P | _PTE_RW | _PTE_US | _PTE_A
    writes: list[tuple[int, bytes]] = []
    writes.append((H_GDT, b"".join(_Q.pack(d) for d in GDT)))
    root_slot = state.root + 8 * HARNESS_SLOT
    if state.la57:
        writes.append((root_slot, _Q.pack(H_PML4 | table)))
        writes.append((H_PML4 + 8 * HARNESS_SLOT, _Q.pack(H_PDPT | table)))
    else:
        writes.append((root_slot, _Q.pack(H_PDPT | table)))
    writes.append((H_PDPT + 8 * 511, _Q.pack(H_PD | table)))
    writes.append((H_PD, _Q.pack(H_PT_K | table) + _Q.pack(H_PT_U | table)))
    kflags = _PTE_P | _PTE_RW | _PTE_A | _PTE_D
    writes.append((H_PT_K, _harness_pt(kflags)))
    writes.append((H_PT_U, _harness_pt(kflags | _PTE_US | (user_key << 59))))
    return writes


def _free_pkey(state: PagingState) -> int | None:
    """A protection key whose PKRU AD and WD bits are both clear (SDM docs/oracles.md §2), for the harness's
    user pages; None when PKRU closes every key."""
    if not state.pke:
        return 0
    for k in range(16):
        if not (state.pkru >> (2 * k)) & 3:
            return k
    return None


# -- the oracle ----------------------------------------------------------------------------------
class UnicornOracle:
    """Oracle protocol backend (x86pt/oracle.py) on unicorn 2.1.4."""

    available = staticmethod(available)

    name = "unicorn"
    profile = "unicorn"

    def __init__(
        self, model: str = "icelake", ram_size: int = RIG_RAM_SIZE, *, self_test: bool = True
    ) -> None:
        why = check_version()
        if why:
            raise OracleUnavailable(why)
        if model not in MODELS:
            raise BadInputError(f"unicorn CPU model must be one of {', '.join(MODELS)}, not {model!r}")
        if ram_size % PAGE or not RIG_IMAGE_BASE < ram_size <= (1 << 32):
            raise BadInputError(f"bad ram_size {ram_size:#x}")
        self.model = model
        self.ram_size = ram_size
        if self_test:
            _self_test(model)

    # context manager / Oracle protocol -----------------------------------------------------------
    def __enter__(self) -> "UnicornOracle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing persists between runs: every run() has its own engine, freed before it returns."""

    @property
    def version(self) -> str:
        model = "UC_CPU_X86_ICELAKE_SERVER" if self.model == "icelake" else "UC_CPU_X86_HASWELL"
        return f"unicorn {_uc.__version__} {model}"

    def capabilities(self) -> Capabilities:
        return _discover(self.model)

    @staticmethod
    def instruction_bytes(probe: Probe) -> bytes:
        """The access instruction a probe runs (its VA is in rbx; a write's value in rdx)."""
        return INSN[probe.access]

    def listing(self, probes: Sequence[Probe]) -> str:
        """The probe interpreter, disassembled by capstone, then each chunk's records: a probe's
        as the register loads the dispatcher makes for it (disassembled) and the stub it runs."""
        import capstone

        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        names = {off: name for name, off in _AT.items()}
        by_addr = {a: f"{n} (CPL0 view)" for n, a in _K.items()} | {
            a: f"{n} (CPL3 view)" for n, a in _U.items()
        }
        lines = [f"; the interpreter at {K_BASE + H_CODE:#x} (CPL0 view), {U_BASE + H_CODE:#x} (CPL3 view)"]
        for addr, size, mnem, ops in md.disasm_lite(_INTERP, K_BASE + H_CODE):
            off = addr - K_BASE - H_CODE
            if off in names:
                lines.append(f"; {names[off]}:")
            raw = _INTERP[off : off + size].hex()
            lines.append(f"{addr:016x}  {raw:<22} {mnem} {ops}".rstrip())
        rec = struct.Struct("<8Q")
        for prog in _chunks(list(probes)):
            seg = prog.segments[0]
            lines.append(f"; chunk @{prog.first}: emu_start({seg.begin:#x}, {seg.until:#x}), records:")
            starts = dict(prog.block_at)
            for off in range(H_TABLE - H_CODE, len(prog.code), REC):
                va, wv, fl, entry, rcx, k, _, _ = rec.unpack_from(prog.code, off)
                i = starts.get(H_CODE + off)
                if i is None:
                    nxt = f", then {by_addr[rcx]}" if rcx in by_addr else ""
                    lines.append(f";   {by_addr.get(entry, hex(entry))}{nxt}")
                    continue
                p = prog.probes[i - prog.first]
                lines.append(f"; probe #{i}: {p.access} va={p.va:#x} cpl={3 if p.user else 0} ac={int(p.ac)}")
                regs = _movabs("rbx", va) + (_movabs("rdx", wv) if p.access == "write" else b"")
                for _, _, mnem, ops in md.disasm_lite(regs, 0):
                    lines.append(f";   {mnem} {ops}")
                lines.append(f";   rflags {fl:#x}, r12 {k}, jmp {by_addr.get(entry, hex(entry))}")
        return "\n".join(lines) + "\n"

    def implicit_gdt_read(self, memory: SparseMemory, state: PagingState, *, ac: bool) -> ProbeResult:
        """An implicit supervisor-mode read at CPL0 (SDM docs/oracles.md §2: descriptor-table reads are implicit
        supervisor accesses): GDTR is pointed at the harness GDT through its *user* view and DS is
        loaded with EFLAGS.AC=`ac`. With CR4.SMAP the SDM faults this whatever AC says; QEMU's
        cpu_mmu_index_kernel lets AC=1 through (docs/paging.md docs/oracles.md §2)."""
        state.check()
        _check_image(memory, self.ram_size)
        gdt_va = U_BASE + H_GDT
        pseudo = H_STUB + 0x800
        code = bytearray(_movabs("r15", K_BASE + H_RESULTS))
        code += (
            _PUSHFQ
            + (
                _OR_RSP_IMM + struct.pack("<I", RFLAGS_AC)
                if ac
                else _AND_RSP_IMM + struct.pack("<I", ~RFLAGS_AC & 0xFFFFFFFF)
            )
            + _POPFQ
        )
        code += _movabs("rbx", K_BASE + pseudo) + bytes.fromhex("0f0113")  # lgdt [rbx]
        code += b"\xb8" + struct.pack("<I", SEL_KDATA)  # mov eax, 0x10
        at = K_BASE + H_CODE + len(code)
        code += bytes.fromhex("8ed8") + _JMP_NEXT  # mov ds, eax
        until = K_BASE + H_CODE + len(code)
        code += _INT3
        probe = Probe(gdt_va + SEL_KDATA, "read")
        prog = _Program(
            0,
            (probe,),
            bytes(code),
            (_Segment(K_BASE + H_CODE, until, (), False),),
            {at: 0},
            {},
            (until,),
            (None,),
            ((H_CODE, 0),),
        )
        key = _free_pkey(state)
        if key is None:
            raise OracleError(f"PKRU {state.pkru:#x} closes every key")
        eng = _Engine(self.model, self.ram_size)
        try:
            self._load(eng, memory, state, key)
            eng.uc.mem_write(pseudo, struct.pack("<HQ", len(GDT) * 8 - 1, gdt_va))
            res = self._run_chunk(eng, prog)[0]
        finally:
            eng.close()
        return dataclasses.replace(res, value=None)  # the result slot was never stored

    # running -------------------------------------------------------------------------------------
    def run(self, memory: SparseMemory, state: PagingState, probes: Sequence[Probe]) -> BatchResult:
        t0 = time.perf_counter()
        state.check()
        if state.pks:
            raise OracleError("unicorn 2.1.4 (QEMU 5.0) has no PKS: cannot run with CR4.PKS=1")
        probes = list(probes)
        for k, p in enumerate(probes):
            if not (0 <= p.va < 2**64 and 0 <= p.wvalue < 2**64):
                raise BadInputError(
                    f"probe #{k}: va {p.va:#x} / wvalue {p.wvalue:#x} is not a 64-bit unsigned value"
                )
        _check_image(memory, self.ram_size)
        if not RIG_IMAGE_BASE <= state.root < self.ram_size:
            raise BadInputError(f"CR3 root {state.root:#x} is outside the rig's image region")
        key = _free_pkey(state)
        if key is None and any(p.user for p in probes):
            raise OracleError(
                f"PKRU {state.pkru:#x} closes every key: the harness's CPL3 stack and "
                "results need one open key"
            )
        eng = _Engine(self.model, self.ram_size)
        try:
            self._load(eng, memory, state, key or 0)
            results: list[ProbeResult] = []
            for prog in _chunks(probes):
                results.extend(self._run_chunk(eng, prog))
            after = self._memory_after(eng, memory, state)
        finally:
            eng.close()
        return BatchResult(results, after, time.perf_counter() - t0)

    def _load(self, eng: _Engine, memory: SparseMemory, state: PagingState, key: int) -> None:
        uc = eng.uc
        for first, count in _runs(memory.pages):
            uc.mem_write(first * PAGE, b"".join(memory.pages[pn] for pn in range(first, first + count)))
        for pa, data in _harness_tables(state, key):
            uc.mem_write(pa, data)
        x = _x86
        uc.reg_write(x.UC_X86_REG_GDTR, (0, K_BASE + H_GDT, len(GDT) * 8 - 1, 0))
        # docs/oracles.md §2: CR4.PAE, then EFER, then CR3, then CR0.PG; reg_write never raises #GP, so a
        # wrong order fails silently. Read them back to be sure.
        cr4 = state.cr4 | CR4_PAE
        efer = state.efer | EFER_LME | EFER_LMA
        cr0 = state.cr0 | CR0_PE | CR0_PG
        uc.reg_write(x.UC_X86_REG_CR4, cr4)
        uc.reg_write(x.UC_X86_REG_MSR, (MSR_EFER, efer))
        uc.reg_write(x.UC_X86_REG_CR3, state.cr3)
        uc.reg_write(x.UC_X86_REG_CR0, cr0)
        uc.reg_write(x.UC_X86_REG_CS, SEL_KCODE)
        uc.reg_write(x.UC_X86_REG_SS, SEL_KDATA)
        uc.reg_write(x.UC_X86_REG_RSP, K_BASE + H_KSTACK_TOP)
        uc.reg_write(x.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(x.UC_X86_REG_CR2, 0)
        got = (
            uc.reg_read(x.UC_X86_REG_CR0),
            uc.reg_read(x.UC_X86_REG_CR4),
            uc.reg_read(x.UC_X86_REG_MSR, MSR_EFER) & (EFER_LME | EFER_LMA | EFER_NXE),
        )
        want = (cr0, cr4, efer & (EFER_LME | EFER_LMA | EFER_NXE))
        if got != want:
            raise OracleError(
                "unicorn did not take the control registers: "
                f"got cr0/cr4/efer {tuple(map(hex, got))}, wanted {tuple(map(hex, want))}"
            )
        eng.flush_tlb()
        stub = _wrpkru(state.pkru) if state.pke else b""
        stub += b"\x90"
        uc.mem_write(H_STUB, stub)
        begin, until = K_BASE + H_STUB, K_BASE + H_STUB + len(stub)
        eng.emu(begin, until)
        if eng.st.faults:
            raise OracleError("the harness set-up stub (wrpkru) did not complete")
        eng.ctx_k = uc.context_save()
        eng.st.ctx_k = eng.ctx_k

    def _run_chunk(self, eng: _Engine, prog: _Program) -> list[ProbeResult]:
        uc = eng.uc
        st = eng.st
        st.prog = prog
        st.faults, st.pa, st.stray = {}, {}, []
        if not prog.table or not eng.interp:
            uc.mem_write(H_CODE, prog.code)
            uc.ctl_flush_tb()  # code of the previous chunk sat at the same addresses
            eng.interp = prog.table
        else:  # the interpreter is in place and translated: only the records change
            uc.mem_write(H_TABLE, prog.code[H_TABLE - H_CODE :])
        n = len(prog.probes)
        for seg in prog.segments:
            eng.run_segment(seg, n, prog.table)
        values = struct.unpack(f"<{n}Q", bytes(uc.mem_read(H_RESULTS, 8 * n))) if n else ()
        out = []
        stray = "; ".join(st.stray)
        stray_detail = f"stray accesses in this chunk: {stray}" if stray else ""
        faults, pas, first, made = st.faults, st.pa, prog.first, made_result
        for k, p in enumerate(prog.probes):
            i = first + k
            f = faults.get(i)
            if f is not None and p.implicit and f.vector == 13 and f.error_code == IMPLICIT_GP_CODE:
                # the descriptor read went through
                out.append(made("ok", None, None, pas.get(i), None, None, ""))
            elif f is None:
                out.append(
                    made(
                        "ok",
                        None,
                        None,
                        pas.get(i),
                        values[k] if p.access == "read" and not p.implicit else None,
                        None,
                        stray_detail,
                    )
                )
            elif f.vector == 14:
                out.append(made("page_fault", f.error_code, f.cr2, None, None, 14, f.detail))
            else:
                out.append(made("general_protection", f.error_code, f.cr2, None, None, f.vector, f.detail))
        return out

    def _memory_after(self, eng: _Engine, memory: SparseMemory, state: PagingState) -> SparseMemory:
        """The image region as the engine left it: the caller's pages plus pages probes wrote. The
        harness slot in the root is put back to the caller's value (it was the engine's own)."""
        after = SparseMemory(memory.size)
        after.control_registers = dict(memory.control_registers)
        lo, hi = RIG_IMAGE_BASE >> 12, self.ram_size >> 12
        pages = set(memory.pages) | {pn for pn in eng.st.written if lo <= pn < hi}
        for first, count in _runs(pages):
            data = eng.uc.mem_read(first * PAGE, count * PAGE)
            for k in range(count):
                after.pages[first + k] = data[k * PAGE : (k + 1) * PAGE]
        slot = state.root + 8 * HARNESS_SLOT
        if state.root >> 12 in after.pages:
            after.write_u64(slot, memory.read_u64(slot))
        return after


# -- once per process: self-test and capabilities ------------------------------------------------
_PF_CASES = (
    ("not-present read", 0x0),
    ("not-present write", 0x2),
    ("user write to a supervisor read-only page", 0x7),
    ("reserved bit 51 in a PTE", 0x9),
)


def _tiny_image(levels: int = 4) -> tuple[SparseMemory, int]:
    """PML4 (or PML5) at 0x200000 and one chain down to the PT at 0x203000 (0x204000 with LA57);
    data frames from 0x300000, filled with the rig's tag pattern."""
    mem = SparseMemory()
    table = _PTE_P | _PTE_RW | _PTE_US
    chain = [0x200000 + PAGE * k for k in range(levels)]
    for upper, lower in zip(chain, chain[1:]):
        mem.write_u64(upper, lower | table)
    for f in range(8):
        base = 0x300000 + f * PAGE
        mem.write(base, b"".join(_Q.pack(tag_value(base + 8 * q)) for q in range(512)))
    return mem, chain[-1]


@functools.cache
def _self_test(model: str) -> str:
    """Known #PF error codes must read back from the context offset (pitfall P2); the value
    old_exception held must be 14, proving its offset too."""
    mem, pt = _tiny_image()
    mem.write_u64(pt + 8 * 1, 0x300000 | _PTE_P | _PTE_US)  # VA 0x1000: user RO
    mem.write_u64(pt + 8 * 2, 0x301000 | _PTE_P)  # VA 0x2000: supervisor RO
    mem.write_u64(pt + 8 * 3, 0x302000 | _PTE_P | _PTE_RW | _PTE_US | (1 << 51))
    state = PagingState(cr3=0x200000, cr0=CR0_PE | CR0_PG | CR0_WP, cr4=CR4_PAE)
    probes = [
        Probe(0x5000, "read"),
        Probe(0x5000, "write"),
        Probe(0x2000, "write", user=True),
        Probe(0x3000, "read"),
        Probe(0x1000, "read"),
    ]
    oracle = UnicornOracle(model, self_test=False)
    eng = _Engine(model, oracle.ram_size)
    try:
        oracle._load(eng, mem, state, 0)
        prog = _assemble(probes)
        res = oracle._run_chunk(eng, prog)
        faults = dict(eng.st.faults)
    except OracleError as e:
        raise OracleError(
            f"unicorn self-test failed ({e}): the context offsets {ERROR_CODE_OFFSET} "
            f"(error_code) / {OLD_EXCEPTION_OFFSET} (old_exception) no longer match "
            "the CPUX86State layout"
        ) from None
    finally:
        eng.close()
    got = [(r.outcome, r.error_code) for r in res]
    want = [("page_fault", c) for _, c in _PF_CASES] + [("ok", None)]
    olds = [faults[i].old_exception for i in range(4) if i in faults]
    if got != want or olds != [14] * 4 or res[4].value != tag_value(0x300000):
        raise OracleError(
            f"unicorn self-test failed: #PF error codes read at context offset {ERROR_CODE_OFFSET} "
            f"no longer match (want {[hex(c) for _, c in _PF_CASES]} then ok, got "
            f"{[(o, None if c is None else hex(c)) for o, c in got]}; old_exception {olds}): the "
            "CPUX86State layout changed"
        )
    return "ok"


def cpuid(model: str, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID `leaf` as the guest sees it on `model` (run, not looked up)."""
    why = check_version()
    if why:
        raise OracleUnavailable(why)
    eng = _Engine(model, RIG_RAM_SIZE)
    try:
        uc = eng.uc
        # Paging is off in a fresh UC_MODE_64 engine (docs/oracles.md docs/oracles.md §2): VA = PA.
        code = (
            b"\xb8" + struct.pack("<I", leaf) + b"\xb9" + struct.pack("<I", subleaf) + bytes.fromhex("0fa290")
        )  # mov eax; mov ecx; cpuid; nop
        uc.mem_write(H_STUB, code)
        uc.emu_start(H_STUB, H_STUB + len(code))
        regs = tuple(
            uc.reg_read(r) & 0xFFFFFFFF
            for r in (_x86.UC_X86_REG_RAX, _x86.UC_X86_REG_RBX, _x86.UC_X86_REG_RCX, _x86.UC_X86_REG_RDX)
        )
    finally:
        eng.close()
    return regs


def _cpuid_vendor(model: str) -> str:
    _, ebx, ecx, edx = cpuid(model, 0)
    return struct.pack("<3I", ebx, edx, ecx).decode("ascii", "replace")


@functools.cache
def _discover(model: str) -> Capabilities:
    """Run tiny batches and read off what the engine really does."""
    oracle = UnicornOracle(model)
    mem, pt = _tiny_image()
    pd = 0x200000 + 2 * PAGE
    pdpt = 0x200000 + PAGE
    user = _PTE_P | _PTE_RW | _PTE_US
    mem.write_u64(pt + 8 * 1, 0x300000 | user)  # 0x1000 user RW
    mem.write_u64(pt + 8 * 2, 0x301000 | user | (1 << 59))  # 0x2000 user, key 1
    mem.write_u64(pt + 8 * 3, 0x302000 | _PTE_P | _PTE_RW | (1 << 63))  # 0x3000 supervisor XD
    mem.write_u64(pt + 8 * 4, 0x303000 | user | (1 << 51))  # 0x4000 RSVD
    mem.write_u64(pdpt + 8 * 1, 0 | _PTE_P | _PTE_RW | 0x80)  # 1G leaf: VA 1G -> PA 0
    probes = [
        Probe(0x1000, "read"),
        Probe(0x1000, "fetch"),
        Probe(0x2000, "read", user=True),
        Probe(0x3000, "fetch"),
        Probe(0x4000, "read"),
        Probe((1 << 30) + 0x300000, "read"),
    ]
    # MAXPHYADDR: a non-leaf PDE with address bit b set. Below M the walk reads an unbacked PT
    # (zero, D6) and says not-present; from M up the bit is reserved (SDM docs/oracles.md §2 table 4-19).
    bits = range(32, 52)
    for b in bits:
        mem.write_u64(pd + 8 * (b - 31), (0x203000 | (1 << b)) | user)
        probes.append(Probe((b - 31) << 21, "read"))
    probes += [Probe(va, user=u, implicit=True) for u in (False, True) for va in (0x1000, 0x3000)]
    state = PagingState(
        cr3=0x200000,
        cr4=CR4_PAE | CR4_SMEP | CR4_SMAP | CR4_PKE,
        efer=EFER_LME | EFER_LMA | EFER_NXE,
        pkru=0b0100,
    )
    r = oracle.run(mem, state, probes).results
    impl0, impl3, impl_note = implicit_support(r[-4:], "unicorn")
    r = r[:-4]
    rsvd = [b for b, res in zip(bits, r[6:]) if res.error_code is not None and res.error_code & 0x8]
    mem5, pt5 = _tiny_image(5)
    mem5.write_u64(0x200000 + 8, 0x200000 + 5 * PAGE | user)  # PML5[1] -> PML4 (extra)
    mem5.write_u64(0x200000 + 5 * PAGE, 0x200000 + 2 * PAGE | user)  # its [0] -> the PDPT
    mem5.write_u64(pt5 + 8 * 7, 0x307000 | user)
    r5 = oracle.run(
        mem5, PagingState(cr3=0x200000, cr4=CR4_PAE | CR4_LA57), [Probe((1 << 48) | 0x7000, "read")]
    ).results
    vendor = _cpuid_vendor(model)
    return Capabilities(
        name="unicorn",
        vendor={"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, vendor),
        maxphyaddr=min(rsvd) if rsvd else 52,
        gbpages=r[5].outcome == "ok" and r[5].value == tag_value(0x300000),
        la57=r5[0].outcome == "ok" and r5[0].value == tag_value(0x307000),
        pku=(r[2].outcome, r[2].error_code) == ("page_fault", 0x25),
        smep=(r[1].outcome, r[1].error_code) == ("page_fault", 0x11),
        smap=(r[0].outcome, r[0].error_code) == ("page_fault", 0x1),
        nx=(r[3].outcome, r[3].error_code) == ("page_fault", 0x11),
        rsvd_sets_p=bool(r[4].error_code is not None and r[4].error_code & 1),
        implicit_cpl0=impl0,
        implicit_cpl3=impl3,
        implicit_note=impl_note,
        ram_size=oracle.ram_size,
        unbacked="error",
        version=oracle.version,
        notes=(
            f"#PF error code read at context offset {ERROR_CODE_OFFSET}",
            "fetch probes report no pa (no memory hook sees instruction fetches)",
            f"CPUID vendor {vendor}",
        ),
    )
