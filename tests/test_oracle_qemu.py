"""The QEMU oracle (harness/oracles/qemu.py): QEMU TCG 7.2 runs the probe guest.

Three kinds of test:
* hand-derived expectations (Intel SDM Vol. 3A §4.5-4.8, §6.15): error codes are written as
  numbers built from the §4.7 bits P=0x1 W=0x2 U=0x4 RSVD=0x8 I/D=0x10 PK=0x20;
* the profile proofs: one test per deviation of PROFILES['qemu'] from the SDM, showing QEMU still
  deviates that way (and, where possible, a control case showing the mechanism is real);
* a cross-check: the model (x86pt.walk with profile 'qemu') against the oracle on ~200 random
  probes over a hand image under four control-register setups.
Each QEMU launch costs ~0.1 s; the file runs in a few seconds.
"""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from tests import guest_oracle_cases as C
from tests.conftest import need_oracle
from tests.hand_image import (
    CR0,
    EFER,
    FRAMES,
    G1,
    KRW,
    M2,
    NONCANON,
    NP,
    URW,
    P,
    check,
    frame,
    run_cases,
    tag_frames,
)
from tests.hand_image import hand_image as shared_hand_image
from x86pt.build import Builder
from x86pt.errors import OracleError
from x86pt.state import CR0_WP, CR4_PAE, CR4_PKE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_LME, PROFILES
from x86pt.oracle import Probe
from x86pt.walk import Access, walk

pytestmark = pytest.mark.qemu

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
REASON = "qemu-system-x86_64 not installed (tools/install_qemu.sh)"


@pytest.fixture(scope="module")
def qemu():
    need_oracle("qemu", HAVE_QEMU, REASON)
    from harness.oracles.qemu import QemuOracle

    return QemuOracle(timeout=30)


def hand_image() -> Builder:
    return shared_hand_image("amd")


state = C.state_for("qemu")


# -- hand-derived (SDM) -------------------------------------------------------------------------------
def test_sdm_base_wp_nxe(qemu):
    """RSVD aside (test_profile_rsvd_sets_p_false)."""
    b = hand_image()
    run_cases(qemu, b, state(b), C.base_wp_nxe(with_rsvd=False))


def test_sdm_wp0(qemu):
    b = hand_image()
    run_cases(qemu, b, state(b, cr0=CR0 & ~CR0_WP), C.wp0())


def test_sdm_smep(qemu):
    b = hand_image()
    run_cases(qemu, b, state(b, cr4=CR4_PAE | CR4_SMEP), C.smep())


def test_sdm_smap_and_ac(qemu):
    b = hand_image()
    run_cases(qemu, b, state(b, cr4=CR4_PAE | CR4_SMAP), C.smap_and_ac())


def test_sdm_pkru(qemu):
    b = hand_image()
    run_cases(qemu, b, state(b, cr4=CR4_PAE | CR4_PKE, pkru=0b0100), C.pkru_ad1(supervisor_read=True))
    run_cases(qemu, b, state(b, cr4=CR4_PAE | CR4_PKE, pkru=0b1000), C.pkru_wd1())


def test_sdm_la57(qemu):
    b = Builder(levels=5, table_base=0x200000, maxphyaddr=40, vendor="amd")
    tag_frames(b.memory, FRAMES, 1)
    va = 0x0080000000001000  # bit 55: PML5 index 128
    b.map(va, FRAMES, 0x1000, flags="rw a")
    cases = [
        (P(va + 8), ("ok", FRAMES + 8)),
        (P(0x0001000000000000), ("pf", 0x00)),  # PML5[1] not present
        (P(0x0100000000000000), ("gp", 0)),  # bit 56 set, 63:57 clear
        (P(0xFE00000000001000), ("gp", 0)),  # bits 63:57 set, bit 56 clear
    ]
    run_cases(qemu, b, b.state(profile="qemu"), cases)


def test_sdm_accessed_dirty(qemu):
    b = hand_image()
    C.check_accessed_dirty(qemu, b, state(b))


# -- capabilities ------------------------------------------------------------------------------------------
def test_capabilities_match_profile(qemu):
    """The measured capabilities (docs/oracles.md §4: -cpu max is AuthenticAMD, phys-bits 40, with pdpe1gb,
    la57, smep, smap, pku) are what PROFILES['qemu'] says."""
    caps = qemu.capabilities()
    prof = PROFILES["qemu"]
    assert caps.vendor == "amd" == prof.vendor
    assert caps.maxphyaddr == 40 == prof.maxphyaddr
    assert (caps.gbpages, caps.la57, caps.pku, caps.smep, caps.smap) == (True,) * 5
    assert (
        prof.features.gbpages,
        prof.features.la57,
        prof.features.pku,
        prof.features.smep,
        prof.features.smap,
    ) == (True,) * 5
    assert caps.rsvd_sets_p is False and prof.rsvd_sets_p is False
    assert caps.version.startswith("QEMU emulator version")
    assert qemu.capabilities() is caps  # cached per process


# -- profile proofs: one per deviation of PROFILES['qemu'] -------------------------------------------------
def test_profile_rsvd_sets_p_false(qemu):
    """docs/paging.md §12.1: RSVD faults report 0x08 without P (SDM: RSVD implies P=1, 0x09)."""
    assert PROFILES["qemu"].rsvd_sets_p is False
    b = hand_image()
    run_cases(qemu, b, state(b), C.rsvd_cases(0x0))


def test_profile_ps_1g_without_gbpages():
    """§11.2 #4: with -cpu max,-pdpe1gb (CPUID without 1-GByte pages) QEMU still maps a 1G leaf
    (SDM: PDPTE.PS is reserved then, a RSVD fault)."""
    need_oracle("qemu", HAVE_QEMU, REASON)
    from harness.oracles.qemu import QemuOracle
    from harness.oracles.qemu_monitor import QemuMonitor

    assert PROFILES["qemu"].ps_1g_without_gbpages is True
    b = hand_image()
    st = state(b)
    with QemuMonitor(b.memory, st, cpu="max,-pdpe1gb") as mon:  # the flag really is off
        assert mon.cpu_property("pdpe1gb") is False
    res = QemuOracle(cpu="max,-pdpe1gb").run(b.memory, st, [P(G1 + FRAMES + 0x10)]).results
    check(res, [(P(G1 + FRAMES + 0x10), ("ok", FRAMES + 0x10))])


def test_profile_amd_top_bit8_not_reserved(qemu):
    """§11.2 #5: the vCPU is AuthenticAMD, whose manual reserves PML4E bit 8; QEMU accepts it."""
    assert PROFILES["qemu"].amd_top_bit8_reserved is False
    assert qemu.capabilities().vendor == "amd"
    b = hand_image()
    pml4e = b.entry_address(KRW, 4, create=False)
    b.memory.write_u64(pml4e, b.memory.read_u64(pml4e) | (1 << 8))
    run_cases(qemu, b, state(b), [(P(KRW + 8), ("ok", frame(0) + 8))])


def test_profile_a_on_1g_leaf_before_checks(qemu):
    """§11.2 #3: a 1G leaf gets A=1 even when the access then faults, on a reserved bit (29:13)
    or on rights. SDM: an entry with reserved bits set is not used, so no A. Control: a 2M leaf
    with a reserved bit (20:13) is left alone."""
    assert PROFILES["qemu"].a_on_1g_leaf_before_checks is True
    b = hand_image()
    g_rsvd, g_sup, m_rsvd = 0x80000000, 0xC0000000, 0x20200000
    b.map(g_rsvd, 1 << 30, 1 << 30, 1 << 30, flags="rw")
    b.set_entry(g_rsvd, 3, b.get_entry(g_rsvd, 3) | (1 << 13))
    b.map(g_sup, 2 << 30, 1 << 30, 1 << 30, flags="rw")  # supervisor only
    b.map(m_rsvd, 0x800000, 0x200000, 0x200000, flags="rw")
    b.set_entry(m_rsvd, 2, b.get_entry(m_rsvd, 2) | (1 << 13))
    addrs = [b.entry_address(va, lv, create=False) for va, lv in ((g_rsvd, 3), (g_sup, 3), (m_rsvd, 2))]
    before = [b.memory.read_u64(a) for a in addrs]
    assert all(not v & 0x20 for v in before)
    res = run_cases(
        qemu,
        b,
        state(b),
        [(P(g_rsvd), ("pf", 0x08)), (P(g_sup, user=True), ("pf", 0x05)), (P(m_rsvd), ("pf", 0x08))],
    )
    after = [res.memory_after.read_u64(a) for a in addrs]
    assert after == [before[0] | 0x20, before[1] | 0x20, before[2]]


def test_profile_implicit_smap_honours_ac(qemu):
    """§11.2 #6: with CR4.SMAP and the IDT in a user page, a #PF raised while EFLAGS.AC=1 is
    delivered (QEMU uses AC for implicit supervisor accesses at CPL<3); the SDM always checks
    implicit accesses, so the IDT read faults -> #DF -> triple fault. Control: with AC=0 QEMU
    triple-faults too, so the user IDT page really is SMAP-checked."""
    assert PROFILES["qemu"].implicit_smap_honours_ac is True
    b = hand_image()
    st = state(b, cr4=CR4_PAE | CR4_SMAP)
    res = qemu.run(b.memory, st, [P(NP, ac=True)], ram_hook=C.user_idt).results
    check(res, [(P(NP, ac=True), ("pf", 0x00))])
    with pytest.raises(OracleError, match="triple-fault"):
        qemu.run(b.memory, st, [P(NP)], ram_hook=C.user_idt)
    # The model agrees: an implicit supervisor read of a user page under SMAP with AC=1.
    idt_like = walk(st, b.memory, URW, Access("read", ac=True, implicit=True))
    assert idt_like.outcome == "ok"
    assert (
        walk(
            st.replace(profile=PROFILES["amd"]), b.memory, URW, Access("read", ac=True, implicit=True)
        ).outcome
        == "page_fault"
    )


def test_profile_gp_leaves_cr2(qemu):
    """§11.2 #2 predicted CR2 written on a non-canonical #GP; QEMU 7.2.22 does not, and the
    profile says so (gp_writes_cr2 False). The guest preloads CR2 with a sentinel."""
    assert PROFILES["qemu"].gp_writes_cr2 is False
    b = hand_image()
    run_cases(qemu, b, state(b), [(P(NP), ("pf", 0x00)), (P(NONCANON), ("gp", 0))])


# -- plumbing -----------------------------------------------------------------------------------------------
def test_big_batch_is_split_and_ad_carries_over(qemu):
    from harness.oracles.qemu import MAX_PROBES

    b = hand_image()
    C.check_big_batch_split(qemu, b, state(b), MAX_PROBES)


def test_timeout_kills_qemu():
    need_oracle("qemu", HAVE_QEMU, REASON)
    from harness.oracles.qemu import QemuOracle

    b = hand_image()
    with pytest.raises(OracleError, match="within"):
        QemuOracle(timeout=0.001).run(b.memory, state(b), [P(KRW)])


def test_bad_image_refused(qemu):
    b = hand_image()
    C.check_bad_image_refused(qemu, b, state(b))


def test_nothing_left_in_shm(qemu):
    import glob
    import os

    b = hand_image()
    qemu.run(b.memory, state(b), [P(KRW)])
    assert glob.glob(f"/dev/shm/x86pt-qemu-{os.getpid()}-*") == []


def test_install_script_is_a_no_op_when_installed():
    need_oracle("qemu", HAVE_QEMU, REASON)
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        ["sh", os.path.join(root, "tools", "install_qemu.sh")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "already installed: QEMU emulator version" in r.stdout


def test_bios_rebuilds_identically(tmp_path):
    """bios.bin is shipped; build_bios.sh must reproduce it byte for byte (needs binutils)."""
    import os

    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("GNU as/objcopy not installed")
    from harness.oracles.qemu import BIOS_PATH

    script = os.path.join(os.path.dirname(BIOS_PATH), "build_bios.sh")
    subprocess.run(["sh", script, str(tmp_path)], check=True, capture_output=True, timeout=60)
    with open(BIOS_PATH, "rb") as f, open(tmp_path / "bios.bin", "rb") as g:
        shipped, rebuilt = f.read(), g.read()
    assert len(shipped) == 65536 and shipped == rebuilt
    assert shipped[0xFFF0:0xFFF3] == bytes([0xE9, 0x0D, 0x00])  # jmp to offset 0 (docs/oracles.md §4)


# -- cross-check: model vs oracle ------------------------------------------------------------------------
def random_image(rng: random.Random, levels: int = 4) -> tuple[Builder, list[tuple[int, int]]]:
    """A hand image with random leaf flags: (va, bytes that may be probed) regions."""
    b = Builder(levels=levels, table_base=0x200000, maxphyaddr=40, vendor="amd")
    tag_frames(b.memory, FRAMES, 64)
    regions = []
    for i in range(32):
        va = 0x10000000 + i * 0x1000
        kind = rng.random()
        if kind < 0.08:
            b.entry_address(va, 1)  # table only: not present
        else:
            fl = " ".join(w for w in ("rw", "us", "nx", "a", "d") if rng.random() < 0.5)
            b.map(va, frame(i), 0x1000, flags=fl or "ro", pk=rng.randrange(4))
            if kind > 0.93:
                b.set_entry(va, 1, b.get_entry(va, 1) | (1 << rng.choice((40, 45, 51))))
        regions.append((va, 0x1000))
    # Non-leaf restrictions: a PDE that is read-only, supervisor-only or XD over 4 pages each.
    for j, pde_flags in enumerate(("p us a", "p rw a", "p rw us a xd")):
        base = 0x30000000 + j * 0x200000
        for k in range(4):
            b.map(base + k * 0x1000, frame(32 + 4 * j + k), 0x1000, flags="rw us")
            regions.append((base + k * 0x1000, 0x1000))
        pde = b.entry_address(base, 2, create=False)
        raw = b.memory.read_u64(pde)
        b.memory.write_u64(pde, (raw & 0x000FFFFFFFFFF000) | _flag_bits(pde_flags))
    b.map(M2, 0x600000, 0x200000, 0x200000, flags="rw us a")
    b.map(M2 + 0x200000, 0x800000, 0x200000, 0x200000, flags="us nx")
    tag_frames(b.memory, 0x600000, 1)
    tag_frames(b.memory, 0x800000, 1)
    regions += [(M2, 0x1000), (M2 + 0x200000, 0x1000)]
    b.map(G1, 0, 1 << 30, 1 << 30, flags=rng.choice(("rw us", "rw", "us nx")))
    regions.append((G1 + FRAMES, 0x10000))
    return b, regions


def _flag_bits(words: str) -> int:
    bits = {"p": 1, "rw": 2, "us": 4, "a": 0x20, "xd": 1 << 63}
    return sum(bits[w] for w in words.split())


CROSS_CONFIGS = [
    dict(cr0=CR0, cr4=CR4_PAE, efer=EFER, pkru=0),
    dict(cr0=CR0 & ~CR0_WP, cr4=CR4_PAE | CR4_SMEP | CR4_SMAP, efer=EFER, pkru=0),
    dict(cr0=CR0, cr4=CR4_PAE | CR4_SMAP | CR4_PKE, efer=EFER, pkru=None),
    dict(cr0=CR0, cr4=CR4_PAE | CR4_SMEP | CR4_PKE, efer=EFER_LME | EFER_LMA, pkru=None),
    dict(cr0=CR0, cr4=CR4_PAE | CR4_SMAP, efer=EFER, pkru=0, levels=5),
]


@pytest.mark.parametrize("config", range(len(CROSS_CONFIGS)))
def test_model_agrees_with_qemu(qemu, config):
    rng = random.Random(0x9E3779B9 + config)
    cfg = dict(CROSS_CONFIGS[config])
    b, regions = random_image(rng, cfg.pop("levels", 4))
    if cfg["pkru"] is None:
        cfg["pkru"] = rng.getrandbits(32) & ~0b11  # key 0 stays open: the guest's user stack
    st = state(b, **cfg)
    if b.levels == 5:
        assert st.la57
    probes = []
    for _ in range(50):
        va, size = rng.choice(regions)
        off = rng.randrange(0, size, 8)
        kind = rng.choice(("read", "read", "write", "fetch"))
        probes.append(
            Probe(
                va + off,
                kind,
                user=rng.random() < 0.5,
                ac=rng.random() < 0.3,
                wvalue=(rng.getrandbits(40) << 8) | 0xC3,
            )
        )
    probes.append(Probe(NONCANON))
    model_mem = b.memory.copy()
    res = qemu.run(b.memory, st, probes)
    diffs = []
    for i, (p, got) in enumerate(zip(probes, res.results)):
        want = walk(st, model_mem, p.va, Access(p.access, p.user, p.ac), update_ad=True)
        line = f"#{i} {p.access} {'U' if p.user else 'S'}{' AC' if p.ac else ''} {p.va:#x}"
        if want.outcome != got.outcome:
            diffs.append(f"{line}: model {want.outcome} ({getattr(want, 'reason', '')}), qemu {got}")
            continue
        if want.outcome == "page_fault" and (want.error_code, want.cr2) != (got.error_code, got.cr2):
            diffs.append(f"{line}: model #PF {want.error_code:#x} ({want.reason}), qemu {got}")
        elif want.outcome == "general_protection" and want.error_code != got.error_code:
            diffs.append(f"{line}: model #GP {want.error_code}, qemu {got}")
        elif want.outcome == "ok":
            if p.access == "read" and got.value != model_mem.read_u64(want.pa):
                diffs.append(
                    f"{line}: read {got.value:#x}, model memory at {want.pa:#x} holds "
                    f"{model_mem.read_u64(want.pa):#x}"
                )
            if p.access == "write":
                model_mem.write_u64(want.pa, p.wvalue)
    # A/D bits and written data: every page of the image, as the model left it.
    for pn in sorted(b.memory.pages):
        pa = pn * 0x1000
        if res.memory_after.read(pa, 0x1000) != model_mem.read(pa, 0x1000):
            for off in range(0, 0x1000, 8):
                x, y = res.memory_after.read_u64(pa + off), model_mem.read_u64(pa + off)
                if x != y:
                    diffs.append(f"after: qword {pa + off:#x} qemu {x:#x} model {y:#x}")
    assert not diffs, f"{len(diffs)} differences ({st.describe()}):\n" + "\n".join(diffs[:20])
