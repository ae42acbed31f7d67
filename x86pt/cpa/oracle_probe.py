"""Invariant (e) of the CPA validator: the oracles of the comparison rig agree.

For a sampled step of a replay, the model's tables are exported, turned into an oracle-ready copy
(root slot 511 cleared: the kernel image and modules live there and the rig reserves it for its
harness; every table reachable from the other slots relocated into guest RAM above
RIG_IMAGE_BASE), and every page the op touched is probed the way the kernel touches its own
memory: a read at CPL0, an instruction fetch, and a write at CPL0 with CR0.WP=1. Each oracle's
answer is compared with
  1. x86pt.walk on the same copy under the oracle's profile (x86pt.compare.compare_probe), and
  2. the CPA validator's flat per-page reference (present / RW / NX / frame), through the #PF error
     codes of SDM Vol. 3A §4.7 (P=bit 0, W/R=bit 1, I/D=bit 4).
A disagreement is a Violation(op, "e", ...).

Frames are the kernel's, so most of them lie beyond the oracle's RAM. What each backend does there
decides what can be probed (x86pt/oracle.py and the backends' notes):
  * qemu / kvm read all-ones from unbacked physical memory and drop writes (no fault), so reads
    and writes that translate are probed; fetches are not (execution from unbacked memory is an
    emulation failure on KVM), nor anything whose frame is in the PC's MMIO hole [3 GiB, 4 GiB).
  * unicorn raises on any access to an unbacked frame, so a probe the model expects to translate
    is only run when its frame is in the oracle's RAM.
  * frames inside the oracle's RAM that are neither harness pages nor relocated tables get the
    rig's tag pattern, so a read's value says which frame the oracle reached; writes and fetches
    to harness or table frames are never run (they would corrupt the run).
Probes the model expects to fault touch no frame and always run. Skips are counted and reported.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from x86pt.cpa.validate import HI, M48, Reference, Violation
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.fields import ADDR_MASK_52, BIT_P, BIT_PS, BIT_RW, BIT_XD

if TYPE_CHECKING:
    from x86pt.cpa.ops import CpaModel
    from x86pt.memory.sparse import SparseMemory
    from x86pt.oracle import Capabilities, Oracle
    from x86pt.state import PagingState
    from x86pt.walk import Result

PAGE = 4096
DEFAULT_CAP = 512
MMIO_HOLE = (3 << 30, 4 << 30)
P_BIT, RW_BIT, PS_BIT, NX_BIT = BIT_P, BIT_RW, BIT_PS, BIT_XD
ADDR_MASK = ADDR_MASK_52
ACCESSES = ("read", "fetch", "write")  # write last: a write to a tagged frame keeps the tag
# #PF error codes of SDM Vol. 3A §4.7 for the accesses the kernel makes at CPL0.
_NP_CODE = {"read": 0x0, "write": 0x2, "fetch": 0x10}
_PROT_CODE = {"write": 0x3, "fetch": 0x11}


@dataclass(frozen=True)
class OracleImage:
    """An oracle-ready copy of an exported model image."""

    memory: SparseMemory
    root: int  # the relocated root table
    tables: frozenset[int]  # page numbers of relocated tables
    ram_size: int


def oracle_image(memory: SparseMemory, cr3: int, ram_size: int, *, base: int = 0x200000) -> OracleImage:
    """Copy of the tables reachable from root slots 0..510, relocated to consecutive pages from
    `base`. Raises BadInputError when they do not fit below `ram_size`."""
    from x86pt.memory.sparse import SparseMemory

    root_old = cr3 & ADDR_MASK
    order: list[int] = []
    level_of: dict[int, int] = {}
    todo = [(root_old, 4)]
    # Hardware rule (SDM §4.5): a PML4E always references a table; a PDPTE/PDE does when present
    # and PS=0. A non-present entry is never followed, so its address bits are left as they are.
    while todo:
        pa, lvl = todo.pop()
        if pa in level_of:
            continue
        level_of[pa] = lvl
        order.append(pa)
        if lvl == 1:
            continue
        tab = memory.table(pa)
        n = 511 if lvl == 4 else 512
        for i in range(n):
            e = int(tab[i])
            if not e & P_BIT or (lvl < 4 and e & PS_BIT):
                continue
            child = e & ADDR_MASK
            if child >> 12 in memory.pages:
                todo.append((child, lvl - 1))
    new_of = {old: base + k * PAGE for k, old in enumerate(order)}
    end = base + len(order) * PAGE
    if end > ram_size:
        raise BadInputError(f"{len(order)} tables do not fit in the oracle's RAM ({ram_size:#x})")
    out = SparseMemory(1 << 52)
    for old in order:
        lvl = level_of[old]
        vals = list(struct.unpack("<512Q", memory.read(old, PAGE)))
        if lvl == 4:
            vals[511] = 0  # the rig's harness slot
        if lvl > 1:
            for i, e in enumerate(vals):
                if e & P_BIT and (lvl == 4 or not e & PS_BIT):
                    child = e & ADDR_MASK
                    if child in new_of:
                        vals[i] = (e & ~ADDR_MASK) | new_of[child]
        out.pages[new_of[old] >> 12] = bytearray(struct.pack("<512Q", *vals))
    return OracleImage(out, new_of[root_old], frozenset(p >> 12 for p in new_of.values()), ram_size)


def tag_page(memory: SparseMemory, pa_page: int) -> None:
    from x86pt.oracle import tag_value

    memory.pages[pa_page >> 12] = bytearray(
        struct.pack("<512Q", *(tag_value(pa_page + 8 * q) for q in range(512)))
    )


def sample_evenly(ranges: Sequence[tuple[int, int]], cap: int) -> tuple[list[int], int]:
    """(page VAs, total): at most `cap` pages spread evenly over the concatenated (start, npages)
    ranges, the first page always included."""
    total = sum(n for _, n in ranges)
    idx: Iterable[int]
    if total <= cap:
        idx = range(total)
    else:
        idx = sorted({k * total // cap for k in range(cap)})
    out: list[int] = []
    it = iter(idx)
    want = next(it, None)
    acc = 0
    for s, n in ranges:
        while want is not None and want < acc + n:
            out.append(s + ((want - acc) << 12))
            want = next(it, None)
        acc += n
    return out, total


def changed_ranges(pages: Sequence[int], touched: set[int] | None) -> list[tuple[int, int]]:
    """The pages an op touched as sorted, merged (va48, npages) ranges: the pages the reference
    applied the op to, and the span of every entry the model wrote (CpaModel.touched keys are
    (va >> (3 + 9*level)) << 2 | level)."""
    spans: list[tuple[int, int]] = [(v & ~0xFFF, 1) for v in pages]
    for ek in touched or ():
        tl, k = ek & 3, ek >> 2
        shift = 12 + 9 * (tl - 1)
        spans.append(((k << shift) & M48, 1 << (9 * (tl - 1))))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, n in spans:
        if merged and s <= merged[-1][0] + (merged[-1][1] << 12):
            ps, pn = merged[-1]
            merged[-1] = (ps, max(pn, ((s - ps) >> 12) + n))
        else:
            merged.append((s, n))
    return merged


@dataclass
class OracleStats:
    name: str
    steps: int = 0
    probes: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_steps: int = 0
    ref_skipped: int = 0

    def skip(self, why: str, n: int = 1) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + n

    def line(self, cap: int) -> str:
        rate = f"{self.probes / self.seconds:.0f} probes/s" if self.seconds else "-"
        sk = ", ".join(f"{n} {w}" for w, n in sorted(self.skipped.items()))
        return (
            f"oracle {self.name}: {self.steps} steps, {self.probes} probes in {self.seconds:.2f} s "
            f"({rate}); cap {cap} pages per step, {self.truncated_steps} steps sampled down"
            + (f"; not probed: {sk}" if sk else "")
            + (
                f"; {self.ref_skipped} probes not compared with the reference (oracle lacks a "
                "feature the tables use)"
                if self.ref_skipped
                else ""
            )
        )


# what an access is to give: (outcome, #PF error code or None, physical address or None)
Expect = tuple[str, int | None, int | None]


def _ref_expect(ref_val: tuple[int, int] | None, access: str, off: int) -> Expect:
    """(outcome, error code or None, pa or None) the per-page reference asks for (SDM §4.6/§4.7)."""
    if ref_val is None or not ref_val[1] & P_BIT:
        return "page_fault", _NP_CODE[access], None
    pfn, fl = ref_val
    if access == "write" and not fl & RW_BIT:
        return "page_fault", _PROT_CODE["write"], None
    if access == "fetch" and fl & NX_BIT:
        return "page_fault", _PROT_CODE["fetch"], None
    return "ok", None, (pfn << 12) | off


class OracleCheck:
    """Probes sampled steps of a replay on the named oracles. Give it to
    `replay(..., validate=True, checks="...e", oracle_check=THIS)`."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        every: int | None = None,
        steps: Sequence[int] | None = None,
        cap: int = DEFAULT_CAP,
        log: Callable[[str], None] | None = None,
        oracles: dict[str, Oracle] | None = None,
    ) -> None:
        from x86pt.registry import availability, get_oracle

        if cap < 1:
            raise BadInputError("the probe cap per step must be at least 1")
        self.every = every
        self.steps = None if steps is None else frozenset(steps)
        self.cap = cap
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.oracles: dict[str, Oracle] = {}
        self.caps: dict[str, Capabilities] = {}
        self.stats: dict[str, OracleStats] = {}
        self.notes: list[str] = []
        self._own = oracles is None
        for name in names:
            if oracles is not None and name in oracles:
                o = oracles[name]
            else:
                ok, why = availability(name)
                if not ok:
                    self._note(f"oracle {name} skipped: {why}")
                    continue
                try:
                    o = get_oracle(name)
                except OracleUnavailable as e:
                    self._note(f"oracle {name} skipped: {e}")
                    continue
            self.oracles[name] = o
            self.caps[name] = o.capabilities()
            self.stats[name] = OracleStats(name)

    def _note(self, s: str) -> None:
        self.notes.append(s)
        self.log(s)

    def close(self) -> None:
        if self._own:
            for o in self.oracles.values():
                try:
                    o.close()
                except Exception:  # closing is best effort; the run's result stands
                    pass
        self.oracles = {}

    def __enter__(self) -> "OracleCheck":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wants(self, idx: int) -> bool:
        if not self.oracles:
            return False
        if self.steps is not None:
            return idx in self.steps
        if self.every:
            return idx % self.every == 0
        return False

    def summary(self) -> list[str]:
        return [s.line(self.cap) for s in self.stats.values()]

    # -- one step ---------------------------------------------------------------------------------
    def check(
        self, m: CpaModel, ref: Reference, idx: int, pages: Sequence[int], touched: set[int] | None
    ) -> Violation | None:
        ranges = changed_ranges(pages, touched)
        # The harness slot: the kernel image, its highmap alias and modules are not probed.
        kept: list[tuple[int, int]] = []
        harness_pages = 0
        for s, n in ranges:
            if s >> 39 == 511:
                harness_pages += n
            else:
                kept.append((s, n))
        vas, total = sample_evenly(kept, self.cap)
        if not vas and not harness_pages:
            return None
        exported = m.export()
        regs = m.export_registers()
        for name, oracle in self.oracles.items():
            st = self.stats[name]
            st.steps += 1
            if harness_pages:
                st.skip("pages in root slot 511 (harness slot: kernel image, modules)", harness_pages)
            if total > len(vas):
                st.truncated_steps += 1
            v = self._run_one(name, oracle, exported, regs, ref, idx, vas)
            if v:
                return v
        return None

    def _states(self, name: str, root: int) -> tuple[PagingState, PagingState]:
        from x86pt.state import PagingState, as_profile, profile_named

        caps = self.caps[name]
        prof = as_profile(getattr(self.oracles[name], "profile", name))
        prof = dataclasses.replace(prof, features=dataclasses.replace(prof.features, gbpages=caps.gbpages))
        regs = dict(cr3=root, cr0=_CR0, cr4=_CR4, efer=_EFER)
        ostate = PagingState(**regs, profile=prof, maxphyaddr=caps.maxphyaddr)
        kstate = PagingState(**regs, profile=profile_named("intel"), maxphyaddr=caps.maxphyaddr)
        return ostate, kstate

    def _run_one(
        self,
        name: str,
        oracle: Oracle,
        exported: SparseMemory,
        regs: dict[str, int],
        ref: Reference,
        idx: int,
        vas: list[int],
    ) -> Violation | None:
        from x86pt.compare import compare_probe, describe_outcome
        from x86pt.oracle import Probe, tag_value
        from x86pt.walk import Access, walk

        st = self.stats[name]
        ram = max(self.caps[name].ram_size, getattr(oracle, "ram_size", 0) or 0)
        img = oracle_image(exported, regs["cr3"], ram)
        mem = img.memory
        ostate, kstate = self._states(name, img.root)
        probes: list[Probe] = []
        meta: list[tuple[int, Access, Result]] = []
        tagged: set[int] = set()
        for v in vas:
            va = v | HI if v >> 47 else v
            for acc in ACCESSES:
                a = Access(acc)
                mres = walk(ostate, mem, va, a)
                pa = getattr(mres, "pa", None)
                if pa is not None:
                    why = self._frame_problem(name, acc, pa, img)
                    if why:
                        st.skip(why)
                        continue
                    page = pa & ~0xFFF
                    if page < img.ram_size and (page >> 12) not in img.tables:
                        if page >> 12 not in tagged:
                            tag_page(mem, page)
                            tagged.add(page >> 12)
                p = Probe(va, acc, wvalue=tag_value(pa) if pa is not None else 0)
                probes.append(p)
                meta.append((v, a, mres))
        if not probes:
            return None
        state = ostate
        t0 = time.perf_counter()
        try:
            got = oracle.run(mem, state, probes)
        except OracleError as e:
            return Violation(idx, "e", f"oracle {name} could not run the step's probes: {e}")
        st.seconds += time.perf_counter() - t0
        st.probes += len(probes)
        for p, (v, a, mres), res in zip(probes, meta, got.results):
            pa = getattr(mres, "pa", None)
            if not (pa is not None and (pa >> 12) in tagged):
                # An untagged frame (beyond RAM, all-ones): its value says nothing about the frame.
                res = dataclasses.replace(res, value=None, pa=None)
            diffs = compare_probe(mres, res, p, state)
            if diffs:
                return Violation(idx, "e", f"oracle {name}, CPL0 {p.access} of {p.va:#x}: {'; '.join(diffs)}")
            # The reference's view, unless the oracle's profile already differs from the kernel's
            # target CPU on this walk (e.g. no 1G pages).
            kres = walk(kstate, mem, p.va, a)
            if _outcome(kres) != _outcome(mres):
                st.ref_skipped += 1
                continue
            want = _ref_expect(ref.get(v), p.access, p.va & 0xFFF)
            opa = res.pa if res.pa is not None else None
            have_pa = opa if opa is not None else (pa if res.outcome == "ok" else None)
            have = (
                res.outcome,
                res.error_code if res.outcome == "page_fault" else None,
                have_pa if res.outcome == "ok" else None,
            )
            if have != want:

                def show(w: Expect) -> str:
                    if w[0] == "ok":
                        return f"ok pa={w[2]:#x}" if w[2] is not None else "ok"
                    return f"#PF {w[1]:#x}"

                return Violation(
                    idx,
                    "e",
                    f"oracle {name}, CPL0 {p.access} of {p.va:#x}: oracle "
                    f"gives {describe_outcome(res)}"
                    f"{'' if opa is not None or res.outcome != 'ok' else f' (model walk pa {pa:#x})'}"
                    f", the op sequence asks for {show(want)}",
                )
        return None

    def _frame_problem(self, name: str, acc: str, pa: int, img: OracleImage) -> str | None:
        page = pa & ~0xFFF
        if page < img.ram_size:
            if page < 0x200000 and acc != "read":
                return f"{acc}s to harness frames"
            if (page >> 12) in img.tables and acc != "read":
                return f"{acc}s to frames holding the copy's tables"
            return None
        if self.caps[name].unbacked != "ones":
            return f"{acc}s of frames beyond {name}'s RAM"
        if MMIO_HOLE[0] <= page < MMIO_HOLE[1]:
            return f"{acc}s of frames in the MMIO hole"
        if acc == "fetch":
            return "fetches from frames beyond the oracle's RAM"
        return None


def _outcome(r: Result) -> tuple[str, int | None]:
    pa = getattr(r, "pa", None)
    if pa is not None:
        return ("ok", pa)
    return (type(r).__name__, getattr(r, "error_code", None))


# Control registers of the copy: what CpaModel.export_registers gives the kernel (PE PG WP; PAE
# PGE; LME LMA NXE); CR3 is the relocated root.
def _regs() -> tuple[int, int, int]:
    from x86pt.state import CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, EFER_LMA, EFER_LME, EFER_NXE

    return CR0_PE | CR0_PG | CR0_WP, CR4_PAE | CR4_PGE, EFER_LME | EFER_LMA | EFER_NXE


_CR0, _CR4, _EFER = _regs()


def sampled_steps(n_ops: int, k: int, seed: int) -> list[int]:
    """K op indices out of n_ops, chosen by a seeded RNG (reproducible)."""
    k = min(k, n_ops)
    return sorted(random.Random(seed).sample(range(n_ops), k)) if k > 0 else []
