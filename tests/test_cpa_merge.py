"""Merge correctness: random traces replayed under every policy with the validator on, and the
failure the 2022 RFC's review predicted (Hyeonggon Yoo: kfence flips _PAGE_PRESENT with set_pte
outside CPA, so a per-table nr_same_prot counter drifts and a merge goes wrong)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from x86pt.cpa.layout import PRESETS
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.trace import minimise, parse_trace, replay

PO = 0xFFFF888000000000
LAY = PRESETS["laptop-4g"]
VM = 0xFFFFFFFFC0400000
# a small arena: two 2M regions below 1G, one 1G-leaf region, four vmalloc pages
DM = [PO + 0x20000000, PO + 0x20200000, PO + 0x100000000 + 0x3FE00000]
FRAMES = [0x20001000, 0x20003000, 0x201FF000, 0x20200000]
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
def traces(draw, oob: bool = False):
    lines = [f"vmap {VM + 4096 * k:#x} {f:#x} 1" for k, f in enumerate(FRAMES)]
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["dm", "dm", "vm", "dmi"] + (["oob"] if oob else [])))
        if kind == "vm":
            k = draw(st.integers(0, 3))
            n = draw(st.integers(1, 4 - k))
            lines.append(f"{draw(st.sampled_from(APIS))} {VM + 4096 * k:#x} {n}")
        elif kind == "dmi":
            a = draw(st.sampled_from(DM)) + 4096 * draw(st.integers(0, 511))
            lines.append(f"set_direct_map_{draw(st.sampled_from(['invalid', 'default']))}_noflush {a:#x}")
        elif kind == "oob":
            a = draw(st.sampled_from(DM)) + 4096 * draw(st.integers(0, 511))
            lines.append(
                f"oob {a:#x} set=0x0 clr=0x1" if draw(st.booleans()) else f"oob {a:#x} set=0x1 clr=0x0"
            )
        else:
            base = draw(st.sampled_from(DM))
            k = draw(st.sampled_from([0, 1, 2, 255, 510, 511]))
            n = draw(st.sampled_from([1, 2, 3, 512 - k, 512]))
            lines.append(f"{draw(st.sampled_from(APIS))} {base + 4096 * k:#x} {n}")
    return parse_trace(lines)


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(traces(), st.sampled_from(["6.1", "6.15"]))
def test_policies_keep_translations(ops, kernel):
    for policy in ("none", "upstream", "ideal", "nr-same-prot"):
        r = replay(CpaModel(LAY, kernel, policy), ops, validate=True, samples=0)
        assert r.violation is None, (policy, kernel, r.violation)


@SETTINGS
@given(traces(oob=True), st.sampled_from(["6.1", "6.15"]))
def test_scan_based_policies_survive_out_of_band_writers(ops, kernel):
    """upstream, ideal and none never merge on a counter, so kfence-style writes cannot fool
    them (ideal never merges a table set_memory_4k split, on any kernel)."""
    for policy in ("none", "upstream", "ideal"):
        r = replay(CpaModel(LAY, kernel, policy), ops, validate=True, samples=0)
        assert r.violation is None, (policy, r.violation)


KFENCE = f"""
# kfence-like: a 4K pool page, a guard page made non-present behind CPA's back
set_memory_4k {PO + 0x20000000:#x} 16
oob {PO + 0x20005000:#x} set=0x0 clr=0x1
# ordinary CPA traffic on a neighbour page in the same 2M table: ro, then rw again
set_memory_ro {PO + 0x20009000:#x} 1
set_memory_rw {PO + 0x20009000:#x} 1
"""


def test_nr_same_prot_counter_drifts_at_the_kfence_write():
    ops = parse_trace(KFENCE.splitlines())
    r = replay(CpaModel(LAY, "6.1", "nr-same-prot"), ops, validate=True, samples=0)
    assert r.violation is not None
    assert (r.violation.op_index, r.violation.invariant) == (1, "d")
    assert "is 512 but a recount gives 511" in r.violation.message


def test_nr_same_prot_merge_makes_the_guard_page_present():
    """The RFC review's prediction: the count returns to 512 while one entry is really
    non-present; the merge writes a present 2M leaf over the kfence guard page."""
    ops = parse_trace(KFENCE.splitlines())
    m = CpaModel(LAY, "6.1", "nr-same-prot")
    r = replay(m, ops, validate=True, checks="abc", samples=0)
    assert r.violation is not None and (r.violation.op_index, r.violation.invariant) == (3, "b")
    assert r.violation.message.startswith(f"present bit of {PO + 0x20005000:#x}")
    assert m.leaf(PO + 0x20005000)[0] == 2 and m.counters.merge_2m == 1
    # the scan-based policies keep the guard page non-present
    for policy in ("none", "upstream"):
        m2 = CpaModel(LAY, "6.1", policy)
        assert replay(m2, ops, validate=True, samples=0).violation is None, policy
        assert not m2.translate(PO + 0x20005000)[1] & 1
    # ideal never merges a table set_memory_4k split, on every kernel (6.15+ also mark the
    # pages _PAGE_KERNEL_4K; before 6.15 only the policy remembers): kfence's PTE write finds
    # its 4K PTE and the guard page stays non-present
    for kernel in ("6.1", "6.15"):
        m3 = CpaModel(LAY, kernel, "ideal")
        assert replay(m3, ops, validate=True, samples=0).violation is None, kernel
        assert m3.leaf(PO + 0x20005000)[0] == 1 and not m3.translate(PO + 0x20005000)[1] & 1


def test_ideal_still_merges_a_table_split_by_an_ordinary_call():
    """The pin is for forced (set_memory_4k) splits only: ro then rw of one page splits the 2M
    leaf and ideal merges it back (512 equal PTEs, contiguous, aligned)."""
    a = PO + 0x20009000
    m = CpaModel(LAY, "6.1", "ideal")
    r = replay(
        m, parse_trace([f"set_memory_ro {a:#x} 1", f"set_memory_rw {a:#x} 1"]), validate=True, samples=0
    )
    assert r.violation is None
    assert m.leaf(a)[0] == 2 and m.counters.merge_2m == 1


def test_minimal_reproducer_is_small():
    ops = parse_trace(KFENCE.splitlines())
    pad = parse_trace([f"set_memory_ro {PO + 0x30000000 + 4096 * k:#x} 1" for k in range(20)])
    full = pad + ops
    r = replay(CpaModel(LAY, "6.1", "nr-same-prot"), full, validate=True, checks="abc", samples=0)
    mini = minimise(lambda: CpaModel(LAY, "6.1", "nr-same-prot"), full, r.violation, "abc", 20)
    assert len(mini) == 4 and mini == ops


def test_nr_same_prot_undoes_set_memory_4k_on_6_15():
    """With _PAGE_KERNEL_4K every PTE of a fully 4K-requested 2M leaves same_prot; the count
    hits 0, re-baselines to 512 and the RFC merges the table back (docs/cpa.md §7.3, the review)."""
    base = PO + 0x20000000
    ops = parse_trace([f"set_memory_4k {base:#x} 512", f"oob {base + 0x3000:#x} set=0x0 clr=0x1"])
    r = replay(CpaModel(LAY, "6.15", "nr-same-prot"), ops, validate=True, samples=0)
    assert r.violation is not None and r.violation.invariant == "b"
    assert "found no 4K PTE" in r.violation.message
    r = replay(CpaModel(LAY, "6.15", "upstream"), ops, validate=True, samples=0)
    assert r.violation is None


def test_ideal_keeps_a_table_set_memory_4k_found_already_split():
    """set_memory_4k on a page whose 2M leaf an ordinary call split earlier (no split now, and
    on 6.1 no bit written): ideal must still never merge that table, or kfence's later PTE
    write finds a 2M leaf."""
    a = PO + 0x20009000
    ops = parse_trace(
        [
            f"set_memory_ro {a:#x} 1",
            f"set_memory_4k {PO + 0x20005000:#x} 1",
            f"set_memory_rw {a:#x} 1",
            f"oob {PO + 0x20005000:#x} set=0x0 clr=0x1",
        ]
    )
    for kernel in ("6.1", "6.15"):
        m = CpaModel(LAY, kernel, "ideal")
        r = replay(m, ops, validate=True, samples=0)
        assert r.violation is None, (kernel, r.violation)
        assert m.leaf(PO + 0x20005000)[0] == 1 and m.counters.merge_2m == 0
