"""The CI sample of the differential runner: for every oracle present here, a fixed-seed sample of
the access matrix (classic and extended) and of random page tables, run on the oracle and on the
x86pt model under that oracle's profile; zero mismatches allowed (every known deviation is a named
profile entry in x86pt/state.py, so anything left is unexplained).

Skips (or, with X86PT_REQUIRE_ORACLES, fails) with the registry's reason when an oracle is absent.
"""

from __future__ import annotations


from harness import matrix as mx
from harness.differential import run_conformance
from harness.matrix import MatrixFeatures, matrix_for
from harness.matrix_pack import MatrixSource
from harness.random_tables import RandomSource
from x86pt.state import as_profile

# (classic sample, extended sample, random cases): unicorn batches are cheap; QEMU pays a launch
# per batch of one CPU state, KVM a VM; keep each oracle's part well under a minute.
SIZES = {
    "unicorn": (4000, 2000, 3000),
    "qemu": (1500, 800, 1500),
    "kvm": (1500, 800, 1500),
    "bochs": (1500, 800, 1500),
}
SEED = 20260601


# Every difference must be explained by the oracle's profile (x86pt/state.py): none is excused here.
KNOWN: tuple = ()


def _run(o, src):
    mms = []
    summ = run_conformance(o, src, on_mismatch=mms.append)
    unexplained = [m for m in mms if not any(k(m) for k in KNOWN)]
    detail = "\n\n".join(m.render() for m in unexplained[:5])
    summ.mismatches = len(unexplained)
    return summ, mms, detail


def _profile_and_features(o):
    caps = o.capabilities()
    return as_profile(o.profile), MatrixFeatures.from_caps(caps)


def test_matrix_sample_has_no_mismatches(oracle):
    prof, feat = _profile_and_features(oracle)
    n = SIZES[oracle.name][0]
    m = matrix_for(feat)
    idx, _, _ = mx.select(m.size, sample=n, seed=SEED)
    summ, mms, detail = _run(oracle, MatrixSource(m, prof, indices=idx))
    assert summ.cases == n
    assert summ.mismatches == 0, f"{summ.mismatches} mismatches on {oracle.name}:\n{detail}"


def test_extended_matrix_sample_has_no_mismatches(oracle):
    prof, feat = _profile_and_features(oracle)
    n = SIZES[oracle.name][1]
    m = matrix_for(feat, extended=True)
    # every extension space is small except SMEP/SMAP: take all of the small ones' share too
    idx, _, _ = mx.select(m.size, sample=n, seed=SEED)
    base = m.spaces[0].size
    small = [base + i for i in range(0, m.size - base, max(1, (m.size - base) // n))]
    import numpy as np

    idx = np.unique(np.concatenate([idx, np.array(small[:n], dtype=idx.dtype)]))
    summ, mms, detail = _run(oracle, MatrixSource(m, prof, indices=idx, name="xmatrix"))
    assert summ.cases == len(idx)
    assert summ.mismatches == 0, f"{summ.mismatches} mismatches on {oracle.name}:\n{detail}"


def test_random_tables_have_no_mismatches(oracle):
    prof, feat = _profile_and_features(oracle)
    n = SIZES[oracle.name][2]
    summ, mms, detail = _run(oracle, RandomSource(feat, prof, seed=SEED, cases=n))
    assert summ.cases == n
    assert summ.mismatches == 0, f"{summ.mismatches} mismatches on {oracle.name}:\n{detail}"
