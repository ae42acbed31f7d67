"""The probe guest's layout and the Python side of running it (docs/oracles.md §3).

The guest (harness.S, prebuilt into h_main.bin and h_ustub.bin by build.sh) lives in
guest-physical [0x100000, 0x200000) and sees itself at VA KBASE + GPA through the harness slot
(PML4[511], or PML5[511] -> a PML4 whose [511] is the same entry). The test image sits at
>= RIG_IMAGE_BASE. Both the KVM and the QEMU backend use this module:

    prepare_ram(ram, memory, state, probes)   # blob, harness tables, boot tables, params, probes, image
    ... enter the guest at ENTRY_VA in 64-bit mode with boot_registers(state) (or via bios.bin) ...
    check_status(ram)                          # OracleError unless the guest wrote 0x600d
    read_results(ram, len(probes), probes)     # -> list[ProbeResult]
    image_after(ram, memory, state)            # the image with the guest's A/D and data writes

GPA map (u64 fields little-endian):
    0x100000  h_main.bin (code, GDT, TSS)          0x108000  params (P_* offsets), boot block +0x100
    0x109000  IDT (built by the guest)             0x10a000  kernel stack (top 0x10b000)
    0x10b000  exception stack (TSS.RSP0 0x10c000)  0x10e000  user stubs (U=1, RO)
    0x10f000  user stack (U=1, RW)                 0x110000  probes, 32 B: va, flags, wvalue, 0
    0x150000  results, 32 B: vector (0xff none), error code, cr2, value or faulting RIP
    0x1f0000  harness PDPT, PD, PT (4K pages)      0x1f3000  boot PML4, PDPT, 4 PDs (identity 0-4 GiB, 2M)
    0x1f9000  boot PML5                            0x1fa000  PML4 for the harness slot under LA57
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from harness.oracles.base import made_result
from x86pt.oracle import HARNESS_SLOT, RIG_IMAGE_BASE, Probe, ProbeResult, pa_from_value
from x86pt.errors import BadInputError, OracleError
from x86pt.memory.sparse import SparseMemory
from x86pt.state import CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE, PagingState
from x86pt.fields import BIT_A as _A, BIT_D as _D, BIT_P as _P, BIT_PS as _PS, BIT_RW as _RW, BIT_US as _US

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = 0x1000

KBASE = 0xFFFFFFFF80000000
HARNESS_GPA = 0x100000
HARNESS_END = 0x200000
ENTRY_GPA = HARNESS_GPA
ENTRY_VA = KBASE + ENTRY_GPA
MAIN_MAX = 0x8000  # h_main.bin must end before the params page

PARAMS_GPA = 0x108000
P_CR3, P_CR0, P_CR4, P_EFER = 0x00, 0x08, 0x10, 0x18
P_N, P_IDX, P_SAVED_RSP, P_CUR, P_STATUS = 0x20, 0x28, 0x30, 0x38, 0x40
P_PKRU, P_FLAGS, P_PHASE = 0x48, 0x50, 0x58
P_SETUP_REC = 0x80  # vector, error code, cr2, rip of a fault before the probes
P_BOOT_CR3, P_BOOT_CR4, P_BOOT_EFER = 0x100, 0x108, 0x110  # read by bios.bin (QEMU)
F_WRPKRU = 0x1

IDT_GPA = 0x109000
KSTACK_TOP_GPA = 0x10B000
XSTACK_TOP_GPA = 0x10C000
USTUB_GPA = 0x10E000
USTACK_GPA = 0x10F000
USTACK_TOP_GPA = 0x110000
PROBES_GPA = 0x110000
RESULTS_GPA = 0x150000
RECORD = 32
MAX_PROBES = 8192

HPT_PDPT = 0x1F0000
HPT_PD = 0x1F1000
HPT_PT = 0x1F2000
BOOT_PML4 = 0x1F3000
BOOT_PDPT = 0x1F4000
BOOT_PD = 0x1F5000  # four pages: 0-4 GiB
BOOT_PML5 = 0x1F9000
SLOT_PML4_LA57 = 0x1FA000

# Probe flags (harness.S PR_*). Kind 3 is an implicit supervisor-mode read: the probe's qword is
# read as LDT entry 0 by a segment-register load (harness.S k_implicit / ustub_implicit).
PR_KIND = {"read": 0, "write": 1, "fetch": 2}
K_IMPLICIT = 3
IMPLICIT_SEL = 0x4  # the #GP error code of a descriptor read that went through
PR_USER = 0x100
PR_AC = 0x200
PR_NOINVLPG = 0x400

STATUS_DONE = 0x600D
STATUS_SETUP = 0x0BAD
NO_VECTOR = 0xFF
CR2_SENTINEL = 0x8BADF00D8BADF00D  # non-canonical, so no #PF can leave it in CR2
DEBUG_EXIT_PORT = 0xF4
QEMU_EXIT_DONE = 33  # isa-debug-exit: (0x10 << 1) | 1
QEMU_EXIT_SETUP = 35  # (0x11 << 1) | 1
UD_VECTOR = 6

# The harness slot: P|RW|US|A. No XD (NXE may be 0), no G (AMD reserves PML4E bit 8).
SLOT_VALUE = HPT_PDPT | _P | _RW | _US | _A

_Q = struct.Struct("<Q")
_PROBE = struct.Struct("<QQQQ")
_RESULT = struct.Struct("<QQQQ")


@lru_cache(maxsize=None)
def blob(name: str) -> bytes:
    """A prebuilt piece of the guest: 'h_main.bin' or 'h_ustub.bin'."""
    with open(os.path.join(HERE, name), "rb") as f:
        return f.read()


@lru_cache(maxsize=None)
def symbols() -> dict[str, int]:
    """Guest symbols (name -> VA) from h_main.sym, written by build.sh from the linked ELF."""
    out: dict[str, int] = {}
    with open(os.path.join(HERE, "h_main.sym"), encoding="ascii") as f:
        for line in f:
            addr, name = line.split()
            out[name] = int(addr, 16)
    return out


def probe_flags(p: Probe, invlpg: bool = True) -> int:
    kind = K_IMPLICIT if p.implicit else PR_KIND[p.access]
    return kind | (PR_USER if p.user else 0) | (PR_AC if p.ac else 0) | (0 if invlpg else PR_NOINVLPG)


def boot_registers(state: PagingState) -> dict[str, int]:
    """Registers to enter the guest with (64-bit mode, harness mapped, identity 0-4 GiB): the
    guest itself then switches to the test registers. LA57 cannot change in long mode
    (SDM §4.1.1), so the boot tables follow the test's paging depth."""
    la57 = state.la57
    return {
        "cr3": BOOT_PML5 if la57 else BOOT_PML4,
        "cr4": CR4_PAE | (CR4_LA57 if la57 else 0),
        "efer": EFER_LME | EFER_LMA | EFER_NXE,
        "cr0": CR0_PE | CR0_PG | (1 << 16) | (1 << 5) | (1 << 4) | (1 << 1),
    }  # PE PG WP NE ET MP


def _u64(ram, gpa: int, value: int) -> None:
    _Q.pack_into(ram, gpa, value & 0xFFFFFFFFFFFFFFFF)


def _get(ram, gpa: int) -> int:
    return _Q.unpack_from(ram, gpa)[0]


def _write_harness_tables(ram, user_pkey: int) -> None:
    # PDPT[510] -> PD, PD[0] -> PT: VA KBASE + [0, 2 MiB). U=1 on the way so the stubs and the user
    # stack are user pages; every other harness page is a supervisor page (SDM §4.6.1).
    ram[HPT_PDPT : HPT_PT + PAGE] = bytes(3 * PAGE)
    _u64(ram, HPT_PDPT + 510 * 8, HPT_PD | _P | _RW | _US | _A)
    _u64(ram, HPT_PD + 0 * 8, HPT_PT | _P | _RW | _US | _A)
    pk = (user_pkey & 0xF) << 59
    for gpa in range(HARNESS_GPA, HARNESS_END, PAGE):
        if gpa == USTUB_GPA:
            e = gpa | _P | _US | _A | pk
        elif gpa == USTACK_GPA:
            e = gpa | _P | _RW | _US | _A | _D | pk
        else:
            e = gpa | _P | _RW | _A | _D
        _u64(ram, HPT_PT + (gpa >> 12) * 8, e)


def _write_boot_tables(ram) -> None:
    # Identity 0-4 GiB with 2M pages: bios.bin runs at 0xffff0000 while CR0.PG turns on.
    ram[BOOT_PML4 : SLOT_PML4_LA57 + PAGE] = bytes(SLOT_PML4_LA57 + PAGE - BOOT_PML4)
    _u64(ram, BOOT_PML4, BOOT_PDPT | _P | _RW | _A)
    _u64(ram, BOOT_PML4 + HARNESS_SLOT * 8, SLOT_VALUE)
    for i in range(4):
        pd = BOOT_PD + i * PAGE
        _u64(ram, BOOT_PDPT + i * 8, pd | _P | _RW | _A)
        for j in range(512):
            _u64(ram, pd + j * 8, ((i << 30) | (j << 21)) | _P | _RW | _PS | _A | _D)
    _u64(ram, BOOT_PML5, BOOT_PML4 | _P | _RW | _A)
    _u64(ram, BOOT_PML5 + HARNESS_SLOT * 8, BOOT_PML4 | _P | _RW | _US | _A)
    _u64(ram, SLOT_PML4_LA57 + HARNESS_SLOT * 8, SLOT_VALUE)


@lru_cache(maxsize=16)
def harness_area(user_pkey: int = 0) -> bytes:
    """GPA [HARNESS_GPA, HARNESS_END) before params and probes: blobs, harness and boot tables."""
    main, ustub = blob("h_main.bin"), blob("h_ustub.bin")
    if len(main) > MAIN_MAX:
        raise OracleError(f"h_main.bin is {len(main)} bytes, more than {MAIN_MAX:#x}")
    ram = bytearray(HARNESS_END)
    ram[HARNESS_GPA : HARNESS_GPA + len(main)] = main
    ram[USTUB_GPA : USTUB_GPA + len(ustub)] = ustub
    _write_harness_tables(ram, user_pkey)
    _write_boot_tables(ram)
    return bytes(ram[HARNESS_GPA:])


def slot_address(state: PagingState) -> int:
    """Physical address of the harness slot in the test image's root table."""
    return state.root + HARNESS_SLOT * 8


def slot_entry(state: PagingState) -> int:
    """The value the backend writes into the test root's slot."""
    if state.la57:
        return SLOT_PML4_LA57 | _P | _RW | _US | _A
    return SLOT_VALUE


def test_registers(state: PagingState) -> dict[str, int]:
    """The registers the guest loads before the probes (EFER.LMA is read-only; keep it set)."""
    state.check()
    return {"cr3": state.cr3, "cr0": state.cr0, "cr4": state.cr4, "efer": state.efer | EFER_LME | EFER_LMA}


def check_image(memory: SparseMemory, state: PagingState, ram_size: int) -> None:
    """BadInputError unless the image fits the rig's conventions (x86pt/oracle.py)."""
    for pn in memory.pages:
        gpa = pn * PAGE
        if gpa < RIG_IMAGE_BASE:
            raise BadInputError(f"image page {gpa:#x} is inside the harness area [0, {RIG_IMAGE_BASE:#x})")
        if gpa + PAGE > ram_size:
            raise BadInputError(f"image page {gpa:#x} is beyond the guest RAM ({ram_size:#x} bytes)")
    root = state.root
    if not RIG_IMAGE_BASE <= root < ram_size or state.cr3 >> 52:
        raise BadInputError(
            f"CR3 {state.cr3:#x} does not point into the image [{RIG_IMAGE_BASE:#x}, {ram_size:#x})"
        )


def prepare_ram(
    ram,
    memory: SparseMemory,
    state: PagingState,
    probes: Sequence[Probe],
    *,
    clear: bool = True,
    ram_size: int | None = None,
    invlpg: bool = True,
    user_pkey: int = 0,
) -> None:
    """Fill guest RAM `ram` (a writable buffer of ram_size bytes, GPA 0 at offset 0): the guest
    blobs, harness and boot tables, params, probes, and a copy of `memory` with the harness slot
    installed. `clear=False` skips zeroing when `ram` is known to be fresh (anonymous mmap).
    `user_pkey` is the protection key of the user stub and user stack pages (a CPL3 fetch pushes
    its return address there; choose a key the test's PKRU allows)."""
    ram_size = len(ram) if ram_size is None else ram_size
    if len(probes) > MAX_PROBES:
        raise BadInputError(f"{len(probes)} probes in one batch; the guest holds {MAX_PROBES}")
    check_image(memory, state, ram_size)
    regs = test_registers(state)
    if clear:
        ram[0:ram_size] = bytes(ram_size)
    ram[HARNESS_GPA:HARNESS_END] = harness_area(user_pkey)

    boot = boot_registers(state)
    ram[PARAMS_GPA : PARAMS_GPA + PAGE] = bytes(PAGE)
    for off, v in (
        (P_CR3, regs["cr3"]),
        (P_CR0, regs["cr0"]),
        (P_CR4, regs["cr4"]),
        (P_EFER, regs["efer"]),
        (P_N, len(probes)),
        (P_PKRU, state.pkru),
        (P_FLAGS, F_WRPKRU if state.pke else 0),
        (P_BOOT_CR3, boot["cr3"]),
        (P_BOOT_CR4, boot["cr4"]),
        (P_BOOT_EFER, boot["efer"]),
    ):
        _u64(ram, PARAMS_GPA + off, v)

    buf = bytearray(len(probes) * RECORD)
    for i, p in enumerate(probes):
        _PROBE.pack_into(
            buf,
            i * RECORD,
            p.va & 0xFFFFFFFFFFFFFFFF,
            probe_flags(p, invlpg),
            p.wvalue & 0xFFFFFFFFFFFFFFFF,
            0,
        )
    ram[PROBES_GPA : PROBES_GPA + len(buf)] = buf
    # Results start as "not run" so a guest that stops early cannot look like all-ok.
    ram[RESULTS_GPA : RESULTS_GPA + len(buf)] = b"\xee" * len(buf)

    for pn, page in memory.pages.items():
        ram[pn * PAGE : (pn + 1) * PAGE] = page
    _u64(ram, slot_address(state), slot_entry(state))


def status(ram) -> int:
    return _get(ram, PARAMS_GPA + P_STATUS)


@dataclass(frozen=True)
class SetupFault:
    vector: int
    error_code: int
    cr2: int
    rip: int

    def describe(self) -> str:
        return (
            f"vector {self.vector} error code {self.error_code:#x} at rip {self.rip:#x} "
            f"(cr2 {self.cr2:#x}) before the first probe"
        )


def setup_fault(ram) -> SetupFault:
    v = [_get(ram, PARAMS_GPA + P_SETUP_REC + 8 * i) for i in range(4)]
    return SetupFault(*v)


def check_status(ram, what: str = "guest") -> None:
    """OracleError unless the guest finished all probes (status 0x600d, docs/oracles.md §3)."""
    st = status(ram)
    if st == STATUS_DONE:
        return
    idx = _get(ram, PARAMS_GPA + P_IDX)
    n = _get(ram, PARAMS_GPA + P_N)
    if st == STATUS_SETUP:
        raise OracleError(
            f"{what}: the probe guest faulted while switching to the test state: "
            f"{setup_fault(ram).describe()}"
        )
    raise OracleError(f"{what}: the probe guest did not finish (status {st:#x}, probe {idx} of {n})")


def _canon_cr2(cr2: int) -> int | None:
    return None if cr2 == CR2_SENTINEL else cr2


def _probe_rips() -> frozenset[int]:
    s = symbols()
    return frozenset(
        s[k] for k in ("k_read_insn", "k_write_insn", "k_fetch_insn", "k_implicit_insn") if k in s
    )


_HARNESS_SLOT_VA = 0xFFFFFF8000000000  # PML4[511] (and PML5[511]->PML4[511]): the harness's


def read_results(ram, n: int, probes: Sequence[Probe] | None = None) -> list[ProbeResult]:
    """The guest's result records as ProbeResults. With `probes`, a successful read's value is
    inverted through tag_value into `pa`, and a fault whose RIP is not the probe's own access
    is flagged in `detail` (harness/guest/listing.py decodes it)."""
    out: list[ProbeResult] = []
    kernel_rips = _probe_rips()
    ustub_va = KBASE + USTUB_GPA
    ustub_end = ustub_va + PAGE
    recs = np.frombuffer(bytes(ram[RESULTS_GPA : RESULTS_GPA + n * RECORD]), dtype="<u8").reshape(n, 4)
    vectors, codes, cr2s, values = (recs[:, k].tolist() for k in range(4))
    made = made_result
    for i in range(n):
        vector, code, cr2, value = vectors[i], codes[i], cr2s[i], values[i]
        p = probes[i] if probes is not None else None
        if vector == 0xEEEEEEEEEEEEEEEE:
            raise OracleError(f"probe {i} was not run by the guest")
        if vector == NO_VECTOR:
            if p is not None and p.access != "read":
                out.append(made("ok", None, None, None, None, None, ""))
            else:
                pa = pa_from_value(value, p.va) if p is not None else None
                out.append(made("ok", None, None, pa, value, None, ""))
            continue
        if (
            p is not None
            and p.implicit
            and vector == 13
            and code == IMPLICIT_SEL
            and (value in kernel_rips or ustub_va <= value < ustub_end)
        ):
            # The descriptor read went through; the frame's qword is no valid descriptor, so the
            # segment load ends in #GP(selector) (harness.S k_implicit). No value, no pa.
            out.append(made("ok", None, None, None, None, None, ""))
            continue
        detail = ""
        if p is not None and not (value == p.va and p.access == "fetch"):
            expected = (ustub_va <= value < ustub_end) if p.user else value in kernel_rips
            if not expected:
                detail = f"fault at rip {value:#x}, not the probe's access"
        if vector == 14 and p is not None and cr2 >= _HARNESS_SLOT_VA > p.va:
            # The harness itself faulted (its stub, stack or results page), not the probe: e.g.
            # PKRU closing the key of the user stub/stack pages. Never report that as the answer.
            raise OracleError(
                f"probe {i} ({p.access} {p.va:#x}): the probe harness faulted at "
                f"{cr2:#x} (error code {code:#x}, rip {value:#x}); does PKRU deny the "
                "harness's own key (see prepare_ram(user_pkey=...))?"
            )
        if vector == 14:
            out.append(made("page_fault", code, cr2, None, None, 14, detail))
        elif vector == 13:
            out.append(made("general_protection", code, _canon_cr2(cr2), None, None, 13, detail))
        else:
            out.append(
                ProbeResult(
                    f"vector_{vector}",
                    error_code=code,
                    cr2=_canon_cr2(cr2),
                    vector=vector,
                    detail=(detail + f" unexpected vector {vector} at rip {value:#x}").strip(),
                )
            )
    return out


def image_after(
    ram,
    memory: SparseMemory,
    state: PagingState | None = None,
    *,
    scan_new: bool = True,
    ram_size: int | None = None,
) -> SparseMemory:
    """The image after the run: the caller's pages read back from RAM (A/D bits, data written)
    with the harness slot restored to the caller's value, plus (scan_new) any other non-zero
    page of the image area (a write probe into a frame the caller left unbacked)."""
    out = SparseMemory(memory.size)
    out.control_registers = dict(memory.control_registers)
    for pn in memory.pages:
        out.pages[pn] = bytearray(ram[pn * PAGE : (pn + 1) * PAGE])
    if scan_new:
        end = len(ram) if ram_size is None else ram_size
        end = min(end, memory.size) // PAGE * PAGE
        if end > RIG_IMAGE_BASE:
            view = np.frombuffer(
                ram, dtype="<u8", count=(end - RIG_IMAGE_BASE) // 8, offset=RIG_IMAGE_BASE
            ).reshape(-1, PAGE // 8)
            for k in np.flatnonzero(view.any(axis=1)):
                pn = RIG_IMAGE_BASE // PAGE + int(k)
                if pn not in out.pages:
                    out.pages[pn] = bytearray(ram[pn * PAGE : (pn + 1) * PAGE])
            del view
    if state is not None:
        addr = slot_address(state)
        if (addr // PAGE) in out.pages:
            out.write_u64(addr, memory.read_u64(addr))
    return out
