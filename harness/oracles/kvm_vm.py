# SPDX-License-Identifier: GPL-2.0-or-later
"""The KVM API as the `kvm` oracle uses it, from pure Python (os, fcntl, mmap, ctypes): the ioctl
numbers and exit reasons, the ctypes layouts of kvm_userspace_memory_region, kvm_regs, kvm_sregs
(kvm_segment, kvm_dtable) and kvm_cpuid2, what KVM_GET_SUPPORTED_CPUID advertises (`cpuid_info`),
a wall-clock limit on KVM_RUN, and `_Vm`: one VM with one vCPU and RAM at GPA 0, put in long mode
and run until the guest writes an exit port. docs/oracles.md §6 (ioctls, measured results,
pitfalls); the oracle itself is harness/oracles/kvm.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading
from dataclasses import dataclass

from x86pt.errors import OracleError

DEV = "/dev/kvm"

# _IOC(dir, 0xAE, nr, size) values for x86-64 (docs/oracles.md §6.1; linux/kvm.h).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    17: "INTERNAL_ERROR",
}
RUN_EXIT_REASON = 8  # offset of kvm_run.exit_reason
RUN_UNION = 32  # offset of the exit union

API_VERSION = 12
MMIO_READ_FILL = 0xFF  # what a read of a GPA outside the memslot returns (no device there)


class KvmRegionStruct(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRegs(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = (
        [(n, KvmSegment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
        + [("gdt", KvmDtable), ("idt", KvmDtable)]
        + [(n, ctypes.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
        + [("interrupt_bitmap", ctypes.c_uint64 * 4)]
    )


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")] + [
        ("padding", ctypes.c_uint32 * 3)
    ]


CPUID_MAX_ENTRIES = 256


class KvmCpuid2(ctypes.Structure):
    _fields_ = [
        ("nent", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("entries", KvmCpuidEntry2 * CPUID_MAX_ENTRIES),
    ]


assert ctypes.sizeof(KvmRegionStruct) == 32 and ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSegment) == 24 and ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmCpuidEntry2) == 40


def _ioctl(fd: int, req: int, arg=0, what: str = ""):
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, req, arg)
        return fcntl.ioctl(fd, req, arg, True)
    except OSError as e:
        raise OracleError(f"kvm: {what or hex(req)} failed: {os.strerror(e.errno or 0)}") from None


def kvm_usable() -> tuple[bool, str]:
    """(True, '') when /dev/kvm opens, speaks API 12 and creates a VM; else (False, why)."""
    try:
        fd = os.open(DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {DEV}: {e.strerror}"
    try:
        ver = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if ver != API_VERSION:
            return False, f"KVM API version {ver}, expected {API_VERSION}"
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        return True, ""
    except OSError as e:
        return False, f"KVM_CREATE_VM failed: {e.strerror}"
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CpuidInfo:
    vendor: str
    maxphyaddr: int
    nx: bool
    gbpages: bool
    la57: bool
    pku: bool
    smep: bool
    smap: bool


def _leaf(cpuid: KvmCpuid2, function: int, index: int = 0) -> KvmCpuidEntry2 | None:
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == function and e.index == index:
            return e
    return None


def cpuid_info(cpuid: KvmCpuid2) -> CpuidInfo:
    l0, l7, l81, l88 = (_leaf(cpuid, 0), _leaf(cpuid, 7), _leaf(cpuid, 0x80000001), _leaf(cpuid, 0x80000008))
    vendor = struct.pack("<III", l0.ebx, l0.edx, l0.ecx).decode("ascii", "replace") if l0 else "?"
    return CpuidInfo(
        vendor=vendor,
        maxphyaddr=(l88.eax & 0xFF) if l88 else 36,
        nx=bool(l81 and l81.edx >> 20 & 1),
        gbpages=bool(l81 and l81.edx >> 26 & 1),
        la57=bool(l7 and l7.ecx >> 16 & 1),
        pku=bool(l7 and l7.ecx >> 3 & 1),
        smep=bool(l7 and l7.ebx >> 7 & 1),
        smap=bool(l7 and l7.ebx >> 20 & 1),
    )


class _Timeout(Exception):
    pass


class _Alarm:
    """A wall-clock limit on KVM_RUN: SIGALRM interrupts the ioctl (EINTR) and the handler raises.
    Only in the main thread (signals); elsewhere the run is unbounded."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = seconds > 0 and threading.current_thread() is threading.main_thread()
        self.old = None

    def __enter__(self) -> "_Alarm":
        if self.active:

            def on_alarm(signum, frame):
                raise _Timeout()

            self.old = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


class _Vm:
    """One VM with one vCPU and RAM at GPA 0; every fd and mapping is released by close()."""

    def __init__(self, kvm_fd: int, ram_size: int, cpuid: KvmCpuid2) -> None:
        self.vm_fd = self.vcpu_fd = -1
        self.ram: mmap.mmap | None = None
        self.run_map: mmap.mmap | None = None
        try:
            self.vm_fd = _ioctl(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            self.ram = mmap.mmap(
                -1, ram_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE
            )
            # from_buffer exports the mmap; drop the object at once so close() works (docs/oracles.md §6).
            anchor = ctypes.c_char.from_buffer(self.ram)
            uaddr = ctypes.addressof(anchor)
            del anchor
            region = KvmRegionStruct(0, 0, 0, ram_size, uaddr)
            _ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
            self.vcpu_fd = _ioctl(self.vm_fd, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
            size = _ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
            self.run_map = mmap.mmap(self.vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _ioctl(self.vcpu_fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in (self.run_map, self.ram):
            if m is not None:
                m.close()
        self.run_map = self.ram = None
        for fd in (self.vcpu_fd, self.vm_fd):
            if fd >= 0:
                os.close(fd)
        self.vcpu_fd = self.vm_fd = -1

    def __enter__(self) -> "_Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def enter_long_mode(self, boot: dict[str, int], rip: int, rsp: int) -> None:
        s = KvmSregs()
        _ioctl(self.vcpu_fd, KVM_GET_SREGS, s, "KVM_GET_SREGS")
        code = KvmSegment(
            base=0, limit=0xFFFFFFFF, selector=0x08, type=0xB, present=1, dpl=0, db=0, s=1, l=1, g=1
        )
        data = KvmSegment(
            base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1, dpl=0, db=1, s=1, l=0, g=1
        )
        s.cs = code
        for r in ("ds", "es", "fs", "gs", "ss"):
            setattr(s, r, data)
        # A busy 64-bit TSS type keeps VMX's guest-state checks happy; the guest loads its own.
        s.tr = KvmSegment(base=0, limit=0x67, selector=0, type=0xB, present=1, s=0)
        s.cr0, s.cr3, s.cr4, s.efer = boot["cr0"], boot["cr3"], boot["cr4"], boot["efer"]
        _ioctl(self.vcpu_fd, KVM_SET_SREGS, s, "KVM_SET_SREGS")
        r = KvmRegs()
        r.rip, r.rsp, r.rflags = rip, rsp, 2
        _ioctl(self.vcpu_fd, KVM_SET_REGS, r, "KVM_SET_REGS")

    def run_to_exit_port(self, port: int, timeout: float) -> list[str]:
        """KVM_RUN until the guest writes `port`; returns notes on MMIO reads it answered."""
        notes: list[str] = []
        rm = self.run_map
        try:
            with _Alarm(timeout):
                while True:
                    try:
                        fcntl.ioctl(self.vcpu_fd, KVM_RUN, 0)
                    except InterruptedError:
                        continue
                    except OSError as e:
                        if e.errno == errno.EINTR:
                            continue
                        raise OracleError(f"kvm: KVM_RUN failed: {e.strerror}") from None
                    reason = struct.unpack_from("<I", rm, RUN_EXIT_REASON)[0]
                    if reason == KVM_EXIT_IO:
                        _dir, _size, io_port = struct.unpack_from("<BBH", rm, RUN_UNION)
                        if io_port == port:
                            return notes
                        continue
                    if reason == KVM_EXIT_MMIO:
                        (gpa,) = struct.unpack_from("<Q", rm, RUN_UNION)
                        length, is_write = struct.unpack_from("<IB", rm, RUN_UNION + 16)
                        if not is_write:
                            rm[RUN_UNION + 8 : RUN_UNION + 16] = bytes([MMIO_READ_FILL]) * 8
                        if len(notes) < 16:
                            notes.append(f"{'write' if is_write else 'read'} of unbacked GPA {gpa:#x}")
                        continue
                    if reason == KVM_EXIT_INTR:
                        continue
                    raise OracleError(self._exit_error(reason))
        except _Timeout:
            raise OracleError(f"kvm: the guest did not finish within {timeout:g} s") from None

    def _exit_error(self, reason: int) -> str:
        name = EXIT_NAMES.get(reason, str(reason))
        rm = self.run_map
        extra = ""
        if reason == KVM_EXIT_INTERNAL_ERROR:
            sub, ndata = struct.unpack_from("<II", rm, RUN_UNION)
            data = struct.unpack_from(f"<{min(ndata, 8)}Q", rm, RUN_UNION + 8)
            extra = f" suberror {sub} data {[hex(d) for d in data]}"
        elif reason == KVM_EXIT_FAIL_ENTRY:
            extra = f" hardware reason {struct.unpack_from('<Q', rm, RUN_UNION)[0]:#x}"
        try:
            r = KvmRegs()
            fcntl.ioctl(self.vcpu_fd, KVM_GET_REGS, r, True)
            extra += f" rip {r.rip:#x}"
            from harness.guest.listing import decode_at

            insn = decode_at(r.rip)
            if insn:
                extra += f" ({insn})"
        except OSError:
            pass
        return f"kvm: unexpected exit {name}{extra}"
