"""The capability batch the probe-guest oracles (QEMU, Bochs) share: one image whose probes'
outcomes say what the oracle enforces (SDM Vol. 3A §4.6/§4.7 error codes), and the reading of
those outcomes into the fields of x86pt.oracle.Capabilities. Each backend adds what only it can
tell (its vendor, version, notes) and runs the batch itself.

The probes, in order (`measured` reads them back by these positions):
    0  supervisor read of a supervisor page             ok (the image works at all)
    1  read through a 1G leaf                           ok when 1-GByte pages are supported
    2  read through a PTE with address bit 51 set       #PF RSVD (with P unless the oracle drops it)
    3  supervisor fetch from a user page (SMEP)         #PF P|I/D with SMEP
    4  supervisor read of a user page (SMAP, AC=0)      #PF P with SMAP
    5  user read of a page with key 1, PKRU.AD1=1       #PF ...|PK with PKU
    [6 a read past the RAM through the 1G leaf, when asked for: all-ones on a PC bus]
    then one read per candidate MAXPHYADDR bit 32..51 (the first RSVD fault is M), and with
    4-level paging the four implicit reads of base.implicit_support; with 5-level paging a read
    of a VA that is canonical only with LA57 (SDM §4.5).
"""

from __future__ import annotations

from x86pt.build import Builder
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import RIG_IMAGE_BASE, Probe, ProbeResult, tag_value
from x86pt.state import CR4_PAE, CR4_PKE, CR4_SMAP, CR4_SMEP, PF_ID, PF_P, PF_PK, PF_RSVD, PagingState

from harness.oracles.base import implicit_support

CAP_BASE = RIG_IMAGE_BASE  # tables
CAP_FRAMES = 0x400000  # 4K frames filled with tag values (0xC3 low byte: fetchable)
CAP_1G_VA = 0x40000000  # 1G leaf -> PA 0 (frames below 1 GiB are RAM)
CAP_M_VA = 0x200000000  # one PTE per candidate MAXPHYADDR bit
LA57_VA = 0x0080000000001000  # bit 55 set: canonical only with 5-level paging
MBITS = tuple(range(32, 52))


def fill_frame(mem: SparseMemory, pa: int) -> None:
    """The rig's tag pattern over one 4K frame."""
    for off in range(0, 0x1000, 8):
        mem.write_u64(pa + off, tag_value(pa + off))


def capability_image(
    la57: bool, vendor: str, profile: str, unbacked_pa: int | None = None
) -> tuple[SparseMemory, PagingState, list[Probe]]:
    """The image, state and probes of the capability batch (module docstring)."""
    b = Builder(levels=5 if la57 else 4, maxphyaddr=52, vendor=vendor, table_base=CAP_BASE)
    mem = b.memory
    for i in range(4):
        fill_frame(mem, CAP_FRAMES + i * 0x1000)
    b.map(0x1000, CAP_FRAMES, 0x1000, flags="rw")  # supervisor page
    b.map(0x2000, CAP_FRAMES + 0x1000, 0x1000, flags="rw us", pk=1)  # user page, key 1
    b.map(0x3000, CAP_FRAMES + 0x2000, 0x1000, flags="rw us")  # user page, key 0
    b.map(CAP_1G_VA, 0, 1 << 30, 1 << 30, flags="rw")
    # Reserved-bit probe: bit 51 of a PTE's address field is reserved for every M < 52.
    b.map(0x4000, CAP_FRAMES + 0x3000, 0x1000, flags="rw")
    b.set_entry(0x4000, 1, b.get_entry(0x4000, 1) | (1 << 51))
    for k, bit in enumerate(MBITS):
        va = CAP_M_VA + k * 0x1000
        b.map(va, CAP_FRAMES, 0x1000, flags="rw")
        b.set_entry(va, 1, b.get_entry(va, 1) | (1 << bit))
    probes = [
        Probe(0x1000),
        Probe(CAP_1G_VA + CAP_FRAMES),
        Probe(0x4000),
        Probe(0x3000, "fetch"),
        Probe(0x3000),
        Probe(0x2000, user=True),
    ]
    if unbacked_pa is not None:
        probes.append(Probe(CAP_1G_VA + unbacked_pa))
    probes += [Probe(CAP_M_VA + k * 0x1000) for k in range(len(MBITS))]
    if la57:
        b.map(LA57_VA, CAP_FRAMES, 0x1000, flags="rw")
        probes.append(Probe(LA57_VA))
    else:
        probes += [Probe(va, user=u, implicit=True) for u in (False, True) for va in (0x3000, 0x1000)]
    st = b.state(cr4=CR4_PAE | CR4_SMEP | CR4_SMAP | CR4_PKE, pkru=0b0100, profile=profile, maxphyaddr=52)
    return mem, st, probes


def measured(
    name: str, results: list[ProbeResult], results5: list[ProbeResult] | None, unbacked: bool = False
) -> dict:
    """Capabilities fields from the answers of the 4-level batch and of the 5-level one (None:
    the oracle refused LA57). `unbacked`: the batch had the past-the-RAM read (index 6)."""
    from x86pt.errors import OracleError

    r = list(results)
    base_ok, gb, rsvd, smep_r, smap_r, pku_r = r[:6]
    if base_ok.outcome != "ok":
        raise OracleError(f"{name} capability batch: a plain supervisor read failed: {base_ok}")
    first_m = 7 if unbacked else 6
    mres = r[first_m : first_m + len(MBITS)]
    impl0, impl3, impl_note = implicit_support(r[-4:], name)
    out = dict(
        maxphyaddr=next(
            (
                bit
                for bit, x in zip(MBITS, mres)
                if x.outcome == "page_fault" and x.error_code is not None and x.error_code & PF_RSVD
            ),
            52,
        ),
        gbpages=gb.outcome == "ok",
        la57=bool(results5) and results5[0].outcome == "ok" and results5[-1].outcome == "ok",
        pku=pku_r.outcome == "page_fault" and bool((pku_r.error_code or 0) & PF_PK),
        smep=smep_r.outcome == "page_fault" and (smep_r.error_code or 0) == (PF_P | PF_ID),
        smap=smap_r.outcome == "page_fault" and (smap_r.error_code or 0) == PF_P,
        nx=True,
        rsvd_sets_p=rsvd.outcome == "page_fault" and bool((rsvd.error_code or 0) & PF_P),
        implicit_cpl0=impl0,
        implicit_cpl3=impl3,
        implicit_note=impl_note,
    )
    if unbacked:
        unb = r[6]
        out["unbacked"] = "ones" if unb.outcome == "ok" and unb.value == 0xFFFFFFFFFFFFFFFF else "error"
    return out
