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


def step_models(run_dir: str, k: int, tmp: str | None):
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
    steps, layout, kernel, m, after = step_models(run_dir, k, tmp)
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
