"""Trace ops are named tuples (x86pt/cpa/traceops.py): the fields a trace line gives, by name,
in the grammar's order (x86pt/cpa/trace.py), equal to the plain tuple of those fields."""

from __future__ import annotations

from x86pt.cpa.layout import PRESETS
from x86pt.cpa.trace import format_op, parse_line
from x86pt.cpa.traceops import Hotplug, MapPages, OnePage, Oob, PageRange, RawCpa, Vmap
from x86pt.cpa.workload import generate


def test_each_line_gives_its_named_fields():
    op = parse_line("cpa 0x1000 3 set=0x2 clr=0x8000000000000000 flags=0x10 alias force_split")
    assert type(op) is RawCpa
    assert (op.addr, op.npages, op.set, op.clr, op.flags, op.primary, op.force_split) == (
        0x1000,
        3,
        2,
        1 << 63,
        16,
        False,
        True,
    )
    assert op == ("cpa", 0x1000, 3, 2, 1 << 63, 16, False, True)
    op = parse_line("set_memory_rox 0xffffffffc0001000 12  # module text")
    assert type(op) is PageRange and (op.name, op.addr, op.npages) == (
        "set_memory_rox",
        0xFFFFFFFFC0001000,
        12,
    )
    op = parse_line("set_direct_map_invalid_noflush 0xffff888012345000")
    assert type(op) is OnePage and op.addr == 0xFFFF888012345000
    op = parse_line("kernel_map_pages 0xffff888000200000 4 0")
    assert type(op) is MapPages and (op.npages, op.enable) == (4, 0)
    op = parse_line("oob 0xffff888000201000 set=0x0 clr=0x1")
    assert type(op) is Oob and (op.set, op.clr) == (0, 1)
    op = parse_line("vmap 0xffffc90000000000 0x40000000 512 huge")
    assert type(op) is Vmap and (op.pa, op.npages, op.huge) == (0x40000000, 512, True)
    op = parse_line("vunmap 0xffffc90000000000 512")
    assert type(op) is PageRange and op.npages == 512
    op = parse_line("memory_add 0x1080000000 0x8000000")
    assert type(op) is Hotplug and (op.pa, op.size) == (0x1080000000, 0x8000000)


def test_format_and_parse_round_trip():
    for line in (
        "cpa 0x1000 3 set=0x2 clr=0x0 flags=0x10 alias force_split",
        "oob 0x2000 set=0x1 clr=0x0",
        "vmap 0x3000 0x4000 2",
        "memory_remove 0x40000000 0x8000000",
        "kernel_map_pages 0x5000 1 1",
    ):
        assert format_op(parse_line(line)) == line


def test_generated_workloads_are_named_tuples():
    ops = generate(PRESETS["server-64g"], "6.15", "mixed-rox", 3000, 1)
    kinds = {type(op) for op in ops}
    assert kinds <= {PageRange, OnePage, Oob, Vmap, Hotplug} and len(kinds) >= 4
    assert all(format_op(parse_line(format_op(op))) == format_op(op) for op in ops[:500])
