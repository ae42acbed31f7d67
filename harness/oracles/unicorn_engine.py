# SPDX-License-Identifier: GPL-2.0-or-later
"""The engine side of the unicorn oracle (harness/oracles/unicorn_oracle.py): one unicorn 2.1.4
instance per batch (`_Engine`) and the hooks that turn what it does into per-probe faults and
physical addresses. The program it runs is harness/oracles/unicorn_program.py, the harness's
page tables in the caller's image harness/oracles/unicorn_image.py.

Facts this file relies on were measured on this machine (docs/oracles.md §2):
* mem_map / mem_read / memory hooks use guest-physical addresses once paging is on (docs/oracles.md §2);
* exceptions never reach a guest IDT, they reach UC_HOOK_INTR; the #PF error code only lives in
  the saved context blob (CPUX86State.error_code, byte 5424 in 2.1.4), and `old_exception` must be
  reset after every fault or the next one becomes #DF and then a silent stop (docs/oracles.md §2, P2);
* CPL3 is only reachable through a guest IRETQ (docs/oracles.md §2), and the guest has no way back (no IDT
  is ever used); so a stretch of CPL3 probes ends in `hlt`, whose #GP(0) (privileged at CPL3)
  reaches UC_HOOK_INTR, and the hook restores the saved CPL0 context and resumes at the CPL0 code after the stretch: one
  `emu_start` per chunk however the probes alternate between CPL0 and CPL3;
* `context_restore` and `mem_write` do not flush the TLB (docs/oracles.md §2): the program reloads
  CR3 itself (harness/oracles/unicorn_program.py);
* the hooks read the probe's index from r12 (the interpreter's records);
* a fetch fault from `call rbx` leaves the return address pushed (P5).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from x86pt.oracle import RIG_IMAGE_BASE, RIG_RAM_SIZE
from x86pt.errors import OracleError
from harness.oracles.unicorn_program import (
    _DELTA,
    _Q,
    _RESUME,
    H_END,
    H_RESULTS,
    H_TABLE,
    K_BASE,
    U_BASE,
    _Program,
    _Segment,
)

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
