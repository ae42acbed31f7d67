"""The walker against tables measured on real oracles on this machine, typed in from the specs:
docs/oracles.md §6.4 (KVM, 25 mappings x {K,U} x {R,W,X}) and docs/oracles.md §2.4.
These numbers were produced by KVM and unicorn, not by x86pt."""

from __future__ import annotations

import pytest

from x86pt.build import Builder
from x86pt.state import CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_LME, EFER_NXE
from x86pt.walk import Access, GeneralProtection, Translation, walk

COLS = [("read", False), ("write", False), ("fetch", False), ("read", True), ("write", True), ("fetch", True)]

# Scenario name -> how to build it. Each VA gets its own PML4 slot so upper-level flags can differ.
SCEN = {}


def _scen(name):
    def deco(f):
        SCEN[name] = f
        return f

    return deco


def image():
    b = Builder(maxphyaddr=48, vendor="amd", table_base=0x200000)
    vas = {}
    slot = [1]

    def next_va():
        va = slot[0] << 39
        slot[0] += 1
        return va

    def leaf(name, flags, size=4096, table_flags=None, upper=None):
        va = next_va()
        page = size
        b.map(
            va, 0x400000 if size == 4096 else (0x40000000 if size == 1 << 30 else 0x600000), size, page, flags
        )
        if upper:
            level, raw_or = upper
            addr = b.entry_address(va, level, create=False)
            b.memory.write_u64(addr, b.memory.read_u64(addr) | raw_or)
        vas[name] = va

    leaf("4K krw", "p rw")
    leaf("4K u-ro-nx", "p us nx")
    vas["4K np"] = next_va()
    b.map(vas["4K np"], 0x400000, 4096, 4096, "p rw us")
    b.unmap(vas["4K np"], 1)
    leaf("4K rsvd51", "p rw us pk=0")
    b.memory.write_u64(
        b.entry_address(vas["4K rsvd51"], 1),
        b.memory.read_u64(b.entry_address(vas["4K rsvd51"], 1)) | 1 << 51,
    )
    leaf("4K u-ro", "p us")
    leaf("2M u-ro-nx", "p us nx", 1 << 21)
    leaf("2M rsvd13", "p rw us", 1 << 21)
    a = b.entry_address(vas["2M rsvd13"], 2)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << 13)
    leaf("1G krw", "p rw", 1 << 30)
    leaf("pml4 US=0", "p rw us")
    a = b.entry_address(vas["pml4 US=0"], 4)
    b.memory.write_u64(a, b.memory.read_u64(a) & ~4)
    leaf("pml4 NX", "p rw us")
    a = b.entry_address(vas["pml4 NX"], 4)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << 63)
    leaf("pdpt RO", "p rw us")
    a = b.entry_address(vas["pdpt RO"], 3)
    b.memory.write_u64(a, b.memory.read_u64(a) & ~2)
    leaf("pml4e.PS", "p rw us")
    a = b.entry_address(vas["pml4e.PS"], 4)
    b.memory.write_u64(a, b.memory.read_u64(a) | 0x80)
    leaf("pdpte b51", "p rw us")
    a = b.entry_address(vas["pdpte b51"], 3)
    b.memory.write_u64(a, b.memory.read_u64(a) | 1 << 51)
    leaf("pml4e.G", "p rw us")
    a = b.entry_address(vas["pml4e.G"], 4)
    b.memory.write_u64(a, b.memory.read_u64(a) | 0x100)
    leaf("2M PAT", "p rw us pat", 1 << 21)
    leaf("4K G", "p rw us g")
    vas["noncanon"] = 1 << 47
    return b, vas


# docs/oracles.md §6.4: WP=1, NXE=1, no SMEP/SMAP. "ok" or the #PF error code; "GP".
KVM_TABLE = {
    "4K krw": ["ok", "ok", "ok", 0x05, 0x07, 0x15],
    "4K u-ro-nx": ["ok", 0x03, 0x11, "ok", 0x07, 0x15],
    "4K np": [0x00, 0x02, 0x10, 0x04, 0x06, 0x14],
    "4K rsvd51": [0x09, 0x0B, 0x19, 0x0D, 0x0F, 0x1D],
    "4K u-ro": ["ok", 0x03, "ok", "ok", 0x07, "ok"],
    "2M u-ro-nx": ["ok", 0x03, 0x11, "ok", 0x07, 0x15],
    "2M rsvd13": [0x09, 0x0B, 0x19, 0x0D, 0x0F, 0x1D],
    "1G krw": [0x09, 0x0B, 0x19, 0x0D, 0x0F, 0x1D],  # no 1G pages on this KVM
    "pml4 US=0": ["ok", "ok", "ok", 0x05, 0x07, 0x15],
    "pml4 NX": ["ok", "ok", 0x11, "ok", "ok", 0x15],
    "pdpt RO": ["ok", 0x03, "ok", "ok", 0x07, "ok"],
    "pml4e.PS": [0x09, 0x0B, 0x19, 0x0D, 0x0F, 0x1D],
    "pdpte b51": [0x09, 0x0B, 0x19, 0x0D, 0x0F, 0x1D],
    "pml4e.G": [0x09, 0x0B, 0x19, 0x0D, 0x0F, 0x1D],  # AMD vendor: PML4E bit 8 reserved
    "2M PAT": ["ok"] * 6,
    "4K G": ["ok"] * 6,
    "noncanon": ["GP"] * 6,
}

BASE = dict(cr0=CR0_PE | CR0_PG | CR0_WP, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA | EFER_NXE)


def outcome(r):
    if isinstance(r, Translation):
        return "ok"
    if isinstance(r, GeneralProtection):
        return "GP"
    return r.error_code


@pytest.fixture(scope="module")
def kvm_image():
    return image()


@pytest.mark.parametrize("name", list(KVM_TABLE))
def test_kvm_measured_table(kvm_image, name):
    b, vas = kvm_image
    st = b.state(profile="kvm-epyc-pvm", **BASE)
    got = [outcome(walk(st, b.memory, vas[name] + 0x18, Access(k, user=u))) for k, u in COLS]
    assert got == KVM_TABLE[name]


def test_kvm_wp0_supervisor_writes_to_ro_pages_succeed_user_writes_fault(kvm_image):
    b, vas = kvm_image
    st = b.state(profile="kvm-epyc-pvm", cr0=CR0_PE | CR0_PG, cr4=CR4_PAE, efer=BASE["efer"])
    assert outcome(walk(st, b.memory, vas["4K u-ro"], Access("write"))) == "ok"
    assert outcome(walk(st, b.memory, vas["pdpt RO"], Access("write"))) == "ok"
    assert outcome(walk(st, b.memory, vas["4K u-ro"], Access("write", user=True))) == 0x07


def test_kvm_nxe0_bit63_reserved_and_id_bit_gone(kvm_image):
    b, vas = kvm_image
    st = b.state(profile="kvm-epyc-pvm", cr0=BASE["cr0"], cr4=CR4_PAE, efer=EFER_LME | EFER_LMA)
    # every entry with bit 63 becomes RSVD (PF09/0b/0d/0f) ...
    assert [
        outcome(walk(st, b.memory, vas["4K u-ro-nx"], Access(k, user=u))) for k, u in COLS[:2] + COLS[3:5]
    ] == [0x09, 0x0B, 0x0D, 0x0F]
    assert outcome(walk(st, b.memory, vas["pml4 NX"], Access("read"))) == 0x09
    # ... and the I/D bit disappears from fetch faults: KX on np -> PF00, UX -> PF04/PF05.
    assert outcome(walk(st, b.memory, vas["4K np"], Access("fetch"))) == 0x00
    assert outcome(walk(st, b.memory, vas["4K np"], Access("fetch", user=True))) == 0x04
    assert outcome(walk(st, b.memory, vas["4K krw"], Access("fetch", user=True))) == 0x05


def test_kvm_smep_and_smap(kvm_image):
    b, vas = kvm_image
    st = b.state(
        profile="kvm-epyc-pvm", cr0=BASE["cr0"], cr4=CR4_PAE | CR4_SMEP | CR4_SMAP, efer=BASE["efer"]
    )
    assert outcome(walk(st, b.memory, vas["4K u-ro"], Access("fetch"))) == 0x11  # SMEP
    assert outcome(walk(st, b.memory, vas["4K u-ro"], Access("read"))) == 0x01  # SMAP
    assert outcome(walk(st, b.memory, vas["pdpt RO"], Access("write"))) == 0x03
    assert outcome(walk(st, b.memory, vas["4K u-ro"], Access("read", ac=True))) == "ok"  # AC overrides
    assert outcome(walk(st, b.memory, vas["pml4 NX"], Access("write", ac=True))) == "ok"
    # "except KW to a RO user page with WP=1 -> PF03"
    assert outcome(walk(st, b.memory, vas["4K u-ro"], Access("write", ac=True))) == 0x03


def test_kvm_ad_bits_after_success_and_untouched_after_faults(kvm_image):
    b, vas = kvm_image
    mem = b.memory.copy()
    st = b.state(profile="kvm-epyc-pvm", **BASE)
    pte = b.entry_address(vas["4K krw"], 1)
    before = mem.read_u64(pte)
    walk(st, mem, vas["4K krw"], Access("write"), update_ad=True)
    assert mem.read_u64(pte) == before | 0x60  # 0x406003 -> 0x406063 in the spec
    ro = b.entry_address(vas["4K u-ro"], 1)
    before = mem.read_u64(ro)
    walk(st, mem, vas["4K u-ro"], Access("read"), update_ad=True)
    assert mem.read_u64(ro) == before | 0x20  # a RO page only gets A
    for name in ("4K rsvd51", "4K np"):
        pml4 = b.entry_address(vas[name], 4)
        before = mem.read_u64(pml4)
        walk(st, mem, vas[name], Access("read"), update_ad=True)
        assert mem.read_u64(pml4) == before  # faulting walks: left alone on KVM


# docs/oracles.md §2.4 (unicorn 2.1.4, Icelake-Server, M=40, WP=1 NXE=1).
def test_unicorn_measured_rows():
    b = Builder(maxphyaddr=40, table_base=0x200000)
    b.map(0x1000, 0x400000, 4096, 4096, "p rw")  # supervisor page
    b.map(0x2000, 0x401000, 4096, 4096, "p rw us nx")  # user data page
    b.map(0x3000, 0x402000, 4096, 4096, "p us")  # user RO exec page
    b.map(0x4000, 0x403000, 4096, 4096, "p rw us pk=1")  # key 1
    b.map(0x40000000, 0x40000000, 1 << 30, 1 << 30, "p rw us")
    st = b.state(profile="unicorn", cr4=CR4_PAE | CR4_SMEP)
    o = lambda va, k="read", u=False, s=st, ac=False: outcome(walk(s, b.memory, va, Access(k, user=u, ac=ac)))
    assert [o(0x9000), o(0x9000, "write"), o(0x9000, "read", True), o(0x9000, "write", True)] == [0, 2, 4, 6]
    assert [o(0x9000, "fetch"), o(0x9000, "fetch", True)] == [0x10, 0x14]
    assert [o(0x1000, "read", True), o(0x1000, "write", True), o(0x1000, "fetch", True)] == [5, 7, 0x15]
    assert [o(0x2000, "fetch"), o(0x2000, "fetch", True)] == [0x11, 0x15]
    assert o(0x3000, "fetch") == 0x11  # SMEP
    assert o(0x3000, "write") == 0x3
    smap = b.state(profile="unicorn", cr4=CR4_PAE | CR4_SMAP)
    assert [o(0x2000, s=smap), o(0x2000, "write", s=smap), o(0x2000, s=smap, ac=True)] == [1, 3, "ok"]
    pk = b.state(profile="unicorn", cr4=CR4_PAE | (1 << 22), pkru=0b0100)  # AD1
    assert [o(0x4000, "read", True, pk), o(0x4000, s=pk), o(0x1000, s=pk), o(0x4000, "fetch", True, pk)] == [
        0x25,
        0x21,
        "ok",
        "ok",
    ]
    wd = b.state(profile="unicorn", cr4=CR4_PAE | (1 << 22), pkru=0b1000)  # WD1
    assert [o(0x4000, "read", True, wd), o(0x4000, "write", True, wd), o(0x4000, "write", s=wd)] == [
        "ok",
        0x27,
        0x23,
    ]
    # reserved bit 40 at M=40 (RSVD|P) and bit 52 ignored
    pte = b.entry_address(0x2000, 1)
    raw = b.memory.read_u64(pte)
    b.memory.write_u64(pte, raw | 1 << 40)
    assert [o(0x2000), o(0x2000, "write", True), o(0x2000, "fetch", True)] == [0x9, 0xF, 0x1D]
    b.memory.write_u64(pte, raw | 1 << 52)
    assert o(0x2000) == "ok"
    b.memory.write_u64(pte, raw)
    # 1G page works; bit 13 of a 1G leaf -> 0x9, bit 12 (PAT) ok
    assert o(0x40001000, "write") == "ok"
    e = b.entry_address(0x40000000, 3)
    raw1g = b.memory.read_u64(e)
    b.memory.write_u64(e, raw1g | 1 << 13)
    assert o(0x40001000) == 0x9
    b.memory.write_u64(e, raw1g | 1 << 12)
    assert o(0x40001000) == "ok"
