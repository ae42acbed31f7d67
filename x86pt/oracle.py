"""The oracle interface, owned by the library: what an oracle is given (an image, a CPU state,
probes), what it answers (ProbeResult, BatchResult), what it says it can do (Capabilities), and the
registry that finds oracles by name.

An oracle is any class with the `Oracle` protocol below, registered under the entry-point group
`x86pt.oracles` (x86pt/plugins.py). The rig's own oracles (unicorn, qemu, kvm, qemu-monitor, model)
are registered that way in this project's pyproject.toml, exactly as a third party's would be;
`x86pt conform --oracle NAME` and `get_oracle(NAME)` find either. A class may define
`available() -> (bool, reason)` (a static or class method) to say cheaply whether it can run on this
host, and `in_all = False` to stay out of `--oracle all` (the model compared with itself, and
translation-only oracles). docs/design.md describes the protocol and the conventions below.

Conventions shared by every oracle and by the image builders of the rig:
* Guest-physical [0, RIG_IMAGE_BASE) belongs to the oracle's own code (IDT, stacks, probe and
  result arrays, its own tables). A test image keeps its tables and frames in
  [RIG_IMAGE_BASE, ram_size), default ram_size RIG_RAM_SIZE.
* The top slot of the root table is the oracle's: PML4[511] with 4-level paging, PML5[511]
  with 5-level (the oracle points it at a PML4 whose [511] maps its own code). VAs from
  0xffffff8000000000 (4-level) / 0xff00000000000000 (5-level) up are not for test mappings.
  The oracle writes that slot into its own copy of the image; the caller's memory is not changed.
* Probes are run in order and each one sees a fresh walk: no translation cached by an earlier
  probe is used. A/D bits set by one probe stay set for the next (the caller arranges
  independence).
* Frame contents are the caller's: a fetch probe needs 0xC3 (ret) at its target, and read
  probes return the 8 bytes at their target as `value`. `tag_value(pa)` is the rig's pattern
  for "this qword lives at pa" (low byte 0xC3, so 8-aligned fetches return too).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from x86pt.errors import BadInputError, OracleUnavailable
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
    # What an access to guest-physical memory beyond ram_size does: "ones" (reads give all-ones,
    # writes are dropped, as on a PC's unbacked bus: QEMU, KVM) or "error" (the emulator stops the
    # run: unicorn). Callers only probe unbacked frames the oracle survives.
    unbacked: str = "ones"
    version: str = ""
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Oracle(Protocol):
    name: str            # the registry name: "unicorn", "qemu", "kvm", ...
    # The x86pt profile that models it: a name of x86pt.state.PROFILES, or a Profile the oracle
    # measured on its host (kvm); x86pt.state.as_profile takes either.
    profile: "str | Profile"

    def capabilities(self) -> Capabilities: ...

    def run(self, memory: SparseMemory, state: PagingState, probes: Sequence[Probe]) -> BatchResult: ...

    def close(self) -> None: ...


# -- the registry ---------------------------------------------------------------------------------
# A name "cmd:PROGRAM ARGS" is an external program speaking the command-oracle protocol
# (x86pt/cmdoracle.py, docs/oracle-protocol.md); it needs no registration.
CMD_PREFIX = "cmd:"


def is_command(name: str) -> bool:
    return name.startswith(CMD_PREFIX)


def oracle_names() -> tuple[str, ...]:
    """Every oracle registered under the `x86pt.oracles` entry-point group, sorted."""
    from x86pt.plugins import ORACLES, entry_points
    return tuple(sorted(entry_points(ORACLES)))


def oracle_class(name: str) -> type:
    """The class registered as `name`; OracleUnavailable when the name is unknown or its package
    cannot be imported here (with the missing module named)."""
    if is_command(name):
        from x86pt.cmdoracle import CmdOracle
        return CmdOracle
    from x86pt.plugins import ORACLES, entry_points, load
    eps = entry_points(ORACLES)
    if name not in eps:
        raise OracleUnavailable(f"unknown oracle {name!r} (one of {', '.join(sorted(eps)) or 'none'})")
    try:
        cls = load(eps[name])
    except ModuleNotFoundError as e:
        raise OracleUnavailable(f"{name}: {eps[name]} needs the missing module {e.name}") from None
    except (ImportError, AttributeError) as e:
        raise OracleUnavailable(f"{name}: cannot load {eps[name]}: {e}") from None
    if not inspect.isclass(cls) or not callable(getattr(cls, "run", None)):
        raise OracleUnavailable(f"{name}: {eps[name]} is not an oracle class (no run method)")
    return cls


def availability(name: str) -> tuple[bool, str]:
    """(available, reason): the class's own `available()` when it has one."""
    if is_command(name):
        from x86pt.cmdoracle import program_available
        return program_available(name[len(CMD_PREFIX):])
    try:
        cls = oracle_class(name)
    except OracleUnavailable as e:
        return False, str(e)
    check = getattr(cls, "available", None)
    if not callable(check):
        return True, ""
    try:
        res = check()
    except Exception as e:   # a backend's self-check failing is a reason, not a crash
        return False, f"{name}: availability check failed: {type(e).__name__}: {e}"
    ok, why = (bool(res[0]), str(res[1]) if len(res) > 1 else "") if isinstance(res, tuple) else (bool(res), "")
    return (True, "") if ok else (False, why or f"{name}: backend reports it is unavailable")


def all_oracles() -> tuple[str, ...]:
    """The oracles `--oracle all` means: every registered one whose class does not set
    `in_all = False` (a class that cannot load here is kept, so its reason is reported)."""
    out = []
    for name in oracle_names():
        try:
            cls = oracle_class(name)
        except OracleUnavailable:
            out.append(name)
            continue
        if getattr(cls, "in_all", True):
            out.append(name)
    return tuple(out)


def get_oracle(name: str, **kwargs: Any) -> Oracle:
    """A ready oracle. Raises OracleUnavailable with the reason when it cannot run here."""
    ok, why = availability(name)
    if not ok:
        raise OracleUnavailable(why if why.startswith(f"{name}:") or why.startswith("unknown")
                                else f"{name}: {why}")
    cls = oracle_class(name)
    try:
        if is_command(name):
            return cls(name[len(CMD_PREFIX):], **kwargs)
        return cls(**kwargs)
    except OracleUnavailable:
        raise
    except OSError as e:
        raise OracleUnavailable(f"{name}: {e}") from None


def oracle_list(text: str, *, what: str = "--oracle") -> list[str]:
    """The oracles a comma list names ("all": all_oracles()); BadInputError for an unknown name.
    A "cmd:PROGRAM ARGS" item runs to the end of the text (its arguments may hold commas)."""
    head, sep, command = text.partition(CMD_PREFIX)
    if sep and head.strip() and not head.rstrip().endswith(","):
        raise BadInputError(f"{what} {text!r}: {CMD_PREFIX} starts an item of the list")
    names = [n.strip() for n in head.split(",") if n.strip()]
    if sep:
        if not command.strip():
            raise BadInputError(f"{what} {text!r}: {CMD_PREFIX} names no program ({CMD_PREFIX}PROGRAM ARGS)")
        if names == ["all"]:
            raise BadInputError(f"{what} {text!r}: all cannot be combined with {CMD_PREFIX}")
        known = oracle_names()
        bad = [n for n in names if n not in known]
        if bad:
            raise BadInputError(f"{what} {text!r}: unknown oracle {bad[0]!r} (one of {', '.join(known)}, all, "
                                f"{CMD_PREFIX}PROGRAM ARGS)")
        return names + [CMD_PREFIX + command.strip()]
    if names == ["all"]:
        return list(all_oracles())
    known = oracle_names()
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise BadInputError(f"{what} {text!r}: unknown oracle {bad[0] if bad else ''!r} "
                            f"(one of {', '.join(known)}, all, {CMD_PREFIX}PROGRAM ARGS)")
    return names
