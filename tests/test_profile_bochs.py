"""The model's two Bochs profile fields without Bochs (docs/paging.md §12.1): `pkru_by_cpl` and
`implicit_smap_honours_ac_cpl3`, against the hand-derived table of tests/test_oracle_bochs.py
(PK_TABLE: a Bochs column measured on Bochs 2.7 and an SDM column derived from SDM Vol. 3A §4.6.2),
for the scalar walker and the batch translator alike."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.test_oracle_bochs import CR0, KPK, PK_TABLE, UPK, URW, hand_image, state
from x86pt.batch import translate_batch
from x86pt.state import CR0_WP, CR4_PAE, CR4_PKE, CR4_SMAP, PROFILES
from x86pt.walk import Access, walk

BOCHS = PROFILES["bochs"]
SDM = dataclasses.replace(BOCHS, pkru_by_cpl=False, implicit_smap_honours_ac_cpl3=False)


@pytest.mark.parametrize("row", PK_TABLE, ids=lambda r: f"wp{r[0]}-pkru{r[1]:#x}-{r[2]}-cpl{r[3]}-{r[4]}")
@pytest.mark.parametrize("profile, column", [(BOCHS, 5), (SDM, 6)], ids=["bochs", "sdm"])
def test_pk_table(row, profile, column):
    b = hand_image()
    st = state(b, cr0=CR0 if row[0] else CR0 & ~CR0_WP, cr4=CR4_PAE | CR4_PKE, pkru=row[1])
    st = st.replace(profile=profile)
    va = (UPK if row[2] == "U" else KPK) + 8
    acc = Access(row[4], user=row[3] == 3)
    r = walk(st, b.memory, va, acc)
    assert (None if r.outcome == "ok" else r.error_code) == row[column]
    out = translate_batch(st, b.memory, np.array([va], dtype=np.uint64), acc.kind, user=acc.user)
    got = None if out.outcome[0] == 0 else int(out.error_code[0])
    assert got == row[column], (out.outcome[0], got)


@pytest.mark.parametrize("user", [False, True])
@pytest.mark.parametrize("ac", [False, True])
def test_implicit_smap_with_ac(user, ac):
    """SDM §4.6.1: an implicit supervisor read of a user page faults under SMAP (#PF P). The
    `implicit_smap_honours_ac` profiles let AC=1 through at CPL<3; `..._cpl3` at CPL3 too."""
    b = hand_image()
    st = state(b, cr4=CR4_PAE | CR4_SMAP)
    acc = Access("read", user=user, ac=ac, implicit=True)
    for prof, passes in (
        (BOCHS, ac),
        (dataclasses.replace(BOCHS, implicit_smap_honours_ac_cpl3=False), ac and not user),
        (PROFILES["intel"], False),
    ):
        r = walk(st.replace(profile=prof), b.memory, URW, acc)
        assert (r.outcome == "ok") == passes, (prof.name, user, ac, r)
        out = translate_batch(
            st.replace(profile=prof),
            b.memory,
            np.array([URW], dtype=np.uint64),
            "read",
            user=user,
            ac=ac,
            implicit=True,
        )
        assert (out.outcome[0] == 0) == passes, (prof.name, user, ac, "batch")
