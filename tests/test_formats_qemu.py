"""`x86pt dump --format qemu-tlb|qemu-mem` against QEMU itself: goldens captured from QEMU 7.2
(fixtures/dump/*.meta.json name the version) and, when QEMU is installed, a live comparison on
images built here."""

from __future__ import annotations

import glob
import io
import json
import os
import random

import pytest

from tests.conftest import FIXTURES, need_oracle
from x86pt.build import Builder
from x86pt.formats.dump import dump_to
from x86pt.image import Image, open_image
from x86pt.state import CR4_PGE

DUMP = os.path.join(FIXTURES, "dump")
GOLDENS = sorted(
    os.path.basename(p)[: -len(".meta.json")] for p in glob.glob(os.path.join(DUMP, "*.meta.json"))
)


def _render(img, fmt: str, crlf: bool = True) -> bytes:
    b = io.BytesIO()
    dump_to(b, img, fmt, crlf=crlf)
    return b.getvalue()


def _open(name: str) -> Image:
    meta = json.load(open(os.path.join(DUMP, f"{name}.meta.json")))
    efer = meta["registers"]["efer"] if "registers" in meta else None  # QEMU's own core: no EFER note
    return open_image(os.path.join(DUMP, meta["image"]), efer=efer)


def test_goldens_present():
    assert {"mixed4", "mixed5", "recursive4", "linuxlike4", "qemu-guest"} <= set(GOLDENS)


@pytest.mark.parametrize("name", GOLDENS)
@pytest.mark.parametrize("fmt", ["qemu-tlb", "qemu-mem"])
def test_matches_qemu_golden(name, fmt):
    meta = json.load(open(os.path.join(DUMP, f"{name}.meta.json")))
    assert "QEMU" in meta["qemu_version"]
    want = open(os.path.join(DUMP, f"{name}.{fmt}.txt"), "rb").read()
    with _open(name) as img:
        assert _render(img, fmt) == want


def test_lf_output_is_crlf_output_without_cr():
    with _open("mixed4") as img:
        assert _render(img, "qemu-tlb", crlf=False) == _render(img, "qemu-tlb").replace(b"\r\n", b"\n")


def test_real_guest_core_registers_from_qemu_note():
    """The dump-guest-memory core carries CR0/CR3/CR4 in QEMU's note; only EFER is supplied."""
    meta = json.load(open(os.path.join(DUMP, "qemu-guest.meta.json")))
    with _open("qemu-guest") as img:
        assert img.state.cr3 == int(meta["registers"]["cr3"], 16)
        assert img.state.cr4 == int(meta["registers"]["cr4"], 16)
        assert img.state.cr0 == int(meta["registers"]["cr0"], 16)


def test_la57_info_mem_quirk_is_in_the_golden():
    """QEMU 7.2's 5-level info mem inverts the present tests below the PML4 (docs/paging.md §13.3.2):
    the golden shows only the non-present PS PDPTE planted by the capture tool."""
    text = open(os.path.join(DUMP, "mixed5.qemu-mem.txt"), "rb").read().decode()
    assert text == "0000050040000000-0000050080000000 0000000040000000 urw\r\n"


def test_pg_disabled():
    with _open("mixed4") as img:
        off = Image(img.memory, img.state.replace(cr0=img.state.cr0 & ~(1 << 31)), img.path)
        assert _render(off, "qemu-mem") == b"PG disabled\r\n"
        assert _render(off, "qemu-tlb") == b"PG disabled\r\n"


# -- live -------------------------------------------------------------------------------------------
def _random_image(seed: int):
    """Random leaves (4K/2M/1G, random flags, some reserved bits) and random parent rights."""
    rnd = random.Random(seed)
    b = Builder(levels=4, maxphyaddr=46, table_base=0x200000, table_flags="p rw us a")
    flag_words = ["rw", "us", "pwt", "pcd", "a", "d", "g", "nx"]
    used = set()
    for _ in range(40):
        size = rnd.choice([4096] * 6 + [1 << 21] * 2 + [1 << 30])
        half = rnd.random() < 0.5
        base = (0xFFFF800000000000 if half else 0) + rnd.randrange(0, 1 << 46, 1 << 30)
        va = base + rnd.randrange(0, 1 << 30, size)
        key = va >> 30
        if key in used and size == 1 << 30:
            continue
        n = rnd.choice([1, 1, 2, 5]) if size == 4096 else 1
        flags = "p " + " ".join(w for w in flag_words if rnd.random() < 0.4)
        try:
            b.map(va, rnd.randrange(0, 1 << 40, size), size * n, size, flags)
        except Exception:
            continue
        used.add(key)
    for pa in b.tables[1:]:  # random rights on some table entries
        for i in rnd.sample(range(512), 3):
            raw = b.memory.read_u64(pa + 8 * i)
            if raw & 1 and not raw & 0x80:
                b.memory.write_u64(pa + 8 * i, raw & ~(rnd.choice([0, 2, 4, 6])))
    return b.memory, b.state(cr4=CR4_PGE)


@pytest.mark.qemu
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_live_qemu_agrees(seed):
    from harness.oracles.qemu_monitor import QemuMonitor, qemu_available

    need_oracle("qemu", qemu_available(), "qemu-system-x86_64 not on PATH")
    mem, st = _random_image(seed)
    img = Image(mem, st, "<random>")
    with QemuMonitor(mem, st, ram_size=32 << 20) as mon:
        tlb, imem = mon.info_tlb(), mon.info_mem()
    assert _render(img, "qemu-tlb").decode() == tlb
    assert _render(img, "qemu-mem").decode() == imem
