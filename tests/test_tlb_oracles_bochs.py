# SPDX-License-Identifier: GPL-2.0-or-later
"""The TLB model's rules on Bochs 2.7 (CPU model tigerlake): the scenarios of
tests/test_tlb_oracles.py and tests/test_tlb_oracles_pcid.py (the same tables, markers and
hand-assembled guest code) run under Bochs' built-in debugger (harness/oracles/bochs.DebuggerRun).

How the guest runs: the rig's reset ROM (bios.bin) enters long mode with CR3 = the scenario's PML4
and CR4 = PAE|PGE from its boot block, then jumps to guest.ENTRY_VA; extra tables (which do not
touch the translations of X and X2) map the ROM's own 2M page identity and ENTRY_VA to a
trampoline that loads the scenario's CR0 and jumps to the scenario code. The debugger has a
linear breakpoint (`lb`) at every `out` stop; at a stop the host writes the changed entry with
`setpmem` (physical memory, Bochs' TLB is not told) and continues (`c`); the values the guest
stored are read with `xp`. CPUID.01H:ECX.PCID[bit 17] and CPUID.(7,0):EBX.INVPCID[bit 10] are
read from the table Bochs logs at reset; a scenario that needs a missing one skips with what was
measured. Every read must be in the model's set under profile "bochs"
(check_inside(kind, got, model_sets(g, steps, "bochs"))); a rule Bochs breaks fails here, named.
"""

from __future__ import annotations

import functools
import struct

import pytest

from tests.conftest import need_oracle
from tests import test_tlb_oracles as base
from tests import test_tlb_oracles_pcid as pcid
from tests.test_tlb_oracles import A, A2, CODE, CR0, P, PDPT, PML4, PS, RES, RW, model_sets, observed_pa

pytestmark = pytest.mark.bochs

# Extra tables for the boot (frames unused by the scenarios' memory)
PD_ROM, PDPT_K, PD_K, PT_K, TRAMPOLINE = 0x7000, 0x8000, 0x9000, 0xA000, 0x50000
ENTRY_VA = 0xFFFFFFFF80100000  # where bios.bin jumps (harness/guest ENTRY_VA)
BOOT_BLOCK = 0x108100  # bios.bin's boot block: CR3, CR4, EFER


def boot_extras() -> dict[int, bytes]:
    q = {
        PDPT + 8 * 3: PD_ROM | P | RW,  # 3-4 GiB: the ROM's 2M page, identity
        PD_ROM + 8 * 511: 0xFFE00000 | P | RW | PS,
        PML4 + 8 * 511: PDPT_K | P | RW,  # ENTRY_VA -> TRAMPOLINE
        PDPT_K + 8 * 510: PD_K | P | RW,
        PD_K: PT_K | P | RW,
        PT_K + 8 * 256: TRAMPOLINE | P | RW,
        BOOT_BLOCK: PML4,
        BOOT_BLOCK + 8: base.CR4,
        BOOT_BLOCK + 16: base.EFER,
    }
    out = {pa: struct.pack("<Q", v) for pa, v in q.items()}
    out[TRAMPOLINE] = (
        b"\x48\xb8"
        + struct.pack("<Q", CR0)
        + b"\x0f\x22\xc0"  # mov rax, CR0; mov cr0, rax
        + b"\x48\xb8"
        + struct.pack("<Q", CODE)
        + b"\xff\xe0"
    )  # mov rax, CODE; jmp rax
    return out


def _need_bochs() -> None:
    from harness.oracles.bochs import available

    ok, why = available()
    need_oracle("bochs", ok, why)


@functools.lru_cache(maxsize=None)
def bochs_cpuid() -> tuple[int, int, str]:
    """(CPUID.01H:ECX, CPUID.(7,0):EBX, version) of Bochs' tigerlake, from its reset log."""
    from harness.oracles.bochs import DEFAULT_CPU, DebuggerRun, bochs_version, cpuid_from_log

    with DebuggerRun({}) as run:
        run.exchange([], "starting")
    table = cpuid_from_log(run.log)
    if 1 not in table or 7 not in table:
        raise AssertionError(f"Bochs logged no CPUID leaves 1 and 7 for {DEFAULT_CPU}")
    return table[1][2], table[7][1], bochs_version()


class Refused(Exception):
    pass


def run_bochs(global_x: bool, steps, asm, memory: dict[int, int]) -> dict[int, int]:
    from harness.oracles.bochs import DebuggerRun
    from x86pt.errors import OracleError

    needs_pcid = any(s[0] in ("pcide",) or (s[0] == "cr3" and len(s) > 1 and s[1] & 0xFFF) for s in steps)
    needs_invpcid = any(s[0] == "invpcid" for s in steps)
    if needs_pcid or needs_invpcid:
        ecx1, ebx7, ver = bochs_cpuid()
        if needs_pcid and not ecx1 >> 17 & 1:
            raise Refused(f"{ver} tigerlake: CPUID.01H:ECX = {ecx1:#x}, PCID bit 17 clear")
        if needs_invpcid and not ebx7 >> 10 & 1:
            raise Refused(f"{ver} tigerlake: CPUID.(7,0):EBX = {ebx7:#x}, INVPCID bit 10 clear")
    ram = {pa: struct.pack("<Q", v) for pa, v in memory.items()}
    ram.update(boot_extras())
    ram[CODE] = bytes(asm.code)
    hosts = [s for s in steps if s[0] == "host"]
    nslots = sum(1 for s in steps if s[0] == "read")
    with DebuggerRun(ram, timeout=60.0) as run:
        run.exchange([f"lb {CODE + off:#x}" for off in asm.stops], "setting breakpoints")
        for i, off in enumerate(asm.stops):
            try:
                lines = run.exchange(["c"], f"running to stop {i}")
            except OracleError as e:
                raise AssertionError(f"Bochs did not reach stop {i} at {CODE + off:#x}: {e}") from None
            if not any(f"Breakpoint {i + 1}," in ln for ln in lines):
                raise AssertionError(f"Bochs stopped elsewhere than stop {i}: {lines[-5:]}")
            if i < len(hosts):
                pa, v = hosts[i][1], hosts[i][2]
                run.exchange(
                    [f"setpmem {pa:#x} 4 {v & 0xFFFFFFFF:#x}", f"setpmem {pa + 4:#x} 4 {v >> 32:#x}"],
                    "the host write",
                )
        vals = run.read_qwords(RES, nslots)
    return dict(enumerate(vals))


def _run(module, kind: str):
    _need_bochs()
    g, steps = module.scenario(kind)
    asm = module.assemble(steps)
    memory = pcid.guest_memory(g, asm) if module is pcid else base.base_memory(g)
    raw = run_bochs(g, steps, asm, memory)
    return g, steps, {k: observed_pa(v) for k, v in raw.items()}


@pytest.mark.parametrize("kind", base.KINDS)
def test_bochs_reads_fall_in_the_models_set(kind, record_property):
    g, steps, got = _run(base, kind)
    record_property("reads", {k: hex(v) for k, v in got.items()})
    pcid.check_inside(kind, got, model_sets(g, steps, "bochs"))
    # a cached translation is observed at all: the stale frame before any invalidation
    assert got[1] == (A2 + 0x1000 if kind == "invlpg-2m" else A)


@pytest.mark.parametrize("kind", pcid.KINDS)
def test_bochs_pcid_reads_fall_in_the_models_set(kind, record_property):
    try:
        g, steps, got = _run(pcid, kind)
    except Refused as e:
        pytest.skip(str(e))
    record_property("reads", {k: hex(v) for k, v in got.items()})
    pcid.check_inside(kind, got, model_sets(g, steps, "bochs"))
    assert got[1] == A


# -- each INVPCID type on an entry nothing else has dropped ------------------------------------------
# In the scenarios above Bochs drops the stale entry earlier than the SDM requires (measured: a MOV
# to CR3 with bit 63 set, a switch to another PCID and an INVPCID for another PCID each drop it),
# so there the invalidation under test acts on an already empty TLB. These scenarios change the
# entry and then run one INVPCID of the current PCID (types 0, 1, 3) or of all (2): the read before
# it must see the stale entry (Bochs cached it), the read after it only the new one.
def drop_scenario(kind: str):
    t = int(kind.rsplit("-", 1)[1])
    g = t == 2  # type 2 is the one that drops a global entry
    steps = [
        ("pcide", True),
        ("read", pcid.X, 0),
        ("host", base.PT2, pcid.B | P | RW | (base.G if g else 0)),
        ("read", pcid.X, 1),
        ("invpcid", t, 0, pcid.X if t == 0 else 0),
        ("read", pcid.X, 2),
    ]
    return g, steps


DROP_KINDS = ("invpcid-drop-0", "invpcid-drop-1", "invpcid-drop-2", "invpcid-drop-3")


@pytest.mark.parametrize("kind", DROP_KINDS)
def test_drop_scenarios_model_sets_match_the_sdm(kind):
    """Hand derivation (SDM Vol. 2A INVPCID; Vol. 3A §4.10.4.1): old, then old or new, then new."""
    g, steps = drop_scenario(kind)
    assert {k: set(v) for k, v in model_sets(g, steps, "bochs").items()} == {
        0: {A},
        1: {A, pcid.B},
        2: {pcid.B},
    }


@pytest.mark.parametrize("kind", DROP_KINDS)
def test_bochs_each_invpcid_type_drops(kind, record_property):
    _need_bochs()
    g, steps = drop_scenario(kind)
    asm = pcid.assemble(steps)
    try:
        raw = run_bochs(g, steps, asm, pcid.guest_memory(g, asm))
    except Refused as e:
        pytest.skip(str(e))
    got = {k: observed_pa(v) for k, v in raw.items()}
    record_property("reads", {k: hex(v) for k, v in got.items()})
    pcid.check_inside(kind, got, model_sets(g, steps, "bochs"))
    assert got[1] == A  # the stale entry was there for INVPCID to drop


def test_bochs_keeps_nothing_across_cr3_writes():
    """What Bochs 2.7 does beyond the SDM's minimum, measured (docs/tlb.md "Checked on oracles"):
    a MOV to CR3 with CR4.PCIDE=1 and bit 63 set, and a switch to another PCID and back, both leave
    only the new translation; the model allows it (its sets hold both frames there)."""
    _, steps_n, got_n = _run(pcid, "cr3-pcid-noflush")
    _, steps_o, got_o = _run(pcid, "cr3-other-pcid")
    assert got_n[2] == pcid.B, "Bochs now keeps entries across MOV to CR3 with bit 63 set: update docs/tlb.md"
    assert got_o[3] == pcid.B, "Bochs now keeps another PCID's entries: update docs/tlb.md"
