# SPDX-License-Identifier: GPL-2.0-or-later
"""What the unicorn oracle (harness/oracles/unicorn_oracle.py) can be trusted with, found out once
per process: the pinned unicorn version (`check_version`, `available`), the self-test of the
context offsets the hooks read (`_self_test`), CPUID as the guest sees it (`cpuid`) and the
capabilities read off tiny batches (`_discover`)."""

from __future__ import annotations

import functools
import struct

from x86pt.oracle import RIG_RAM_SIZE, Capabilities, Probe, tag_value
from harness.oracles.base import implicit_support
from x86pt.errors import OracleError, OracleUnavailable
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
    PagingState,
)
from x86pt.fields import BIT_P as _PTE_P, BIT_RW as _PTE_RW, BIT_US as _PTE_US
from harness.oracles.unicorn_engine import (
    _IMPORT_ERROR,
    ERROR_CODE_OFFSET,
    OLD_EXCEPTION_OFFSET,
    PINNED_VERSION,
    _Engine,
    _uc,
    _x86,
)
from harness.oracles.unicorn_program import _Q, H_STUB, _assemble


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
    from harness.oracles.unicorn_oracle import UnicornOracle  # it imports this module

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
    from harness.oracles.unicorn_oracle import UnicornOracle  # it imports this module

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
