"""The QEMU monitor path (harness/qemu/monitor.py, harness/oracles/qemu_monitor.py): a paused QEMU
whose RAM is our image.

Expectations are written by hand: translations from the SDM's address split (§4.5: 4K offset
bits 11:0, 2M 20:0, 1G 29:0), and `info tlb` / `info mem` lines from the output format in
docs/paging.md §13.3 (fixed-width %016 hex, sign-extended VAs, leaf flags XGPDACTUW, folded urw).
"""

from __future__ import annotations

import glob
import os
import shutil
import struct

import pytest

from tests.conftest import need_oracle

from x86pt.build import Builder
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.formats.qemu_parse import parse_info_mem, parse_info_tlb
from x86pt.memory.elfcore import ElfCore
from x86pt.state import CR4_LA57, CR4_PAE

from x86pt.oracle import Probe

from harness.qemu.ram import RamLayout

pytestmark = pytest.mark.qemu

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None


@pytest.fixture(autouse=True)
def _qemu(request):
    if request.node.name.startswith("test_offline_"):
        return  # pure functions: no QEMU needed
    need_oracle("qemu", HAVE_QEMU, "qemu-system-x86_64 not installed (tools/install_qemu.sh)")


def _qm():
    from harness.oracles import qemu_monitor

    return qemu_monitor


def tiny_image(levels: int = 4, table_base: int = 0x200000):
    """Four leaves, one per page size plus a read-only user 4K page with PWT/PCD."""
    b = Builder(levels=levels, maxphyaddr=40, vendor="amd", table_base=table_base)
    b.map(0x400000, 0x600000, 0x1000, flags="rw us a")
    b.map(0x40000000, 0x800000, 0x200000, 0x200000, flags="rw nx g d a")
    b.map(0x7F0000001000, 0xA00000, 0x1000, flags="us pwt pcd")
    b.map(0xFFFF800000000000, 0x40000000, 1 << 30, 1 << 30, flags="rw")
    return b


# Hand-written from docs/paging.md §13.3 for tiny_image (table entries are P|RW|US|A).
INFO_TLB_4LEVEL = """\
0000000000400000: 0000000000600000 ----A--UW
0000000040000000: 0000000000800000 XGPDA---W
00007f0000001000: 0000000000a00000 -----CTU-
ffff800000000000: 0000000040000000 --P-----W
"""
INFO_MEM_4LEVEL = """\
0000000000400000-0000000000401000 0000000000001000 urw
0000000040000000-0000000040200000 0000000000200000 -rw
00007f0000001000-00007f0000002000 0000000000001000 ur-
ffff800000000000-ffff800040000000 0000000040000000 -rw
"""


@pytest.fixture(scope="module")
def monitor():
    if not HAVE_QEMU:
        pytest.skip("qemu-system-x86_64 not installed")
    b = tiny_image()
    with _qm().QemuMonitor(b.memory, b.state(profile="qemu")) as mon:
        yield mon


def test_version_and_registers(monitor):
    assert monitor.version.startswith("QEMU ")
    regs = monitor.registers()
    # CR0 = PE|WP|PG plus ET (hardwired 1); EFER.LMA set by QEMU when PG turned on.
    assert regs["cr0"] == 0x80010011
    assert regs["cr3"] == 0x200000
    assert regs["cr4"] == 0x20
    assert regs["efer"] == 0xD00


@pytest.mark.parametrize(
    "va, pa",
    [
        (0x400123, 0x600123),  # 4K: offset bits 11:0
        (0x400FFF, 0x600FFF),
        (0x40012345, 0x812345),  # 2M: offset bits 20:0
        (0x7F0000001008, 0xA00008),
        (0xFFFF800012345678, 0x52345678),  # 1G: offset bits 29:0
    ],
)
def test_gva2gpa_mapped(monitor, va, pa):
    assert monitor.gva2gpa(va) == pa


@pytest.mark.parametrize(
    "va",
    [
        0x401000,  # PTE not present
        0x40200000,  # PDE not present
        0x7F0000000000,  # PTE [0] of that table not present
        0x0000800000000000,  # non-canonical (bit 47 set, 63:48 clear)
        0xFFFF7FFFFFFFF000,  # non-canonical the other way
        0xFFFFFFFFFFFFF000,  # canonical, PML4[511] not present
    ],
)
def test_gva2gpa_unmapped(monitor, va):
    assert monitor.gva2gpa(va) is None


def test_gva2gpa_many_crosses_batches_in_order(monitor):
    # 2M leaf at 0x40000000 -> 0x800000 (offset bits 20:0); every third address is in the
    # not-present PDE after it. 150 addresses in batches of 64: three pipelined batches.
    vas = [0x40000000 + i * 0x3008 if i % 3 else 0x40200000 + i * 0x1000 for i in range(150)]
    want = [0x800000 + i * 0x3008 if i % 3 else None for i in range(150)]
    assert monitor.gva2gpa_many(vas, batch=64) == want
    with pytest.raises(BadInputError):
        monitor.gva2gpa_many([0x1000, 1 << 64])


def test_info_tlb_lines(monitor):
    assert monitor.info_tlb().replace("\r\n", "\n") == INFO_TLB_4LEVEL
    lines = parse_info_tlb(INFO_TLB_4LEVEL)
    assert [ln.large for ln in lines] == [False, True, False, True]
    assert [ln.nx for ln in lines] == [False, True, False, False]


def test_info_mem_lines(monitor):
    assert monitor.info_mem().replace("\r\n", "\n") == INFO_MEM_4LEVEL
    ranges = parse_info_mem(INFO_MEM_4LEVEL)
    assert ranges[1].size == 0x200000 and ranges[2].rights == "ur-"


def test_tables_rewritten_without_relaunch(monitor):
    # docs/oracles.md §5: QEMU reads RAM directly; zeroing a PTE in the file unmaps the page.
    b = tiny_image()
    addr = b.entry_address(0x400000, 1, create=False)
    saved = monitor.read_memory(addr, 8)
    try:
        monitor.write_memory(addr, bytes(8))
        assert monitor.gva2gpa(0x400123) is None
    finally:
        monitor.write_memory(addr, saved)
    assert monitor.gva2gpa(0x400123) == 0x600123


def test_reserved_bits_pass_into_gpa():
    # §2.2: the debug walker ignores reserved bits; bit 45 (>= MAXPHYADDR 40) lands in the GPA.
    b = tiny_image()
    addr = b.entry_address(0x400000, 1, create=False)
    b.memory.write_u64(addr, b.memory.read_u64(addr) | (1 << 45))
    with _qm().QemuMonitor(b.memory, b.state(profile="qemu")) as mon:
        assert mon.gva2gpa(0x400010) == (1 << 45) | 0x600010


def test_la57_info_mem_prints_nothing():
    """docs/paging.md §13.3.2: under LA57, `info mem` treats present PDPTEs/PDEs as holes and prints
    nothing, while `info tlb` and gva2gpa still walk the 5 levels."""
    b = Builder(levels=5, maxphyaddr=40, vendor="amd", table_base=0x200000)
    va = 0x0080000000001000  # bit 55: PML5 index 128
    b.map(va, 0x600000, 0x1000, flags="rw us a")
    # Fill the rest of that PDPT with 1G leaves. Besides more mappings for info mem to miss, this
    # keeps the buggy walk short: it descends into every *non-present* PDPTE (reading tables at
    # physical 0), 512*512 entries each, which took 3-6 s with one present PDPTE.
    b.map(va - 0x1000 + (1 << 30), 1 << 30, 511 << 30, 1 << 30, flags="rw")
    st = b.state(profile="qemu")
    assert st.cr4 == CR4_PAE | CR4_LA57
    with _qm().QemuMonitor(b.memory, st) as mon:
        assert mon.gva2gpa(0x0080000000001234) == 0x600234
        assert mon.gva2gpa(0x0080000080000010) == 0x80000010  # PDPTE[2]: 1G leaf
        assert mon.gva2gpa(0x0100000000001234) is None  # bit 56 alone: non-canonical
        tlb = mon.info_tlb().splitlines()
        assert tlb[0] == "0080000000001000: 0000000000600000 ----A--UW"
        assert tlb[1] == "0080000040000000: 0000000040000000 --P-----W"
        assert len(tlb) == 512
        assert mon.info_mem().strip() == ""


def test_cr3_above_4gib():
    # gdbstub CR writes are 32 bits wide until CS is 64-bit (§2.1); the monitor works around it.
    b = tiny_image(table_base=0x100200000)
    b.memory.write_u64(0x100600008, 0x1122334455667788)
    st = b.state(profile="qemu")
    with _qm().QemuMonitor(b.memory, st, ram_size=(3 << 30) + (8 << 20)) as mon:
        assert mon.registers()["cr3"] == 0x100200000
        assert mon.gva2gpa(0x400123) == 0x600123
        # pc machine: RAM above 3 GiB continues at 4 GiB.
        assert mon.hmp("xp /1gx 0x100600008").split()[-1] == "0x1122334455667788"
        # Back and forth between a low and a high CR3 without relaunching.
        low = tiny_image()
        mon.load(low.memory, low.state(profile="qemu"), clear=False)
        assert mon.registers()["cr3"] == 0x200000 and mon.gva2gpa(0x400123) == 0x600123
        mon.set_state(st)
        assert mon.registers()["cr3"] == 0x100200000
        mon.set_state(st)
        assert mon.gva2gpa(0xFFFF800000001000) == 0x40001000


def test_dump_guest_memory(tmp_path, monitor):
    path = str(tmp_path / "vm.elf")
    monitor.dump_guest_memory(path)
    b = tiny_image()
    with ElfCore(path) as core:
        assert core.control_registers["cr3"] == 0x200000
        addr = b.entry_address(0x400000, 1, create=False)
        assert core.read_u64(addr) == b.memory.read_u64(addr)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".x86pt")] == []


def test_refuses_data_in_rom_hole():
    b = tiny_image()
    b.memory.write_u64(0xF0000, 1)
    with pytest.raises(BadInputError, match="BIOS ROM"):
        _qm().QemuMonitor(b.memory, b.state(profile="qemu"))


def test_refuses_data_beyond_ram():
    b = tiny_image()
    b.memory.write_u64(0x3000000, 1)
    with pytest.raises(BadInputError, match="not RAM"):
        _qm().QemuMonitor(b.memory, b.state(profile="qemu"), ram_size=32 << 20)


def test_missing_binary():
    b = tiny_image()
    with pytest.raises(OracleUnavailable):
        _qm().QemuMonitor(b.memory, b.state(), binary="/nonexistent/qemu-system-x86_64")


def test_cleanup_on_exception():
    b = tiny_image()
    qm = _qm()
    before = set(glob.glob(f"/dev/shm/x86pt-qemu-{os.getpid()}-*"))
    with pytest.raises(RuntimeError):
        with qm.QemuMonitor(b.memory, b.state(profile="qemu")) as mon:
            proc = mon.proc
            raise RuntimeError("boom")
    assert proc.poll() is not None
    assert set(glob.glob(f"/dev/shm/x86pt-qemu-{os.getpid()}-*")) == before
    with pytest.raises(OracleError, match="closed"):
        mon.gva2gpa(0x400000)


def test_monitor_oracle_protocol():
    qm = _qm()
    b = tiny_image()
    o = qm.QemuMonitorOracle()
    caps = o.capabilities()
    assert caps.name == "qemu-monitor" and not caps.smep and not caps.pku
    assert any("rights are not checked" in n for n in caps.notes)
    probes = [
        Probe(0x400008),
        Probe(0x400008, "write", user=True),
        Probe(0x401000),
        Probe(0x0000800000000000),
    ]
    res = o.run(b.memory, b.state(profile="qemu"), probes).results
    assert [r.outcome for r in res] == ["ok", "ok", "page_fault", "page_fault"]
    assert res[0].pa == 0x600008 and res[2].error_code is None


def test_large_sparse_ram_is_cheap():
    # A 4 GiB RAM file on tmpfs costs only the pages written (benchmark images need GiBs).
    b = tiny_image()
    with _qm().QemuMonitor(b.memory, b.state(profile="qemu"), ram_size=4 << 30) as mon:
        assert mon.ram.size == 4 << 30
        assert mon.gva2gpa(0xFFFF800000001000) == 0x40001000
        assert struct.unpack("<Q", mon.read_memory(0x600000, 8))[0] == 0


def test_load_new_image_without_relaunch():
    qm = _qm()
    b = tiny_image()
    b5 = Builder(levels=5, maxphyaddr=40, vendor="amd", table_base=0x300000)
    b5.map(0x0080000000001000, 0x700000, 0x1000, flags="rw")
    with qm.QemuMonitor(b.memory, b.state(profile="qemu")) as mon:
        pid = mon.proc.pid
        mon.load(b5.memory, b5.state(profile="qemu"))
        assert mon.registers()["cr4"] == CR4_PAE | CR4_LA57
        assert mon.gva2gpa(0x0080000000001010) == 0x700010
        assert mon.gva2gpa(0x400123) is None  # old image gone
        assert mon.proc.pid == pid


def test_hmp_one_line_only(monitor):
    with pytest.raises(BadInputError):
        monitor.hmp("info tlb\nquit")


def test_qemu_dies_with_its_parent(tmp_path):
    """PR_SET_PDEATHSIG: a SIGKILLed Python leaves no QEMU and no file behind."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, time\n"
        f"sys.path.insert(0, {root!r})\n"
        "from x86pt.build import Builder\n"
        "from harness.oracles.qemu_monitor import QemuMonitor\n"
        "b = Builder(maxphyaddr=40, vendor='amd', table_base=0x200000)\n"
        "b.map(0x1000, 0x600000, 0x1000)\n"
        "m = QemuMonitor(b.memory, b.state(profile='qemu'))\n"
        "print(m.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        qpid = int(child.stdout.readline())
        os.kill(qpid, 0)  # QEMU is running
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(qpid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        os.kill(qpid, signal.SIGKILL)
        pytest.fail("QEMU outlived its parent")
    assert glob.glob(f"/dev/shm/x86pt-qemu-{child.pid}-*") == []


def test_offline_ram_layout_of_the_pc_machine():
    # pc machine with max-ram-below-4g=3G: RAM [0, 3G) at file offset 0, the rest from 4 GiB.
    layout = RamLayout(5 << 30)
    assert layout.ranges == [(0, 3 << 30), (4 << 30, 6 << 30)]
    assert layout.offset(0x1000) == 0x1000
    assert layout.offset((4 << 30) + 0x2000, 8) == (3 << 30) + 0x2000
    with pytest.raises(BadInputError, match="not RAM"):
        layout.offset((3 << 30) + 0x1000)  # the PCI hole
    with pytest.raises(BadInputError):
        layout.offset((3 << 30) - 4, 8)  # straddles the end of low RAM
    assert RamLayout(32 << 20).ranges == [(0, 32 << 20)]


def test_offline_parse_monitor_lines():
    with pytest.raises(OracleError, match="info tlb"):
        parse_info_tlb("0000000000400000: 0000000000600000 ----A--U")
    with pytest.raises(OracleError, match="info mem"):
        parse_info_mem("PG disabled")
    line = parse_info_tlb("ffff800000000000: 0000000040000000 XGP-----W")[0]
    assert (line.va, line.pa, line.nx, line.large) == (0xFFFF800000000000, 0x40000000, True, True)
