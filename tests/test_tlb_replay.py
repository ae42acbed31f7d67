# SPDX-License-Identifier: GPL-2.0-or-later
"""`cpa replay --tlb` (x86pt/cpa/tlbreplay.py): TLB ops in traces, the CPA model's flushes at the
point the kernel issues them, and the report. Expectations are hand-derived from the kernel's
flush rule (arch/x86/mm/pat/set_memory.c v6.15: a split does flush_tlb_all before the call's
cpa_flush; cpa_flush of <= 33 pages invalidates each page on every CPU) and the SDM (§4.10.4:
an entry changed without an invalidation may still be used)."""

from __future__ import annotations

import json
import random

import pytest

from x86pt.cli import main
from x86pt.cpa.layout import layout_named
from x86pt.cpa.ops import CpaModel
from x86pt.cpa.tlbreplay import LiveTables, replay_tlb
from x86pt.cpa.trace import format_op, parse_trace, replay

KB4 = 1 << 12
PO = 0xFFFF888000000000  # laptop-4g's page_offset (no KASLR)
A = PO + 0x40200000 + 5 * KB4  # inside a 2M direct-map page of RAM


def run(tmp_path, text, *extra, capsys):
    p = tmp_path / "t.trace"
    p.write_text(text)
    rc = main(["cpa", "replay", str(p), "--layout", "laptop-4g", "--tlb", "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_tlb_lines_parse_and_format_back():
    text = (
        f"set_memory_ro {A:#x} 1\nflush_tlb_kernel_range {A:#x} {A + KB4:#x}\ninvlpg {A:#x} 1\n"
        f"flush_tlb_all\ntouch 1 {A:#x} 1 write\nflush_tlb_local 0\n"
    )
    ops = parse_trace(text.splitlines())
    assert [o[0] for o in ops] == [
        "set_memory_ro",
        "flush_tlb_kernel_range",
        "invlpg",
        "flush_tlb_all",
        "touch",
        "flush_tlb_local",
    ]
    assert parse_trace([format_op(o) for o in ops]) == ops


def test_plain_replay_skips_tlb_ops():
    ops = parse_trace([f"set_memory_ro {A:#x} 1", "flush_tlb_all", f"set_memory_rw {A:#x} 1"])
    a, b = CpaModel(layout_named("laptop-4g")), CpaModel(layout_named("laptop-4g"))
    ra = replay(a, ops, validate=True, samples=0)
    rb = replay(b, [o for o in ops if o[0] != "flush_tlb_all"], validate=True, samples=0)
    assert ra.violation is None and ra.counters == rb.counters


def test_live_tables_read_what_export_writes():
    m = CpaModel(layout_named("laptop-4g"))
    live = LiveTables(m)
    for i in range(3):  # splits allocate tables: the index must follow
        m.set_memory_ro(A + i * 0x200000, 1)
    mem = m.export()
    rnd = random.Random(1)
    for pn in list(mem.pages):
        for off in [0, 4088] + [rnd.randrange(512) * 8 for _ in range(8)]:
            assert live.read_u64(pn * KB4 + off) == mem.read_u64(pn * KB4 + off)


def test_missing_flush_is_reported_at_its_op_and_address(tmp_path, capsys):
    # flushes from the trace, none recorded: the 2M entry cached writable before the split stays
    # usable on both CPUs (SDM §4.10.4.1: only an invalidation removes it)
    rc, d = run(tmp_path, f"set_memory_ro {A:#x} 1\n", "--tlb-flushes", "trace", capsys=capsys)
    assert rc == 1 and not d["ok"]
    (f,) = d["dangerous_at_end_of_call"]
    assert f["index"] == 0
    assert sorted((w["cpu"], w["start"], w["end"], w["kind"], w["opened"]) for w in f["windows"]) == [
        (0, hex(A), hex(A + KB4), "rw", 0),
        (1, hex(A), hex(A + KB4), "rw", 0),
    ]
    # the recorded flush after the call closes it: the window lasted until op 1
    rc, d = run(
        tmp_path,
        f"set_memory_ro {A:#x} 1\nflush_tlb_kernel_range {A:#x} {A + KB4:#x}\n",
        "--tlb-flushes",
        "trace",
        capsys=capsys,
    )
    assert rc == 0 and d["ok"] and d["dangerous_at_end_of_call"] == []
    assert {
        (w["cpu"], w["kind"], w["opened"], w["closed"])
        for w in d["windows_closed"]
        if w["severity"] == "dangerous"
    } == {(0, "rw", 0, 1), (1, "rw", 0, 1)}


def test_model_flushes_close_the_window(tmp_path, capsys):
    rc, d = run(tmp_path, f"set_memory_ro {A:#x} 1\nset_memory_rw {A:#x} 1\n", capsys=capsys)
    assert rc == 0 and d["ok"] and d["open_at_end"] == []
    # split of the 2M page (flush_tlb_all), then cpa_flush of one page on each CPU per call
    assert d["model_counters"] == {"flush_all": 1, "invlpg_pages": 2}
    assert d["flushes_done"] == {"flush_all": 1, "invlpg_pages": 2}


def test_split_flush_mid_op_does_not_hide_a_missing_final_flush():
    # The split's flush_tlb_all comes before the PTE is made read-only: if only the final
    # cpa_flush is lost, the window stays open. Applied at the op's end instead, the split's
    # flush would wrongly close it.
    m = CpaModel(layout_named("laptop-4g"))
    from x86pt.cpa import tlbreplay

    real = tlbreplay.TlbReplay.flush
    kinds = []

    def drop_range(self, memory, kind, *a, **k):
        kinds.append(kind)
        return None if kind == "range" else real(self, memory, kind, *a, **k)

    tlbreplay.TlbReplay.flush = drop_range
    try:
        res = replay_tlb(m, parse_trace([f"set_memory_ro {A:#x} 1"]))
    finally:
        tlbreplay.TlbReplay.flush = real
    assert kinds == ["all", "range"]
    assert [(f.index, [(w.cpu, w.start, w.kind) for w in f.windows]) for f in res.findings] == [
        (0, [(0, A, "rw"), (1, A, "rw")])
    ]


def test_noflush_needs_the_callers_flush(tmp_path, capsys):
    inv = f"set_direct_map_invalid_noflush {A:#x}\n"
    rc, d = run(tmp_path, inv, capsys=capsys)
    assert rc == 1 and d["dangerous_at_end_of_call"] == []  # not the call's own flush
    assert {(w["cpu"], w["kind"], w["opened"], w["closed"]) for w in d["open_at_end"]} == {
        (0, "present", 0, None),
        (1, "present", 0, None),
    }
    rc, d = run(
        tmp_path,
        inv + f"flush_tlb_kernel_range {A:#x} {A + KB4:#x}\nset_direct_map_default_noflush {A:#x}\n",
        capsys=capsys,
    )
    assert rc == 0 and d["open_at_end"] == []


def test_tlb_flags_need_tlb(tmp_path, capsys):
    p = tmp_path / "t.trace"
    p.write_text(f"set_memory_ro {A:#x} 1\n")
    assert main(["cpa", "replay", str(p), "--layout", "laptop-4g", "--cpus", "4"]) == 2
    assert main(["cpa", "replay", str(p), "--layout", "laptop-4g", "--tlb", "--tlb-assume", "x"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("cpus", [1, 4])
def test_cpus_flag(tmp_path, capsys, cpus):
    rc, d = run(tmp_path, f"set_direct_map_invalid_noflush {A:#x}\n", "--cpus", str(cpus), capsys=capsys)
    assert rc == 1 and d["cpus"] == cpus
    assert sorted(w["cpu"] for w in d["open_at_end"]) == list(range(cpus))
