"""Replay check of a captured Linux run (issue 6 item 4): the CPA model, started from the page
tables captured after step k-1 (plus the run's layout and --kernel of that kernel), replays the
CPA calls the kprobes recorded in step k and must end with the kernel's state after step k:

* the direct map and the kernel-image mapping ("highmap"), leaf for leaf: the level of the leaf,
  its frame and its flags (P RW US PWT PCD PAT G NX), against the tables captured after step k.
  An A or D bit the kernel's entry has and the model's lacks is counted apart (`ad_only`): the
  CPU sets them when the page is used after the change (SDM 4.8), e.g. 6.6+ clears D with RW
  in set_direct_map_invalid_noflush and a later write to the reused page sets it again;
* DirectMap4k/2M/1G against counters.json of step k (the kernel's /proc/meminfo);
* the split events of the step (direct_map_level2/3_splits deltas of /proc/vmstat) against the
  model's split counts.

Module memory that vmalloc mapped inside step k is not in image k-1; the kernel's vmap did that
between the two captures and it is not a CPA call. Before replaying, each 4K page a top-level
call of the trace acts on outside the direct map gets the frame the kernel used: from the alias
calls the trace recorded as comments (cpa_process_alias was called on that frame's direct-map
address: exact), else from image k (where that page points after the step). A page known from
neither is reported as `unseeded`. The vmalloc mappings themselves are not compared.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from harness.linux.runfolder import cpa_layout, load_json, materialize, read_artifact, run_meta
from x86pt.cpa.importer import model_from_image
from x86pt.cpa.kernel import P, PSE, PTE_PFN_MASK, PMD_PFN_MASK, PUD_PFN_MASK
from x86pt.cpa.layout import Layout, layout_from_json
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.trace import apply_op, parse_line
from x86pt.image import open_image

AD = 0x60  # _PAGE_ACCESSED | _PAGE_DIRTY: set by the CPU on use
PMD_SIZE = 1 << 21


@dataclass(frozen=True)
class Divergence:
    va: int
    level_model: int
    level_kernel: int
    model: int
    kernel: int

    def __str__(self) -> str:
        return (
            f"{self.va:#x}: model L{self.level_model} {self.model:#018x}, kernel "
            f"L{self.level_kernel} {self.kernel:#018x}"
        )


@dataclass
class StepReplay:
    run: str
    step: int
    name: str
    ops: int
    leaves: int  # leaves compared (direct map + highmap)
    divergences: list[Divergence]
    ad_only: int  # leaves that differ in A/D only
    meminfo_model: tuple[int, int, int]
    meminfo_kernel: tuple[int, int, int]
    splits_model: tuple[int, int]  # (2M, 1G) split events during the replay
    splits_kernel: tuple[int, int]  # vmstat deltas
    seeded_alias: int = 0
    seeded_image: int = 0
    unseeded: int = 0
    errors: int = 0  # calls the model answered with an errno
    notes: list[str] = field(default_factory=list)

    @property
    def tables_equal(self) -> bool:
        return not self.divergences

    @property
    def counters_equal(self) -> bool:
        return self.meminfo_model == self.meminfo_kernel and self.splits_model == self.splits_kernel

    @property
    def identical(self) -> bool:
        return self.tables_equal and self.counters_equal


def run_layout(run_dir: str) -> Layout:
    lay = load_json(os.path.join(run_dir, "layout.json"))
    return layout_from_json(cpa_layout(lay, os.path.basename(run_dir)), os.path.basename(run_dir))


def run_kernel(run_dir: str) -> str:
    meta = run_meta(run_dir)
    return str(meta.get("config", {}).get("kernel") or meta["kernel_release"].split("-")[0])


def step_dirs(run_dir: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(run_dir, "step-[0-9]*")))


def load_model(step_dir: str, layout: Layout, kernel: str, tmp: str) -> CpaModel:
    os.makedirs(tmp, exist_ok=True)
    elf = materialize(step_dir, "tables.elf", tmp)
    with open_image(elf) as img:
        return model_from_image(img, layout, kernel, "none")


def leaves(m: CpaModel, lo: int, hi: int) -> dict[int, tuple[int, int]]:
    """{va & vmask: (level, raw)} of the non-zero leaves (present or not) in [lo, hi) (masked)."""
    out: dict[int, tuple[int, int]] = {}
    for k3, t3 in m.t3.items():
        base3 = k3 << 39
        if base3 + (1 << 39) <= lo or base3 >= hi:
            continue
        for i3, e3 in enumerate(t3):
            v3 = base3 | (i3 << 30)
            if not e3 or not lo <= v3 < hi:
                continue
            if not e3 & P or e3 & PSE:
                out[v3] = (3, e3)
                continue
            for i2, e2 in enumerate(m.t2[(k3 << 9) | i3]):
                v2 = v3 | (i2 << 21)
                if not e2:
                    continue
                if not e2 & P or e2 & PSE:
                    out[v2] = (2, e2)
                    continue
                for i1, e1 in enumerate(m.t1[(((k3 << 9) | i3) << 9) | i2]):
                    if e1:
                        out[v2 | (i1 << 12)] = (1, e1)
    return out


def compare(model: CpaModel, kernel: CpaModel) -> tuple[int, list[Divergence], int]:
    """Leaves of the direct map and the highmap: (count, divergences, A/D-only differences)."""
    regions = [model.dm_bounds()]
    hs = model.start_kernel_map & model.vmask
    regions.append((hs, hs + model.layout.kernel_image_size))
    n, div, ad = 0, [], 0
    for lo, hi in regions:
        a, b = leaves(model, lo, hi), leaves(kernel, lo, hi)
        for va in sorted(set(a) | set(b)):
            la, ea = a.get(va, (0, 0))
            lb, eb = b.get(va, (0, 0))
            n += 1
            if la == lb and ea == eb:
                continue
            # the CPU sets A/D on use (SDM 4.8) and nothing in a step clears them behind CPA's
            # back, so only bits the kernel has and the model lacks are excused
            if la == lb and (ea ^ eb) & ~AD == 0 and not ea & ~eb:
                ad += 1
                continue
            div.append(Divergence(va | (~model.vmask & ((1 << 64) - 1)), la, lb, ea, eb))
    return n, div, ad


def _frame(m: CpaModel, va: int) -> tuple[int, int] | None:
    """(level, pfn of the 4K page at va) from m's tables, present or not; None if no leaf."""
    lvl, t, i = m.lookup(va)
    if t is None or not t[i]:
        return None
    e = t[i]
    if lvl == 1 or not e & PSE:
        return lvl, (e & PTE_PFN_MASK) >> 12
    mask, span = (PMD_PFN_MASK, PMD_SIZE) if lvl == 2 else (PUD_PFN_MASK, 1 << 30)
    return lvl, ((e & mask) >> 12) + ((va & (span - 1)) >> 12)


def _alias_frames(text: str, m: CpaModel) -> dict[int, int]:
    """{vaddr of a top-level call's chunk: pfn} from the `#   alias cpa` comments after it: the
    kernel called cpa_process_alias with the chunk's pfn, on its direct-map address."""
    out: dict[int, int] = {}
    cur = None  # next chunk address of the current top-level call
    po, skm = m.page_offset, m.start_kernel_map
    ram_end = po + (m.max_pfn_mapped << 12)
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("cpa "):
            op = parse_line(s)
            cur = op[1] & ~0xFFF if op and not (po <= op[1] < ram_end) else None
            continue
        if cur is None or not s.startswith("#") or " alias cpa " not in f" {s[1:].lstrip()}":
            continue
        body = s[1:].strip()
        if not body.startswith("alias cpa "):
            continue
        op = parse_line(body[len("alias ") :].split("#")[0])
        if not op:
            continue
        a, n = op[1], op[2]
        if po <= a < ram_end:
            pfn = (a - po) >> 12
        elif skm <= a < skm + m.layout.kernel_image_size:
            continue  # the highmap alias follows the direct-map one
        else:
            continue
        for j in range(max(n, 1)):
            out.setdefault(cur + (j << 12), pfn + j)
        cur += max(n, 1) << 12
    return out


def seed_vmalloc(
    m: CpaModel, after: CpaModel, ops: list[tuple], alias: dict[int, int]
) -> tuple[int, int, int]:
    """Map each page the trace's calls touch outside the direct map and the highmap to the
    frame the kernel used (alias comments first, image k next), as vmap did inside the step.
    Returns (from alias, from image k, unknown)."""
    po, end = m.page_offset, m.page_offset + (m.max_pfn_mapped << 12)
    hs, he = m.start_kernel_map, m.start_kernel_map + m.layout.kernel_image_size
    n_alias = n_img = n_none = 0
    done: set[int] = set()
    for op in ops:
        if op[0] != "cpa":
            continue
        addr, n = op[1] & ~0xFFF, op[2]
        if po <= addr < end or hs <= addr < he:
            continue
        for j in range(n):
            va = addr + (j << 12)
            if va in done:
                continue
            done.add(va)
            pfn = alias.get(va)
            src = "alias"
            if pfn is None:
                f = _frame(after, va)
                pfn, src = (f[1], "image") if f else (None, "")
            if pfn is None:
                if _frame(m, va) is None:
                    n_none += 1
                continue
            have = _frame(m, va)
            if have is not None and have[1] == pfn:
                continue
            if have is not None and have[0] != 1:
                continue  # a large vmalloc leaf: leave it
            m.vmap(va, pfn << 12, 1)
            if src == "alias":
                n_alias += 1
            else:
                n_img += 1
    return n_alias, n_img, n_none


def _step_models(run_dir: str, k: int, tmp: str | None):
    """(step folders, layout, kernel, the model of image k-1, the model of image k) of a run."""
    steps = step_dirs(run_dir)
    if not 1 <= k < len(steps):
        raise ValueError(f"step {k} has no predecessor in {run_dir}")
    layout, kernel = run_layout(run_dir), run_kernel(run_dir)
    with tempfile.TemporaryDirectory(prefix="x86pt-replay-") as own:
        tmp = tmp or own
        m = load_model(steps[k - 1], layout, kernel, os.path.join(tmp, f"{k - 1}"))
        after = load_model(steps[k], layout, kernel, os.path.join(tmp, f"{k}"))
    return steps, layout, kernel, m, after


def replay_step(run_dir: str, k: int, tmp: str | None = None) -> StepReplay:
    steps, layout, kernel, m, after = _step_models(run_dir, k, tmp)
    text = read_artifact(steps[k], "cpa.trace").decode()
    ops = [op for op in (parse_line(l) for l in text.splitlines()) if op]
    sa, si, sn = seed_vmalloc(m, after, ops, _alias_frames(text, m))
    before = (m.counters.split_2m, m.counters.split_1g)
    for op in ops:
        apply_op(m, op)
    c = m.counters
    cp = load_json(os.path.join(steps[k - 1], "counters.json"))
    ck = load_json(os.path.join(steps[k], "counters.json"))
    n, div, ad = compare(m, after)
    mi = c.meminfo(layout.gbpages)
    step = load_json(os.path.join(steps[k], "step.json"))
    return StepReplay(
        os.path.basename(run_dir),
        k,
        step.get("name", ""),
        len(ops),
        n,
        div,
        ad,
        (mi["DirectMap4k"], mi["DirectMap2M"], mi["DirectMap1G"]),
        (ck["DirectMap4k"], ck["DirectMap2M"], ck["DirectMap1G"]),
        (c.split_2m - before[0], c.split_1g - before[1]),
        (
            ck["direct_map_level2_splits"] - cp["direct_map_level2_splits"],
            ck["direct_map_level3_splits"] - cp["direct_map_level3_splits"],
        ),
        sa,
        si,
        sn,
        c.errors,
    )


def replay_run(run_dir: str) -> list[StepReplay]:
    with tempfile.TemporaryDirectory(prefix="x86pt-replay-") as tmp:
        return [replay_step(run_dir, k, os.path.join(tmp, str(k))) for k in range(1, len(step_dirs(run_dir)))]


def render(results: list[StepReplay]) -> str:
    head = (
        f"{'run':<18} {'step':>4} {'what':<22} {'ops':>5} {'leaves':>7} {'diverge':>7} {'A/D':>4} "
        f"{'DM model (4k,2M,1G kB)':>28} {'DM kernel':>28} {'spl m':>6} {'spl k':>6} "
        f"{'seed a/i/?':>10} {'same':>4}"
    )
    out = [head]
    for r in results:
        out.append(
            f"{r.run:<18} {r.step:>4} {r.name[:22]:<22} {r.ops:>5} {r.leaves:>7} "
            f"{len(r.divergences):>7} {r.ad_only:>4} {str(r.meminfo_model):>28} "
            f"{str(r.meminfo_kernel):>28} {'%d,%d' % r.splits_model:>6} "
            f"{'%d,%d' % r.splits_kernel:>6} {f'{r.seeded_alias}/{r.seeded_image}/{r.unseeded}':>10} "
            f"{'yes' if r.identical else 'no':>4}"
        )
    return "\n".join(out)


# -- the kernel's TLB flushes against the model's (issue 15 item 4) --------------------------------
@dataclass
class FlushCheck:
    """One step's flushes: what the CPA model issues for each recorded call against what the
    kernel did during and right after it, and the TLB replay of the step with the kernel's own
    flushes (no dangerous window may be open at the end of an API call)."""

    run: str
    step: int
    name: str
    calls: int
    predicted: int  # flush events the model issues (per-page INVLPGs counted)
    recorded: int  # the kernel's, attributed to CPA calls
    mismatches: list[tuple[int, str, list, list]]  # (op index, op, model's, kernel's)
    caller_flushes: int  # flush_tlb_kernel_range calls (vm_reset_perms, vmap purges)
    dangerous: list[str]  # windows open at the end of an API call or of the step
    recorded_flushes: bool  # the step's trace was recorded with the flush probes
    windows: list[tuple] = field(default_factory=list)  # (call index or None, cpu, start, end, kind)

    @property
    def exact(self) -> bool:
        return not self.mismatches and self.predicted == self.recorded


def _model_events(kind: str, start: int, end: int, kernel: tuple[int, int]) -> list[tuple]:
    """What the kernel's probes see for one flush the model issues: flush_tlb_all; for cpa_flush
    of a range, up to v6.17 one flush_tlb_one_kernel per page (__cpa_flush_tlb), from v6.18 one
    flush_tlb_kernel_range (arch/x86/mm/pat/set_memory.c)."""
    if kind == "all":
        return [("all",)]
    if kind == "range":
        if kernel >= (6, 18):
            return [("range", start, end)]
        return [("page", a) for a in range(start, end, 4096)]
    if kind == "page":
        return [("page", start)]
    return [("local",)]


def _recorded_event(op: tuple) -> tuple | None:
    if op[0] == "flush_tlb_all":
        return ("all",)
    if op[0] == "invlpg":
        return ("page", op[1])
    if op[0] == "flush_tlb_kernel_range":
        return ("range", op[1], op[2])
    return None


def _as_called(op: tuple, api: str) -> tuple:
    """The trace's `primary` keyword is the probe's primary argument; whether the kernel's flush
    follows depends on the caller (arch/x86/mm/pat/set_memory.c): set_memory_* go through
    change_page_attr_set_clr, which flushes, also with primary=0 (an NX-only change before v6.2
    runs with checkalias=0: CPA_NO_CHECK_ALIAS here); set_direct_map_*_noflush call
    __change_page_attr_set_clr directly, also with primary=1 (CPA_NO_CHECK_ALIAS since v6.2),
    and never flush: a bare call here (no alias either way)."""
    from x86pt.cpa.kernel import CPA_NO_CHECK_ALIAS

    _, a, n, st, cl, fl, primary, force = op
    if api.startswith("set_memory_") and not primary:
        return ("cpa", a, n, st, cl, fl | CPA_NO_CHECK_ALIAS, True, force)
    if api.startswith("set_direct_map_") and primary and fl & CPA_NO_CHECK_ALIAS:
        return ("cpa", a, n, st, cl, fl, False, force)
    return op


def flush_check(
    run_dir: str, k: int, tmp: str | None = None, ncpus: int = 2, text: str | None = None
) -> FlushCheck:
    """Replay step k from image k-1 with the TLB model and the kernel's recorded flushes: the
    model's flushes per call must equal the kernel's (count and addresses), and no dangerous
    window may remain at the end of an API call."""
    from x86pt.cpa.kernel import kernel_version
    from x86pt.cpa.tlbreplay import replay_tlb
    from x86pt.cpa.trace import format_op
    from x86pt.tlb import parse_tlb_line

    steps, layout, kernel, m, after = _step_models(run_dir, k, tmp)
    if text is None:
        text = read_artifact(steps[k], "cpa.trace").decode()
    ops: list[tuple] = []
    recorded: dict[int, list[tuple]] = {}  # CPA op index -> the kernel's flushes it made
    caller = 0
    has_flushes = False
    api = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("# set_"):
            api = s[2:].split()[0]
            continue
        if s.startswith("# with the kernel's TLB flushes"):
            has_flushes = True
            continue
        if s.startswith("#   in-call "):
            ev = _recorded_event(parse_tlb_line(s[len("#   in-call ") :]))
            if ops and ev is not None:
                recorded.setdefault(len(ops) - 1, []).append(ev)
            continue
        op = parse_line(s)
        if op is None:
            continue
        if op[0] == "cpa":
            op = _as_called(op, api)
        ev = _recorded_event(op) if op[0] != "cpa" else None
        if op[0] != "cpa":
            if ev is not None and ev[0] == "range":
                caller += 1  # never cpa_flush's before v6.18: the caller's own flush
            elif ev is not None:
                last_cpa = max((i for i, o in enumerate(ops) if o[0] == "cpa"), default=None)
                if last_cpa is not None:
                    recorded.setdefault(last_cpa, []).append(ev)
        ops.append(op)
    sa, si, sn = seed_vmalloc(m, after, ops, _alias_frames(text, m))
    ver = kernel_version(kernel)
    kv = tuple(int(x) for x in ver.name.split(".")[:2])
    predicted: dict[int, list[tuple]] = {}

    def on_flush(idx: int, kind: str, start: int, end: int) -> None:
        predicted.setdefault(idx, []).extend(_model_events(kind, start, end, kv))

    res = replay_tlb(m, ops, ncpus=ncpus, flushes="trace", on_flush=on_flush)
    mism = []
    for i in sorted(set(predicted) | set(recorded)):
        if predicted.get(i, []) != recorded.get(i, []):
            mism.append((i, format_op(ops[i]), predicted.get(i, []), recorded.get(i, [])))
    dangerous = [
        f"end of op {f.index} ({f.op}): cpu {w.cpu} {w.start:#x}-{w.end:#x} {w.kind} since op {w.opened}"
        for f in res.findings
        for w in f.windows
    ]
    dangerous += [
        f"end of step: cpu {w.cpu} {w.start:#x}-{w.end:#x} {w.kind} since op {w.opened}"
        for w in res.open_at_end
        if w.severity == "dangerous"
    ]
    wins = [(f.index, w.cpu, w.start, w.end, w.kind) for f in res.findings for w in f.windows]
    wins += [(None, w.cpu, w.start, w.end, w.kind) for w in res.open_at_end if w.severity == "dangerous"]
    step = load_json(os.path.join(steps[k], "step.json"))
    return FlushCheck(
        os.path.basename(run_dir),
        k,
        step.get("name", ""),
        sum(1 for o in ops if o[0] == "cpa"),
        sum(len(v) for v in predicted.values()),
        sum(len(v) for v in recorded.values()),
        mism,
        caller,
        dangerous,
        has_flushes,
        wins,
    )


def render_flushes(results: list[FlushCheck]) -> str:
    out = [
        f"{'run':<18} {'step':>4} {'what':<22} {'calls':>5} {'model':>6} {'kernel':>6} "
        f"{'caller':>6} {'exact':>5} {'dangerous':>9}"
    ]
    for r in results:
        out.append(
            f"{r.run:<18} {r.step:>4} {r.name[:22]:<22} {r.calls:>5} {r.predicted:>6} "
            f"{r.recorded:>6} {r.caller_flushes:>6} {'yes' if r.exact else 'NO':>5} "
            f"{len(r.dangerous):>9}"
        )
        for i, op, p, rec in r.mismatches[:5]:
            out.append(f"    op {i} {op}: model {p[:6]} kernel {rec[:6]}")
        for d in r.dangerous[:5]:
            out.append(f"    DANGEROUS {d}")
    return "\n".join(out)
