"""Batch translation: the walker's semantics over numpy arrays of probes.

Same rules as `walk.walk` (and property-tested against it): canonical check, per-level present and
reserved-bit checks with the same `rsvd_mask`, RW/US AND and XD OR, leaf by PS, rights with WP,
SMEP, SMAP/AC, PKRU/PKRS, error codes, the profile's deviations. It does not apply A/D writes and
does not explain faults; use `walk` for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from x86pt.errors import PhysicalAddressError
from x86pt.fields import BIT_P, BIT_PS, BIT_RW, BIT_US, BIT_XD, PK_MASK, PK_SHIFT
from x86pt.state import PF_ID, PF_P, PF_PK, PF_RSVD, PF_U, PF_W, PagingState, Profile, rsvd_mask

if TYPE_CHECKING:
    from x86pt.fields import Level
    from x86pt.memory.sparse import SparseMemory


class QwordGather(Protocol):
    """What the batch walk reads tables through: any x86pt.memory image (MemoryBase), or the
    snapshot a SparseMemory's gather_view gives."""

    def gather_u64(self, pas: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


OK, PAGE_FAULT, GENERAL_PROTECTION = 0, 1, 2
OUTCOME_NAMES = ("ok", "page_fault", "general_protection")
ACCESS_CODES = {"read": 0, "write": 1, "fetch": 2}
U64 = np.uint64


@dataclass
class BatchTranslation:
    """Per-probe results, index-aligned with the input."""

    outcome: np.ndarray  # uint8: OK / PAGE_FAULT / GENERAL_PROTECTION
    pa: np.ndarray  # uint64 (valid where outcome == OK)
    page_size: np.ndarray  # uint64 (0 where not OK)
    error_code: np.ndarray  # uint32 (#PF/#GP error code; 0 where OK)
    level: np.ndarray  # uint8: leaf level when OK, level that ended the walk on a
    # not-present/RSVD fault, 0 for rights faults and #GP

    def __len__(self) -> int:
        return len(self.outcome)


def _u(x: int) -> np.uint64:
    return U64(x & ((1 << 64) - 1))


@dataclass
class _Probes:
    """The probes of one batch and what the walk has found for each so far (index-aligned)."""

    vas: np.ndarray
    write: np.ndarray
    fetch: np.ndarray
    user: np.ndarray
    ac: np.ndarray
    implicit: np.ndarray
    user_acc: np.ndarray  # a user-mode access: user and not implicit
    base: np.ndarray  # the access's error-code bits (W, U, I/D)
    outcome: np.ndarray
    pa: np.ndarray
    size: np.ndarray
    level: np.ndarray
    err: np.ndarray
    leaf_raw: np.ndarray
    leaf_rw: np.ndarray
    leaf_us: np.ndarray
    leaf_xd: np.ndarray


def translate_batch(
    state: PagingState,
    memory: QwordGather,
    vas: npt.ArrayLike,
    access: str | npt.ArrayLike = "read",
    user: npt.ArrayLike = False,
    ac: npt.ArrayLike = False,
    implicit: npt.ArrayLike = False,
) -> BatchTranslation:
    """Translate many VAs at once. `access` is 'read'|'write'|'fetch' or an array of codes
    (0 read, 1 write, 2 fetch); `user`, `ac`, `implicit` are bools or bool arrays.

    The steps: the probes as arrays; the canonical check and the profile's blind ranges; the
    walk, one level at a time over the probes still walking; the rights of the complete
    translations."""
    p = _probes(state, vas, access, user, ac, implicit)
    view = getattr(memory, "gather_view", None)
    memory = view() if view is not None else memory  # stack sparse pages once per batch
    canon = _before_the_walk(state, p)
    _walk_levels(state, memory, p, np.nonzero(canon)[0])
    _check_rights(state, p, canon)
    okm = p.outcome == OK
    p.pa[~okm] = 0
    p.size[~okm] = 0
    return BatchTranslation(p.outcome, p.pa, p.size, p.err, p.level)


def _probes(
    state: PagingState,
    vas: npt.ArrayLike,
    access: str | npt.ArrayLike,
    user: npt.ArrayLike,
    ac: npt.ArrayLike,
    implicit: npt.ArrayLike,
) -> _Probes:
    vas = np.asarray(vas, dtype=U64)
    n = len(vas)
    if isinstance(access, str):
        acc = np.full(n, ACCESS_CODES[access], dtype=np.uint8)
    else:
        acc = np.asarray(access, dtype=np.uint8)
    user = np.broadcast_to(np.asarray(user, dtype=bool), (n,))
    ac = np.broadcast_to(np.asarray(ac, dtype=bool), (n,))
    implicit = np.broadcast_to(np.asarray(implicit, dtype=bool), (n,))
    write = acc == 1
    fetch = acc == 2
    user_acc = user & ~implicit
    base = (
        np.where(write, PF_W, 0)
        | np.where(user_acc, PF_U, 0)
        | np.where(fetch & (state.nxe or state.smep), PF_ID, 0)
    ).astype(np.uint32)
    return _Probes(
        vas,
        write,
        fetch,
        user,
        ac,
        implicit,
        user_acc,
        base,
        outcome=np.zeros(n, dtype=np.uint8),
        pa=np.zeros(n, dtype=U64),
        size=np.zeros(n, dtype=U64),
        level=np.zeros(n, dtype=np.uint8),
        err=np.zeros(n, dtype=np.uint32),
        leaf_raw=np.zeros(n, dtype=U64),
        leaf_rw=np.zeros(n, dtype=bool),
        leaf_us=np.zeros(n, dtype=bool),
        leaf_xd=np.zeros(n, dtype=bool),
    )


def _before_the_walk(state: PagingState, p: _Probes) -> np.ndarray:
    """The canonical check (SDM §3.3.7.1: #GP(0), nothing read) and the profile's CPL3 blind
    ranges (#PF without a walk). Returns which probes walk."""
    top = p.vas >> U64(state.va_bits - 1)
    canon: np.ndarray = (top == 0) | (top == _u((1 << (65 - state.va_bits)) - 1))
    p.outcome[~canon] = GENERAL_PROTECTION
    for start, end in state.profile.cpl3_blind_ranges:
        blind = canon & p.user_acc & (p.vas >= _u(start)) & (p.vas < _u(end))
        if blind.any():
            p.outcome[blind] = PAGE_FAULT
            p.err[blind] = p.base[blind] | np.where(p.fetch[blind], PF_ID, 0).astype(np.uint32)
            canon = canon & ~blind
    return canon


def _walk_levels(
    state: PagingState,
    memory: QwordGather,
    p: _Probes,
    active: np.ndarray,
    trace: list[tuple[Any, ...]] | None = None,
) -> None:
    """The walk from CR3 down, one level at a time over the probes still walking (`active`):
    a not-present or reserved entry ends a probe's walk with a #PF; a leaf ends it with a
    translation and the rights accumulated (RW/US ANDed, XD ORed). With `trace`, each level
    appends (level, probe indices, entry addresses, raw entries, reserved mask, reserved, leaf)."""
    table = np.full(len(active), _u(state.root), dtype=U64)
    eff_rw = np.ones(len(active), dtype=bool)
    eff_us = np.ones(len(active), dtype=bool)
    eff_xd = np.zeros(len(active), dtype=bool)
    phys = _u(state.phys_mask)
    prof = state.profile
    p_rsvd = PF_RSVD | (PF_P if prof.rsvd_sets_p else 0)
    for lv in state.levels:
        if len(active) == 0:
            break
        raw = _read_entries(memory, prof, lv, p.vas[active], table)
        present = (raw & _u(BIT_P)) != 0
        is_leaf = np.zeros(len(active), dtype=bool)
        if lv.leaf_kind is not None:
            is_leaf = (raw & _u(BIT_PS)) != 0
        if lv.number == 1:
            is_leaf[:] = True
        m_table = _u(rsvd_mask(state, lv, lv.table_kind))
        m_leaf = _u(rsvd_mask(state, lv, lv.leaf_kind)) if lv.leaf_kind is not None else m_table
        rs = np.where(is_leaf & (lv.leaf_kind is not None), m_leaf, m_table)
        reserved = present & ((raw & rs) != 0)
        if trace is not None:
            e_addr = table | (((p.vas[active] >> U64(lv.shift)) & U64(0x1FF)) << U64(3))
            trace.append((lv, active, e_addr, raw, rs, present, reserved, is_leaf))
        np_idx = active[~present]
        p.outcome[np_idx] = PAGE_FAULT
        p.err[np_idx] = p.base[np_idx]
        p.level[np_idx] = lv.number
        rs_idx = active[reserved]
        p.outcome[rs_idx] = PAGE_FAULT
        p.err[rs_idx] = p.base[rs_idx] | p_rsvd
        p.level[rs_idx] = lv.number
        good = present & ~reserved
        eff_rw &= (raw & _u(BIT_RW)) != 0
        eff_us &= (raw & _u(BIT_US)) != 0
        eff_xd |= (raw & _u(BIT_XD)) != 0
        done = good & is_leaf
        d_idx = active[done]
        p.leaf_raw[d_idx] = raw[done]
        p.leaf_rw[d_idx] = eff_rw[done]
        p.leaf_us[d_idx] = eff_us[done]
        p.leaf_xd[d_idx] = eff_xd[done]
        p.level[d_idx] = lv.number
        psz = U64(1 << lv.shift)
        p.pa[d_idx] = (raw[done] & phys & ~(psz - U64(1))) | (p.vas[d_idx] & (psz - U64(1)))
        p.size[d_idx] = psz
        cont = good & ~is_leaf
        table = raw[cont] & phys
        eff_rw, eff_us, eff_xd = eff_rw[cont], eff_us[cont], eff_xd[cont]
        active = active[cont]


def _read_entries(
    memory: QwordGather, prof: Profile, lv: Level, va: np.ndarray, table: np.ndarray
) -> np.ndarray:
    """The entries of level `lv` the probes `va` use, from their tables; an entry outside the
    image reads as the profile says (zeros, ones) or is an error."""
    e_addr = table | (((va >> U64(lv.shift)) & U64(0x1FF)) << U64(3))
    raw, valid = memory.gather_u64(e_addr)
    if not valid.all():
        if prof.unbacked_read == "zero":
            raw = np.where(valid, raw, U64(0))
        elif prof.unbacked_read == "ones":
            raw = np.where(valid, raw, _u(-1))
        else:
            bad = int(e_addr[~valid][0])
            raise PhysicalAddressError(
                f"{lv.table} entry at {bad:#x} (for va {int(va[~valid][0]):#x}) lies outside the image", bad
            )
    return raw


def _check_rights(state: PagingState, p: _Probes, canon: np.ndarray) -> None:
    """Rights on complete translations (SDM §4.6; walk.check_rights is the scalar twin): a
    denied access becomes a #PF with P (and PK when the key denies), level 0."""
    n = len(p.vas)
    prof = state.profile
    walked = (p.outcome == OK) & canon
    ua = p.leaf_us
    write, fetch, user_acc, leaf_rw = p.write, p.fetch, p.user_acc, p.leaf_rw
    executable = ~(p.leaf_xd & state.nxe)
    sup = ~user_acc
    fault = np.zeros(n, dtype=bool)
    fault |= user_acc & ~ua
    fault |= user_acc & ua & write & ~leaf_rw
    fault |= user_acc & ua & fetch & ~executable
    fault |= sup & fetch & ua & state.smep
    fault |= sup & fetch & ~executable
    smap_ac_ok = p.ac & (
        ~p.implicit | (prof.implicit_smap_honours_ac & (~p.user | prof.implicit_smap_honours_ac_cpl3))
    )
    fault |= sup & ~fetch & ua & state.smap & ~smap_ac_ok
    fault |= sup & write & ~leaf_rw & state.wp
    key_denied = np.zeros(n, dtype=bool)
    if state.pke or state.pks:
        pk = ((p.leaf_raw & _u(PK_MASK)) >> U64(PK_SHIFT)).astype(np.uint32)
        reg = np.zeros(n, dtype=np.uint32)
        applies = np.zeros(n, dtype=bool)
        by_cpl = state.pke and prof.pkru_by_cpl  # walk.check_rights: PKRU by the CPL
        if by_cpl:
            reg[:] = np.uint32(state.pkru)
            applies[:] = True
        if state.pke and not by_cpl:
            reg = np.where(ua, np.uint32(state.pkru), reg)
            applies |= ua
        if state.pks and not by_cpl:
            reg = np.where(~ua, np.uint32(state.pkrs), reg)
            applies |= ~ua
        ad = ((reg >> (2 * pk)) & 1) == 1
        if by_cpl:
            ad &= user_acc
        wd = ((reg >> (2 * pk + 1)) & 1) == 1
        key_denied = applies & ~fetch & (ad | (write & wd & (user_acc | state.wp)))
    fault |= key_denied
    fault &= walked
    p.outcome[fault] = PAGE_FAULT
    p.err[fault] = p.base[fault] | PF_P | np.where(key_denied[fault], PF_PK, 0).astype(np.uint32)
    p.level[fault] = 0


# -- the model side of a differential batch: translations plus the A/D writes ---------------------------
@dataclass
class ModelBatch:
    """`model_batch`'s answer: per-probe translations, the memory after every probe ran in order
    (A/D writes and the writes' values applied, as compare.model_run leaves it), and the pages the
    walks read entries from."""

    translation: BatchTranslation
    memory_after: object
    entry_addrs: np.ndarray  # every entry address a walk read (sorted, unique)


class NotBatchable(Exception):
    """The batch needs the scalar walker: probes that write into pages the walks read, or an A/D
    write outside the image."""


def model_batch(
    state: PagingState,
    memory: SparseMemory,
    vas: npt.ArrayLike,
    access: str | npt.ArrayLike,
    user: npt.ArrayLike,
    ac: npt.ArrayLike,
    implicit: npt.ArrayLike,
    wvalues: npt.ArrayLike,
) -> ModelBatch:
    """compare.model_run over arrays: every probe walked with A/D updates, in order, on a copy of
    `memory` (a SparseMemory). The A/D writes are ORs of bits no walk decides on (SDM §4.8), so
    their order does not matter; a write probe's value goes in last, which is the same as in order
    as long as no write lands on a page a walk reads (else NotBatchable). A/D rules as walk.walk:
    A in every non-leaf entry used and the leaf, D in the leaf of a write; on a fault, A in the
    non-leaf entries used (profile `a_on_faulting_walk` 'used'), and the 1G leaf's A for profiles
    that set it before the checks (`a_on_1g_leaf_before_checks`)."""
    from x86pt.fields import BIT_A, BIT_D, Kind, masks_for

    p = _probes(state, vas, access, user, ac, implicit)
    view = getattr(memory, "gather_view", None)
    mem_view = view() if view is not None else memory
    canon = _before_the_walk(state, p)
    trace: list[tuple[Any, ...]] = []
    _walk_levels(state, mem_view, p, np.nonzero(canon)[0], trace)
    _check_rights(state, p, canon)
    okm = p.outcome == OK
    prof = state.profile
    fault_a = prof.a_on_faulting_walk == "used"
    addrs: list[np.ndarray] = []
    bits: list[np.ndarray] = []
    read: list[np.ndarray] = []
    a_bit, d_bit = U64(BIT_A), U64(BIT_D)
    for lv, idx, e_addr, raw, rs, present, reserved, is_leaf in trace:
        read.append(e_addr)
        ok = okm[idx]
        good = present & ~reserved
        used = good & ~is_leaf  # a non-leaf entry the walk went through
        sel = used & (ok | fault_a)
        addrs.append(e_addr[sel])
        bits.append(np.full(int(sel.sum()), a_bit, dtype=U64))
        leaf = good & is_leaf
        lsel = leaf & ok
        addrs.append(e_addr[lsel])
        bits.append(np.where(p.write[idx[lsel]], a_bit | d_bit, a_bit).astype(U64))
        if lv.number == 3 and lv.leaf_kind is Kind.PDPTE_1G and prof.a_on_1g_leaf_before_checks:
            gig = present & is_leaf
            # a rights fault after the walk: A was set before the checks
            rf = gig & good & ~ok
            # reserved bits only among the low (frame alignment) ones: A set, then the #PF
            low = U64(masks_for(Kind.PDPTE_1G, state.m, state.vendor).rsvd & ((1 << 30) - 1))
            high_bad = (raw & rs & ~low) != 0
            lowf = gig & reserved & ~high_bad & ((raw & low) != 0)
            extra = rf | lowf
            addrs.append(e_addr[extra])
            bits.append(np.full(int(extra.sum()), a_bit, dtype=U64))
    entry_addrs = np.unique(np.concatenate(read)) if read else np.zeros(0, dtype=U64)
    table_pages = np.unique(entry_addrs >> U64(12))
    wr = np.flatnonzero(okm & p.write)
    pa_w = p.pa[wr]
    if len(wr) and (
        np.isin(pa_w >> U64(12), table_pages).any() or np.isin((pa_w + U64(7)) >> U64(12), table_pages).any()
    ):
        raise NotBatchable("a write probe lands on a page the walks read")
    after = memory.copy()
    if addrs:
        _or_into(after, np.concatenate(addrs), np.concatenate(bits))
    wv = np.asarray(wvalues, dtype=object)
    for k, pa in zip(wr.tolist(), pa_w.tolist()):
        try:
            after.write_u64(pa, int(wv[k]))
        except PhysicalAddressError:
            pass
    p.pa[~okm] = 0
    p.size[~okm] = 0
    return ModelBatch(BatchTranslation(p.outcome, p.pa, p.size, p.err, p.level), after, entry_addrs)


def _or_into(memory: SparseMemory, addrs: np.ndarray, bits: np.ndarray) -> None:
    """OR `bits` into the qwords at `addrs` (8-aligned entry addresses) of a SparseMemory."""
    if not len(addrs):
        return
    order = np.argsort(addrs, kind="stable")
    addrs, bits = addrs[order], bits[order]
    first = np.concatenate(([True], addrs[1:] != addrs[:-1]))
    starts = np.flatnonzero(first)
    uaddr = addrs[starts]
    ubits = np.bitwise_or.reduceat(bits, starts)
    if int(uaddr[-1]) + 8 > memory.size:
        raise NotBatchable("an A/D write outside the image")
    pns = uaddr >> U64(12)
    pstart = np.flatnonzero(np.concatenate(([True], pns[1:] != pns[:-1])))
    bounds = list(pstart.tolist()) + [len(uaddr)]
    slots = ((uaddr >> U64(3)) & U64(511)).astype(np.int64)
    for a, b in zip(bounds, bounds[1:]):
        pn = int(pns[a])
        page = memory.pages.get(pn)
        if page is None:
            page = memory.pages[pn] = bytearray(4096)
        q = np.frombuffer(page, dtype="<u8")
        q[slots[a:b]] |= ubits[a:b]
