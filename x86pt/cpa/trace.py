"""Traces: one operation per line, `#` comments, numbers decimal or 0x-hex.

    set_memory_ro ADDR NPAGES            (likewise rw x nx rox np np_noalias p 4k global nonglobal)
    set_direct_map_invalid_noflush ADDR  (the page's direct-map address)
    set_direct_map_default_noflush ADDR
    kernel_map_pages ADDR NPAGES 0|1     (DEBUG_PAGEALLOC __kernel_map_pages)
    cpa ADDR NPAGES set=MASK clr=MASK [flags=F] [primary|alias] [force_split]
    oob ADDR set=MASK clr=MASK           (out-of-band write of the 4K PTE mapping ADDR, as kfence)
    vmap ADDR PA NPAGES [huge]           (vmalloc mapping, frames PA.. ; not CPA)
    vunmap ADDR NPAGES
    memory_add PA SIZE / memory_remove PA SIZE   (hotplug; not CPA)

and the TLB operations of x86pt.tlb (flush_tlb_all, flush_tlb_kernel_range START END, invlpg
ADDR, touch, speculate, ...): they change no table; `cpa replay --tlb` runs them on its TLB
model, a plain replay skips them.

`cpa ... primary` (the default) is a whole change_page_attr_set_clr call; `cpa ... alias` is
one bare __change_page_attr_set_clr(primary=0) as the kernel's nested alias calls are traced.
The replay driver runs a parsed trace on a CpaModel, with optional incremental validation,
samples for the fragmentation plot, and minimisation of a failing trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence

from x86pt import tlb
from x86pt.cpa.ops import API, CpaModel
from x86pt.cpa.traceops import Hotplug, MapPages, OnePage, Oob, PageRange, RawCpa, Vmap
from x86pt.cpa.validate import Validator, Violation
from x86pt.errors import BadInputError
from x86pt.memory.atomic import write_text_atomic

if TYPE_CHECKING:
    from x86pt.cpa.layout import Layout
    from x86pt.cpa.validate import OracleCheck
    from x86pt.image import Image
    from x86pt.memory.base import MemoryBase
    from x86pt.state import PagingState

# one trace operation: (name, fields...), the fields' number and types set by the name (parse_line)
Op = tuple[Any, ...]

API_NAMES = tuple(API)
OTHER = (
    "set_direct_map_invalid_noflush",
    "set_direct_map_default_noflush",
    "kernel_map_pages",
    "cpa",
    "oob",
    "vmap",
    "vunmap",
    "memory_add",
    "memory_remove",
)
U64MAX = (1 << 64) - 1
TLB_NAMES = frozenset(tlb.TLB_OPS)


def _num(s: str, what: str, where: str) -> int:
    try:
        s = s.replace("_", "")
        v = int(s, 16) if s[:2].lower() == "0x" else int(s, 10)
    except ValueError:
        raise BadInputError(f"{where}: bad {what} {s!r} (expected decimal or 0x-hex)") from None
    if not 0 <= v <= U64MAX:
        raise BadInputError(f"{where}: {what} {s!r} out of range")
    return v


def parse_line(line: str, where: str = "trace") -> Op | None:
    """One trace line -> an op tuple (name, ...), None for blank/comment lines."""
    h = line.find("#")
    if h >= 0:
        line = line[:h]
    parts = line.split()
    if not parts:
        return None
    name = parts[0]
    args = parts[1:]
    if name.startswith("set_memory_") and name in API:
        if len(args) != 2:
            raise BadInputError(f"{where}: {name} takes ADDR NPAGES")
        return PageRange(name, _num(args[0], "address", where), _num(args[1], "page count", where))
    if name in ("set_direct_map_invalid_noflush", "set_direct_map_default_noflush"):
        if len(args) != 1:
            raise BadInputError(f"{where}: {name} takes one ADDR (the page's direct-map address)")
        return OnePage(name, _num(args[0], "address", where))
    if name == "kernel_map_pages":
        if len(args) != 3 or args[2] not in ("0", "1"):
            raise BadInputError(f"{where}: kernel_map_pages takes ADDR NPAGES 0|1")
        return MapPages(
            name, _num(args[0], "address", where), _num(args[1], "page count", where), int(args[2])
        )
    if name in ("cpa", "oob"):
        if len(args) < (2 if name == "oob" else 3):
            raise BadInputError(
                f"{where}: {name} needs ADDR{' NPAGES' if name == 'cpa' else ''} set=.. clr=.."
            )
        addr = _num(args[0], "address", where)
        rest = args[1:]
        n = 1
        if name == "cpa":
            n = _num(args[1], "page count", where)
            rest = args[2:]
        kv = {"set": None, "clr": None, "flags": 0}
        primary, force = True, False
        for w in rest:
            if "=" in w:
                k, v = w.split("=", 1)
                if k not in kv or (name == "oob" and k == "flags"):
                    raise BadInputError(f"{where}: unknown field {k!r}")
                kv[k] = _num(v, k, where)
            elif name == "cpa" and w in ("primary", "alias"):
                primary = w == "primary"
            elif name == "cpa" and w == "force_split":
                force = True
            else:
                raise BadInputError(f"{where}: unexpected word {w!r}")
        if kv["set"] is None or kv["clr"] is None:
            raise BadInputError(f"{where}: {name} needs both set=MASK and clr=MASK")
        if name == "oob":
            return Oob("oob", addr, kv["set"], kv["clr"])
        flags = kv["flags"] or 0
        if flags & 6:
            raise BadInputError(f"{where}: CPA_ARRAY/CPA_PAGES_ARRAY (flags & 6) are not modelled")
        return RawCpa("cpa", addr, n, kv["set"], kv["clr"], flags, primary, force)
    if name == "vmap":
        if len(args) not in (3, 4) or (len(args) == 4 and args[3] != "huge"):
            raise BadInputError(f"{where}: vmap takes ADDR PA NPAGES [huge]")
        return Vmap(
            "vmap",
            _num(args[0], "address", where),
            _num(args[1], "physical address", where),
            _num(args[2], "page count", where),
            len(args) == 4,
        )
    if name == "vunmap":
        if len(args) != 2:
            raise BadInputError(f"{where}: vunmap takes ADDR NPAGES")
        return PageRange("vunmap", _num(args[0], "address", where), _num(args[1], "page count", where))
    if name in ("memory_add", "memory_remove"):
        if len(args) != 2:
            raise BadInputError(f"{where}: {name} takes PA SIZE")
        return Hotplug(name, _num(args[0], "physical address", where), _num(args[1], "size", where))
    op = tlb.parse_tlb_line(line, where)
    if op is not None:
        return op
    raise BadInputError(
        f"{where}: unknown operation {name!r} (known: {', '.join(API_NAMES + OTHER + tlb.TLB_OPS)})"
    )


def format_op(op: Op) -> str:
    name = op[0]
    if name in TLB_NAMES:
        return tlb.format_tlb_op(op)
    if name in API:
        return f"{name} {op[1]:#x} {op[2]}"
    if name in ("set_direct_map_invalid_noflush", "set_direct_map_default_noflush"):
        return f"{name} {op[1]:#x}"
    if name == "kernel_map_pages":
        return f"{name} {op[1]:#x} {op[2]} {op[3]}"
    if name == "cpa":
        _, a, n, s, c, fl, prim, fs = op
        return (
            f"cpa {a:#x} {n} set={s:#x} clr={c:#x}"
            + (f" flags={fl:#x}" if fl else "")
            + ("" if prim else " alias")
            + (" force_split" if fs else "")
        )
    if name == "oob":
        return f"oob {op[1]:#x} set={op[2]:#x} clr={op[3]:#x}"
    if name == "vmap":
        return f"vmap {op[1]:#x} {op[2]:#x} {op[3]}" + (" huge" if op[4] else "")
    if name == "vunmap":
        return f"vunmap {op[1]:#x} {op[2]}"
    return f"{name} {op[1]:#x} {op[2]:#x}"


def parse_trace(lines: Iterable[str], source: str = "trace") -> list[Op]:
    ops = []
    for n, line in enumerate(lines, 1):
        op = parse_line(line, f"{source}:{n}")
        if op is not None:
            ops.append(op)
    return ops


def read_trace(path: str) -> list[Op]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return parse_trace(f, path)
    except OSError as e:
        raise BadInputError(f"cannot read trace {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"trace {path} is not UTF-8 text") from None


def _api_call(f: Callable[[CpaModel, int, int], int]) -> Callable[[CpaModel, Op], object]:
    return lambda m, op: f(m, op[1], op[2])


# op name -> how the model runs it (positional fields, so a plain tuple of the fields works too)
APPLY: dict[str, Callable[[CpaModel, Op], object]] = {
    **{name: _api_call(f) for name, f in API.items()},
    "set_direct_map_invalid_noflush": lambda m, op: m.set_direct_map_invalid_noflush(op[1]),
    "set_direct_map_default_noflush": lambda m, op: m.set_direct_map_default_noflush(op[1]),
    "cpa": lambda m, op: m.cpa(op[1], op[2], op[3], op[4], op[5], op[6], op[7]),
    "oob": lambda m, op: m.oob(op[1], op[2], op[3]),
    "kernel_map_pages": lambda m, op: m.kernel_map_pages(op[1], op[2], op[3]),
    "vmap": lambda m, op: m.vmap(op[1], op[2], op[3], op[4]),
    "vunmap": lambda m, op: m.vunmap(op[1], op[2]),
    "memory_add": lambda m, op: m.memory_add(op[1], op[2]),
    "memory_remove": lambda m, op: m.memory_remove(op[1], op[2]),
}


def apply_op(m: CpaModel, op: Op) -> object:
    """Run one op on the model; returns the op's result (errno, or oob's accepted flag). TLB ops
    change no table: None (cpa replay --tlb sends them to its TlbReplay.trace_op)."""
    f = APPLY.get(op[0])
    if f is not None:
        return f(m, op)
    if op[0] in TLB_NAMES:
        return None
    raise BadInputError(f"unknown operation {op[0]!r}")


class CostSample(Protocol):
    """A walk-cost estimate as a replay result keeps it: an x86pt.cost.Cost (not imported
    here, even for annotations: x86pt.cost imports this module)."""

    @property
    def walks(self) -> float: ...

    @property
    def pattern(self) -> str: ...

    def to_json(self) -> dict[str, object]: ...


@dataclass
class ReplayResult:
    policy: str
    kernel: str
    layout: str
    ops: int
    seconds: float
    counters: dict[str, int]
    meminfo: dict[str, int]
    tables: int
    table_high_water: int
    violation: Violation | None = None
    samples: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # idx, 4k, 2m, 1g, tables
    notes: tuple[str, ...] = ()
    pages_checked: int = 0
    cost: CostSample | None = None  # cpa compare --cost: the walk cost at the end
    cost_series: Sequence[tuple[int, CostSample]] = ()  # --cost: (ops done, cost) over the replay

    def summary(self) -> dict[str, Any]:
        c = self.counters
        return {
            "policy": self.policy,
            "kernel": self.kernel,
            "layout": self.layout,
            "ops": self.ops,
            "seconds": round(self.seconds, 3),
            "ops_per_s": round(self.ops / self.seconds) if self.seconds else None,
            **self.meminfo,
            "split_2m": c["split_2m"],
            "split_1g": c["split_1g"],
            "collapse_2m": c["collapse_2m"],
            "collapse_1g": c["collapse_1g"],
            "merge_2m": c["merge_2m"],
            "merge_1g": c["merge_1g"],
            "tables": self.tables,
            "tables_allocated": c["tables_allocated"],
            "tables_freed": c["tables_freed"],
            "flush_all": c["flush_all"],
            "flush_all_split": c["flush_all_split"],
            "invlpg_pages": c["invlpg_pages"],
            "oob_rejected": c["oob_rejected"],
            "violation": str(self.violation) if self.violation else None,
        }


def new_model(
    layout: Layout, kernel: str, policy: str, image: Image | tuple[MemoryBase, PagingState] | None = None
) -> CpaModel:
    if image is not None:
        from x86pt.cpa.importer import model_from_image

        return model_from_image(image, layout, kernel, policy)
    return CpaModel(layout, kernel, policy)


def replay(
    m: CpaModel,
    ops: list[Op],
    *,
    validate: bool = False,
    checks: str = "abcd",
    samples: int = 400,
    progress: Callable[[int, int], None] | None = None,
    dump_at: int | None = None,
    on_dump: Callable[[CpaModel, int], None] | None = None,
    stop_on_violation: bool = True,
    checkpoints: frozenset[int] = frozenset(),
    on_checkpoint: Callable[[CpaModel, int], None] | None = None,
    oracle_check: OracleCheck | None = None,
) -> ReplayResult:
    """Run `ops` on `m`. With `validate`, check after each op (first violation stops).
    `on_checkpoint(m, done)` runs after `done` ops for each `done` in `checkpoints`.
    `oracle_check` (an x86pt.cpa.oracle_probe.OracleCheck) decides invariant (e) when `checks`
    holds "e"."""
    val = Validator(m, checks, oracle_check=oracle_check) if validate else None
    violation = val.initial() if val else None
    pol = m.policy
    track = validate or pol.needs_touched
    every = max(1, len(ops) // samples) if samples else 0
    series: list[tuple[int, int, int, int, int]] = []
    c = m.counters
    prog_every = max(1, len(ops) // 200)
    t0 = time.perf_counter()
    n = len(ops)
    api = API
    idx = -1
    if dump_at is not None and dump_at < 0 and on_dump:
        on_dump(m, -1)
    for idx, op in enumerate(ops):
        if violation and stop_on_violation:
            break
        f = api.get(op[0])
        if f is None and op[0] in TLB_NAMES:
            continue  # no table changes (the TLB model's, under --tlb)
        if track:
            m.touched = set()
        res = f(m, op[1], op[2]) if f is not None else apply_op(m, op)
        if track:
            touched = m.touched
            pol.after_op(touched)
            m.touched = None
            if val is not None:
                v = val.check(idx, op, res, touched)
                if v and not violation:
                    violation = v
        if every and idx % every == 0:
            series.append((idx, c.dpc4k, c.dpc2m, c.dpc1g, m.table_count()))
        if progress and idx % prog_every == 0:
            progress(idx, n)
        if dump_at is not None and idx == dump_at and on_dump:
            on_dump(m, idx)
        if on_checkpoint is not None and idx + 1 in checkpoints:
            on_checkpoint(m, idx + 1)
    secs = time.perf_counter() - t0
    if progress:
        progress(n, n)
    done = (idx + 1) if not (violation and stop_on_violation and violation.op_index < idx) else idx
    series.append((done, c.dpc4k, c.dpc2m, c.dpc1g, m.table_count()))
    return ReplayResult(
        pol.name,
        m.version.name,
        m.layout.name,
        done,
        secs,
        c.snapshot(),
        c.meminfo(m.layout.gbpages),
        m.table_count(),
        m.pool.high_water,
        violation,
        series,
        tuple(x for x in (pol.note,) if x),
        val.pages_checked if val else 0,
    )


def reproduces(
    make: Callable[[], CpaModel],
    ops: list[Op],
    invariant: str,
    checks: str,
    oracle_check: OracleCheck | None = None,
) -> bool:
    m = make()
    r = replay(m, ops, validate=True, checks=checks, samples=0, oracle_check=oracle_check)
    return r.violation is not None and r.violation.invariant == invariant


def minimise(
    make: Callable[[], CpaModel],
    ops: list[Op],
    violation: Violation,
    checks: str = "abcd",
    budget_s: float = 30.0,
    oracle_check: OracleCheck | None = None,
) -> list[Op]:
    """A small trace that still violates the same invariant: the shortest failing suffix of the
    prefix up to the failing op, then delta debugging (ddmin) within a time budget."""
    deadline = time.monotonic() + budget_s
    prefix = ops[: violation.op_index + 1]
    inv = violation.invariant
    w = 1
    cur = prefix
    while w < len(prefix):
        cand = prefix[-w:]
        if reproduces(make, cand, inv, checks, oracle_check):
            cur = cand
            break
        if time.monotonic() > deadline:
            break
        w *= 2
    n = 2
    while len(cur) >= 2 and time.monotonic() < deadline:
        chunk = max(1, len(cur) // n)
        reduced = False
        for i in range(0, len(cur), chunk):
            cand = cur[:i] + cur[i + chunk :]
            if cand and reproduces(make, cand, inv, checks, oracle_check):
                cur = cand
                n = max(n - 1, 2)
                reduced = True
                break
            if time.monotonic() > deadline:
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(cur), n * 2)
    return cur


def write_trace(path: str, ops: list[Op], header: Iterable[str] = ()) -> None:
    text = "".join(f"# {h}\n" for h in header) + "".join(format_op(op) + "\n" for op in ops)
    write_text_atomic(path, text)


def iter_lines(ops: list[Op]) -> Iterator[str]:
    for op in ops:
        yield format_op(op)
