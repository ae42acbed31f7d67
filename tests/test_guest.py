"""The probe guest: the shipped bytes rebuild from harness.S, the layout matches
docs/oracles.md §3.1, and the RAM preparation / result decoding do what the layout says.
Expected values are the spec's layout table and hand-computed entries, not the module's output."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

import harness.guest as g
from harness.guest import listing
from x86pt.oracle import Probe, tag_value
from x86pt.errors import BadInputError, OracleError
from x86pt.memory.sparse import SparseMemory
from x86pt.state import CR4_LA57, CR4_PAE, PagingState, profile_named
from x86pt.walk import Access, Translation, walk

HERE = os.path.dirname(g.__file__)
RAM = 32 << 20


def test_rebuild_matches_shipped_bytes(tmp_path):
    if not all(shutil.which(t) for t in ("as", "ld", "objcopy", "nm")):
        pytest.skip("binutils (as, ld, objcopy, nm) not installed")
    subprocess.run(
        ["sh", os.path.join(HERE, "build.sh"), str(tmp_path)], check=True, capture_output=True, timeout=60
    )
    for name in ("h_main.bin", "h_ustub.bin", "h_main.sym"):
        with open(os.path.join(HERE, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), f"{name} differs from a rebuild of harness.S"


def test_layout_is_the_spec_table():
    # docs/oracles.md §3.1, copied by hand.
    assert g.KBASE == 0xFFFFFFFF80000000
    assert (g.HARNESS_GPA, g.PARAMS_GPA, g.IDT_GPA) == (0x100000, 0x108000, 0x109000)
    assert (g.USTUB_GPA, g.USTACK_GPA, g.PROBES_GPA, g.RESULTS_GPA) == (
        0x10E000,
        0x10F000,
        0x110000,
        0x150000,
    )
    assert (g.HPT_PDPT, g.BOOT_PML4) == (0x1F0000, 0x1F3000)
    assert g.MAX_PROBES * 32 == g.RESULTS_GPA - g.PROBES_GPA
    assert g.RESULTS_GPA + g.MAX_PROBES * 32 <= g.HPT_PDPT
    assert g.SLOT_VALUE & 0xFFF == 0x27 and g.SLOT_VALUE >> 12 << 12 == 0x1F0000


def test_asm_constants_match_python():
    text = open(os.path.join(HERE, "harness.S")).read()
    consts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == ".set":
            consts[parts[1].rstrip(",")] = " ".join(parts[2:]).split("/*")[0].strip()

    def gpa(name):
        return int(consts[name].replace("KBASE +", "").strip(), 0)

    assert gpa("PARAMS") == 0x108000 and gpa("IDT") == 0x109000
    assert gpa("USTUB") == 0x10E000 and gpa("PROBES") == 0x110000 and gpa("RESULTS") == 0x150000
    assert gpa("KSTACK_TOP") == g.KSTACK_TOP_GPA and gpa("XSTACK_TOP") == g.XSTACK_TOP_GPA
    for asm, py in (
        ("P_CR3", g.P_CR3),
        ("P_N", g.P_N),
        ("P_IDX", g.P_IDX),
        ("P_STATUS", g.P_STATUS),
        ("P_PKRU", g.P_PKRU),
        ("P_FLAGS", g.P_FLAGS),
        ("P_PHASE", g.P_PHASE),
        ("P_SETUP_REC", g.P_SETUP_REC),
        ("PR_USER", g.PR_USER),
        ("PR_AC", g.PR_AC),
        ("PR_NOINVLPG", g.PR_NOINVLPG),
        ("STATUS_DONE", g.STATUS_DONE),
        ("CR2_SENTINEL", g.CR2_SENTINEL),
    ):
        assert int(consts[asm], 0) == py, asm


def test_symbols_and_sizes():
    s = g.symbols()
    assert s["_start"] == 0xFFFFFFFF80100000
    assert s["ustub_read"] == 0xFFFFFFFF8010E000
    assert len(g.blob("h_main.bin")) < 0x8000
    assert len(g.blob("h_ustub.bin")) <= 0x40
    assert s["ustub_implicit"] == 0xFFFFFFFF8010E030  # kind 3 at USTUB + 3 * 16
    assert (s["isr_table"] & 15) == 0


def test_no_zero_padding_executes():
    # docs/oracles.md §3: zero padding decodes as 'add [rax], al'; code must be padded with nops.
    text = listing.listing()
    assert "add byte ptr [rax], al" not in text
    assert "ud2" in text and "iretq" in text and "invlpg" in text
    assert "stac" not in text.split()  # kvm_pvm cannot emulate stac (§8 pitfall 2)


def test_user_stubs_end_in_ud2():
    code = g.blob("h_ustub.bin")
    # Hand-assembled: mov rax,[rbx]; ud2 / mov [rbx],rdx; ud2 / call rbx; ud2.
    assert code[0:5] == bytes.fromhex("488b030f0b")
    assert code[16:21] == bytes.fromhex("4889130f0b")
    assert code[32:36] == bytes.fromhex("ffd30f0b")


def test_decode_at():
    assert listing.decode_at(g.symbols()["k_read_insn"]).startswith("mov rax, qword ptr [rbx]")
    assert "ustub_write" in listing.decode_at(0xFFFFFFFF8010E010)
    assert listing.decode_at(0x1000) == ""
    assert listing.decode_at(0x1000, b"\xc3") == "ret"


def _image():
    """PML4 0x200000 -> PDPT 0x201000 -> PD 0x202000 -> PT 0x203000; VA 0x400000 -> 0x300000."""
    m = SparseMemory(RAM)
    m.write_u64(0x200000, 0x201000 | 0x27)
    m.write_u64(0x201000, 0x202000 | 0x27)
    m.write_u64(0x202000 + 2 * 8, 0x203000 | 0x27)
    m.write_u64(0x203000, 0x300000 | 0x3)
    m.write_u64(0x300000, tag_value(0x300000))
    st = PagingState(cr3=0x200000, profile=profile_named("kvm-epyc-pvm"))
    return m, st


class _RamMemory(SparseMemory):
    """A read-only view of prepared RAM for the model walker."""

    def __init__(self, ram):
        super().__init__(len(ram))
        self.ram = ram

    def read(self, pa, n):
        self._check(pa, n)
        return bytes(self.ram[pa : pa + n])

    def read_u64(self, pa):
        return struct.unpack_from("<Q", self.ram, pa)[0]


def test_prepare_ram_maps_harness_through_slot():
    m, st = _image()
    ram = bytearray(RAM)
    g.prepare_ram(ram, m, st, [Probe(0x400000), Probe(0x400000, "write", user=True, ac=True, wvalue=5)])
    assert struct.unpack_from("<Q", ram, 0x200000 + 511 * 8)[0] == 0x1F0027
    assert m.read_u64(0x200000 + 511 * 8) == 0  # the caller's memory is untouched
    mem = _RamMemory(ram)
    for va, pa, user, writable, kind in (
        (g.ENTRY_VA, 0x100000, False, True, "fetch"),
        (g.KBASE + 0x150000, 0x150000, False, True, "write"),
        (g.KBASE + 0x10E000, 0x10E000, True, False, "fetch"),
        (g.KBASE + 0x10F008, 0x10F008, True, True, "write"),
    ):
        t = walk(st, mem, va, Access(kind, user=user))
        assert isinstance(t, Translation) and t.pa == pa, (hex(va), t)
        assert t.rights.user == user and t.rights.writable == writable
        if not user:
            assert not isinstance(walk(st, mem, va, Access("read", user=True)), Translation)
    # The test mapping is still there and the params hold the test registers.
    assert walk(st, mem, 0x400000).pa == 0x300000
    q = lambda off: struct.unpack_from("<Q", ram, 0x108000 + off)[0]
    assert (q(0), q(0x20), q(0x28), q(0x40)) == (0x200000, 2, 0, 0)
    assert q(0x08) == st.cr0 and q(0x10) == st.cr4
    assert struct.unpack_from("<4Q", ram, 0x110020) == (0x400000, 1 | 0x100 | 0x200, 5, 0)
    assert struct.unpack_from("<4Q", ram, 0x110000) == (0x400000, 0, 0, 0)


def test_boot_tables_identity_and_harness():
    m, st = _image()
    ram = bytearray(RAM)
    g.prepare_ram(ram, m, st, [])
    mem = _RamMemory(ram)
    for la57, cr3 in ((False, 0x1F3000), (True, 0x1F9000)):
        boot = PagingState(
            cr3=cr3, cr4=CR4_PAE | (CR4_LA57 if la57 else 0), profile=profile_named("kvm-epyc-pvm")
        )
        assert g.boot_registers(boot)["cr3"] == cr3
        assert walk(boot, mem, 0xFFFF0000, Access("fetch")).pa == 0xFFFF0000  # bios.bin
        assert walk(boot, mem, 0x100000, Access("fetch")).pa == 0x100000
        assert walk(boot, mem, g.ENTRY_VA, Access("fetch")).pa == 0x100000
        assert struct.unpack_from("<Q", ram, 0x108100)[0] == 0x1F3000  # boot block: 4-level here


def test_la57_slot():
    m = SparseMemory(RAM)
    m.write_u64(0x200000, 0x201000 | 0x27)
    st = PagingState(cr3=0x200000, cr4=CR4_PAE | CR4_LA57, profile=profile_named("kvm-epyc-pvm"))
    ram = bytearray(RAM)
    g.prepare_ram(ram, m, st, [])
    assert struct.unpack_from("<Q", ram, 0x200000 + 511 * 8)[0] == 0x1FA027
    assert walk(st, _RamMemory(ram), 0xFFFFFFFF80100000, Access("fetch")).pa == 0x100000
    assert struct.unpack_from("<Q", ram, 0x108100)[0] == 0x1F9000


@pytest.mark.parametrize("page", [0x1FF000, 0x100000, RAM])
def test_image_outside_its_area_is_refused(page):
    m, st = _image()
    m2 = SparseMemory(RAM + 0x1000)
    m2.pages = dict(m.pages)
    m2.write_u64(page, 1)
    with pytest.raises(BadInputError):
        g.prepare_ram(bytearray(RAM), m2, st, [])


def test_too_many_probes_and_bad_cr3():
    m, st = _image()
    with pytest.raises(BadInputError):
        g.prepare_ram(bytearray(RAM), m, st, [Probe(0)] * 8193)
    with pytest.raises(BadInputError):
        g.prepare_ram(bytearray(RAM), m, st.replace(cr3=0x1F3000), [])


def _results(ram, *recs):
    for i, r in enumerate(recs):
        struct.pack_into("<4Q", ram, 0x150000 + 32 * i, *r)


def test_read_results_decodes_records():
    ram = bytearray(RAM)
    probes = [
        Probe(0x400008),
        Probe(0x400000, "write"),
        Probe(0x500000),
        Probe(1 << 47),
        Probe(0x600000, user=True),
        Probe(0x700000, "fetch"),
    ]
    k_read = g.symbols()["k_read_insn"]
    _results(
        ram,
        (0xFF, 0, 0, tag_value(0x300008)),
        (0xFF, 0, 0, 0),
        (14, 0x9, 0x500000, k_read),
        (13, 0, g.CR2_SENTINEL, k_read),
        (14, 5, 0x600000, 0xFFFFFFFF8010E000),
        (14, 0x11, 0x700000, 0x700000),
    )
    r = g.read_results(ram, 6, probes)
    assert (r[0].outcome, r[0].pa, r[0].value) == ("ok", 0x300008, tag_value(0x300008))
    assert (r[1].outcome, r[1].pa, r[1].value) == ("ok", None, None)
    assert (r[2].outcome, r[2].error_code, r[2].cr2, r[2].detail) == ("page_fault", 9, 0x500000, "")
    assert (r[3].outcome, r[3].error_code, r[3].cr2) == ("general_protection", 0, None)
    assert (r[4].error_code, r[4].detail) == (5, "")
    assert (r[5].error_code, r[5].detail) == (0x11, "")
    _results(ram, (14, 2, 0x1234, 0x1234))
    assert "not the probe's access" in g.read_results(ram, 1, [Probe(0x400000)])[0].detail


def test_implicit_probes_are_kind_3_and_gp4_at_their_load_means_ok():
    """harness.S: kind 3 loads ES from LDT entry 0 (LDT base = the probe's VA); the frames hold no
    valid descriptor, so a read that went through ends in #GP(selector & ~3) = #GP(4) at the load
    (k_implicit_insn at CPL0, the stub at USTUB + 0x30 at CPL3). Any other #GP stays a #GP."""
    s = g.symbols()
    p0, p3 = Probe(0x400000, implicit=True), Probe(0x400000, user=True, implicit=True)
    assert g.probe_flags(p0) & 3 == 3 and g.probe_flags(p3) == 3 | g.PR_USER
    with pytest.raises(BadInputError):
        Probe(0x400000, "write", implicit=True)
    ram = bytearray(RAM)
    k_impl, u_impl = s["k_implicit_insn"], s["ustub_implicit"] + 5  # after `mov $7, %eax`
    _results(
        ram,
        (13, 4, g.CR2_SENTINEL, k_impl),
        (13, 4, g.CR2_SENTINEL, u_impl),
        (14, 1, 0x400000, k_impl),
        (14, 0, 0x400000, u_impl),
        (13, 0x38, g.CR2_SENTINEL, k_impl),
    )
    r = g.read_results(ram, 5, [p0, p3, p0, p3, p0])
    assert [(x.outcome, x.error_code) for x in r] == [
        ("ok", None),
        ("ok", None),
        ("page_fault", 1),
        ("page_fault", 0),
        ("general_protection", 0x38),
    ]
    assert r[0].pa is None and r[0].value is None
    # the bytes at the symbols are the instructions the docs name (8e c0 = mov es, eax)
    main = g.blob("h_main.bin")
    assert main[k_impl - g.ENTRY_VA : k_impl - g.ENTRY_VA + 2] == bytes.fromhex("8ec0")
    assert g.blob("h_ustub.bin")[0x30:0x39] == bytes.fromhex("b8070000008ec00f0b")


def test_a_fault_of_the_harness_itself_is_an_error_not_an_answer():
    """A CPL3 fetch pushes its return address on the harness's user stack (VA 0xffffffff8010f000,
    key 0): with PKRU AD0 that push faults (QEMU reported #PF 0x27 at 0xffffffff8010fff8). That is
    the harness failing, never the probe's result."""
    ram = bytearray(RAM)
    _results(ram, (14, 0x27, 0xFFFFFFFF8010FFF8, 0xFFFFFFFF8010E020))
    with pytest.raises(OracleError, match="harness faulted"):
        g.read_results(ram, 1, [Probe(0x40000008, "fetch", user=True)])


def test_unrun_probe_and_bad_status_are_errors():
    m, st = _image()
    ram = bytearray(RAM)
    g.prepare_ram(ram, m, st, [Probe(0x400000)])
    with pytest.raises(OracleError, match="not run"):
        g.read_results(ram, 1)
    with pytest.raises(OracleError, match="did not finish"):
        g.check_status(ram)
    struct.pack_into("<Q", ram, 0x108040, 0xBAD)
    struct.pack_into("<4Q", ram, 0x108080, 13, 0, 0, 0xFFFFFFFF80100050)
    with pytest.raises(OracleError, match="vector 13"):
        g.check_status(ram)
    struct.pack_into("<Q", ram, 0x108040, 0x600D)
    g.check_status(ram)


def test_image_after_restores_slot_and_finds_new_pages():
    m, st = _image()
    ram = bytearray(RAM)
    g.prepare_ram(ram, m, st, [])
    struct.pack_into("<Q", ram, 0x203000, 0x300000 | 0x63)  # the guest set A and D
    struct.pack_into("<Q", ram, 0x900010, 0xC3)  # a write into an unbacked frame
    after = g.image_after(ram, m, st)
    assert after.read_u64(0x203000) == 0x300063
    assert after.read_u64(0x200000 + 511 * 8) == 0
    assert after.read_u64(0x900010) == 0xC3
    assert sorted(after.pages) == sorted(set(m.pages) | {0x900})
    assert m.read_u64(0x203000) == 0x300003
