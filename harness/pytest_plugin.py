"""x86pt's conformance suite as a pytest plugin (entry point `pytest11: x86pt`), so an emulator
project runs it in its own CI:

    python -m pytest --pyargs x86pt.conformance --x86pt-oracle unicorn
    python -m pytest --pyargs x86pt.conformance --x86pt-oracle 'cmd:./my-emu-adapter' \\
        --x86pt-cases extended --x86pt-limit 20000 --x86pt-shard 2/8 --junitxml=conformance.xml

Options (group "x86pt"): --x86pt-oracle NAME|cmd:PROGRAM ARGS, --x86pt-cases matrix | extended |
random | cpa, --x86pt-limit N, --x86pt-seed N, --x86pt-shard I/N, --x86pt-batch N,
--x86pt-repro-dir DIR. docs/conformance.md is the manual.

What it collects: `x86pt/conformance/test_conformance.py` holds one test function,
`test_conformance(x86pt_case)`; this plugin parametrizes it with one item per batch of cases, and
each batch holds cases of one CPU configuration (the matrix groups its cases by CR0.WP, EFER.NXE,
CR4.SMEP/SMAP/PKE/LA57 and PKRU), so an item's id names the configuration, e.g.
`test_conformance[matrix-cr0.wp+efer.nx+cr4.smep-1]`. A failing item's message is every mismatch
as `x86pt conform` prints it: the state, the decoded walk, both outcomes and the repro command.
The cases are the rig's own (harness/cli.py make_source: harness/matrix.py and
harness/random_tables.py; the CPA replays of x86pt/cpa with invariant (e) for `cpa`).

The plugin changes nothing for runs that do not ask for it: loading it imports pytest and this
module only (no numpy, no x86pt, no oracle); without --x86pt-oracle nothing is opened and the
conformance test, when collected at all, is one skipped item. The library (x86pt/) never imports
the rig: x86pt/conformance holds only the test module, which names a fixture and nothing else.

Fixtures: `x86pt_oracle` (the oracle --x86pt-oracle names, opened once, closed at the end of the
session) and `x86pt_builder` (a factory of cases users write themselves: page tables in the
oracle's RAM, probes, and `.check()` that compares the model with the oracle).
"""

from __future__ import annotations

import os
import re

import pytest

CASES = ("matrix", "extended", "random", "cpa")
DEFAULT_RANDOM = 2000
CPA_OPS = 150  # ops per CPA workload replay (one item per workload)
CPA_STEPS = 4  # sampled steps of each replay probed on the oracle (invariant (e))
CPA_LAYOUT = "server-64g-nogb"
MAX_REPORT = 10  # mismatches rendered in one failing item's message
MAX_REPROS = 50  # repro files written per session
_STATE = pytest.StashKey[dict]()


# -- options -------------------------------------------------------------------------------------------
def pytest_addoption(parser) -> None:
    g = parser.getgroup("x86pt", "x86pt conformance suite (python -m pytest --pyargs x86pt.conformance)")
    g.addoption(
        "--x86pt-oracle",
        default=None,
        metavar="NAME|cmd:PROGRAM ARGS",
        help="the oracle to compare the x86pt model with (unicorn, qemu, kvm, a registered "
        "plugin, or cmd:PROGRAM ARGS); without it the conformance suite is skipped",
    )
    g.addoption(
        "--x86pt-cases",
        default="matrix",
        choices=CASES,
        help="matrix (the kvm-unit-tests access matrix), extended (plus SMEP, SMAP+AC, 1G, "
        "PML4E PS/bit 8, LA57, non-canonical, implicit), random (random page tables), "
        "cpa (Linux CPA replays probed on the oracle); default matrix",
    )
    g.addoption(
        "--x86pt-limit",
        default=None,
        metavar="N",
        help="at most N cases (matrix: the first N of the shard; default a seeded sample of "
        "20,000 matrix cases, 2,000 random cases, 2 CPA workloads)",
    )
    g.addoption("--x86pt-seed", default="0", metavar="N", help="seed of samples and random tables")
    g.addoption("--x86pt-shard", default=None, metavar="I/N", help="the I-th of N equal parts (1-based)")
    g.addoption(
        "--x86pt-batch",
        default=None,
        metavar="N",
        help="cases per test item (matrix: default the oracle's batch size; random: cases per tree, "
        "default 64)",
    )
    g.addoption(
        "--x86pt-repro-dir",
        default="x86pt-repros",
        metavar="DIR",
        help="where repro files of mismatches go (default ./x86pt-repros)",
    )


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "x86pt_conformance: an item of x86pt's conformance suite")
    if config.getoption("x86pt_oracle", None):
        # asked for: options and the oracle are checked before collection, so a bad one is a
        # usage error (one line, exit 4) rather than a collection error
        _options(config)
        open_oracle(config)


def pytest_unconfigure(config) -> None:
    st = config.stash.get(_STATE, None)
    if st and st.get("oracle") is not None:
        try:
            st["oracle"].close()
        finally:
            st["oracle"] = None


def _state(config) -> dict:
    st = config.stash.get(_STATE, None)
    if st is None:
        st = config.stash[_STATE] = {"oracle": None}
    return st


def open_oracle(config):
    """The session's oracle (opened on first use). pytest.UsageError when none is named or it
    cannot run here: one line, non-zero exit."""
    st = _state(config)
    if st["oracle"] is None:
        name = config.getoption("x86pt_oracle")
        if not name:
            raise pytest.UsageError("x86pt: no oracle: pass --x86pt-oracle NAME (or cmd:PROGRAM ARGS)")
        from x86pt.errors import X86ptError
        from x86pt.registry import get_oracle, oracle_list

        try:
            names = oracle_list(name, what="--x86pt-oracle")
            if len(names) != 1:
                raise pytest.UsageError(f"x86pt: --x86pt-oracle names one oracle, not {len(names)}")
            o = get_oracle(names[0], **({"profile": "intel"} if names[0] == "model" else {}))
            caps = o.capabilities()
        except X86ptError as e:
            raise pytest.UsageError(f"x86pt: {e}") from None
        st["oracle"], st["caps"], st["name"] = o, caps, names[0]
    return st["oracle"]


# -- the plan: one item per batch of one configuration ---------------------------------------------------
class Case:
    """One test item's batch: built when the item runs (so collection stays cheap)."""

    def __init__(self, config, kind: str, ident: str, spec) -> None:
        self.config, self.kind, self.id, self.spec = config, kind, ident, spec

    def __repr__(self) -> str:
        return f"<x86pt case {self.id}>"

    def check(self) -> None:
        from x86pt.errors import X86ptError

        error = None
        try:
            if self.kind == "cpa":
                return _check_cpa(self)
            from harness.differential import run_conformance

            st = _state(self.config)
            mms: list = []
            summ = run_conformance(st["oracle"], _OneBatch(self), on_mismatch=mms.append)
        except X86ptError as e:  # the oracle failed (a command oracle's crash, timeout, ...)
            error = str(e)
        if error is not None:
            pytest.fail(f"oracle error: {error}", pytrace=False)
        st["cases"] = st.get("cases", 0) + summ.cases
        if mms:
            fail_with(self.config, mms)

    def batch(self):
        from harness.matrix_pack import build_batch
        from harness.random_tables import random_batch

        if self.kind == "random":
            seed, index, n, feat, prof = self.spec
            return random_batch(seed, index, feat, prof, n)
        cases, feat, prof = self.spec
        return build_batch(cases, feat, prof)


class _OneBatch:
    name = "x86pt-conformance"

    def __init__(self, case: Case) -> None:
        self.case = case

    @property
    def total(self) -> int:
        return 1

    def batches(self):
        yield self.case.batch()


def _int(config, opt: str, text, lo: int = 1) -> int | None:
    if text is None:
        return None
    from x86pt.errors import BadInputError
    from x86pt.numbers import parse_int

    try:
        return parse_int(text, f"--{opt}", lo=lo, hi=1 << 40)
    except BadInputError as e:
        raise pytest.UsageError(f"x86pt: {e}") from None


def _options(config) -> tuple:
    """(cases, limit, seed, batch, shard) from the options; pytest.UsageError on a bad one."""
    from x86pt.errors import BadInputError

    kind = config.getoption("x86pt_cases")
    limit = _int(config, "x86pt-limit", config.getoption("x86pt_limit"))
    seed = _int(config, "x86pt-seed", config.getoption("x86pt_seed"), lo=0)
    batch = _int(config, "x86pt-batch", config.getoption("x86pt_batch"))
    shard = None
    if config.getoption("x86pt_shard"):
        from harness.cli import _shard

        try:
            shard = _shard(config.getoption("x86pt_shard"))
        except BadInputError as e:
            raise pytest.UsageError(f"x86pt: {str(e).replace('--shard', '--x86pt-shard')}") from None
    return kind, limit, seed, batch, shard


def plan(config) -> list[Case]:
    """The items for the options given (cached on the config)."""
    st = _state(config)
    if "plan" in st:
        return st["plan"]
    oracle = open_oracle(config)
    kind, limit, seed, batch, shard = _options(config)
    if kind == "cpa":
        st["plan"] = _cpa_plan(config, limit, seed, shard)
        return st["plan"]
    # The case source exactly as `x86pt conform` builds it (harness/cli.py make_source).
    import argparse
    from harness.cli import DEFAULT_SAMPLE, make_source

    args = argparse.Namespace(
        cases="random" if kind == "random" else "matrix",
        extended=kind == "extended",
        limit=limit,
        sample=None,
        seed=seed,
        shard=shard,
        batch=batch,
        per_tree=batch or 64,
    )
    if kind != "random" and limit is None and shard is None:
        args.sample = DEFAULT_SAMPLE
    if kind == "random" and limit is None:
        args.limit = DEFAULT_RANDOM
    src = make_source(args, oracle, st["caps"])
    st["plan"] = _matrix_plan(config, src) if kind != "random" else _random_plan(config, src)
    return st["plan"]


def _matrix_plan(config, src) -> list[Case]:
    """MatrixSource.batches without building the images: the same grouping (by CPU state inside
    each chunk, then batch_cases per batch), so the items hold exactly conform's batches."""
    import numpy as np
    from harness.matrix import flag_names
    from harness.matrix_pack import _STATE_BITS

    feat = src.matrix.features
    out: list[Case] = []
    seen: dict[str, int] = {}
    for idx, flags in src._chunks():
        keys = flags & np.uint64(_STATE_BITS)
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for grp in np.split(order, bounds):
            cfg = flag_names(int(keys[grp[0]])).replace(" ", "+")
            cfg = "base" if cfg == "(none)" else cfg
            for lo in range(0, len(grp), src.batch_cases):
                sel = grp[lo : lo + src.batch_cases]
                cases = [(f"{src.name}#{int(idx[k])}", int(flags[k])) for k in sel]
                n = seen[cfg] = seen.get(cfg, 0) + 1
                out.append(Case(config, "matrix", f"{src.name}-{cfg}-{n}", (cases, feat, src.profile)))
    return out


def _random_plan(config, src) -> list[Case]:
    out = []
    done, b = 0, src.first_batch
    while done < src.cases:
        n = min(src.per_batch, src.cases - done)
        out.append(
            Case(
                config,
                "random",
                f"random-seed{src.seed}-tree{b}",
                (src.seed, b, n, src.features, src.profile),
            )
        )
        done += n
        b += 1
    return out


def _cpa_plan(config, limit, seed, shard) -> list[Case]:
    from x86pt.cpa.workload import SCENARIOS

    work = [(sc, seed + k) for k in range(4) for sc in SCENARIOS]
    if shard is not None:
        i, n = shard
        work = work[(i - 1) * len(work) // n : i * len(work) // n]
    work = work[: limit if limit is not None else 2]
    return [Case(config, "cpa", f"cpa-{sc}-seed{s}", (sc, s)) for sc, s in work]


def _check_cpa(case: Case) -> None:
    """A generated CPA workload replayed under the upstream merge policy with the validator on;
    sampled steps are probed on the oracle (invariant (e): x86pt/cpa/oracle_probe.py)."""
    from x86pt.cpa.layout import layout_named
    from x86pt.cpa.oracle_probe import OracleCheck, sampled_steps
    from x86pt.cpa.trace import new_model, replay
    from x86pt.cpa.workload import generate

    st = _state(case.config)
    scenario, seed = case.spec
    layout = layout_named(CPA_LAYOUT)
    ops = generate(layout, "6.15", scenario, CPA_OPS, seed)
    name = st["name"]
    with OracleCheck(
        [name],
        steps=sampled_steps(len(ops), CPA_STEPS, seed),
        log=lambda s: None,
        oracles={name: st["oracle"]},
    ) as oc:
        r = replay(new_model(layout, "6.15", "upstream"), ops, validate=True, checks="abcde", oracle_check=oc)
        stats = oc.summary()
    if r.violation is not None:
        pytest.fail(
            f"CPA workload {scenario} seed {seed} ({len(ops)} ops, layout {CPA_LAYOUT}, kernel "
            f"6.15, policy upstream) on {name}:\n  {r.violation}\n  "
            + "\n  ".join(stats)
            + f"\n  repro: x86pt cpa generate {scenario} --ops {CPA_OPS} --seed {seed} --layout "
            f"{CPA_LAYOUT} -o w.trace && x86pt cpa replay w.trace --layout {CPA_LAYOUT} "
            f"--policy upstream --validate --oracle '{name}' --oracle-every 1",
            pytrace=False,
        )


# -- failing an item ----------------------------------------------------------------------------------------
def fail_with(config, mms) -> None:
    """pytest.fail with the mismatches rendered (decoded walk, outcomes, repro path): the first
    MAX_REPORT of the item, repro files for at most MAX_REPROS per session (as x86pt conform's
    --max-report / --max-repros)."""
    import json
    from x86pt.memory.atomic import write_text_atomic

    st = _state(config)
    repro_dir = config.getoption("x86pt_repro_dir")
    texts = []
    for mm in mms[:MAX_REPORT]:
        if st.get("repros", 0) < MAX_REPROS:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{mm.oracle}-{mm.case.label}")[-150:]
            path = os.path.join(repro_dir, safe + ".json")
            os.makedirs(repro_dir, exist_ok=True)
            mm.repro["file"] = path
            write_text_atomic(path, json.dumps(mm.repro, indent=1) + "\n")
            st["repros"] = st.get("repros", 0) + 1
        texts.append(mm.render())
    more = len(mms) - len(texts)
    pytest.fail(
        f"{len(mms)} mismatches in this batch\n"
        + "\n".join(texts)
        + (f"\n({more} more mismatches in this batch not shown)" if more else ""),
        pytrace=False,
    )


# -- collection ---------------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc) -> None:
    if "x86pt_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    if not config.getoption("x86pt_oracle"):
        metafunc.parametrize(
            "x86pt_case",
            [
                pytest.param(
                    None,
                    marks=pytest.mark.skip(
                        reason="x86pt conformance: pass --x86pt-oracle NAME (or cmd:PROGRAM ARGS)"
                    ),
                )
            ],
            ids=["no-oracle"],
        )
        return
    items = plan(config)
    metafunc.parametrize(
        "x86pt_case",
        [pytest.param(c, marks=pytest.mark.x86pt_conformance) for c in items],
        ids=[c.id for c in items],
    )


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def x86pt_oracle(request):
    """The oracle --x86pt-oracle names (closed at the end of the session)."""
    return open_oracle(request.config)


@pytest.fixture
def x86pt_builder(request, x86pt_oracle):
    """A factory of hand-written cases on the session's oracle:

    def test_user_write_to_ro_page(x86pt_builder):
        case = x86pt_builder()                     # 4-level; x86pt_builder(levels=5) for LA57
        frame = case.frame()
        case.map(0x400000, frame, flags="p us")     # read-only user page
        case.probe(0x400000, "write", user=True)
        case.check(cr0_wp=True)                     # model vs oracle; fails with the walk
    """
    config = request.config

    def make(levels: int = 4) -> "UserCase":
        return UserCase(config, levels)

    return make


class UserCase:
    """Page tables in the oracle's RAM (x86pt.build.Builder from RIG_IMAGE_BASE), tagged frames
    (each qword holds tag_value(its pa): reads say where they landed, fetches hit `ret`), probes,
    and a comparison of the model with the oracle."""

    FRAMES = 0x1000000

    def __init__(self, config, levels: int) -> None:
        from x86pt.build import Builder
        from x86pt.memory.sparse import SparseMemory
        from x86pt.oracle import RIG_IMAGE_BASE

        st = _state(config)
        caps = st["caps"]
        self.config = config
        self.caps = caps
        self.memory = SparseMemory(caps.ram_size)
        self.builder = Builder(
            self.memory,
            levels=levels,
            maxphyaddr=caps.maxphyaddr,
            vendor=caps.vendor,
            table_base=RIG_IMAGE_BASE,
            table_limit=self.FRAMES,
        )
        self.probes: list = []
        self._next_frame = self.FRAMES

    def frame(self, pages: int = 1, align: int = 4096) -> int:
        """Allocate `pages` tagged frame pages (aligned to `align`); returns the first one's pa."""
        from x86pt.oracle import tag_value
        import struct

        pa = (self._next_frame + align - 1) & ~(align - 1)
        if pa + pages * 4096 > self.caps.ram_size:
            raise pytest.UsageError(
                f"x86pt_builder: no room for {pages} frames below {self.caps.ram_size:#x}"
            )
        for p in range(pa, pa + pages * 4096, 4096):
            self.memory.write(p, struct.pack("<512Q", *(tag_value(p + 8 * q) for q in range(512))))
        self._next_frame = pa + pages * 4096
        return pa

    def map(
        self, va: int, pa: int, size: int = 4096, page_size: int = 4096, flags: str = "p rw", pk: int = 0
    ) -> None:
        self.builder.map(va, pa, size, page_size, flags, pk=pk)

    def probe(
        self, va: int, access: str = "read", *, user: bool = False, ac: bool = False, implicit: bool = False
    ) -> None:
        from x86pt.oracle import Probe

        self.probes.append(Probe(va, access, user, ac, implicit=implicit))

    def state(
        self,
        *,
        cr0_wp: bool = True,
        nxe: bool = True,
        smep: bool = False,
        smap: bool = False,
        pke: bool = False,
        pkru: int = 0,
    ):
        from x86pt.state import (
            CR0_PE,
            CR0_PG,
            CR0_WP,
            CR4_PAE,
            CR4_PKE,
            CR4_SMAP,
            CR4_SMEP,
            EFER_LMA,
            EFER_LME,
            EFER_NXE,
            as_profile,
        )

        prof = as_profile(getattr(_state(self.config)["oracle"], "profile", "intel"))
        cr4 = CR4_PAE | (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0) | (CR4_PKE if pke else 0)
        return self.builder.state(
            cr0=CR0_PE | CR0_PG | (CR0_WP if cr0_wp else 0),
            cr4=cr4,
            efer=EFER_LME | EFER_LMA | (EFER_NXE if nxe else 0),
            pkru=pkru,
            profile=prof,
            maxphyaddr=self.caps.maxphyaddr,
        )

    def check(self, **state) -> list:
        """Run the probes on the model and on the oracle; fail the test with every mismatch.
        Returns the oracle's answers (ProbeResult per probe)."""
        from harness.differential import Batch, CaseInfo, check_batch, fix_write_values
        from x86pt.compare import model_run

        if not self.probes:
            raise pytest.UsageError("x86pt_builder: check() without probes")
        st = _state(self.config)
        oracle = st["oracle"]
        batch = Batch(
            self.memory,
            self.state(**state),
            list(self.probes),
            [CaseInfo(f"user#{i}", None, (i,), (), ()) for i in range(len(self.probes))],
        )
        from x86pt.errors import X86ptError

        results, after = model_run(batch.memory, batch.state, batch.probes)
        fix_write_values(batch, results)
        error = None
        try:
            got = oracle.run(batch.memory, batch.state, batch.probes)
            mms = check_batch(st["name"], batch, results, after, got, oracle)
        except X86ptError as e:
            error = str(e)
        if error is not None:
            pytest.fail(f"oracle error: {error}", pytrace=False)
        if mms:
            fail_with(self.config, mms)
        return got.results
