"""The hand derivation of the model's rights logic: kvm-unit-tests' expected-result logic for the
access matrix (ac_emulate_access / ac_test_permissions, docs/paging.md §11.5), re-written here
from the flags alone, in our own words, and checked against the x86pt walker on a large sample of
the matrix.

It works on flags, never on the model: which entries are present, which carry a reserved bit,
what rights they give, what error code follows, and what the PTE and PDE must hold afterwards
(PTE exact; PDE's A ignored when the access faults and pde.a was clear — KUT's ignore_pde).

Documented difference: the §10.4 pseudo-code's SMEP rule reads 'fetch and u and smep' without the
CPL; the SDM (§4.6.1) and KVM fault only *supervisor* fetches from user pages, and this is what
we expect. KUT has no SMAP in access.c and no implicit accesses anywhere; the rules added for
them here are the SDM's (Vol. 3A §4.6: an implicit access is a supervisor-mode access whatever
the CPL, SMAP-checked whatever EFLAGS.AC; §4.7: its #PF error code has U/S=0), plus one measured
profile deviation (QEMU/unicorn let EFLAGS.AC=1 lift SMAP for an implicit access at CPL0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from harness import matrix as mx
from harness import matrix_pack as mp
from x86pt.compare import model_run
from harness.matrix import MatrixFeatures, matrix_for
from x86pt.state import profile_named
from x86pt.walk import PageFault, Translation

PFERR_P, PFERR_W, PFERR_U, PFERR_RSVD, PFERR_F, PFERR_PK = 1, 2, 4, 8, 16, 32
A, D = 1 << 5, 1 << 6


@dataclass
class Expect:
    fault: bool
    error: int
    pte_add: int  # bits the PTE gains (A, D)
    pde_add: int
    ignore_pde_a: bool


def _has(flags: int, *names: str) -> bool:
    return all(flags & mx.F[n] for n in names)


def kut_expect(
    flags: int,
    *,
    user: bool,
    write: bool,
    fetch: bool,
    m: int,
    ac: bool = False,
    implicit: bool = False,
    implicit_ac_at_cpl0: bool = False,
) -> Expect:
    """One access of a matrix case, the KUT way (`implicit`: a descriptor-table read, which is a
    supervisor access at any CPL)."""
    f = flags
    nx_on = _has(f, "efer.nx")
    smep = _has(f, "cr4.smep")
    cpl3 = user
    user = user and not implicit
    smap_lifted = ac and (not implicit or (implicit_ac_at_cpl0 and not cpl3))
    error = PFERR_P | (PFERR_U if user else 0) | (PFERR_W if write else 0) | (PFERR_F if fetch else 0)
    fault = False
    pte_add = pde_add = 0
    ignore_pde_a = not _has(f, "pde.a")

    def reserved_in(prefix: str) -> bool:
        bad = _has(f, prefix + ".51") and m <= 51
        bad |= _has(f, prefix + ".36") and m <= 36
        bad |= _has(f, prefix + ".nx") and not nx_on
        if prefix == "pde" and _has(f, "pde.pse"):
            bad |= _has(f, "pde.13")
        return bad

    def perms(writable: bool, upage: bool, execable: bool) -> tuple[bool, int, int]:
        """(fault, extra error bits, A/D gained)."""
        kwritable = not _has(f, "cr0.wp") and not user
        bad = False
        extra = 0
        if user and not upage:
            bad = True
        if write and not writable and not kwritable:
            bad = True
        if fetch and not execable:
            bad = True
        if fetch and upage and smep and not user:  # SDM: SMEP is for supervisor fetches
            bad = True
        if _has(f, "cr4.smap") and upage and not user and not fetch and not smap_lifted:
            bad = True
        if upage and not fetch and _has(f, "pkey=1") and _has(f, "cr4.pke"):
            if _has(f, "pkru.ad"):
                bad = True
                extra |= PFERR_PK
            elif write and _has(f, "pkru.wd") and not kwritable:
                bad = True
                extra |= PFERR_PK
        return bad, extra, 0 if bad else (A | (D if write else 0))

    done = False
    if not _has(f, "pde.p") or reserved_in("pde"):
        fault = True
        if _has(f, "pde.p"):
            error |= PFERR_RSVD
        else:
            error &= ~PFERR_P
        done = True
    if not done:
        writable = not _has(f, "pdpte.ro") and _has(f, "pde.rw")
        upage = _has(f, "pde.user")
        execable = not _has(f, "pde.nx")
        if _has(f, "pde.pse"):
            bad, extra, add = perms(writable, upage, execable)
            fault, pde_add = bad, add
            error |= extra
        else:
            pde_add = A
            if not _has(f, "pte.p") or reserved_in("pte"):
                fault = True
                if _has(f, "pte.p"):
                    error |= PFERR_RSVD
                else:
                    error &= ~PFERR_P
            else:
                writable &= _has(f, "pte.rw")
                upage &= _has(f, "pte.user")
                execable &= not _has(f, "pte.nx")
                bad, extra, add = perms(writable, upage, execable)
                fault, pte_add = bad, add
                error |= extra
    if not fault:
        ignore_pde_a = False
    if not nx_on and not smep:
        error &= ~PFERR_F
    return Expect(fault, error, pte_add, pde_add, ignore_pde_a)


def check_case(
    flags: int, batch, case, results, after, m: int, implicit_ac_at_cpl0: bool = False
) -> list[str]:
    """KUT's five checks for one case of a model run."""
    msgs = []
    probes = [batch.probes[i] for i in case.probes]
    rs = [results[i] for i in case.probes]
    pte_add = pde_add = 0
    if flags & mx.ACC_TWICE:
        first = kut_expect(flags, user=False, write=False, fetch=False, m=m)
        if not first.fault:
            pte_add |= first.pte_add
            pde_add |= first.pde_add
    e = kut_expect(
        flags,
        user=bool(flags & mx.ACC_USER),
        write=bool(flags & mx.ACC_WRITE),
        fetch=bool(flags & mx.ACC_FETCH),
        m=m,
        ac=bool(flags & mx.ACC_AC),
        implicit=bool(flags & mx.IMPLICIT),
        implicit_ac_at_cpl0=implicit_ac_at_cpl0,
    )
    pte_add |= e.pte_add
    pde_add |= e.pde_add
    r = rs[-1]
    if e.fault and not isinstance(r, PageFault):
        msgs.append(f"unexpected access (model {r.outcome})")
    elif not e.fault and not isinstance(r, Translation):
        msgs.append(f"unexpected fault (model error code {getattr(r, 'error_code', None)})")
    elif e.fault and r.error_code != e.error:
        msgs.append(f"error code {r.error_code:x} expected {e.error:x}")
    elif not e.fault and r.pa != (case.frames[0] | (probes[-1].va & 0xFFF)):
        msgs.append(f"pa {r.pa:#x} is not the case's frame")
    owned = {o.kind: o for o in case.owned}
    if "pte" in owned:
        o = owned["pte"]
        want = o.raw | pte_add
        got = after.read_u64(o.addr)
        if got != want:
            msgs.append(f"pte {got:x} expected {want:x}")
    pde = owned.get("pde") or owned.get("pde2m")
    if pde is not None:
        want = pde.raw | pde_add
        got = after.read_u64(pde.addr)
        mask = ~0
        if e.fault and not pde.raw & A:
            mask = ~A  # KUT: PDE.A is don't-care when the access faults
        if (got ^ want) & mask:
            msgs.append(f"pde {got:x} expected {want:x}")
    return msgs


def _run_sample(
    profile: str,
    n: int,
    seed: int,
    extended: bool = False,
    maxphyaddr: int | None = None,
    space_name: str | None = None,
):
    prof = profile_named(profile)
    feat = MatrixFeatures.from_profile(prof, maxphyaddr)
    m = matrix_for(feat, extended=extended)
    base = 0
    space = m.spaces[0]
    if space_name is not None:
        for space in m.spaces:
            if space.name == space_name:
                break
            base += space.size
        assert space.name == space_name
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(space.size, size=min(n, space.size), replace=False)) + base
    src = mp.MatrixSource(m, prof, indices=idx)
    failures = []
    count = 0
    for batch in src.batches():
        results, after = model_run(batch.memory, batch.state, batch.probes)
        for case in batch.cases:
            msgs = check_case(
                case.flags, batch, case, results, after, feat.maxphyaddr, prof.implicit_smap_honours_ac
            )
            count += 1
            if msgs:
                failures.append(f"test {mx.flag_names(case.flags)}: " + "; ".join(msgs))
    return count, failures


@pytest.mark.parametrize(
    "profile,maxphyaddr", [("intel", 40), ("intel", 36), ("intel", 52), ("unicorn", None), ("kvm", None)]
)
def test_model_agrees_with_kut_expectations_on_a_matrix_sample(profile, maxphyaddr):
    count, failures = _run_sample(profile, 12000, seed=11, maxphyaddr=maxphyaddr)
    assert count == 12000
    assert not failures, f"{len(failures)} of {count} cases differ, e.g.:\n" + "\n".join(failures[:10])


def test_model_agrees_with_kut_expectations_with_smep_and_smap():
    # Extended classic space: CR4.SMEP legal, CR4.SMAP x EFLAGS.AC added (the 'twice' read is
    # made with AC=0, so SMAP applies to it).
    count, failures = _run_sample("intel", 12000, seed=12, extended=True, maxphyaddr=40)
    assert not failures, f"{len(failures)} of {count} cases differ, e.g.:\n" + "\n".join(failures[:10])


@pytest.mark.parametrize(
    "profile,maxphyaddr", [("intel", 40), ("intel", 48), ("unicorn", None), ("kvm", None)]
)
def test_model_agrees_with_hand_expectations_on_implicit_accesses(profile, maxphyaddr):
    # The extended matrix's implicit space: descriptor-table reads at CPL0 and CPL3, SMAP x AC,
    # keys, user/supervisor pages, not-present and reserved-bit walks.
    count, failures = _run_sample(
        profile, 4000, seed=13, extended=True, maxphyaddr=maxphyaddr, space_name="implicit"
    )
    assert count >= 1500
    assert not failures, f"{len(failures)} of {count} cases differ, e.g.:\n" + "\n".join(failures[:10])


def test_implicit_expectation_by_hand():
    # SDM §4.6/§4.7: an implicit read at CPL3 of a user page under SMAP faults with P only (no U),
    # EFLAGS.AC notwithstanding; of a supervisor page it is allowed (a supervisor access).
    f = mx.flags_from_names("pte.p pte.user pde.p pde.user cr4.smap ac user implicit")
    e = kut_expect(f, user=True, write=False, fetch=False, m=40, ac=True, implicit=True)
    assert e.fault and e.error == PFERR_P
    f = mx.flags_from_names("pte.p pde.p user implicit")
    assert not kut_expect(f, user=True, write=False, fetch=False, m=40, implicit=True).fault
    # not present at CPL3: error code 0, not U
    f = mx.flags_from_names("pde.p user implicit")
    e = kut_expect(f, user=True, write=False, fetch=False, m=40, implicit=True)
    assert e.fault and e.error == 0
    # CPL0 with AC=1: the SDM faults, QEMU/unicorn's deviation lets it through
    f = mx.flags_from_names("pte.p pte.user pde.p pde.user cr4.smap ac implicit")
    assert kut_expect(f, user=False, write=False, fetch=False, m=40, ac=True, implicit=True).fault
    assert not kut_expect(
        f, user=False, write=False, fetch=False, m=40, ac=True, implicit=True, implicit_ac_at_cpl0=True
    ).fault


def test_the_expectation_can_fail():
    # A hand-picked case: user write to a read-only user PTE with WP=1 faults with P|W|U.
    f = mx.flags_from_names("pte.p pte.user pde.p pde.rw pde.user user write cr0.wp efer.nx")
    e = kut_expect(f, user=True, write=True, fetch=False, m=40)
    assert e.fault and e.error == PFERR_P | PFERR_W | PFERR_U
    # not-present PDE: P clear, no I/D without NXE/SMEP
    e = kut_expect(mx.flags_from_names("fetch"), user=False, write=False, fetch=True, m=40)
    assert e.fault and e.error == 0
    # reserved bit 51 in the PTE under a present PDE
    e = kut_expect(
        mx.flags_from_names("pte.p pte.51 pde.p efer.nx"), user=False, write=False, fetch=False, m=40
    )
    assert e.fault and e.error == PFERR_P | PFERR_RSVD and e.pde_add == A
