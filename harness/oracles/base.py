"""One oracle interface, three backends (unicorn in-process, QEMU with our probe guest, KVM via
/dev/kvm). Every backend takes the same image and probes and answers the same records.

Conventions shared by every backend and by the image builders of the rig (matrix, random):
* Guest-physical [0, RIG_IMAGE_BASE) belongs to the harness (code, IDT, stacks, probe and
  result arrays, its own tables). A test image keeps its tables and frames in
  [RIG_IMAGE_BASE, ram_size) — default ram_size RIG_RAM_SIZE.
* The top slot of the root table is the harness's: PML4[511] with 4-level paging, PML5[511]
  with 5-level (the backend points it at a PML4 whose [511] maps the harness). VAs from
  0xffffff8000000000 (4-level) / 0xff00000000000000 (5-level) up are not for test mappings.
  The backend writes that slot into its own copy of the image; the caller's memory is not changed.
* Probes are run in order and each one sees a fresh walk: no translation cached by an earlier
  probe is used (the guest does INVLPG of the VA at CPL0 before dropping to CPL3; unicorn
  reloads CR3). A/D bits set by one probe stay set for the next (the caller arranges
  independence).
* Frame contents are the caller's: a fetch probe needs 0xC3 (ret) at its target, and read
  probes return the 8 bytes at their target as `value`. `tag_value(pa)` is the rig's pattern
  for "this qword lives at pa" (low byte 0xC3, so 8-aligned fetches return too).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

from x86pt.errors import BadInputError
from x86pt.memory.sparse import SparseMemory
from x86pt.state import PagingState, Profile
from x86pt.walk import ACCESS_KINDS

RIG_IMAGE_BASE = 0x200000
RIG_RAM_SIZE = 32 << 20
HARNESS_SLOT = 511
OUTCOMES = ("ok", "page_fault", "general_protection")


def tag_value(pa: int) -> int:
    """The rig's frame pattern: the qword at 8-aligned `pa` holds (pa << 8) | 0xC3."""
    return ((pa & ~7) << 8) | 0xC3


def pa_from_value(value: int | None, va: int) -> int | None:
    """Invert `tag_value` for a read of 8-aligned `va`; None when the value is not a tag."""
    if value is None or va & 7 or value & 0xFF != 0xC3:
        return None
    return value >> 8


@dataclass(frozen=True)
class Probe:
    va: int
    access: str = "read"       # read | write | fetch
    user: bool = False         # CPL 3
    ac: bool = False           # EFLAGS.AC
    wvalue: int = 0            # value stored by a write probe
    # An implicit supervisor-mode read (SDM Vol. 3A §4.6): the CPU itself reads the qword at `va`
    # as a segment descriptor (the rig's guests load a segment register from an LDT based at
    # `va`). A supervisor access whatever the CPL; SMAP-checked whatever EFLAGS.AC says.
    implicit: bool = False

    def __post_init__(self) -> None:
        if self.access not in ACCESS_KINDS:
            raise BadInputError(f"bad access {self.access!r}")
        if self.implicit and self.access != "read":
            raise BadInputError("an implicit probe is a read (a descriptor-table read)")
        if not 0 <= self.va < (1 << 64) or not 0 <= self.wvalue < (1 << 64):
            raise BadInputError(f"probe va {self.va:#x} / wvalue {self.wvalue:#x} is not a 64-bit value")


@dataclass(frozen=True)
class ProbeResult:
    outcome: str                       # ok | page_fault | general_protection
    error_code: int | None = None      # #PF / #GP error code
    cr2: int | None = None             # CR2 after a #PF (None for ok and for #GP unless written)
    pa: int | None = None              # physical address reached, when the oracle can tell
    value: int | None = None           # 8 bytes loaded by a successful read
    vector: int | None = None          # raw exception vector seen (14, 13, ...), None for ok
    detail: str = ""                   # anything odd the backend noticed

    def to_json(self) -> dict:
        return {"outcome": self.outcome, "error_code": self.error_code,
                "cr2": None if self.cr2 is None else hex(self.cr2),
                "pa": None if self.pa is None else hex(self.pa)}


@dataclass
class BatchResult:
    results: list[ProbeResult]
    memory_after: SparseMemory          # the image region after the run (A/D bits, written data)
    seconds: float = 0.0


@dataclass(frozen=True)
class Capabilities:
    """What the oracle really does, found by running a tiny batch (not by trusting CPUID)."""

    name: str
    vendor: str
    maxphyaddr: int
    gbpages: bool
    la57: bool
    pku: bool
    smep: bool
    smap: bool
    nx: bool = True
    rsvd_sets_p: bool = True
    # Implicit supervisor reads (Probe.implicit) the oracle runs faithfully, at CPL0 / CPL3;
    # when it cannot, why not (implicit_note).
    implicit_cpl0: bool = False
    implicit_cpl3: bool = False
    implicit_note: str = ""
    ram_size: int = RIG_RAM_SIZE
    version: str = ""
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Oracle(Protocol):
    name: str            # "unicorn" | "qemu" | "kvm" | "qemu-monitor"
    # The x86pt profile that models it: a name of x86pt.state.PROFILES, or a Profile the oracle
    # measured on its host (kvm); x86pt.state.as_profile takes either.
    profile: "str | Profile"

    def capabilities(self) -> Capabilities: ...

    def run(self, memory: SparseMemory, state: PagingState, probes: Sequence[Probe]) -> BatchResult: ...

    def close(self) -> None: ...


def implicit_support(results, what: str) -> tuple[bool, bool, str]:
    """(CPL0, CPL3, note) from the four implicit probes of a capability batch run with CR4.SMAP=1
    and EFLAGS.AC=0: an implicit read of a user page, then of a supervisor page, at CPL0 then CPL3.
    SDM Vol. 3A §4.6/§4.7: the user page faults with error code P only (a supervisor access: no U
    bit, even at CPL3), the supervisor page translates."""
    r = list(results)
    ok = [(x.outcome, x.error_code if x.outcome == "page_fault" else None) for x in r]
    want = ("page_fault", 0x1), ("ok", None)
    cpl0 = tuple(ok[0:2]) == want
    cpl3 = tuple(ok[2:4]) == want
    note = ""
    if not (cpl0 and cpl3):
        note = (f"{what}: implicit supervisor reads answered {ok} (wanted #PF 0x1 on a user page "
                f"and ok on a supervisor page, at CPL0 and at CPL3)")
    return cpl0, cpl3, note


def required_oracles() -> set[str]:
    """X86PT_REQUIRE_ORACLES=unicorn,qemu,kvm: those oracles must be present (skips fail)."""
    return {s.strip() for s in os.environ.get("X86PT_REQUIRE_ORACLES", "").split(",") if s.strip()}
