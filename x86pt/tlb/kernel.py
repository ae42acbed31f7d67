# SPDX-License-Identifier: GPL-2.0-or-later
"""The kernel's TLB flushes (arch/x86/mm/tlb.c: flush_tlb_kernel_range and its ceiling) and the TLB
trace operations: parse, format and apply them to a `TlbSystem`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from x86pt.errors import BadInputError
from x86pt.walk import Access
from x86pt.tlb.entries import PAGE, TLB_FLUSH_ALL, TLB_SINGLE_PAGE_FLUSH_CEILING, U64
from x86pt.tlb.system import Outcome, TlbSystem

# one TLB trace operation: (name, fields...), the fields set by the name (parse_tlb_line)
TlbOp = tuple[Any, ...]


# -- the kernel's flushes and the trace operations -----------------------------------------------
@dataclass(frozen=True)
class FlushDone:
    """What one flush operation did on the CPUs: `full` flushes (one per CPU set) or INVLPGs
    of `pages` addresses on each CPU; comparable with the CPA model's counters (flush_all,
    invlpg_pages)."""

    full: int = 0
    pages: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()


# what applying a TLB op gives: a FlushDone, a touch's outcomes, the entries a speculate made, or None
TlbResult = FlushDone | frozenset[Outcome] | int | None


def kernel_range_plan(
    start: int, end: int, kernel: str = "6.15", ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING
) -> tuple[int, ...] | None:
    """What flush_tlb_kernel_range(start, end) does (arch/x86/mm/tlb.c): None for a full flush
    on every CPU (do_flush_tlb_all), else the addresses each CPU invalidates one by one
    (do_kernel_range_flush: from start in PAGE_SIZE steps while < end).
    Full flush when end is TLB_FLUSH_ALL or the range is over the ceiling: up to v6.14,
    `end - start > ceiling << PAGE_SHIFT` (bytes); from v6.15 (commit 4a02ed8e1cc3 "x86/mm:
    Consolidate full flush threshold decision", in get_flush_tlb_info) `(end - start) >>
    PAGE_SHIFT > ceiling` (whole pages). The two differ only when end - start is not a
    multiple of 4K. INVLPGB (AMD, v6.15+) broadcasts the same per-page or full invalidation."""
    start &= U64
    end &= U64
    if end == TLB_FLUSH_ALL:
        return None
    length = (end - start) & U64 if end >= start else 0
    if _version(kernel) >= (6, 15):
        full = (length >> 12) > ceiling
    else:
        full = length > ceiling << 12
    if full:
        return None
    return tuple(range(start, end, PAGE))


def _version(kernel: str) -> tuple[int, int]:
    s = str(kernel).strip().lstrip("v").rstrip("+")
    try:
        a, b = s.split(".")[:2]
        return int(a), int(b)
    except ValueError:
        raise BadInputError(f"bad kernel version {kernel!r} (e.g. 6.1, 6.15)") from None


TLB_OPS = (
    "flush_tlb_all",
    "flush_tlb_kernel_range",
    "flush_tlb_local",
    "invlpg",
    "touch",
    "speculate",
    "mov_cr3",
    "mov_cr4",
    "invpcid",
)
ACCESS_WORDS = {"read": Access("read"), "write": Access("write"), "fetch": Access("fetch")}


def _num(s: str, what: str, where: str) -> int:
    try:
        t = s.replace("_", "")
        v = int(t, 16) if t[:2].lower() == "0x" else int(t, 10)
    except ValueError:
        raise BadInputError(f"{where}: bad {what} {s!r} (expected decimal or 0x-hex)") from None
    if not 0 <= v <= U64:
        raise BadInputError(f"{where}: {what} {s!r} out of range")
    return v


def _cpu_word(w: str, where: str) -> int | None:
    if w == "all":
        return None
    if w.startswith("cpu="):
        w = w[4:]
    return _num(w, "CPU number", where)


def parse_tlb_line(line: str, where: str = "trace") -> TlbOp | None:
    """One trace line -> a TLB op tuple, or None when the line is blank, a comment, or not a TLB
    operation (so a trace parser can offer the line to this function first). Syntax:

        flush_tlb_all                          every CPU: full flush incl. globals
        flush_tlb_kernel_range START END       every CPU: the kernel's 33-page rule
        flush_tlb_local CPU                    one CPU: full flush (__flush_tlb_all)
        invlpg ADDR [CPU|all]                  INVLPG; default every CPU (on_each_cpu)
        touch CPU ADDR [NPAGES] [read|write|fetch] [user]
        speculate CPU|all START END            prefetch/speculative fills of a range
        mov_cr3 CPU VALUE   /   mov_cr4 CPU VALUE
        invpcid CPU TYPE [PCID [ADDR]]
    """
    h = line.find("#")
    if h >= 0:
        line = line[:h]
    parts = line.split()
    if not parts or parts[0] not in TLB_OPS:
        return None
    name, args = parts[0], parts[1:]

    def need(lo: int, hi: int, usage: str) -> None:
        if not lo <= len(args) <= hi:
            raise BadInputError(f"{where}: {name} takes {usage}")

    if name == "flush_tlb_all":
        need(0, 0, "no arguments")
        return (name,)
    if name == "flush_tlb_kernel_range":
        need(2, 2, "START END")
        return (name, _num(args[0], "start", where), _num(args[1], "end", where))
    if name == "flush_tlb_local":
        need(1, 1, "CPU")
        return (name, _cpu_word(args[0], where))
    if name == "invlpg":
        need(1, 2, "ADDR [CPU|all]")
        return (name, _num(args[0], "address", where), _cpu_word(args[1], where) if len(args) > 1 else None)
    if name == "touch":
        need(2, 5, "CPU ADDR [NPAGES] [read|write|fetch] [user]")
        cpu = _cpu_word(args[0], where)
        addr = _num(args[1], "address", where)
        n, kind, user = 1, "read", False
        for w in args[2:]:
            if w in ACCESS_WORDS:
                kind = w
            elif w == "user":
                user = True
            else:
                n = _num(w, "page count", where)
        return (name, cpu, addr, n, kind, user)
    if name == "speculate":
        need(3, 3, "CPU|all START END")
        return (name, _cpu_word(args[0], where), _num(args[1], "start", where), _num(args[2], "end", where))
    if name in ("mov_cr3", "mov_cr4"):
        need(2, 2, "CPU VALUE")
        return (name, _cpu_word(args[0], where), _num(args[1], "value", where))
    need(2, 4, "CPU TYPE [PCID [ADDR]]")
    return (
        name,
        _cpu_word(args[0], where),
        _num(args[1], "type", where),
        _num(args[2], "pcid", where) if len(args) > 2 else 0,
        _num(args[3], "address", where) if len(args) > 3 else 0,
    )


def format_tlb_op(op: TlbOp) -> str:
    name: str = op[0]

    def cpu(c: int | None) -> str:
        return "all" if c is None else str(c)

    if name == "flush_tlb_all":
        return name
    if name == "flush_tlb_kernel_range":
        return f"{name} {op[1]:#x} {op[2]:#x}"
    if name == "flush_tlb_local":
        return f"{name} {cpu(op[1])}"
    if name == "invlpg":
        return f"{name} {op[1]:#x}" + ("" if op[2] is None else f" {op[2]}")
    if name == "touch":
        return f"touch {cpu(op[1])} {op[2]:#x} {op[3]} {op[4]}" + (" user" if op[5] else "")
    if name == "speculate":
        return f"speculate {cpu(op[1])} {op[2]:#x} {op[3]:#x}"
    if name in ("mov_cr3", "mov_cr4"):
        return f"{name} {cpu(op[1])} {op[2]:#x}"
    if name == "invpcid":
        return f"invpcid {cpu(op[1])} {op[2]} {op[3]:#x} {op[4]:#x}"
    raise BadInputError(f"not a TLB operation: {op!r}")


def flush_tlb_kernel_range(
    system: TlbSystem,
    start: int,
    end: int,
    *,
    kernel: str = "6.15",
    ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING,
) -> FlushDone:
    """The kernel's flush_tlb_kernel_range on every CPU (on_each_cpu), by kernel_range_plan."""
    plan = kernel_range_plan(start, end, kernel, ceiling)
    cpus = tuple(c.index for c in system.cpus)
    if plan is None:
        system.flush_all()
        return FlushDone(full=1, cpus=cpus)
    for c in system.cpus:
        for a in plan:
            c.invlpg(a)
    return FlushDone(pages=plan, cpus=cpus)


def apply_tlb_op(
    system: TlbSystem, op: TlbOp, *, kernel: str = "6.15", ceiling: int = TLB_SINGLE_PAGE_FLUSH_CEILING
) -> TlbResult:
    """Run one TLB trace op (from parse_tlb_line) on `system`. Flushes return a FlushDone;
    `touch` the set of possible outcomes of its last access; `speculate` the entries added."""
    run = _APPLY.get(op[0])
    if run is None:
        raise BadInputError(f"unknown TLB operation {op[0]!r} (known: {', '.join(TLB_OPS)})")
    return run(system, op, kernel, ceiling)


def _cpus(system: TlbSystem, which: int | None) -> tuple[int, ...]:
    return tuple(c.index for c in system.selected(which))


def _apply_flush_all(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> FlushDone:
    system.flush_all()
    return FlushDone(full=1, cpus=_cpus(system, None))


def _apply_kernel_range(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> FlushDone:
    return flush_tlb_kernel_range(system, op[1], op[2], kernel=kernel, ceiling=ceiling)


def _apply_flush_local(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> FlushDone:
    system.flush_all(op[1])
    return FlushDone(full=1, cpus=_cpus(system, op[1]))


def _apply_invlpg(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> FlushDone:
    system.invlpg(op[1], op[2])
    return FlushDone(pages=(op[1],), cpus=_cpus(system, op[2]))


def _apply_touch(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> frozenset[Outcome]:
    _, cpu, addr, n, kind, user = op
    res: frozenset[Outcome] = frozenset()
    for c in system.selected(cpu):
        for i in range(n):
            res = system.touch(c.index, addr + i * PAGE, Access(kind, user=user))
    return res


def _apply_speculate(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> int:
    return system.speculate(op[1], op[2], op[3])


def _apply_mov_cr3(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> None:
    for c in system.selected(op[1]):
        c.mov_cr3(op[2])


def _apply_mov_cr4(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> None:
    for c in system.selected(op[1]):
        c.mov_cr4(op[2])


def _apply_invpcid(system: TlbSystem, op: TlbOp, kernel: str, ceiling: int) -> None:
    for c in system.selected(op[1]):
        c.invpcid(op[2], op[3], op[4])


# op name -> what it does on a TlbSystem (the names of TLB_OPS, one handler each)
_APPLY: dict[str, Callable[[TlbSystem, TlbOp, str, int], TlbResult]] = {
    "flush_tlb_all": _apply_flush_all,
    "flush_tlb_kernel_range": _apply_kernel_range,
    "flush_tlb_local": _apply_flush_local,
    "invlpg": _apply_invlpg,
    "touch": _apply_touch,
    "speculate": _apply_speculate,
    "mov_cr3": _apply_mov_cr3,
    "mov_cr4": _apply_mov_cr4,
    "invpcid": _apply_invpcid,
}
assert set(_APPLY) == set(TLB_OPS)
