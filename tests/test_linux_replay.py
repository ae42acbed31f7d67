"""The replay check's parts (harness/linux/replay.py, x86pt/cpa/importer.py) on the committed
real-kernel fixtures: the expectations are the kernel's own counters (/proc/meminfo, vmstat) and
its captured tables, and hand derivations from arch/x86/include/asm/pgtable-invert.h."""

from __future__ import annotations

import glob
import os

import pytest

from harness.linux import replay as R
from harness.linux.collect import load_json
from x86pt.cpa.importer import model_from_image
from x86pt.cpa.layout import PRESETS
from x86pt.cpa.ops import CpaModel
from x86pt.errors import ImageError
from x86pt.memory.sparse import SparseMemory
from x86pt.state import PagingState, profile_named

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "fixtures", "linux")


def _run(name: str) -> str:
    d = os.path.join(FX, name)
    if not os.path.isdir(d):
        pytest.skip(f"fixture {name} not committed")
    return d


@pytest.mark.parametrize("name", ["6.1-4l-modules", "6.12-5l-modules"])
def test_import_of_a_real_image_counts_like_meminfo(name, tmp_path):
    """The imported model's direct_pages_count (a census of the tables) equals the kernel's
    /proc/meminfo at that step; ESPfix's shared tables import (4-level: one PMD page under many
    PUD entries) and 5-level images import with their P4D tables."""
    d = _run(name)
    lay = R.run_layout(d)
    step = R.step_dirs(d)[0]
    m = R.load_model(step, lay, R.run_kernel(d), str(tmp_path))
    want = load_json(os.path.join(step, "counters.json"))
    mi = m.counters.meminfo(lay.gbpages)
    assert (mi["DirectMap4k"], mi["DirectMap2M"], mi["DirectMap1G"]) == (
        want["DirectMap4k"],
        want["DirectMap2M"],
        want["DirectMap1G"],
    )
    assert m.shared, "ESPfix's shared table pages were expected"
    assert m.levels == load_json(os.path.join(d, "layout.json"))["levels"]
    if m.levels == 5:
        assert m.p4d


def test_replay_check_can_fail():
    """Step 1 of 6.12-4l-modules splits a 2M direct-map page (counters.json: level2 +1). Without
    its trace the model must disagree with the kernel on leaves, DirectMap and split events."""
    d = _run("6.12-4l-modules")
    good = R.replay_step(d, 1)
    assert good.identical and good.splits_kernel == (1, 0)
    orig = R.parse_line
    try:
        R.parse_line = lambda line, where="trace": None  # an empty trace
        bad = R.replay_step(d, 1)
    finally:
        R.parse_line = orig
    assert not bad.tables_equal and bad.meminfo_model != bad.meminfo_kernel
    assert bad.splits_model == (0, 0) != bad.splits_kernel


def test_agreement_on_every_committed_step():
    """All steps of all multi-step runs: 6.1 and 6.12, 4- and 5-level."""
    runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(FX, "*", "meta.json")))
    if not runs:
        pytest.skip("no fixtures/linux runs committed")
    seen = set()
    for d in runs:
        cfg = load_json(os.path.join(d, "meta.json"))["config"]
        for r in R.replay_run(d):
            assert r.identical, (r.run, r.step, [str(x) for x in r.divergences[:3]])
            seen.add((cfg["kernel"], cfg["levels"]))
    assert {("6.1", 4), ("6.12", 4)} <= seen


def test_l1tf_inversion_hand_derived():
    """pgtable-invert.h: pfn_pte with a non-present, non-empty prot stores ~pfn in bits 12..51;
    pte_pfn undoes it. 0x8000000000000163 (a 4K direct-map PTE) -> clr P -> frame inverted;
    set P -> back to the plain frame."""
    lay = PRESETS["server-64g"]
    m = CpaModel(lay, "6.1", "none")
    m.l1tf_invert = True
    va = lay.page_offset + 0x20007000
    m.set_memory_4k(va, 1)
    m.cpa(va, 1, 0, 0x1)
    e = m.leaf(va)[1]
    assert e & 0x000FFFFFFFFFF000 == (~0x20007000) & 0x000FFFFFFFFFF000
    assert m.translate(va)[0] == 0x20007
    m.cpa(va, 1, 0x1, 0)
    assert m.leaf(va)[1] & 0x000FFFFFFFFFF000 == 0x20007000


def test_importer_refuses_a_table_seen_at_two_levels():
    """PML4[256] pointing back at the PML4 page itself is a loop: one clear ImageError."""
    mem = SparseMemory(1 << 32)
    root = 0x1000
    mem.write_u64(root + 256 * 8, root | 0x63)
    st = PagingState(
        cr3=root, cr0=0x80010033, cr4=0x20, efer=0xD01, profile=profile_named("intel"), maxphyaddr=46
    )
    with pytest.raises(ImageError, match="level"):
        model_from_image((mem, st), PRESETS["server-64g"], "6.1", "none")
