"""Oracle "qemu-monitor": translation only, through QEMU's debug walker (docs/oracles.md §5).

The paused VM behind it is harness/qemu/monitor.py's QemuMonitor (process, QMP, gdbstub and RAM
file in harness/qemu/); the names other modules import from here are re-exported below.
"""

from __future__ import annotations

import time
from typing import Sequence

from harness.qemu.monitor import CODE64_DESCRIPTOR, QemuMonitor
from harness.qemu.process import NOT_FOUND, qemu_available, qemu_binary, qemu_version
from x86pt.errors import OracleUnavailable
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import RIG_RAM_SIZE, BatchResult, Capabilities, Probe, ProbeResult
from x86pt.state import PagingState

__all__ = [
    "CODE64_DESCRIPTOR",
    "MONITOR_NOTES",
    "QemuMonitor",
    "QemuMonitorOracle",
    "qemu_available",
    "qemu_version",
]


# -- Oracle-protocol wrapper ------------------------------------------------------------------------------
MONITOR_NOTES = (
    "translation only: gva2gpa uses QEMU's debug walker (P, PS, canonical form)",
    "rights are not checked: NX, U/S, WP, SMEP, SMAP, PKU and reserved bits are ignored",
    "A/D bits are never set; memory_after is the input image",
    "'Unmapped' (not present, or non-canonical) is reported as page_fault with error_code None",
    "reserved address bits pass into the physical address (bit 51 -> gpa 0x8000000000000+...)",
)


class QemuMonitorOracle:
    """Oracle "qemu-monitor": one paused QEMU per batch, one `gva2gpa` per probe (pipelined). The access kind,
    CPL and AC of a probe do not matter to it (see MONITOR_NOTES)."""

    available = staticmethod(qemu_available)
    in_all = False  # translation only: no error codes, no A/D

    name = "qemu-monitor"
    profile = "qemu"

    def __init__(self, *, binary: str | None = None, cpu: str = "max", timeout: float = 20.0) -> None:
        self.binary = binary or qemu_binary()
        self.cpu = cpu
        self.timeout = timeout
        if self.binary is None:
            raise OracleUnavailable(NOT_FOUND)

    def capabilities(self) -> Capabilities:
        # Page sizes and LA57 are walked by the debug walker whatever CPUID says; nothing that
        # depends on rights is enforced, so those capabilities are reported as absent.
        return Capabilities(
            name=self.name,
            vendor="amd",
            maxphyaddr=40,
            gbpages=True,
            la57=True,
            pku=False,
            smep=False,
            smap=False,
            nx=False,
            rsvd_sets_p=False,
            ram_size=RIG_RAM_SIZE,
            version=qemu_version(self.binary),
            notes=MONITOR_NOTES,
        )

    def run(self, memory: SparseMemory, state: PagingState, probes: Sequence[Probe]) -> BatchResult:
        t0 = time.monotonic()
        results: list[ProbeResult] = []
        with QemuMonitor(memory, state, cpu=self.cpu, binary=self.binary, timeout=self.timeout) as mon:
            for pa in mon.gva2gpa_many([p.va for p in probes]):
                if pa is None:
                    results.append(ProbeResult("page_fault", detail="gva2gpa: Unmapped"))
                else:
                    results.append(ProbeResult("ok", pa=pa, detail="gva2gpa"))
        after = memory.copy() if isinstance(memory, SparseMemory) else SparseMemory()
        return BatchResult(results, after, time.monotonic() - t0)

    def close(self) -> None:
        pass
