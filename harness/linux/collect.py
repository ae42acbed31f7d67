"""Turn what one guest boot wrote (its ttyS1 file, its registers, its RAM file) into per-step
artefacts: counters, the decoded CPA trace, the kernel's ptdump text, the layout and a compact
page-table image.

The image is an ELF core (x86pt.memory.write_elf_core) holding only the table pages reachable
from `init_top_pgt`, with CR0/CR3/CR4/EFER of the guest and CR3 pointing at init_top_pgt, so
every x86pt command reads it. CR3 as QEMU reports it is the current task's PGD; its kernel half is
the same tables, and init_top_pgt is what the kernel's own ptdump of init_mm walks.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from x86pt.errors import BadInputError, OracleError
from x86pt.memory.base import PAGE, MemoryBase
from x86pt.memory.elfcore import write_elf_core
from x86pt.memory.sparse import SparseMemory
from x86pt.state import CR4_LA57, PagingState, profile_named
from x86pt.walk import Translation, walk
from x86pt.fields import ADDR_MASK_52 as ADDR_MASK, BIT_PS as PS  # bits 51:12; PS

# cpa_data.flags (arch/x86/mm/pat/set_memory.c): CPA_ARRAY / CPA_PAGES_ARRAY carry more than
# one address, of which the probe sees only the first.
CPA_ARRAY, CPA_PAGES_ARRAY = 2, 4


# -- the ttyS1 stream -------------------------------------------------------------------------------
@dataclass
class StepText:
    number: int
    name: str
    sections: dict[str, list[str]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    rc: int | None = None


@dataclass
class BootText:
    header: dict[str, list[str]]
    steps: list[StepText]
    ended: int | None  # number of steps the guest says it ran (@@END n), None if cut off
    pauses: list[int] = field(default_factory=list)  # checkpoints at which it asked for a pause


def parse_output(text: str) -> BootText:
    """Split the guest's ttyS1 output into its header sections and its steps."""
    header: dict[str, list[str]] = {}
    steps: list[StepText] = []
    logs: dict[int, list[str]] = {}
    rcs: dict[int, int] = {}
    cur: list[str] | None = None
    step: StepText | None = None
    ended = None
    pauses: list[int] = []
    log_no = None
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("@@"):
            word, _, rest = line[2:].partition(" ")
            if word == "STEP":
                no, _, name = rest.partition(" ")
                step = StepText(int(no), name)
                steps.append(step)
                cur = None
            elif word == "ENDSTEP":
                step, cur = None, None
            elif word == "LOG":
                log_no = int(rest)
                cur = logs.setdefault(log_no, [])
            elif word == "RC":
                if log_no is not None:
                    rcs[log_no] = int(rest)
                cur = None
            elif word == "PAUSE":
                pauses.append(int(rest))
                cur = None
            elif word == "END":
                ended = int(rest)
                cur = None
            elif step is not None:
                cur = step.sections.setdefault(word, [])
            else:
                cur = header.setdefault(word, [])
            continue
        if cur is not None:
            cur.append(line)
    for s in steps:
        s.log = logs.get(s.number, [])
        s.rc = rcs.get(s.number)
    return BootText(header, steps, ended, pauses)


def parse_kallsyms(lines: list[str]) -> dict[str, int]:
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            out.setdefault(parts[2], int(parts[0], 16))
    return out


def parse_counters(meminfo: list[str], vmstat: list[str]) -> dict[str, int]:
    """DirectMap4k/2M/1G in kB (as /proc/meminfo prints them) and the vmstat split counters."""
    out: dict[str, int] = {}
    for line in meminfo:
        m = re.match(r"(DirectMap\w+):\s+(\d+)\s*kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    for line in vmstat:
        k, _, v = line.partition(" ")
        if k.startswith("direct_map"):
            out[k] = int(v)
    return out


# -- the CPA trace ----------------------------------------------------------------------------------
_EVENT = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s+\((?P<loc>[^)]*)\)\s*(?P<args>.*)$"
)


def _args(s: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in s.split() if "=" in kv)


def _num(v: str | None) -> int | None:
    if v is None or v.startswith("("):  # "(fault)": the probe could not read it
        return None
    return int(v, 0)


@dataclass
class CpaCall:
    """One `__change_page_attr_set_clr` call (primary, or an alias nested in one)."""

    task: str
    pid: int
    ts: str
    vaddr: int | None
    numpages: int
    mask_set: int
    mask_clr: int
    flags: int
    force_split: bool
    primary: bool
    depth: int
    api: str = ""  # the set_memory_*/set_direct_map_* call it belongs to
    before: tuple[int, int, int] | None = None  # direct_pages_count[4K, 2M, 1G] at entry
    after: tuple[int, int, int] | None = None  # ... at return
    ret: int | None = None
    children: list["CpaCall"] = field(default_factory=list, repr=False)

    @property
    def total(self) -> tuple[int, int, int] | None:
        if self.before is None or self.after is None:
            return None
        return tuple(a - b for a, b in zip(self.after, self.before))  # type: ignore[return-value]

    @property
    def own(self) -> tuple[int, int, int] | None:
        """Counter change made by this call itself (its nested alias calls taken out)."""
        t = self.total
        if t is None:
            return None
        d = list(t)
        for c in self.children:
            ct = c.total
            if ct is None:
                return None
            d = [x - y for x, y in zip(d, ct)]
        return tuple(d)  # type: ignore[return-value]

    def splits(self) -> tuple[int, int] | None:
        """(1G->2M splits, 2M->4K splits) made by this call itself, from its counter deltas:
        a 1G split is 1G -1, 2M +512; a 2M split is 2M -1, 4K +512 (update_page_count)."""
        d = self.own
        if d is None:
            return None
        s1g = max(0, -d[2])
        s2m = 512 * s1g - d[1]
        return s1g, s2m

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "children"}
        for k in ("vaddr", "mask_set", "mask_clr"):
            d[k] = None if d[k] is None else hex(d[k])
        d["own"] = self.own
        d["splits"] = self.splits()
        return d


@dataclass(frozen=True)
class Flush:
    """One TLB invalidation the kernel made (probes of initramfs.TLB_PROBES): kind "all"
    (flush_tlb_all), "range" (flush_tlb_kernel_range [start, end); the one-page flushes it made
    are folded into it) or "page" (flush_tlb_one_kernel of start). `in_call`: made inside a
    __change_page_attr_set_clr (a split's or collapse's flush), before the call's last write."""

    kind: str
    start: int = 0
    end: int = 0
    task: str = ""
    pid: int = 0
    in_call: bool = False

    def line(self) -> str:
        """The flush as a trace op (x86pt.tlb.parse_tlb_line)."""
        if self.kind == "all":
            return "flush_tlb_all"
        if self.kind == "range":
            return f"flush_tlb_kernel_range {self.start:#x} {self.end:#x}"
        return f"invlpg {self.start:#x}"


@dataclass
class TraceDecode:
    calls: list[CpaCall]  # every call, in order of entry (nested ones included)
    api: list[tuple[str, str, dict[str, str]]]  # (task, api name, args)
    unmatched: int  # entries without a return (or returns without an entry)
    seq: list = field(default_factory=list)  # calls and Flushes in the order they happened

    @property
    def flushes(self) -> list[Flush]:
        return [x for x in self.seq if isinstance(x, Flush)]


def decode_trace(lines: list[str]) -> TraceDecode:
    """Rebuild the call tree from the probe events: `cpasc` at entry, `cpasc_ret` at return,
    per task (a task's nested entries are `cpa_process_alias` calls on the alias)."""
    calls: list[CpaCall] = []
    api: list[tuple[str, str, dict[str, str]]] = []
    stacks: dict[int, list[CpaCall]] = {}
    last_api: dict[int, str] = {}
    seq: list = []
    ranges: dict[int, tuple[int, int]] = {}  # pid -> (next page, end) of a flush_tlb_kernel_range
    unmatched = 0
    for line in lines:
        m = _EVENT.match(line)
        if not m:
            continue
        ev, a, pid, task = (
            m.group("event"),
            _args(m.group("args")),
            int(m.group("pid")),
            m.group("task").strip(),
        )
        st = stacks.setdefault(pid, [])
        if ev.startswith("tlb_"):
            f = _flush(ev, a, task, pid, bool(st), ranges)
            if f is not None:
                seq.append(f)
            continue
        ranges.pop(pid, None)
        if ev == "cpasc":
            bits = _num(a.get("bits")) or 0
            c = CpaCall(
                task,
                pid,
                m.group("ts"),
                _num(a.get("vaddr")),
                _num(a.get("numpages")) or 0,
                _num(a.get("set")) or 0,
                _num(a.get("clr")) or 0,
                _num(a.get("flags")) or 0,
                bool(bits & 1),
                bool(_num(a.get("primary"))),
                len(st),
                api=last_api.get(pid, "") if not st else st[0].api,
                before=_triple(a),
            )
            if st:
                st[-1].children.append(c)
            st.append(c)
            calls.append(c)
            seq.append(c)
        elif ev == "cpasc_ret":
            if not st:
                unmatched += 1
                continue
            c = st.pop()
            c.after = _triple(a)
            c.ret = _num(a.get("ret"))
            if not st:
                last_api.pop(pid, None)
        elif ev.startswith("set_"):
            api.append((task, ev, a))
            if not st:
                last_api[pid] = f"{ev} " + " ".join(f"{k}={v}" for k, v in a.items())
    unmatched += sum(len(s) for s in stacks.values())
    return TraceDecode(calls, api, unmatched, seq)


def _flush(
    ev: str, a: dict[str, str], task: str, pid: int, in_call: bool, ranges: dict[int, tuple[int, int]]
) -> Flush | None:
    """A flush event -> Flush; None for a one-page flush that flush_tlb_kernel_range made
    (do_kernel_range_flush: flush_tlb_one_kernel from start in 4K steps while < end; the guest
    has one CPU, so they follow the range event in the same task)."""
    if ev == "tlb_one":
        addr = _num(a.get("addr")) or 0
        r = ranges.get(pid)
        if r is not None and addr == r[0] and addr < r[1]:
            ranges[pid] = (addr + 4096, r[1])
            return None
        ranges.pop(pid, None)
        return Flush("page", addr, addr + 4096, task, pid, in_call)
    ranges.pop(pid, None)
    if ev == "tlb_range":
        s, e = _num(a.get("start")) or 0, _num(a.get("end")) or 0
        ranges[pid] = (s, e)
        return Flush("range", s, e, task, pid, in_call)
    if ev == "tlb_all":
        return Flush("all", 0, 0, task, pid, in_call)
    return None


def _triple(a: dict[str, str]) -> tuple[int, int, int] | None:
    v = [_num(a.get(k)) for k in ("d4k", "d2m", "d1g")]
    return None if None in v else (v[0], v[1], v[2])  # type: ignore[return-value]


def trace_text(dec: TraceDecode, title: str) -> str:
    """The trace in the CPA model's format. Each top-level call is one active line:
    `cpa ADDR NPAGES set=MASK clr=MASK flags=F primary|alias [force_split]`; `primary` means the
    kernel ran it with primary=1 (so cpa_process_alias follows), `alias` means it called
    __change_page_attr_set_clr(primary=0) directly (set_direct_map_*). The alias calls the
    kernel made on the side are comments (`#   alias cpa ...`) with their split counts, so a
    replay that models cpa_process_alias does not apply them twice; the API call each line came
    from is a comment before it."""
    out = [f"# {title}", "# decoded from kprobes on __change_page_attr_set_clr (x86pt linux run)"]
    if dec.flushes:
        out.append(
            "# with the kernel's TLB flushes (flush_tlb_all, flush_tlb_kernel_range, "
            "flush_tlb_one_kernel as invlpg); `# in-call` ones ran inside the call before "
            "its last write"
        )
    last_api = None
    for c in dec.seq or dec.calls:
        if isinstance(c, Flush):
            out.append(f"#   in-call {c.line()}" if c.in_call else c.line())
            continue
        if c.depth == 0 and c.api and c.api != last_api:
            out.append(f"# {c.api}")
            last_api = c.api
        if c.depth == 0 and not c.api:
            last_api = None
        line = _cpa_line(c)
        sp = c.splits()
        note = ""
        if sp and (sp[0] or sp[1]):
            note = f"  # split 1G:{sp[0]} 2M:{sp[1]}"
        if c.vaddr is None:
            out.append(f"# unreadable vaddr: {line}{note}")
        elif c.depth == 0:
            if c.flags & (CPA_ARRAY | CPA_PAGES_ARRAY):
                out.append("# array call: only the first address was seen")
            out.append(line + note)
        else:
            out.append("#" + "  " * c.depth + " alias " + line + note)
    return "\n".join(out) + "\n"


def _cpa_line(c: CpaCall) -> str:
    words = [
        f"cpa {c.vaddr:#x}" if c.vaddr is not None else "cpa ?",
        str(c.numpages),
        f"set={c.mask_set:#x}",
        f"clr={c.mask_clr:#x}",
        f"flags={c.flags:#x}",
        "primary" if c.primary else "alias",
    ]
    if c.force_split:
        words.append("force_split")
    return " ".join(words)


def trace_summary(dec: TraceDecode) -> dict:
    tops = [c for c in dec.calls if c.depth == 0]
    s1g = s2m = 0
    for c in dec.calls:
        sp = c.splits()
        if sp:
            s1g += sp[0]
            s2m += sp[1]
    fl = dec.flushes
    return {
        "calls": len(dec.calls),
        "top_level_calls": len(tops),
        "api_calls": len(dec.api),
        "splits_1g": s1g,
        "splits_2m": s2m,
        "unmatched": dec.unmatched,
        "flushes": {k: sum(f.kind == k for f in fl) for k in ("all", "range", "page")},
    }


# -- page tables out of guest RAM -------------------------------------------------------------------
def guest_state(regs: dict[str, int]) -> PagingState:
    """The guest's paging state (QEMU TCG -cpu max: the `qemu` profile, 40 physical bits)."""
    return PagingState(
        cr3=regs["cr3"] & ADDR_MASK,
        cr0=regs["cr0"],
        cr4=regs["cr4"],
        efer=regs["efer"],
        profile=profile_named("qemu"),
    )


def read_kernel_u64(state: PagingState, ram: MemoryBase, va: int) -> int:
    r = walk(state, ram, va)
    if not isinstance(r, Translation):
        raise OracleError(f"guest VA {va:#x} does not translate through CR3 {state.cr3:#x}")
    return ram.read_u64(r.pa)


def kernel_pa(state: PagingState, ram: MemoryBase, va: int) -> int:
    r = walk(state, ram, va)
    if not isinstance(r, Translation):
        raise OracleError(f"guest VA {va:#x} does not translate through CR3 {state.cr3:#x}")
    return r.pa


def collect_tables(ram: MemoryBase, root: int, levels: int) -> SparseMemory:
    """Copy every table page reachable from `root` (present non-leaf entries only) into a sparse
    memory. A table seen twice is copied once (ESPfix maps one PUD page many times)."""
    mem = SparseMemory()
    seen: set[int] = set()
    todo = [(root, levels)]
    while todo:
        pa, level = todo.pop()
        if pa in seen:
            continue
        if not ram.contains(pa, PAGE):
            raise OracleError(f"level-{level} table at {pa:#x} is outside guest RAM")
        seen.add(pa)
        t = ram.table(pa)
        mem.write(pa, t.tobytes())
        if level == 1:
            continue
        for e in t.tolist():
            if not e & 1 or (level in (2, 3) and e & PS):
                continue
            todo.append((e & ADDR_MASK, level - 1))
    return mem


@dataclass(frozen=True)
class Capture:
    memory: SparseMemory
    state: PagingState  # CR3 = init_top_pgt's PA
    layout: dict


def capture(ram: MemoryBase, regs: dict[str, int], kallsyms: dict[str, int]) -> Capture:
    """The table pages of init_mm plus what the guest's memory says about the layout."""
    st = guest_state(regs)
    for need in ("init_top_pgt", "page_offset_base"):
        if need not in kallsyms:
            raise OracleError(f"kallsyms output has no {need}")
    root = kernel_pa(st, ram, kallsyms["init_top_pgt"])
    levels = 5 if regs["cr4"] & CR4_LA57 else 4
    mem = collect_tables(ram, root, levels)
    layout = {
        "levels": levels,
        "init_top_pgt_pa": hex(root),
        "cr3_task": hex(regs["cr3"]),
        "table_pages": len(mem.pages),
    }
    # variables, not symbols: their values are in guest memory (_brk_end is where brk use ended)
    for var in ("page_offset_base", "vmalloc_base", "vmemmap_base", "phys_base", "_brk_end"):
        if var in kallsyms:
            layout[var.lstrip("_") + ("_value" if var == "_brk_end" else "")] = hex(
                read_kernel_u64(st, ram, kallsyms[var])
            )
    return Capture(mem, st.replace(cr3=root), layout)


def parse_tables(lines: list[str]) -> tuple[int, int, SparseMemory]:
    """The in-guest dump of init_mm's tables (build.py, <debugfs>/x86pt/tables): returns the root
    table's PA, its level and the table pages. Each page is "T pa level" followed by runs
    "index count entry stride" (entry[index + k] = entry + k * stride, mod 2^64)."""
    mem = SparseMemory()
    root = level0 = None
    page: list[int] | None = None
    pa = 0
    ended = False

    def flush() -> None:
        if page is not None:
            mem.write(pa, b"".join(v.to_bytes(8, "little") for v in page))

    for line in lines:
        w = line.split()
        if not w:
            continue
        if w[0] == "T":
            flush()
            pa, lvl = int(w[1], 16), int(w[2])
            if root is None:
                root, level0 = pa, lvl
            page = [0] * 512
        elif w[0] == "E":
            if int(w[2]):
                raise OracleError(f"the guest's table dump overflowed ({w[1]} tables)")
            ended = True
        elif page is not None and len(w) == 4:
            i, n, e, stride = (int(x, 16) for x in w)
            if i + n > 512:
                raise OracleError(f"table dump: run {line!r} passes the end of table {pa:#x}")
            for k in range(n):
                page[i + k] = (e + k * stride) & 0xFFFF_FFFF_FFFF_FFFF
        else:
            raise OracleError(f"table dump: unexpected line {line!r}")
    flush()
    if root is None or not ended:
        raise OracleError("the guest's table dump is empty or cut short")
    return root, level0, mem


def capture_from_dump(lines: list[str], regs: dict[str, int], layout: dict) -> Capture:
    """A Capture from the guest's own table dump of one step; control registers from QEMU (they
    do not change after boot) and the layout values from the run's RAM capture."""
    root, levels, mem = parse_tables(lines)
    st = guest_state(regs).replace(cr3=root)
    if levels != (5 if regs["cr4"] & CR4_LA57 else 4):
        raise OracleError(f"table dump has a level-{levels} root, CR4 says otherwise")
    lay = dict(layout)
    lay.update({"levels": levels, "init_top_pgt_pa": hex(root), "table_pages": len(mem.pages)})
    return Capture(mem, st, lay)


def write_capture(path: str, cap: Capture) -> None:
    s = cap.state
    write_elf_core(
        path,
        cap.memory,
        cr0=s.cr0,
        cr3=s.cr3,
        cr4=s.cr4,
        efer=s.efer,
        maxphyaddr=s.m,
        vendor=s.vendor,
        profile=s.profile.name,
    )


# -- registers and layout ---------------------------------------------------------------------------
def parse_registers(info: str) -> dict[str, int]:
    """CR0/CR2/CR3/CR4/EFER from HMP `info registers`."""
    regs = {}
    for name in ("CR0", "CR2", "CR3", "CR4", "EFER"):
        m = re.search(rf"\b{name}=([0-9a-fA-F]+)", info)
        if not m:
            raise OracleError(f"`info registers` has no {name}")
        regs[name.lower()] = int(m.group(1), 16)
    return regs


def parse_iomem(lines: list[str]) -> list[dict]:
    """Top-level /proc/iomem ranges (the guest's physical memory map)."""
    out = []
    for line in lines:
        if line.startswith(" "):
            continue
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) : (.*)", line)
        if m:
            out.append(
                {"start": hex(int(m.group(1), 16)), "end": hex(int(m.group(2), 16) + 1), "name": m.group(3)}
            )
    return out


def layout_of(boot: BootText) -> dict:
    """What the header of the output says: release, cmdline, gbpages/la57, symbols, memory map."""
    ks = parse_kallsyms(boot.header.get("KALLSYMS", []))
    flags = (boot.header.get("CPUFLAGS") or [""])[0].split()
    out = {
        "release": (boot.header.get("UNAME") or [""])[0].strip(),
        "cmdline": (boot.header.get("CMDLINE") or [""])[0].strip(),
        "gbpages": "pdpe1gb" in flags,
        "la57": "la57" in flags,
        "symbols": {k: hex(v) for k, v in ks.items()},
        "iomem": parse_iomem(boot.header.get("IOMEM", [])),
        "probes": boot.header.get("PROBES", []),
    }
    for a, b, name in (("_text", "_etext", "text"), ("__start_rodata", "__end_rodata", "rodata")):
        if a in ks and b in ks:
            out[name] = [hex(ks[a]), hex(ks[b])]
    return out


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise BadInputError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}: bad JSON: {e.msg}") from None


def run_meta(run_dir: str) -> dict:
    """What a run says about itself: run.json, written by every `x86pt linux run` (fresh runs and
    fixtures alike); a fixture's meta.json (source, versions, config) is read when run.json is
    missing, and its keys fill in what run.json lacks."""
    import os

    paths = [os.path.join(run_dir, n) for n in ("run.json", "meta.json")]
    have = [p for p in paths if os.path.exists(p)]
    if not have:
        raise BadInputError(f"{run_dir} has neither run.json nor meta.json (not an x86pt linux run)")
    meta: dict = {}
    for p in reversed(have):  # run.json last: it wins
        meta.update(load_json(p))
    return meta


def read_artifact(directory: str, name: str) -> bytes:
    """A run's file by name, plain or xz-compressed (`name.xz`, as fixtures keep big files)."""
    import lzma
    import os

    p = os.path.join(directory, name)
    try:
        if os.path.exists(p):
            with open(p, "rb") as f:
                return f.read()
        with open(p + ".xz", "rb") as f:
            return lzma.decompress(f.read())
    except FileNotFoundError:
        raise BadInputError(f"{p}: no such file (nor {name}.xz)") from None
    except lzma.LZMAError as e:
        raise BadInputError(f"{p}.xz: bad xz data: {e}") from None
    except OSError as e:
        raise BadInputError(f"cannot read {p}: {e.strerror}") from None


def materialize(directory: str, name: str, dest: str) -> str:
    """Path of `name` as a plain file: itself, or decompressed into `dest` (for xz fixtures)."""
    import os

    p = os.path.join(directory, name)
    if os.path.exists(p):
        return p
    from x86pt.memory.atomic import write_bytes_atomic

    out = os.path.join(dest, name)
    write_bytes_atomic(out, read_artifact(directory, name))
    return out


START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map: the highmap's base (x86-64)


def cpa_layout(layout: dict, name: str = "linux") -> dict:
    """The run's layout in the CPA model's layout format (x86pt.cpa.layout.layout_from_json):
    RAM ranges from /proc/iomem, the kernel image symbols as physical addresses (highmap VA -
    __START_KERNEL_map + phys_base), PAGE_OFFSET and gbpages as the guest had them."""
    sym = {k: int(v, 16) for k, v in layout.get("symbols", {}).items()}
    phys_base = int(layout.get("phys_base", "0x0"), 16)

    def pa(name: str) -> int:
        return sym[name] - START_KERNEL_MAP + phys_base

    def page_up(x: int) -> int:
        return (x + 0xFFF) & ~0xFFF

    ram = []
    for r in layout.get("iomem", []):
        if r["name"] == "System RAM":  # whole pages only (the first range ends at 0x9fc00)
            lo, hi = page_up(int(r["start"], 16)), int(r["end"], 16) & ~0xFFF
            if lo < hi:
                ram.append([hex(lo), hex(hi)])
    out: dict = {"name": name, "ram": ram, "gbpages": bool(layout.get("gbpages", True)), "pti": False}
    if "page_offset_base" in layout:
        out["page_offset"] = layout["page_offset_base"]
    need = (
        "_text",
        "_etext",
        "__start_rodata",
        "__end_rodata",
        "_sdata",
        "__init_begin",
        "__init_end",
        "__brk_base",
    )
    if all(n in sym for n in need):
        end_ro = sym.get("__end_rodata_hpage_align", (sym["__end_rodata"] + (2 << 20) - 1) & ~((2 << 20) - 1))
        out["kernel"] = {
            "text": hex(pa("_text")),
            "etext": hex(page_up(pa("_etext"))),
            "start_rodata": hex(pa("__start_rodata")),
            "end_rodata": hex(page_up(pa("__end_rodata"))),
            "end_rodata_hpage_align": hex(end_ro - START_KERNEL_MAP + phys_base),
            "sdata": hex(pa("_sdata")),
            "init_begin": hex(pa("__init_begin")),
            "init_end": hex(pa("__init_end")),
            # _brk_end's value when the run captured it, else __brk_base (older runs)
            "brk_end": hex(
                page_up(
                    int(layout["brk_end_value"], 16) - START_KERNEL_MAP + phys_base
                    if "brk_end_value" in layout
                    else pa("__brk_base")
                )
            ),
        }
    return out
