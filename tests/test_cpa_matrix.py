# SPDX-License-Identifier: GPL-2.0-or-later
"""Every generated workload x every merge policy x every kernel rule set, replayed with the
validator on (issue 10 / issue 12 item 4).

The verdict each cell must reach is derived from the policies' definitions (docs/cpa.md §7),
not from a previous run: every cell is clean, except nr-same-prot on a trace with out-of-band
(kfence) writers. The 2022 RFC adjusts nr_same_prot only in CPA's set_pte path; kfence clears
_PAGE_PRESENT with a raw set_pte (Hyeonggon Yoo's review), so the first such write to a page whose
prot still equals the table's same_prot leaves the count one too high: invariant (d), at that op.
On 6.15+ the pages set_memory_4k was called on carry _PAGE_KERNEL_4K, already differ from
same_prot, and a write to them changes nothing the counter counts.

This is also the README example's violation (`--policy nr-same-prot --kernel 6.1`, issue 10
item 2): it is a true finding, on every kernel rule set. It looked 6.1-only because the generator
called set_memory_4k on every kfence page, which on 6.15+ marked them all _PAGE_KERNEL_4K;
arch_kfence_init_pool calls it only where lookup_address() finds a large page.
"""

from __future__ import annotations

import pytest

from x86pt.cpa.layout import PRESETS
from x86pt.cpa.merge import POLICIES
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.trace import replay
from x86pt.cpa.workload import MIXES, SCENARIOS, generate

KERNELS = ("6.1", "6.6", "6.15", "6.18")
WORKLOADS = tuple(MIXES) + SCENARIOS
LAY = PRESETS["server-64g"]
# ops per cell in the normal run (hotplug ops map/unmap 128 MiB each: fewer of them)
N_OPS = {"hotplug": 60}
N_DEFAULT = 350


def expected_violation(ops: list[tuple], policy: str, kernel: str) -> tuple[int, str] | None:
    """(op index, invariant) the cell must stop at, from the policies' definitions."""
    if policy != "nr-same-prot":
        return None
    marked = set()
    for i, op in enumerate(ops):
        if op[0] == "set_memory_4k" and kernel in ("6.15", "6.18"):
            marked.update(op[1] + (k << 12) for k in range(op[2]))
        if op[0] == "oob" and op[1] & ~0xFFF not in marked:
            return i, "d"
    return None


def _cell(ops, kernel, policy, n=None):
    r = replay(CpaModel(LAY, kernel, policy), ops, validate=True, samples=0)
    want = expected_violation(ops, policy, kernel)
    got = None if r.violation is None else (r.violation.op_index, r.violation.invariant)
    assert got == want, (policy, kernel, n, r.violation)
    if want is not None:
        assert "but a recount gives" in r.violation.message
    else:
        assert r.ops == len(ops)
    return r


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_workload_and_policy(kernel):
    cells = 0
    for wl in WORKLOADS:
        ops = generate(LAY, kernel, wl, N_OPS.get(wl, N_DEFAULT), 1)
        for policy in POLICIES:
            _cell(ops, kernel, policy, wl)
            cells += 1
    assert cells == len(WORKLOADS) * len(POLICIES)


def test_kfence_workloads_do_reach_the_documented_violation():
    """The matrix above is not vacuous: kfence and mixed-rox put an oob write on an unmarked
    page within the normal op count, on every kernel (mixed reaches kfence later)."""
    for kernel in KERNELS:
        for wl in ("kfence", "mixed-rox"):
            ops = generate(LAY, kernel, wl, N_DEFAULT, 1)
            assert expected_violation(ops, "nr-same-prot", kernel) is not None, (wl, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_readme_trace_on_every_kernel(kernel):
    """The README's pair: a mixed-rox trace generated with --kernel 6.15, replayed under each
    rule set. nr-same-prot stops with (d) at its first kfence write to an unmarked page, on
    6.1 as on 6.15; the three other policies replay it clean."""
    ops = generate(LAY, "6.15", "mixed-rox", 1500, 1)
    for policy in POLICIES:
        r = _cell(ops, kernel, policy)
        if policy == "nr-same-prot":
            assert ops[r.violation.op_index][0] == "oob"


def test_rfc_counter_drift_hand_derived():
    """Two ops, counted by hand from the RFC: set_memory_4k splits a 2M leaf into a table born
    with same_prot = the leaf's prot and nr_same_prot = 512; 6.15 then writes _PAGE_KERNEL_4K
    into that one PTE through CPA (count 511). kfence's raw P clear of another page is not
    counted: stored 512 (6.1) / 511 (6.15), a recount gives one less."""
    po = 0xFFFF888000000000
    ops = [("set_memory_4k", po + 0x20000000, 1), ("oob", po + 0x20007000, 0, 1)]
    for kernel, stored in (("6.1", 512), ("6.6", 512), ("6.15", 511), ("6.18", 511)):
        r = replay(CpaModel(LAY, kernel, "nr-same-prot"), ops, validate=True, samples=0)
        assert (r.violation.op_index, r.violation.invariant) == (1, "d"), kernel
        assert f"is {stored} but a recount gives {stored - 1}" in r.violation.message, kernel
    # kfence's write to the very page set_memory_4k marked (6.15+) leaves the count exact
    ops = [("set_memory_4k", po + 0x20000000, 1), ("oob", po + 0x20000000, 0, 1)]
    assert replay(CpaModel(LAY, "6.15", "nr-same-prot"), ops, validate=True, samples=0).violation is None


@pytest.mark.unicorn
def test_sampled_states_agree_with_unicorn():
    """Invariant (e) on the comparison rig: sampled steps of merged/split states probed on
    unicorn (every page each sampled op touched, read/write/fetch at CPL0) for the merge
    policies on the oldest and newest rule sets."""
    from conftest import need_oracle
    from x86pt.registry import availability
    from x86pt.cpa.oracle_probe import OracleCheck, sampled_steps

    ok, why = availability("unicorn")
    need_oracle("unicorn", ok, why)
    lay = PRESETS["server-64g-nogb"]
    for kernel in ("6.1", "6.18"):
        ops = generate(lay, kernel, "modules-rox", 200, 2)
        for policy in ("upstream", "ideal", "nr-same-prot"):
            oc = OracleCheck(["unicorn"], steps=sampled_steps(len(ops), 3, 11), cap=128, log=lambda s: None)
            try:
                m = CpaModel(lay, kernel, policy)
                r = replay(m, ops, validate=True, checks="abcde", samples=0, oracle_check=oc)
                assert r.violation is None, (kernel, policy, r.violation)
                st = oc.stats["unicorn"]
                assert st.steps == 3 and st.probes > 0, (kernel, policy, oc.summary())
            finally:
                oc.close()


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_readme_size(workload):
    """The README's 100k-op size, every policy and rule set (tools/bench_cpa.py --matrix prints
    the same cells with timings)."""
    n = 100_000 if workload != "hotplug" else 20_000
    for kernel in KERNELS:
        ops = generate(LAY, kernel, workload, n, 1)
        for policy in POLICIES:
            _cell(ops, kernel, policy, workload)
