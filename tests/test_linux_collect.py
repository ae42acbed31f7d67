"""Unit tests of the Linux ground-truth collection (no QEMU): the ttyS1 parser, the CPA trace
decoder, the counters, the newc writer, register parsing and the table copier. Expected values are
derived by hand from the formats' documentation and the kernel's accounting rules cited below."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.linux.collect import (
    collect_tables,
    decode_trace,
    parse_counters,
    parse_output,
    parse_registers,
    trace_summary,
    trace_text,
)
from harness.linux.initramfs import Cpio, steps_archive
from x86pt.build import Builder
from x86pt.errors import BadInputError, OracleError

# Shaped like a real 5-level trace of insmod crc7: the primary call on module memory,
# and nested inside it the alias call on the direct map, whose return shows one 2M split
# (update_page_count: 4K +512, 2M -1).
TRACE = """\
insmod-107 [000] ..... 3.440669: set_memory_ro: (set_memory_ro+0x0/0x30) addr=0xffffffffc0208000 numpages=1
insmod-107 [000] ..... 3.441066: cpasc: (__change_page_attr_set_clr+0x0/0xf00) vaddr=0xffffffffc0208000 numpages=1 set=0x0 clr=0x2 flags=0x0 bits=0 primary=1 d4k=6624 d2m=1011 d1g=1
insmod-107 [000] ..... 3.441126: cpasc: (__change_page_attr_set_clr+0x0/0xf00) vaddr=0xff1100000690b000 numpages=1 set=0x0 clr=0x2 flags=0x1 bits=0 primary=0 d4k=6624 d2m=1011 d1g=1
insmod-107 [000] ..... 3.441150: cpasc_ret: (__change_page_attr_set_clr+0xe30/0xf00 <- __change_page_attr_set_clr) ret=0 d4k=7136 d2m=1010 d1g=1
insmod-107 [000] ..... 3.441191: cpasc_ret: (__change_page_attr_set_clr+0xe30/0xf00 <- __change_page_attr_set_clr) ret=0 d4k=7136 d2m=1010 d1g=1
kworker/0:2-48 [000] ..... 3.453020: set_direct_map_invalid_noflush: (set_direct_map_invalid_noflush+0x0/0x90) page=0xffd40000001a4580
kworker/0:2-48 [000] ..... 3.453214: cpasc: (__change_page_attr_set_clr+0x0/0xf00) vaddr=0xff11000006916000 numpages=1 set=0x0 clr=0x3 flags=0x0 bits=1 primary=0 d4k=7136 d2m=1010 d1g=1
kworker/0:2-48 [000] ..... 3.453300: cpasc_ret: (__change_page_attr_set_clr+0xe30/0xf00 <- __change_page_attr_set_clr) ret=0 d4k=7648 d2m=1521 d1g=0
"""


def test_decode_trace_nests_alias_and_attributes_splits():
    dec = decode_trace(TRACE.splitlines())
    assert [c.depth for c in dec.calls] == [0, 1, 0]
    primary, alias, invalid = dec.calls
    assert primary.primary and not alias.primary and not invalid.primary
    assert primary.own == (0, 0, 0) and primary.total == (512, -1, 0)
    assert alias.own == (512, -1, 0) and alias.splits() == (0, 1)
    # 1G -1, 2M +511 (= +512 from the 1G split, -1 for a 2M split), 4K +512
    assert invalid.splits() == (1, 1)
    assert invalid.force_split
    assert primary.api.startswith("set_memory_ro addr=0xffffffffc0208000")
    assert trace_summary(dec) == {
        "calls": 3,
        "top_level_calls": 2,
        "api_calls": 2,
        "splits_1g": 1,
        "splits_2m": 2,
        "unmatched": 0,
        "flushes": {"all": 0, "range": 0, "page": 0},
    }


def test_trace_text_has_top_level_calls_active_and_aliases_commented():
    text = trace_text(decode_trace(TRACE.splitlines()), "t")
    active = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert active == [
        "cpa 0xffffffffc0208000 1 set=0x0 clr=0x2 flags=0x0 primary",
        "cpa 0xff11000006916000 1 set=0x0 clr=0x3 flags=0x0 alias force_split  # split 1G:1 2M:1",
    ]
    assert "#   alias cpa 0xff1100000690b000 1 set=0x0 clr=0x2 flags=0x1 alias  # split 1G:0 2M:1" in text
    assert "# set_memory_ro addr=0xffffffffc0208000 numpages=1" in text


def test_decode_trace_counts_unmatched_and_skips_noise():
    lines = TRACE.splitlines()[:3] + ["garbage line", "# tracer: nop"]
    dec = decode_trace(lines)
    assert dec.unmatched == 2 and len(dec.calls) == 2
    assert dec.calls[0].own is None and dec.calls[0].splits() is None


def test_parse_counters_reads_meminfo_kb_and_vmstat():
    c = parse_counters(
        ["DirectMap4k:       24448 kB", "DirectMap2M:     2072576 kB", "DirectMap1G:     1048576 kB"],
        ["direct_map_level2_splits 3", "direct_map_level3_splits 0"],
    )
    assert c == {
        "DirectMap4k": 24448,
        "DirectMap2M": 2072576,
        "DirectMap1G": 1048576,
        "direct_map_level2_splits": 3,
        "direct_map_level3_splits": 0,
    }


def test_parse_output_sections_steps_and_end():
    text = (
        "@@BEGIN\n@@UNAME\n6.1.0-56-amd64\n@@KALLSYMS\nffffffff82a10000 D init_top_pgt\n"
        "@@STEP 0 baseline\n@@MEMINFO\nDirectMap4k: 4 kB\n@@ENDSTEP 0\n"
        "@@LOG 1\ninsmod: ok\n@@RC 0\n@@STEP 1 insmod crc7\n@@PTDUMP\n---[ x ]---\n@@ENDSTEP 1\n"
        "@@END 0001\n"
    )
    b = parse_output(text)
    assert b.ended == 1 and b.header["UNAME"] == ["6.1.0-56-amd64"]
    assert [(s.number, s.name, s.rc, s.log) for s in b.steps] == [
        (0, "baseline", None, []),
        (1, "insmod crc7", 0, ["insmod: ok"]),
    ]
    assert b.steps[1].sections["PTDUMP"] == ["---[ x ]---"]
    assert parse_output("@@STEP 0 base\n@@MEMINFO\nDirect").ended is None  # cut off: no @@END


def test_cpio_newc_header_by_hand():
    a = Cpio()
    a.file("a", b"xy")
    data = a.finish()
    # 070701, then 13 8-digit hex fields: ino 1, mode 0100644, uid, gid, nlink 1, mtime, size 2,
    # devmajor, devminor, rdevmajor, rdevminor, namesize 2 ("a\0"), check; 110 + 2 = 112 bytes.
    head = (
        b"070701"
        + b"00000001"
        + b"000081A4"
        + b"0" * 16
        + b"00000001"
        + b"0" * 8
        + b"00000002"
        + b"0" * 32
        + b"00000002"
        + b"0" * 8
    )
    assert data.startswith(head + b"a\0" + b"xy\0\0")
    assert b"TRAILER!!!\0" in data and len(data) % 512 == 0


def test_steps_archive_is_fixed_size():
    assert len(steps_archive(0)) == len(steps_archive(9999))
    assert b"0042 0\n" in steps_archive(42) and b"0042 1\n" in steps_archive(42, True)
    with pytest.raises(BadInputError):
        steps_archive(10000)


def test_parse_registers_from_info_registers():
    info = (
        "RAX=0000000000000000 RBX=0000000000000000\nCR0=80050033 CR2=0000000000477a90 "
        "CR3=00000000083c0000 CR4=00750ef0\nEFER=0000000000000d01\n"
    )
    assert parse_registers(info) == {
        "cr0": 0x80050033,
        "cr2": 0x477A90,
        "cr3": 0x83C0000,
        "cr4": 0x750EF0,
        "efer": 0xD01,
    }
    with pytest.raises(OracleError):
        parse_registers("RAX=0")


def test_collect_tables_copies_exactly_the_tables():
    b = Builder(levels=4, table_base=0x100000)
    b.map(0xFFFF888000000000, 0x0, 0x1000, page_size=4096, flags="rw nx g")
    b.map(0xFFFF888000200000, 0x200000, 0x200000, page_size=2 << 20, flags="rw nx g")
    st = b.state()
    # one 4K page needs a PML4, a PDPT, a PD and a PT; the 2M leaf lives in the same PD
    mem = collect_tables(b.memory, st.cr3, 4)
    assert len(mem.pages) == 4
    for pn in mem.pages:
        assert mem.read(pn * 4096, 4096) == b.memory.read(pn * 4096, 4096)


def test_report_rejects_a_directory_that_is_not_a_run(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "x86pt", "linux", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.startswith("x86pt: error:") and len(p.stderr.strip().splitlines()) == 1


# One CPU: flush_tlb_all inside the call (a split), then cpa_flush's per-page flushes after it;
# later vm_reset_perms' flush_tlb_kernel_range, whose own one-page flushes (do_kernel_range_flush)
# are folded into it, and a lone flush_tlb_one_kernel.
TLB_TRACE = """\
 insmod-90 [000] ..... 5.000001: set_memory_ro: (set_memory_ro+0x0/0x30) addr=0xffffffffc0208000 numpages=2
 insmod-90 [000] ..... 5.000002: cpasc: (__change_page_attr_set_clr+0x0/0xf00) vaddr=0xffffffffc0208000 numpages=2 set=0x0 clr=0x2 flags=0x0 bits=0 primary=1 d4k=10 d2m=5 d1g=1
 insmod-90 [000] ..... 5.000003: tlb_all: (flush_tlb_all+0x0/0x20)
 insmod-90 [000] ..... 5.000004: cpasc_ret: (change_page_attr_set_clr+0x1/0x2 <- __change_page_attr_set_clr) ret=0 d4k=522 d2m=4 d1g=1
 insmod-90 [000] ..... 5.000005: tlb_one: (flush_tlb_one_kernel+0x0/0x20) addr=0xffffffffc0208000
 insmod-90 [000] ..... 5.000006: tlb_one: (flush_tlb_one_kernel+0x0/0x20) addr=0xffffffffc0209000
 rmmod-91 [000] ..... 6.000001: tlb_range: (flush_tlb_kernel_range+0x0/0x90) start=0xffffffffc0208000 end=0xffffffffc020a000
 rmmod-91 [000] ..... 6.000002: tlb_one: (flush_tlb_one_kernel+0x0/0x20) addr=0xffffffffc0208000
 rmmod-91 [000] ..... 6.000003: tlb_one: (flush_tlb_one_kernel+0x0/0x20) addr=0xffffffffc0209000
 rmmod-91 [000] ..... 6.000004: tlb_one: (flush_tlb_one_kernel+0x0/0x20) addr=0xffffffffc0208000
"""


def test_decode_trace_records_the_kernels_flushes_in_order():
    from harness.linux.collect import Flush

    dec = decode_trace(TLB_TRACE.splitlines())
    assert [(f.kind, f.start, f.end, f.in_call) for f in dec.flushes] == [
        ("all", 0, 0, True),
        ("page", 0xFFFFFFFFC0208000, 0xFFFFFFFFC0209000, False),
        ("page", 0xFFFFFFFFC0209000, 0xFFFFFFFFC020A000, False),
        ("range", 0xFFFFFFFFC0208000, 0xFFFFFFFFC020A000, False),
        ("page", 0xFFFFFFFFC0208000, 0xFFFFFFFFC0209000, False),
    ]
    assert isinstance(dec.seq[0], type(dec.calls[0])) and isinstance(dec.seq[1], Flush)
    text = trace_text(dec, "t").splitlines()
    body = [l for l in text if not l.startswith("# ") or l.startswith("#   in-call")]
    assert body == [
        "cpa 0xffffffffc0208000 2 set=0x0 clr=0x2 flags=0x0 primary  # split 1G:0 2M:1",
        "#   in-call flush_tlb_all",
        "invlpg 0xffffffffc0208000",
        "invlpg 0xffffffffc0209000",
        "flush_tlb_kernel_range 0xffffffffc0208000 0xffffffffc020a000",
        "invlpg 0xffffffffc0208000",
    ]
    assert trace_summary(dec)["flushes"] == {"all": 1, "range": 1, "page": 3}
