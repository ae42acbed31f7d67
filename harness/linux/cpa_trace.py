# SPDX-License-Identifier: GPL-2.0-or-later
"""The CPA trace of one step: the kprobe events on __change_page_attr_set_clr (entry and return)
and the TLB flush events the guest's ftrace buffer held, decoded into calls (decode_trace), written
as the trace text of docs/formats.md (trace_text) and summed up (trace_summary)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# cpa_data.flags (arch/x86/mm/pat/set_memory.c): CPA_ARRAY / CPA_PAGES_ARRAY carry more than
# one address, of which the probe sees only the first.
CPA_ARRAY, CPA_PAGES_ARRAY = 2, 4


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
