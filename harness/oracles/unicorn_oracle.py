# SPDX-License-Identifier: GPL-2.0-or-later
"""The unicorn backend of the comparison rig: real IA-32e walks from CR3 inside an in-process
unicorn 2.1.4 engine (QEMU 5.0's x86 MMU), many probes per `emu_start` (docs/oracles.md §2).

`UnicornOracle` (the entry point `harness.oracles.unicorn_oracle:UnicornOracle`) loads the image
and the state into an engine, runs each chunk's program and turns what the hooks saw into
ProbeResults. The rest lives beside it, one concern a module:

    harness/oracles/unicorn_program.py  the guest: harness layout, instructions, the probe
                                        interpreter and each chunk's records
    harness/oracles/unicorn_engine.py   the unicorn instance and its hooks
    harness/oracles/unicorn_image.py    the harness in the caller's image: GDT, page tables, key
    harness/oracles/unicorn_caps.py     the version pin, the self-test, cpuid, capabilities

The names callers import from here (available, check_version, cpuid, INSN, MODELS,
PINNED_VERSION, UnicornOracle) still come from this module.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from typing import Sequence

from x86pt.oracle import (
    HARNESS_SLOT,
    RIG_IMAGE_BASE,
    RIG_RAM_SIZE,
    BatchResult,
    Capabilities,
    Probe,
    ProbeResult,
)
from harness.oracles.base import made_result
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.base import PAGE
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    RFLAGS_AC,
    PagingState,
)
from harness.oracles.unicorn_program import (
    _AND_RSP_IMM,
    _AT,
    _INT3,
    _INTERP,
    _JMP_NEXT,
    _K,
    _OR_RSP_IMM,
    _POPFQ,
    _PUSHFQ,
    _U,
    GDT,
    H_CODE,
    H_GDT,
    H_KSTACK_TOP,
    H_RESULTS,
    H_STUB,
    H_TABLE,
    IMPLICIT_GP_CODE,
    INSN,
    K_BASE,
    REC,
    SEL_KCODE,
    SEL_KDATA,
    U_BASE,
    _chunks,
    _movabs,
    _Program,
    _Segment,
    _wrpkru,
)
from harness.oracles.unicorn_engine import (
    PINNED_VERSION,
    _Engine,
    _uc,
    _x86,
)
from harness.oracles.unicorn_image import _check_image, _free_pkey, _harness_tables, _runs
from harness.oracles.unicorn_caps import _discover, _self_test, available, check_version, cpuid

__all__ = ["INSN", "MODELS", "PINNED_VERSION", "UnicornOracle", "available", "check_version", "cpuid"]

MODELS = ("icelake", "haswell")
MSR_EFER = 0xC0000080


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
