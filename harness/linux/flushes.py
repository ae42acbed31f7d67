# SPDX-License-Identifier: GPL-2.0-or-later
"""The kernel's TLB flushes against the model's (issue 15 item 4): step k replayed from image k-1
with the TLB model and the flushes the kernel's probes recorded (flush_check). The CPA model's
flushes per call must equal the kernel's, in count and addresses (up to v6.17 one
flush_tlb_one_kernel per page of a range, from v6.18 one flush_tlb_kernel_range:
arch/x86/mm/pat/set_memory.c), and no dangerous window may remain open at the end of an API
call. The step's models come from harness/linux/replay.py (step_models)."""

from __future__ import annotations
import os
from dataclasses import dataclass, field

from harness.linux.replay import _alias_frames, seed_vmalloc, step_models
from harness.linux.runfolder import load_json, read_artifact
from x86pt.cpa.trace import parse_line


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

    steps, layout, kernel, m, after = step_models(run_dir, k, tmp)
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
