"""The CPA model's counters as the kernel prints them (x86pt/cpa/counters.py), written by hand
from the kernel's formats: arch_report_meminfo() in arch/x86/mm/pat/set_memory.c ("DirectMap4k:
%8lu kB" with 4 spaces after the colon, direct_pages_count[] << 2 / << 11 / << 20 kB; the 1G line
only with X86_FEATURE_GBPAGES), the vmstat names of include/linux/vm_event_item.h
(direct_map_level2_splits ...), and debugfs x86/cpa_stats ("1G pages checked:     %16lu")."""

from __future__ import annotations

from x86pt.census import meminfo_text
from x86pt.cpa.counters import Counters


def sample() -> Counters:
    return Counters(
        dpc4k=3,
        dpc2m=5,
        dpc1g=7,
        split_2m=11,
        split_1g=13,
        collapse_2m=17,
        collapse_1g=19,
        merge_2m=23,
        merge_1g=29,
        checked_1g=31,
        sameprot_1g=37,
        preserved_1g=41,
        checked_2m=43,
        sameprot_2m=47,
        preserved_2m=53,
        setchecked_4k=59,
    )


def test_meminfo_in_kb():
    c = sample()
    assert c.meminfo(True) == {"DirectMap4k": 12, "DirectMap2M": 10240, "DirectMap1G": 7340032}
    assert c.meminfo(False) == {"DirectMap4k": 12, "DirectMap2M": 10240}


def test_meminfo_text_is_the_kernels():
    c = sample()
    want = "DirectMap4k:          12 kB\nDirectMap2M:       10240 kB\nDirectMap1G:     7340032 kB\n"
    assert c.meminfo_text(True) == want
    assert c.meminfo_text(False) == want[: -len("DirectMap1G:     7340032 kB\n")]
    assert meminfo_text(3, 5, 7) == want
    # a 64 GiB direct map in 2M pages: wider than 8 digits is printed whole
    assert (
        meminfo_text(0, 1 << 25, 0, False) == "DirectMap4k:           0 kB\nDirectMap2M:    68719476736 kB\n"
    )


def test_vmstat_names():
    assert sample().vmstat() == {
        "direct_map_level2_splits": 11,
        "direct_map_level3_splits": 13,
        "direct_map_level2_collapses": 17,
        "direct_map_level3_collapses": 19,
        "direct_map_level1_merges": 23,
        "direct_map_level2_merges": 29,
    }


def test_cpa_stats_text():
    assert sample().cpa_stats() == (
        "1G pages checked:                   31\n"
        "1G pages sameprot:                  37\n"
        "1G pages preserved:                 41\n"
        "2M pages checked:                   43\n"
        "2M pages sameprot:                  47\n"
        "2M pages preserved:                 53\n"
        "4K pages set-checked:               59\n"
    )


def test_snapshot_is_every_field_by_name():
    c = sample()
    snap = c.snapshot()
    assert snap["dpc4k"] == 3 and snap["merge_1g"] == 29 and snap["setchecked_4k"] == 59
    assert snap["flush_all"] == 0 and len(snap) == 39  # the fields above, counted by hand
    c.flush_all += 1
    assert snap["flush_all"] == 0 and c.snapshot()["flush_all"] == 1  # a copy, not a view
