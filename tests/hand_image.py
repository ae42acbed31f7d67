"""The hand-built image of the probe-guest oracle tests (tests/test_oracle_qemu.py,
tests/test_oracle_bochs.py): one page per rule of SDM Vol. 3A §4.6, frames tagged with the rig's
pattern so a read names the frame it reached, and the helpers that check hand-derived answers."""

from __future__ import annotations

from x86pt.build import Builder
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import Probe, tag_value
from x86pt.state import CR0_PE, CR0_PG, CR0_WP, EFER_LMA, EFER_LME, EFER_NXE

CR0 = CR0_PE | CR0_PG | CR0_WP
EFER = EFER_LME | EFER_LMA | EFER_NXE
FRAMES = 0x400000  # 4K frames, tagged: the qword at pa holds tag_value(pa)

# Virtual addresses of the hand image (4-level).
KRW = 0x10000000  # supervisor, RW, executable
URW = 0x10001000  # user, RW
URO = 0x10002000  # user, read-only
UNX = 0x10003000  # user, RW, XD
NP = 0x10004000  # not present (its PT exists)
UPK = 0x10005000  # user, RW, protection key 1
KRO = 0x10006000  # supervisor, read-only
RSV = 0x10007000  # PTE with bit 45 set (reserved: 51:M with M=40)
AD_R = 0x10008000  # supervisor RW, A=D=0: read once
AD_W = 0x10009000  # user RW, A=D=0: written once
KPK = 0x1000A000  # supervisor, RW, protection key 1
M2 = 0x20000000  # 2M page -> 0x600000
G1 = 0x40000000  # 1G page -> 0
NONCANON = 0x0000800000000000


def frame(i: int) -> int:
    return FRAMES + i * 0x1000


def tag_frames(mem: SparseMemory, start: int, pages: int) -> None:
    for pa in range(start, start + pages * 0x1000, 8):
        mem.write_u64(pa, tag_value(pa))


def hand_image(vendor: str) -> Builder:
    b = Builder(table_base=0x200000, maxphyaddr=40, vendor=vendor)
    tag_frames(b.memory, FRAMES, 16)
    tag_frames(b.memory, 0x600000, 2)
    b.map(KRW, frame(0), 0x1000, flags="rw a")
    b.map(URW, frame(1), 0x1000, flags="rw us a")
    b.map(URO, frame(2), 0x1000, flags="us a")
    b.map(UNX, frame(3), 0x1000, flags="rw us nx a")
    b.map(UPK, frame(4), 0x1000, flags="rw us a", pk=1)
    b.map(KRO, frame(5), 0x1000, flags="ro a")
    b.map(RSV, frame(6), 0x1000, flags="rw a")
    b.set_entry(RSV, 1, b.get_entry(RSV, 1) | (1 << 45))
    b.map(AD_R, frame(7), 0x1000, flags="rw")
    b.map(AD_W, frame(8), 0x1000, flags="rw us")
    b.map(KPK, frame(9), 0x1000, flags="rw a", pk=1)
    b.map(M2, 0x600000, 0x200000, 0x200000, flags="rw us a")
    b.map(G1, 0, 1 << 30, 1 << 30, flags="rw us a")
    return b


def P(va: int, access: str = "read", user: bool = False, ac: bool = False) -> Probe:
    return Probe(va, access, user, ac)


def check(results, cases) -> None:
    """cases: (probe, expected) with expected 'ok', ('ok', pa), ('pf', code) or ('gp', code)."""
    bad = []
    for (p, want), got in zip(cases, results):
        w = want if isinstance(want, tuple) else (want,)
        if w[0] == "ok":
            ok = got.outcome == "ok" and (len(w) == 1 or got.pa == w[1])
        elif w[0] == "pf":
            ok = got.outcome == "page_fault" and got.error_code == w[1] and got.cr2 == p.va
        else:
            ok = got.outcome == "general_protection" and got.error_code == w[1] and got.cr2 is None
        if not ok:
            bad.append(f"{p}: wanted {want}, got {got}")
    assert not bad, "\n".join(bad)


def run_cases(oracle, b, st, cases, **kw):
    """Run the cases' probes on `oracle` and check each answer (check)."""
    assert len(cases) == len({id(c) for c in cases})
    res = oracle.run(b.memory, st, [p for p, _ in cases], **kw)
    check(res.results, cases)
    return res
