"""The differential runner: the x86pt model (x86pt.walk.walk under the oracle's profile) and an
oracle run the same batches (image + CPU state + probes); every difference is a Mismatch with the
state, the decoded walk, the capstone-decoded probe instruction, both outcomes and a minimal
repro (JSON) that `x86pt conform --repro FILE` replays.

What is compared (docs/paging.md §11.5, §13.4):
* per probe: outcome, #PF/#GP error code, CR2 (for #PF; for #GP whether CR2 was written), the
  physical address when the oracle tells it (ProbeResult.pa, or the frame tag a read returned);
* per case, after the batch: the entries it owns and the entries its walks read. A 4K PTE must
  match exactly (KUT's `pte %x expected %x`); for every other entry the A bit is only compared
  when a successful walk of the case used the entry (non-leaf A on faulting walks, and a large
  leaf's A on a faulting access, are don't-care, as KUT's ignore_pde).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Protocol, Sequence

from x86pt.compare import agrees, as_probe_result, compare_probe, describe_outcome, model_run, read_value
from x86pt.errors import BadInputError, OracleError, PhysicalAddressError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import BatchResult, Probe, ProbeResult, tag_value
from x86pt.progress import Interrupt, ProgressBar
from x86pt.state import PagingState, as_profile
from x86pt.walk import BIT_A, Result, Translation

REPRO_VERSION = 1


# -- what a source hands the runner ------------------------------------------------------------------
@dataclass(frozen=True)
class OwnedEntry:
    """An entry a case owns: its address, its value when the batch starts, its kind
    ('pte', 'pde', 'pde2m', 'pdpte1g', or a table kind)."""

    addr: int
    raw: int
    kind: str


@dataclass(frozen=True)
class CaseInfo:
    label: str  # e.g. "matrix#123456" or "random#7:12"
    flags: int | None  # matrix flags (None for random cases)
    probes: tuple[int, ...]  # indices into Batch.probes
    owned: tuple[OwnedEntry, ...] = ()
    frames: tuple[int, ...] = ()  # frame pages the case's accesses aim at (for repros)
    description: str = ""


@dataclass
class Batch:
    memory: SparseMemory
    state: PagingState
    probes: list[Probe]
    cases: list[CaseInfo]


class CaseSource(Protocol):
    name: str

    @property
    def total(self) -> int: ...

    def batches(self) -> Iterator[Batch]: ...


# -- instruction decoding --------------------------------------------------------------------------------
# Canonical encodings of the rig's accesses: mov rax,[rbx] / mov [rbx],rdx / call rbx.
CANONICAL_BYTES = {
    "read": bytes.fromhex("488b03"),
    "write": bytes.fromhex("488913"),
    "fetch": bytes.fromhex("ffd3"),
}


def canonical_instruction(probe: Probe) -> bytes:
    return CANONICAL_BYTES[probe.access]


def disassemble(code: bytes, address: int = 0) -> str:
    try:
        from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    except ImportError:
        return code.hex() + " (capstone not installed)"
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    out = [f"{mn} {ops}".strip() for _, _, mn, ops in md.disasm_lite(code, address)]
    return "; ".join(out) if out else code.hex() + " (not decodable)"


# An implicit probe: the guest loads ES from LDT entry 0 of an LDT based at the probe's VA.
IMPLICIT_BYTES = bytes.fromhex("8ec0")


def probe_instruction(oracle, probe: Probe) -> str:
    if probe.implicit:
        who = "CPL3" if probe.user else "CPL0"
        return (
            f"{disassemble(IMPLICIT_BYTES)}   ({who}{', EFLAGS.AC=1' if probe.ac else ''}, "
            f"implicit supervisor read of LDT entry 0, LDT base={probe.va:#x})"
        )
    code = None
    fn = getattr(oracle, "instruction_bytes", None)
    if callable(fn):
        try:
            code = fn(probe)
        except Exception:  # a backend without a fixed encoding: use the canonical one
            code = None
    if not code:
        code = canonical_instruction(probe)
    who = "CPL3" if probe.user else "CPL0"
    return f"{disassemble(bytes(code))}   ({who}{', EFLAGS.AC=1' if probe.ac else ''}, rbx={probe.va:#x})"


# -- comparison ------------------------------------------------------------------------------------------
def _entries_of_case(case: CaseInfo, results: Sequence[Result]) -> dict[int, tuple[str, bool]]:
    """addr -> (kind, used by a successful walk of this case)."""
    out: dict[int, tuple[str, bool]] = {e.addr: (e.kind, False) for e in case.owned}
    for i in case.probes:
        r = results[i]
        ok = isinstance(r, Translation)
        for s in r.steps:
            kind, used = out.get(s.entry_addr, (s.kind.value, False))
            out[s.entry_addr] = (kind, used or ok)
    return out


def _read(mem, addr: int) -> int | None:
    try:
        return mem.read_u64(addr)
    except (PhysicalAddressError, ValueError):
        return None


def compare_entries(
    case: CaseInfo, results: Sequence[Result], model_after: SparseMemory, oracle_after
) -> list[str]:
    diffs = []
    for addr, (kind, used_ok) in sorted(_entries_of_case(case, results).items()):
        want = _read(model_after, addr)
        got = _read(oracle_after, addr)
        if got is None:
            diffs.append(f"entry at {addr:#x} ({kind}) missing from the oracle's memory")
            continue
        mask = (1 << 64) - 1
        if kind != "pte" and not used_ok:
            mask &= ~BIT_A
        if (want ^ got) & mask:
            diffs.append(
                f"{kind} at {addr:#x} after the batch: model {want:#018x}, oracle {got:#018x}"
                f" (differs in {(want ^ got) & mask:#x})"
            )
    return diffs


# -- mismatch records --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    oracle: str
    case: CaseInfo
    state: PagingState
    probes: tuple[Probe, ...]
    model: tuple[ProbeResult, ...]
    got: tuple[ProbeResult, ...]
    differences: tuple[str, ...]
    walk: tuple[str, ...]  # decoded entries of the model's walks
    instructions: tuple[str, ...]
    repro: dict

    def to_json(self) -> dict:
        from harness.matrix import flag_names

        return {
            "type": "mismatch",
            "oracle": self.oracle,
            "case": self.case.label,
            "flags": None if self.case.flags is None else flag_names(self.case.flags),
            "state": self.state.to_json(),
            "probes": [probe_json(p) for p in self.probes],
            "model": [r.to_json() for r in self.model],
            "oracle_result": [r.to_json() for r in self.got],
            "differences": list(self.differences),
            "walk": list(self.walk),
            "instructions": list(self.instructions),
            "repro": self.repro.get("file"),
        }

    def render(self) -> str:
        from harness.matrix import flag_names

        lines = [f"MISMATCH {self.case.label} on {self.oracle}"]
        if self.case.flags is not None:
            lines.append(f"  test {flag_names(self.case.flags)}")
        if self.case.description:
            lines.append(f"  {self.case.description}")
        lines.append(f"  state: {self.state.describe()}")
        for p, ins, m, g in zip(self.probes, self.instructions, self.model, self.got):
            lines.append(
                f"  probe {'implicit ' if p.implicit else ''}{p.access} va={p.va:#x} "
                f"{'user' if p.user else 'supervisor'}{' ac' if p.ac else ''}: {ins}"
            )
            lines.append(f"    model:  {describe_outcome(m)}")
            lines.append(f"    oracle: {describe_outcome(g)}")
        lines.append("  walk (model, entries as they were before the batch):")
        lines.extend("    " + w for w in self.walk)
        for d in self.differences:
            lines.append(f"  FAIL: {d}")
        if self.repro.get("file"):
            from harness.reports import repro_line

            lines.append(repro_line(self.repro["file"], self.oracle))
        return "\n".join(lines)


def probe_json(p: Probe) -> dict:
    return {
        "va": hex(p.va),
        "access": p.access,
        "user": p.user,
        "ac": p.ac,
        "wvalue": hex(p.wvalue),
        **({"implicit": True} if p.implicit else {}),
    }


def probe_from_json(d: dict) -> Probe:
    from x86pt.numbers import parse_int

    try:
        return Probe(
            parse_int(d["va"], "probe va"),
            str(d.get("access", "read")),
            bool(d.get("user", False)),
            bool(d.get("ac", False)),
            parse_int(d.get("wvalue", 0), "probe wvalue"),
            bool(d.get("implicit", False)),
        )
    except KeyError as e:
        raise BadInputError(f"repro probe lacks {e.args[0]}") from None
    except (TypeError, AttributeError):  # not a JSON object
        raise BadInputError(f"bad repro probe: {d!r:.80} is not an object") from None


def decoded_walk(state: PagingState, results: Sequence[Result], memory: SparseMemory) -> list[str]:
    from x86pt.describe import decode_entry, entry_flags

    lines = []
    seen = set()
    for r in results:
        for s in r.steps:
            if s.entry_addr in seen:
                continue
            seen.add(s.entry_addr)
            raw = _read(memory, s.entry_addr)
            raw = s.raw if raw is None else raw
            d = decode_entry(raw, s.kind, state.m, state.vendor, state)
            rsv = f"  RESERVED {d['reserved_set']}" if d["reserved_set"] else ""
            lines.append(
                f"L{s.level.number} {s.level.table:<4}[{(r.va >> s.level.shift) & 0x1FF:3d}] "
                f"@{s.entry_addr:#x} = {raw:#018x}  {s.kind.sdm_name}: {entry_flags(raw, s.kind)}"
                f"{rsv}"
            )
    return lines


def make_repro(
    oracle_name: str, batch: Batch, case: CaseInfo, results: Sequence[Result], differences: Sequence[str]
) -> dict:
    """A minimal image: the case's entries (owned and walked), as they were before the batch,
    plus its frame pages (re-filled with tags on replay)."""
    entries: dict[int, tuple[int, str]] = {e.addr: (e.raw, e.kind) for e in case.owned}
    for i in case.probes:
        for s in results[i].steps:
            entries.setdefault(s.entry_addr, (batch.memory.read_u64(s.entry_addr), s.kind.value))
    frames = set(case.frames)
    for i in case.probes:
        r = results[i]
        if isinstance(r, Translation):
            frames.add(r.pa & ~0xFFF)
    return {
        "x86pt_repro": REPRO_VERSION,
        "oracle": oracle_name,
        "case": case.label,
        "flags": case.flags,
        "state": batch.state.to_json(),
        "ram_size": batch.memory.size,
        "entries": [
            {"pa": hex(a), "value": f"{v:#018x}", "kind": k} for a, (v, k) in sorted(entries.items())
        ],
        "frames": [hex(f) for f in sorted(frames)],
        "probes": [probe_json(batch.probes[i]) for i in case.probes],
        "differences": list(differences),
    }


def batch_from_repro(d: dict) -> Batch:
    from harness.matrix_pack import fill_frames
    from x86pt.numbers import parse_int

    if not isinstance(d, dict) or d.get("x86pt_repro") != REPRO_VERSION:
        raise BadInputError("not an x86pt conform repro file (x86pt_repro: 1 missing)")
    try:
        state = PagingState.from_json(d["state"])
        mem = SparseMemory(parse_int(d.get("ram_size", 32 << 20), "ram_size"))
        for f in d.get("frames", []):
            fill_frames(mem, parse_int(f, "frame") & ~0xFFF, 1)
        owned = []
        for e in d["entries"]:
            a, v = parse_int(e["pa"], "entry pa"), parse_int(e["value"], "entry value")
            mem.write_u64(a, v)
            owned.append(OwnedEntry(a, v, str(e.get("kind", "entry"))))
        probes = [probe_from_json(p) for p in d["probes"]]
    except KeyError as e:
        raise BadInputError(f"repro file lacks {e.args[0]}") from None
    except (TypeError, AttributeError):
        raise BadInputError("repro file is malformed") from None
    if not probes:
        raise BadInputError("repro file has no probes")
    flags = d.get("flags")
    case = CaseInfo(
        str(d.get("case", "repro")),
        flags if isinstance(flags, int) else None,
        tuple(range(len(probes))),
        tuple(owned),
    )
    return Batch(mem, state, probes, [case])


# -- the runner ----------------------------------------------------------------------------------------------
@dataclass
class Summary:
    oracle: str
    cases: int = 0
    probes: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    oracle_seconds: float = 0.0
    build_seconds: float = 0.0
    skipped: str = ""
    interrupted: bool = False

    def to_json(self) -> dict:
        return {
            "type": "summary",
            "oracle": self.oracle,
            "cases": self.cases,
            "probes": self.probes,
            "mismatches": self.mismatches,
            "seconds": round(self.seconds, 3),
            "model_seconds": round(self.model_seconds, 3),
            "oracle_seconds": round(self.oracle_seconds, 3),
            "build_seconds": round(self.build_seconds, 3),
            "oracle_cases_per_s": round(self.cases / self.oracle_seconds) if self.oracle_seconds else None,
            "model_cases_per_s": round(self.cases / self.model_seconds) if self.model_seconds else None,
            **({"skipped": self.skipped} if self.skipped else {}),
            **({"interrupted": True} if self.interrupted else {}),
        }


def check_batch(
    oracle_name: str,
    batch: Batch,
    results: Sequence[Result],
    model_after: SparseMemory,
    got: BatchResult,
    oracle=None,
) -> list[Mismatch]:
    """Compare one batch; one Mismatch per differing case."""
    if len(got.results) != len(batch.probes):
        raise OracleError(
            f"{oracle_name} answered {len(got.results)} probes for a batch of {len(batch.probes)}"
        )
    if oracle_name == "qemu-monitor":
        return _check_translation_only(oracle_name, batch, results, got, oracle)
    out = []
    suspect = differing_qwords(model_after, got.memory_after)
    for case in batch.cases:
        diffs = []
        for i in case.probes:
            if agrees(results[i], got.results[i], batch.probes[i], batch.state):
                continue
            for d in compare_probe(results[i], got.results[i], batch.probes[i], batch.state):
                diffs.append(f"probe {i - case.probes[0] + 1}: {d}" if len(case.probes) > 1 else d)
        if suspect and any(a in suspect for a in _entries_of_case(case, results)):
            diffs += compare_entries(case, results, model_after, got.memory_after)
        if not diffs:
            continue
        rs = [results[i] for i in case.probes]
        ps = tuple(batch.probes[i] for i in case.probes)
        out.append(
            Mismatch(
                oracle_name,
                case,
                batch.state,
                ps,
                tuple(as_probe_result(r, read_value(model_after, r, p)) for r, p in zip(rs, ps)),
                tuple(got.results[i] for i in case.probes),
                tuple(diffs),
                tuple(decoded_walk(batch.state, rs, batch.memory)),
                tuple(probe_instruction(oracle, p) for p in ps),
                make_repro(oracle_name, batch, case, results, diffs),
            )
        )
    return out


def _check_translation_only(
    oracle_name: str, batch: Batch, results: Sequence[Result], got: BatchResult, oracle=None
) -> list[Mismatch]:
    """A translation-only oracle (QEMU's monitor: gva2gpa) is compared with the debugger's view of
    the same tables (walk.debug_translate): mapped or not, and where to. Rights, reserved bits,
    error codes and A/D are not its business."""
    from x86pt.walk import debug_translate

    out = []
    for case in batch.cases:
        diffs = []
        for i in case.probes:
            p, g = batch.probes[i], got.results[i]
            try:
                want = debug_translate(batch.state, batch.memory, p.va)
            except PhysicalAddressError:
                want = None
            if want is None and g.outcome == "ok":
                diffs.append(f"monitor maps {p.va:#x} to {g.pa:#x}; the tables do not map it")
            elif want is not None and g.outcome != "ok":
                diffs.append(f"monitor says {p.va:#x} is unmapped; the tables map it to {want[0]:#x}")
            elif want is not None and g.pa is not None and g.pa != want[0]:
                diffs.append(f"monitor maps {p.va:#x} to {g.pa:#x}, the tables to {want[0]:#x}")
        if diffs:
            rs = [results[i] for i in case.probes]
            ps = tuple(batch.probes[i] for i in case.probes)
            out.append(
                Mismatch(
                    oracle_name,
                    case,
                    batch.state,
                    ps,
                    tuple(as_probe_result(r) for r in rs),
                    tuple(got.results[i] for i in case.probes),
                    tuple(diffs),
                    tuple(decoded_walk(batch.state, rs, batch.memory)),
                    tuple(probe_instruction(oracle, p) for p in ps),
                    make_repro(oracle_name, batch, case, results, diffs),
                )
            )
    return out


def differing_qwords(model_after: SparseMemory, oracle_after) -> set[int]:
    """Addresses of the qwords where the two memories differ (page-wise byte compare first: almost
    every page is equal): over the model's pages (every qword of a page the oracle cannot read),
    and over the oracle's own pages the model never held (a non-zero qword there differs from the
    model's zero)."""
    import numpy as np

    out: set[int] = set()
    for pn, page in model_after.pages.items():
        base = pn * 4096
        try:
            other = oracle_after.read(base, 4096)
        except PhysicalAddressError:
            out.update(range(base, base + 4096, 8))
            continue
        if other == page:
            continue
        a = np.frombuffer(bytes(page), dtype="<u8")
        b = np.frombuffer(other, dtype="<u8")
        out.update(int(base + 8 * i) for i in np.flatnonzero(a != b))
    for pn, page in getattr(oracle_after, "pages", {}).items():
        if pn in model_after.pages:
            continue
        b = np.frombuffer(bytes(page), dtype="<u8")
        out.update(int(pn * 4096 + 8 * i) for i in np.flatnonzero(b))
    return out


def fix_write_values(batch: Batch, results: Sequence[Result]) -> None:
    """A write stores tag_value(model pa), so frames keep the 'qword at pa holds tag(pa)'
    pattern and a later read through any alias still tells its physical address."""
    for i, (p, r) in enumerate(zip(batch.probes, results)):
        if p.access == "write" and isinstance(r, Translation) and p.wvalue != tag_value(r.pa):
            batch.probes[i] = replace(p, wvalue=tag_value(r.pa))


# -- the vectorised model side (speed only: the verdicts are check_batch's) ----------------------------------
# A batch is first run through x86pt.batch.model_batch (every probe at once, A/D writes included).
# When every probe agrees with the oracle and no entry a case owns or walked differs in memory,
# check_batch would report nothing, and nothing is reported. Anything else (a difference, a #GP,
# a batch the vectorised model cannot take) goes through model_run and check_batch as before, so
# reports are the scalar walker's, byte for byte.
_ACCESS_CODE = {"read": 0, "write": 1, "fetch": 2}


@dataclass
class _FastModel:
    probes: list[Probe]  # the batch's probes as the model ran them (before fix_write_values)
    run: object  # x86pt.batch.ModelBatch
    owned: object  # numpy array of the cases' owned entry addresses


def _fast_model(batch: Batch) -> _FastModel | None:
    if type(batch.memory) is not SparseMemory:
        return None
    try:
        import numpy as np
        from x86pt.batch import model_batch

        probes = list(batch.probes)
        code = _ACCESS_CODE
        run = model_batch(
            batch.state,
            batch.memory,
            [p.va for p in probes],
            [code[p.access] for p in probes],
            [p.user for p in probes],
            [p.ac for p in probes],
            [p.implicit for p in probes],
            [p.wvalue for p in probes],
        )
        owned = np.array([e.addr for c in batch.cases for e in c.owned], dtype=np.uint64)
    except Exception:  # anything unusual: the scalar walker runs (and raises what it raises)
        return None
    return _FastModel(probes, run, owned)


def _fix_write_values_fast(batch: Batch, fast: _FastModel) -> None:
    """fix_write_values from the vectorised translations."""
    import numpy as np
    from x86pt.batch import OK

    tr = fast.run.translation
    writes = np.flatnonzero(tr.outcome == OK)
    pas = tr.pa[writes].tolist()
    for i, pa in zip(writes.tolist(), pas):
        p = batch.probes[i]
        if p.access == "write" and p.wvalue != tag_value(pa):
            batch.probes[i] = replace(p, wvalue=tag_value(pa))


def _fast_check(batch: Batch, fast: _FastModel, got: BatchResult) -> list | None:
    """[] when check_batch would find no mismatch in this batch (agrees() on every probe, no
    owned or walked entry among the differing qwords); None when check_batch must look."""
    from x86pt.batch import OK, PAGE_FAULT
    from x86pt.oracle import pa_from_value

    if len(got.results) != len(batch.probes):
        return None
    tr = fast.run.translation
    outcome, pa, err = tr.outcome.tolist(), tr.pa.tolist(), tr.error_code.tolist()
    state = batch.state
    blind = state.profile.cpl3_blind_ranges
    for i, (p, g) in enumerate(zip(batch.probes, got.results)):
        o = outcome[i]
        if o == OK:
            if g.outcome != "ok":
                return None
            gpa = g.pa if g.pa is not None else (pa_from_value(g.value, p.va) if p.access == "read" else None)
            if gpa is None:
                if not (p.access != "read" or g.value is None or p.va & 7):
                    return None
            elif gpa != pa[i]:
                return None
        elif o == PAGE_FAULT:
            if g.outcome != "page_fault" or g.error_code is None or (g.cr2 is not None and g.cr2 != p.va):
                return None
            diff = g.error_code ^ err[i]
            if diff and (not blind or diff & ~_dont_care(state, p)):
                return None
        else:
            return None
    suspect = differing_qwords(fast.run.memory_after, got.memory_after)
    if suspect:
        import numpy as np

        addrs = np.array(sorted(suspect), dtype=np.uint64)
        if np.isin(addrs, fast.run.entry_addrs).any() or np.isin(addrs, fast.owned).any():
            return None
    return []


def _dont_care(state: PagingState, p: Probe) -> int:
    from x86pt.compare import dont_care

    return dont_care(state, p)


def run_conformance(
    oracle,
    source: CaseSource,
    *,
    on_mismatch: Callable[[Mismatch], None] | None = None,
    progress: ProgressBar | None = None,
    compare: bool = True,
    interrupt: Interrupt | None = None,
) -> Summary:
    """Run every batch of `source` on the model and on `oracle`; report mismatches through
    `on_mismatch`. With compare=False only the model runs (to time it). When `interrupt` is
    requested (Ctrl-C), the run stops after the batch in flight: the summary says so."""
    name = getattr(oracle, "name", "oracle") if oracle is not None else "model-only"
    gc_was = gc.get_threshold()
    # A batch is tens of thousands of small objects, freed by reference counting; the default
    # young-generation threshold would scan them dozens of times per batch (~25% of the build).
    gc.set_threshold(max(gc_was[0], 50_000), max(gc_was[1], 20), max(gc_was[2], 100))
    try:
        return _run(oracle, source, name, on_mismatch, progress, compare, interrupt)
    finally:
        gc.set_threshold(*gc_was)


def _run(oracle, source: CaseSource, name: str, on_mismatch, progress, compare: bool, interrupt) -> Summary:
    summ = Summary(name)
    t0 = time.perf_counter()
    tb = time.perf_counter()
    for batch in source.batches():
        if interrupt is not None and interrupt.requested:
            summ.interrupted = True
            break
        t1 = time.perf_counter()
        summ.build_seconds += t1 - tb
        fast = _fast_model(batch) if name != "qemu-monitor" else None
        if fast is None:
            results, model_after = model_run(batch.memory, batch.state, batch.probes)
            fix_write_values(batch, results)
        else:
            _fix_write_values_fast(batch, fast)
        t2 = time.perf_counter()
        summ.model_seconds += t2 - t1
        if compare and oracle is not None:
            got = oracle.run(batch.memory, batch.state, batch.probes)
            t3 = time.perf_counter()
            summ.oracle_seconds += t3 - t2
            mms = _fast_check(batch, fast, got) if fast is not None else None
            if mms is None:
                if fast is not None:  # something differs: the scalar walker decides, as always
                    results, model_after = model_run(batch.memory, batch.state, fast.probes)
                mms = check_batch(name, batch, results, model_after, got, oracle)
            for mm in mms:
                summ.mismatches += 1
                if on_mismatch is not None:
                    on_mismatch(mm)
        summ.cases += len(batch.cases)
        summ.probes += len(batch.probes)
        if progress is not None:
            progress.update_to(summ.cases, mismatches=summ.mismatches)
        tb = time.perf_counter()
    if interrupt is not None and interrupt.requested:
        summ.interrupted = True
    summ.seconds = time.perf_counter() - t0
    return summ


def load_repro(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise BadInputError(f"cannot read repro {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"repro {path} is not JSON: {e}") from None


def replay(oracle, repro: dict) -> tuple[Batch, list[Result], list[Mismatch]]:
    """Run a repro's minimal image on the model and on `oracle`; the state's profile is replaced
    by the oracle's."""
    batch = batch_from_repro(repro)
    prof = as_profile(getattr(oracle, "profile", batch.state.profile.name))
    batch.state = batch.state.replace(profile=prof)
    results, model_after = model_run(batch.memory, batch.state, batch.probes)
    fix_write_values(batch, results)
    got = oracle.run(batch.memory, batch.state, batch.probes)
    return (
        batch,
        results,
        check_batch(getattr(oracle, "name", "oracle"), batch, results, model_after, got, oracle),
    )
