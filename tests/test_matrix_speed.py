"""The vectorised model side of the differential runner (x86pt.batch.model_batch, used by
harness.differential.run_conformance) against the scalar walker it stands in for
(x86pt.compare.model_run: one x86pt.walk.walk per probe, in order, A/D writes applied).

The expectations are the scalar walker's, an independent implementation (one entry at a time,
Python ints, the SDM's rules written out step by step); the batch side is numpy over arrays. The
matrix samples cover A/D writes, not-present and reserved-bit faults, rights faults with WP, SMEP,
SMAP/AC, protection keys, 1G leaves, PML4E PS/bit 8, 5-level paging, non-canonical addresses and
implicit supervisor reads, under every named profile (their A/D deviations included); the test
checks that the samples do hold those cases before comparing.

The runner's reports must be the same whichever side runs: a buggy oracle (ModelOracle with
deviations, and memory after the batch with entries changed) is reported identically with the fast
path on and forced off.
"""

from __future__ import annotations

import numpy as np
import pytest

import harness.differential as diff
from harness.differential import run_conformance
from harness.matrix import (
    ACC_AC,
    IMPLICIT,
    LA57,
    NONCANON,
    PDPTE_1G,
    PKE,
    PML4E_PS,
    SMAP,
    SMEP,
    MatrixFeatures,
    matrix_for,
)
from harness.matrix_pack import MatrixSource
from harness.oracles.model import ModelOracle, deviation
from x86pt.batch import GENERAL_PROTECTION, OK, PAGE_FAULT, NotBatchable, model_batch
from x86pt.compare import model_run
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    PF_PK,
    PF_RSVD,
    PROFILES,
    PagingState,
    as_profile,
)
from x86pt.walk import BIT_A, BIT_D, GeneralProtection, PageFault, Translation

CODE = {"read": 0, "write": 1, "fetch": 2}
FEAT = MatrixFeatures(maxphyaddr=40, pku=True, smep=True, smap=True, gbpages=True, la57=True)


def _batched(batch):
    ps = batch.probes
    return model_batch(
        batch.state,
        batch.memory,
        [p.va for p in ps],
        [CODE[p.access] for p in ps],
        [p.user for p in ps],
        [p.ac for p in ps],
        [p.implicit for p in ps],
        [p.wvalue for p in ps],
    )


def _sample(m, n: int, seed: int) -> np.ndarray:
    """A seeded sample of about n cases spread over every space of the matrix (small spaces whole)."""
    rng = np.random.default_rng(seed)
    per = max(1, n // len(m.spaces))
    parts, base = [], 0
    for sp in m.spaces:
        k = min(per, sp.size)
        parts.append(base + np.sort(rng.choice(sp.size, k, replace=False)))
        base += sp.size
    return np.concatenate(parts)


def _sample_batches(profile: str, extended: bool, n: int = 6000, seed: int = 3):
    m = matrix_for(FEAT, extended=extended)
    return list(MatrixSource(m, as_profile(profile), indices=_sample(m, n, seed), batch_cases=1024).batches())


def _pages_equal(a: SparseMemory, b: SparseMemory) -> list[str]:
    out = []
    for pn in sorted(set(a.pages) | set(b.pages)):
        x, y = a.pages.get(pn), b.pages.get(pn)
        if x is None or y is None or bytes(x) != bytes(y):
            out.append(f"page {pn * 4096:#x}")
    return out


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("extended", [False, True], ids=["classic", "extended"])
def test_model_batch_matches_the_scalar_walker(profile, extended):
    seen = {
        "ok": 0,
        "pf": 0,
        "gp": 0,
        "rsvd": 0,
        "pk": 0,
        "a_set": 0,
        "d_set": 0,
        "smep": 0,
        "smap_ac": 0,
        "1g": 0,
        "pml4e_ps": 0,
        "la57": 0,
        "noncanon": 0,
        "implicit": 0,
        "pke": 0,
    }
    for batch in _sample_batches(profile, extended):
        results, after = model_run(batch.memory, batch.state, batch.probes)
        mb = _batched(batch)
        tr = mb.translation
        for i, r in enumerate(results):
            if isinstance(r, Translation):
                assert (int(tr.outcome[i]), int(tr.pa[i])) == (OK, r.pa), (i, batch.probes[i], r)
                seen["ok"] += 1
            elif isinstance(r, PageFault):
                assert (int(tr.outcome[i]), int(tr.error_code[i])) == (PAGE_FAULT, r.error_code), (
                    i,
                    batch.probes[i],
                    r,
                )
                seen["pf"] += 1
                seen["rsvd"] += bool(r.error_code & PF_RSVD)
                seen["pk"] += bool(r.error_code & PF_PK)
            else:
                assert isinstance(r, GeneralProtection) and int(tr.outcome[i]) == GENERAL_PROTECTION
                seen["gp"] += 1
            for a, v in getattr(r, "ad_writes", ()):
                old = batch.memory.read_u64(a)
                seen["a_set"] += bool(v & ~old & BIT_A)
                seen["d_set"] += bool(v & ~old & BIT_D)
        assert _pages_equal(after, mb.memory_after) == []
        walked = {s.entry_addr for r in results for s in r.steps}
        assert walked == set(int(a) for a in mb.entry_addrs)
        for c in batch.cases:
            f = c.flags
            for name, bit in (
                ("smep", SMEP),
                ("1g", PDPTE_1G),
                ("pml4e_ps", PML4E_PS),
                ("la57", LA57),
                ("noncanon", NONCANON),
                ("implicit", IMPLICIT),
                ("pke", PKE),
            ):
                seen[name] += bool(f & bit)
            seen["smap_ac"] += f & (SMAP | ACC_AC) == SMAP | ACC_AC
    need = ["ok", "pf", "rsvd", "a_set", "d_set", "smep", "smap_ac", "pke"]
    if PROFILES[profile].features.pku:
        need.append("pk")
    if extended:
        need += ["gp", "1g", "pml4e_ps", "la57", "noncanon", "implicit"]
    assert [k for k in need if not seen[k]] == []


def test_a_write_into_a_table_is_left_to_the_scalar_walker():
    # A write probe through a mapping of the PT itself would change what later walks read.
    mem = SparseMemory(1 << 24)
    pml4, pdpt, pd, pt = 0x100000, 0x101000, 0x102000, 0x103000
    for upper, lower in ((pml4, pdpt), (pdpt, pd), (pd, pt)):
        mem.write_u64(upper, lower | 7)
    mem.write_u64(pt + 8, pt | 7)  # VA 0x1000 maps the PT page
    state = PagingState(cr3=pml4, cr0=CR0_PE | CR0_PG, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA)
    with pytest.raises(NotBatchable):
        model_batch(state, mem, [0x1000], [1], [False], [False], [False], [0])


def _buggy(profile: str):
    """A ModelOracle that deviates: #PF error codes lose RSVD, some reads come back unmapped, and
    after the batch a few entries lose their A bit and one PTE gains D."""
    base = ModelOracle(
        profile,
        deviate=deviation(
            error_code=None, when=lambda p, r: r.outcome == "page_fault" and p.va & 0x3000 == 0x3000
        ),
    )
    flip = deviation(
        outcome="page_fault",
        error_code=0,
        cr2=None,
        pa=None,
        value=None,
        when=lambda p, r: r.outcome == "ok" and p.access == "read" and p.va & 0x7000 == 0x5000,
    )
    inner = base.deviate

    def both(p, r):
        return flip(p, inner(p, r))

    base.deviate = both
    run = base.run

    def run_and_spoil(memory, state, probes):
        res = run(memory, state, probes)
        for k, pn in enumerate(sorted(res.memory_after.pages)):
            if k % 3 == 0:
                page = res.memory_after.pages[pn]
                q = np.frombuffer(page, dtype="<u8")
                q[7] ^= np.uint64(BIT_A)
                q[9] |= np.uint64(BIT_D)
        return res

    base.run = run_and_spoil
    return base


@pytest.mark.parametrize("profile", ["intel", "unicorn", "kvm"])
def test_reports_are_the_same_with_and_without_the_fast_path(profile, monkeypatch):
    m = matrix_for(FEAT, extended=True)
    idx = _sample(m, 3000, 11)

    def report(fast: bool):
        if not fast:
            monkeypatch.setattr(diff, "_fast_model", lambda batch: None)
        else:
            monkeypatch.undo()
        got = []
        src = MatrixSource(m, as_profile(profile), indices=idx, batch_cases=512)
        summ = run_conformance(
            _buggy(profile), src, on_mismatch=lambda mm: got.append((mm.render(), mm.to_json(), mm.repro))
        )
        return got, (summ.cases, summ.probes, summ.mismatches)

    slow = report(False)
    fast = report(True)
    assert slow[1][2] > 0  # the deviations were caught at all
    assert fast == slow


def test_a_clean_run_takes_the_fast_path_and_reports_nothing(monkeypatch):
    calls = []
    real = diff.model_run

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(diff, "model_run", counting)
    m = matrix_for(FEAT)
    src = MatrixSource(m, as_profile("intel"), start=1_000_000, stop=1_004_096, batch_cases=1024)
    summ = run_conformance(ModelOracle("intel"), src)
    assert (summ.cases, summ.mismatches) == (4096, 0)
    assert calls == []  # no batch needed the scalar walker


def test_matrix_objects_made_without_init_are_the_real_ones():
    # build_batch makes its probes, entries and case infos without their __init__ (harness.matrix
    # _made): every field must be given, and the object must equal the one __init__ makes.
    import dataclasses

    from harness.differential import CaseInfo, OwnedEntry
    from harness.matrix_pack import _made, build_batch
    from x86pt.oracle import Probe

    b = build_batch([("m#1", 0), ("m#2", 1 << 25)], FEAT, as_profile("intel"))  # 1<<25: twice
    for obj in list(b.probes) + list(b.cases) + [e for c in b.cases for e in c.owned]:
        cls = type(obj)
        assert cls in (Probe, CaseInfo, OwnedEntry)
        names = [f.name for f in dataclasses.fields(cls)]
        assert list(vars(obj)) == names
        real = cls(**vars(obj))
        assert real == obj and hash(real) == hash(obj) and repr(real) == repr(obj)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.probes[0].va = 0
    assert _made(OwnedEntry, {"addr": 8, "raw": 1, "kind": "pte"}) == OwnedEntry(8, 1, "pte")


def test_oracle_results_made_without_init_are_the_real_ones():
    # The unicorn backend and the guest's read_results make ProbeResults without __init__.
    import dataclasses

    from harness.oracles.base import made_result
    from x86pt.oracle import ProbeResult

    names = [f.name for f in dataclasses.fields(ProbeResult)]
    assert names == ["outcome", "error_code", "cr2", "pa", "value", "vector", "detail"]
    args = ("page_fault", 0x7, 0x1000, None, None, 14, "x")
    for made in (made_result,):
        r = made(*args)
        assert r == ProbeResult(*args) and repr(r) == repr(ProbeResult(*args))
        assert r.to_json() == ProbeResult(*args).to_json()


def test_batches_filled_by_probes_hold_the_same_cases():
    # batch_probes (x86pt conform with an oracle that has max_probes) changes how the cases of a
    # CPU-state group are cut into batches, not which cases run or in what order.
    m = matrix_for(FEAT)
    by_cases = MatrixSource(m, as_profile("qemu"), start=2_000_000, stop=2_020_000, batch_cases=4096)
    by_probes = MatrixSource(
        m, as_profile("qemu"), start=2_000_000, stop=2_020_000, batch_cases=4096, batch_probes=8192
    )
    a = [c.label for b in by_cases.batches() for c in b.cases]
    got = list(by_probes.batches())
    assert [c.label for b in got for c in b.cases] == a
    assert all(len(b.probes) <= 8192 for b in got)
    assert len(got) < len(list(by_cases.batches()))
    full = [b for b in got[:-1] if len(b.probes) < 8191]  # only a group's last batch is short
    assert len(full) <= 3
