# SPDX-License-Identifier: GPL-2.0-or-later
"""The CPA validator against an independent brute-force reference (issue 12 item 2).

x86pt/cpa/reference.py walks every 4K page of the direct map with the core batch walker after an
op and compares presence, frame and supervisor write/fetch rights with a flat per-page
expectation written from the APIs' definitions; it shares no code with validate.py. Here:

* on random clean traces (every policy, 6.1 and 6.15 rules) neither the brute force nor the
  validator finds anything;
* a random single-entry corruption of an entry the op wrote (a split or merged table's PTE, a 2M
  or 1G leaf, a table pointer) — a frame bit, each flag bit, P, PS, a whole table dropped — is
  reported by the validator at that op, on a page inside the corrupted entry's span, and, where
  the corruption changes what the hardware does, on a page the brute force also finds wrong;
* the same at the last 4K page of a 2M region, by name (the audit's planted bug: a validator
  that skips that page passed every test before).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from x86pt.cpa.kernel import NX, P, PMD_PFN_MASK, PSE, PUD_PFN_MASK, PTE_PFN_MASK, RW
from x86pt.cpa.layout import Layout
from x86pt.cpa.merge import POLICIES
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.reference import BruteForce, brute_force_replay
from x86pt.cpa.trace import apply_op, parse_trace, replay
from x86pt.cpa.validate import Validator

PO = 0xFFFF888000000000
# RAM: 1M..64M (2M leaves; the kernel image at 16M..62M, rodata at 32M) and 1G..2G (a 1G leaf):
# every direct-map page is walked after an op, so the layout stays small (278k pages)
LAY = Layout("brute-force", ((0x0, 0x9F000), (0x100000, 0x4000000), (0x40000000, 0x80000000)))
VM = 0xFFFFFFFFC0400000
DM = [PO + 0x400000, PO + 0x2000000, PO + 0x40000000, PO + 0x7FE00000]
FRAMES = [0x401000, 0x2003000, 0x7FFFF000, 0x40000000]
APIS = [
    "set_memory_ro",
    "set_memory_rw",
    "set_memory_x",
    "set_memory_nx",
    "set_memory_rox",
    "set_memory_np",
    "set_memory_p",
    "set_memory_4k",
    "set_memory_global",
    "set_memory_nonglobal",
]


@st.composite
def traces(draw, max_ops: int = 6):
    lines = [f"vmap {VM + 4096 * k:#x} {f:#x} 1" for k, f in enumerate(FRAMES)]
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(["dm", "dm", "vm", "dmi"]))
        if kind == "vm":
            k = draw(st.integers(0, 3))
            n = draw(st.integers(1, 4 - k))
            lines.append(f"{draw(st.sampled_from(APIS))} {VM + 4096 * k:#x} {n}")
        elif kind == "dmi":
            a = draw(st.sampled_from(DM)) + 4096 * draw(st.sampled_from([0, 1, 7, 510, 511]))
            lines.append(f"set_direct_map_{draw(st.sampled_from(['invalid', 'default']))}_noflush {a:#x}")
        else:
            base = draw(st.sampled_from(DM))
            k = draw(st.sampled_from([0, 1, 2, 255, 510, 511]))
            n = draw(st.sampled_from([1, 2, 3, 512 - k, 512]))
            lines.append(f"{draw(st.sampled_from(APIS))} {base + 4096 * k:#x} {n}")
    return parse_trace(lines)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.sampled_from(POLICIES), st.sampled_from(["6.1", "6.15"]))
def test_clean_traces_brute_force_and_validator_agree(ops, policy, kernel):
    bf = brute_force_replay(CpaModel(LAY, kernel, policy), ops)
    assert bf is None, (policy, kernel, bf[0], [str(d) for d in bf[1]])
    r = replay(CpaModel(LAY, kernel, policy), ops, validate=True, samples=0)
    assert r.violation is None, (policy, kernel, r.violation)


# -- corruptions -------------------------------------------------------------------------------
LEAF_FLAG_BITS = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 63]  # + bit 7 (PAT) on PTEs, 12 on large
VISIBLE = {"frame", "present", "rw", "nx", "ptr-rw", "ptr-nx", "ps", "drop"}


def _entries(m, touched):
    """(tl, key, table, index, span va, span size) of every entry the op wrote that is still
    reachable in the model (a merge after the write may have removed its table)."""
    out = []
    for ek in sorted(touched):
        tl, key = ek & 3, ek >> 2
        tbl = {1: m.t1, 2: m.t2, 3: m.t3}[tl].get(key >> 9)
        if tbl is None:
            continue
        va = key << (12 + 9 * (tl - 1))
        if va >> 47:
            va |= ~((1 << 48) - 1) & ((1 << 64) - 1)
        # reachable: the walk of va passes through this table
        lvl, t, i = m.lookup(va)
        if tl == 1 and t is not tbl:
            continue
        if tl >= 2 and lvl < tl and not (tl == 2 and lvl == 1 and m.t2.get(key >> 9) is tbl):
            continue
        if tl >= 2 and lvl > tl:
            continue
        out.append((tl, key, tbl, key & 511, va, 1 << (12 + 9 * (tl - 1))))
    return out


def corrupt(m, touched, pick: int, kind: str, bit: int):
    """Apply one corruption to an entry the op wrote; returns (kind, span va, span size) or None
    when no entry suits the kind."""
    cands = []
    for tl, _key, tbl, i, va, size in _entries(m, touched):
        e = tbl[i]
        leaf = tl == 1 or (e & PSE) or not e & P
        if kind in ("frame", "flag", "present", "rw", "nx") and leaf and e:
            cands.append((tl, tbl, i, va, size, e))
        elif kind in ("ptr-rw", "ptr-nx", "ps", "drop") and not leaf:
            cands.append((tl, tbl, i, va, size, e))
    if not cands:
        return None
    tl, tbl, i, va, size, e = cands[pick % len(cands)]
    if kind == "frame":
        mask = PTE_PFN_MASK if tl == 1 or not e & PSE else (PMD_PFN_MASK if tl == 2 else PUD_PFN_MASK)
        lo = {1: 12, 2: 21, 3: 30}[tl] if e & PSE or tl == 1 else 12
        b = lo + bit % (40 - lo)  # a frame bit below MAXPHYADDR 46
        assert mask >> b & 1
        tbl[i] = e ^ (1 << b)
    elif kind == "flag":
        bits = LEAF_FLAG_BITS + ([7] if tl == 1 else [12] if e & PSE else [])
        tbl[i] = e ^ (1 << bits[bit % len(bits)])
    elif kind == "present":
        tbl[i] = e ^ P
    elif kind == "rw":
        tbl[i] = e ^ RW
    elif kind == "nx":
        tbl[i] = e ^ NX
    elif kind == "ptr-rw":
        tbl[i] = e & ~RW
    elif kind == "ptr-nx":
        tbl[i] = e | NX
    elif kind == "ps":
        tbl[i] = e | PSE  # a table pointer read as a leaf
    elif kind == "drop":
        tbl[i] = 0  # the whole table below is gone
    return kind, va, size


def _page_of(msg: str) -> int:
    return int(re.search(r"0x[0-9a-f]+", msg).group(0), 16)


def run_corrupted(ops, kernel, policy, k, pick, kind, bit):
    """Replay with the validator (checks a, b) and the brute force; corrupt after op k's own
    writes (and the policy's merges). Returns None when op k offers no entry of that kind."""
    m = CpaModel(LAY, kernel, policy)
    val = Validator(m, "ab")
    bf = BruteForce(m)
    for idx, op in enumerate(ops):
        m.touched = set()
        bf.apply(op, m)
        res = apply_op(m, op)
        touched = m.touched
        m.policy.after_op(touched)
        m.touched = None
        c = corrupt(m, touched, pick, kind, bit) if idx == k else None
        if idx == k and c is None:
            return None
        v = val.check(idx, op, res, touched)
        if idx < k:
            assert v is None, v
            continue
        kind, va, size = c
        assert v is not None, f"corruption {kind} of the entry for {va:#x} at op {k} ({op}) not reported"
        assert v.op_index == k
        page = _page_of(v.message)
        assert va <= page < va + size, (kind, hex(va), v)
        diffs = bf.differences(m, limit=1 << 40)
        if diffs:
            # the hardware-visible damage stays inside the corrupted entry's span, and the page
            # the validator names is one of the damaged ones
            assert all(va <= d.va < va + size for d in diffs), (kind, hex(va), diffs[:3])
            if PO <= page < PO + (1 << 46):
                assert page in {d.va for d in diffs}, (kind, v, diffs[:3])
        return kind, page, diffs
    return None


KINDS = ["frame", "flag", "present", "rw", "nx", "ptr-rw", "ptr-nx", "ps", "drop"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    traces(max_ops=5),
    st.sampled_from(["ideal", "none", "upstream", "nr-same-prot"]),
    st.sampled_from(["6.1", "6.15"]),
    st.integers(0, 10),
    st.integers(0, 1000),
    st.sampled_from(KINDS),
    st.integers(0, 1000),
)
def test_single_entry_corruption_is_reported_at_its_op(ops, policy, kernel, k, pick, kind, bit):
    k = 4 + k % (len(ops) - 4)  # an op after the four vmaps
    run_corrupted(ops, kernel, policy, k, pick, kind, bit)


# -- the last page of a 2M region, by name -------------------------------------------------------
LAST = PO + 0x4001FF000 - 0x3C0000000  # PO + 0x401FF000: last 4K of a 2M region


@pytest.mark.parametrize("kind", ["frame", "flag", "present", "rw", "nx"])
@pytest.mark.parametrize("policy", ["none", "ideal"])
def test_corrupted_last_page_of_a_2m_region_is_reported(kind, policy):
    """set_memory_ro of the last page of a 2M region of the 1G leaf (1G and 2M splits), then
    the corruption of exactly that PTE (index 511): the validator must name that page."""
    ops = parse_trace([f"set_memory_ro {LAST:#x} 1"])
    got = run_corrupted(ops, "6.15", policy, 0, 0, kind, 3)
    assert got is not None
    _, page, diffs = got
    assert page == LAST
    if kind in ("frame", "present", "rw", "nx"):
        assert [d.va for d in diffs] == [LAST]


def test_corrupted_merged_leaf_is_reported():
    """ro then rw of the last page of a 2M region of the 1G leaf: 1G and 2M splits, then 512
    equal PTEs again; ideal merges them back to a 2M leaf and the 512 PMD leaves to a 1G leaf
    (6.1: ro keeps D). Corrupting the merged 1G leaf's frame (bit 30) moves every page of the
    gigabyte: the validator names the first, the brute force sees all 262144."""
    ops = parse_trace([f"set_memory_ro {LAST:#x} 1", f"set_memory_rw {LAST:#x} 1"])
    got = run_corrupted(ops, "6.1", "ideal", 1, 0, "frame", 0)
    assert got is not None
    assert got[1] == PO + 0x40000000
    assert len(got[2]) == 1 << 18 and all(d.what == "frame" for d in got[2])


def test_brute_force_sees_a_table_pointer_restriction():
    """A table pointer with RW=0 changes 512 translations while every leaf stays as it was: the
    brute force sees all of them, and the validator's pointer check names the region."""
    ops = parse_trace([f"set_memory_ro {LAST:#x} 1"])
    got = run_corrupted(ops, "6.15", "none", 0, 0, "ptr-rw", 0)
    assert got is not None
    _, page, diffs = got
    assert len(diffs) >= 511 and all(d.what == "writable" for d in diffs)


def test_validator_reports_nothing_on_the_kernels_own_steps():
    """fixtures/linux: each step k replayed from image k-1 (vmalloc frames seeded as
    harness/linux/replay.py does) with the validator on: real 6.1/6.12 kernels, 4- and 5-level,
    never trip it (before, every 5-level run failed (c) at the start: the validator kept 48-bit
    keys where the model's are 57-bit)."""
    import glob
    import os
    import tempfile

    R = pytest.importorskip("harness.linux.replay")
    from harness.linux.collect import read_artifact
    from x86pt.cpa.trace import parse_line

    fx = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "linux")
    runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(fx, "*", "meta.json")))
    if not runs:
        pytest.skip("no fixtures/linux runs committed")
    seen = set()
    for d in runs:
        steps = R.step_dirs(d)
        if len(steps) < 2:
            continue
        lay, kern = R.run_layout(d), R.run_kernel(d)
        for k in range(1, len(steps)):
            with tempfile.TemporaryDirectory() as tmp:
                m = R.load_model(steps[k - 1], lay, kern, os.path.join(tmp, "a"))
                after = R.load_model(steps[k], lay, kern, os.path.join(tmp, "b"))
            text = read_artifact(steps[k], "cpa.trace").decode()
            ops = [op for op in (parse_line(ln) for ln in text.splitlines()) if op]
            R.seed_vmalloc(m, after, ops, R._alias_frames(text, m))
            r = replay(m, ops, validate=True, samples=0)
            assert r.violation is None, (os.path.basename(d), k, r.violation)
            seen.add((kern, m.levels))
    assert {("6.1", 4), ("6.1", 5), ("6.12", 4), ("6.12", 5)} <= seen


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="open finding (2026-12-02, Hypothesis): after a set_direct_map_invalid_noflush, a PS bit "
    "planted at op 5 is reported by the validator at the invalidated page 0xffff888002000000, which "
    "the brute-force reference does not list among its differences; which side is right is not "
    "decided yet (see the session note)",
)
def test_known_corruption_example_ps_after_invalidate():
    from x86pt.cpa.traceops import OnePage, PageRange, Vmap

    ops = [
        Vmap(name="vmap", addr=18446744072640004096, pa=4198400, npages=1, huge=False),
        Vmap(name="vmap", addr=18446744072640008192, pa=33566720, npages=1, huge=False),
        Vmap(name="vmap", addr=18446744072640012288, pa=2147479552, npages=1, huge=False),
        Vmap(name="vmap", addr=18446744072640016384, pa=1073741824, npages=1, huge=False),
        PageRange(name="set_memory_ro", addr=18446612682074226688, npages=1),
        OnePage(name="set_direct_map_invalid_noflush", addr=18446612682103586816),
        PageRange(name="set_memory_ro", addr=18446744072640004096, npages=1),
    ]
    test_single_entry_corruption_is_reported_at_its_op.hypothesis.inner_test(
        ops=ops, policy="ideal", kernel="6.1", k=1, pick=0, kind="ps", bit=0
    )
