"""One linear-address translation, with the full IA-32e semantics (Intel SDM Vol. 3A §4.5-4.8,
docs/paging.md §2-§10): canonical check, 4/5 levels, 4K/2M/1G leaves, reserved bits (MAXPHYADDR,
vendor, NXE, PS where it is reserved, large-frame alignment), RW/US ANDed and XD ORed across
levels, WP, SMEP, SMAP with EFLAGS.AC (explicit vs implicit), PKRU/PKRS, the #PF error code and
CR2, and optionally the A/D writes a processor would make.

Result: Translation | PageFault | GeneralProtection, each carrying the steps taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from x86pt.errors import BadInputError, PhysicalAddressError
from x86pt.fields import ADDR_MASK_52, BIT_A, BIT_D, BIT_PS, BIT_XD, PK_MASK, PK_SHIFT, Kind, Level, masks_for
from x86pt.state import PF_ID, PF_P, PF_PK, PF_RSVD, PF_U, PF_W, PagingState, rsvd_mask

if TYPE_CHECKING:  # annotations only: walk imports no typing machinery at run time
    from typing import Any, Protocol, Sequence

    from x86pt.state import Profile

    class EntryReader(Protocol):
        """What a walk reads tables through: one 8-byte entry at a physical address."""

        def read_u64(self, pa: int) -> int: ...

    class TableMemory(EntryReader, Protocol):
        """A walk that applies its A/D writes (update_ad) also writes entries back."""

        def write_u64(self, pa: int, value: int) -> None: ...


ACCESS_KINDS = ("read", "write", "fetch")


@dataclass(frozen=True)
class Access:
    """One memory access. `user` is CPL 3. `implicit` marks a supervisor-mode access the CPU makes
    itself (GDT/IDT/TSS reads): always a supervisor access, SMAP-checked regardless of AC."""

    kind: str = "read"
    user: bool = False
    ac: bool = False
    implicit: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ACCESS_KINDS:
            raise BadInputError(f"access must be read, write or fetch, not {self.kind!r}")

    @property
    def user_access(self) -> bool:
        return self.user and not self.implicit

    def describe(self) -> str:
        who = "implicit supervisor" if self.implicit else ("user" if self.user else "supervisor")
        return f"{who} {self.kind}" + (" AC=1" if self.ac else "")


@dataclass(frozen=True)
class Step:
    """One entry read by the walk."""

    level: Level
    entry_addr: int
    raw: int
    kind: Kind

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level.number,
            "table": self.level.table,
            "entry_addr": hex(self.entry_addr),
            "raw": f"{self.raw:#018x}",
            "kind": self.kind.value,
        }


@dataclass(frozen=True)
class Rights:
    """Effective rights of a translation (SDM §4.6.1): US and RW ANDed, XD ORed over the walk."""

    writable: bool
    user: bool
    executable: bool
    pkey: int

    def letters(self) -> str:
        return rights_letters(self.user, self.writable, self.executable)


def rights_letters(user: bool, writable: bool, executable: bool) -> str:
    """Effective rights as four letters, 'urwx' / '-r--' (every present translation reads): the
    one rights-to-text of the library."""
    return ("u" if user else "-") + "r" + ("w" if writable else "-") + ("x" if executable else "-")


@dataclass(frozen=True)
class Translation:
    va: int
    pa: int
    page_size: int
    level: int  # level of the leaf (3 = 1G, 2 = 2M, 1 = 4K)
    rights: Rights
    steps: tuple[Step, ...]
    ad_writes: tuple[tuple[int, int], ...] = ()  # (entry address, new raw value)
    outcome: str = field(default="ok", init=False)

    @property
    def leaf(self) -> Step:
        return self.steps[-1]


@dataclass(frozen=True)
class PageFault:
    va: int
    error_code: int
    cr2: int
    reason: str
    steps: tuple[Step, ...]
    level: int | None  # the level whose entry ended the walk (None: a rights fault)
    ad_writes: tuple[tuple[int, int], ...] = ()
    outcome: str = field(default="page_fault", init=False)


@dataclass(frozen=True)
class GeneralProtection:
    va: int
    error_code: int
    cr2: int | None
    reason: str
    steps: tuple[Step, ...] = ()
    outcome: str = field(default="general_protection", init=False)


Result = Translation | PageFault | GeneralProtection
# rsvd_mask (x86pt.state) is re-exported here, where the walk's other rules are.
__all__ = [
    "ACCESS_KINDS",
    "BIT_A",
    "BIT_D",
    "BIT_PS",
    "BIT_XD",
    "Access",
    "GeneralProtection",
    "PageFault",
    "Result",
    "Rights",
    "Step",
    "Translation",
    "check_rights",
    "debug_translate",
    "error_code_dont_care",
    "rights_letters",
    "rsvd_mask",
    "translate",
    "walk",
]


def _error_bits(state: PagingState, access: Access) -> int:
    code = 0
    if access.kind == "write":
        code |= PF_W
    if access.user_access:
        code |= PF_U
    if access.kind == "fetch" and (state.nxe or state.smep):
        code |= PF_ID
    return code


def check_rights(state: PagingState, rights: Rights, access: Access) -> tuple[bool, bool, str]:
    """Decide a complete translation's access (SDM §4.6, docs/paging.md §7.3 decision table).
    Returns (fault, key_denied, reason). PK is reported whenever the key denies (SDM §4.7), even if
    another rule denies too."""
    reasons = []
    user_addr = rights.user
    fetch = access.kind == "fetch"
    write = access.kind == "write"
    if access.user_access:
        if not user_addr:
            reasons.append("user access to a supervisor-mode address")
        else:
            if write and not rights.writable:
                reasons.append("user write to a read-only address")
            if fetch and not rights.executable:
                reasons.append("fetch from an execute-disabled address")
    else:
        if fetch:
            if user_addr and state.smep:
                reasons.append("SMEP: supervisor fetch from a user-mode address")
            if not rights.executable:
                reasons.append("fetch from an execute-disabled address")
        else:
            if user_addr and state.smap:
                prof = state.profile
                ac_ok = access.ac and (
                    not access.implicit
                    or (
                        prof.implicit_smap_honours_ac
                        and (not access.user or prof.implicit_smap_honours_ac_cpl3)
                    )
                )
                if not ac_ok:
                    reasons.append(
                        "SMAP: supervisor data access to a user-mode address"
                        + (" (implicit)" if access.implicit else " with AC=0")
                    )
            if write and not rights.writable and state.wp:
                reasons.append("supervisor write to a read-only address with CR0.WP=1")
    key_denied = False
    by_cpl = state.pke and state.profile.pkru_by_cpl
    if not fetch:
        if by_cpl:
            reg, regname = state.pkru, "PKRU"
        elif user_addr and state.pke:
            reg, regname = state.pkru, "PKRU"
        elif not user_addr and state.pks:
            reg, regname = state.pkrs, "PKRS"
        else:
            reg = None
        if reg is not None:
            ad = (reg >> (2 * rights.pkey)) & 1
            wd = (reg >> (2 * rights.pkey + 1)) & 1
            if ad and (access.user_access or not by_cpl):
                key_denied = True
                reasons.append(f"{regname} AD{rights.pkey}=1 denies data access")
            elif write and wd and (access.user_access or state.wp):
                key_denied = True
                reasons.append(f"{regname} WD{rights.pkey}=1 denies the write")
    return bool(reasons), key_denied, "; ".join(reasons)


def walk(
    state: PagingState, memory: TableMemory, va: int, access: Access | None = None, *, update_ad: bool = False
) -> Result:
    """Translate `va` for `access` under `state`, reading tables from `memory`.

    With `update_ad`, the A/D writes the processor makes are applied to `memory` (SDM §4.8):
    A in every entry used, D in the leaf on a successful write; a fault leaves the leaf alone and
    (profile `used`) sets A in the non-leaf entries above it. They are returned either way in
    `ad_writes`.

    The steps: the checks before any table is read (`_before_the_walk`); the entries from CR3
    down, each checked for P and reserved bits (`_reserved_fault`), the rights accumulated; the
    complete translation's rights and A/D writes (`_complete`).
    """
    access = access or Access()
    if not 0 <= va < (1 << 64):
        raise BadInputError(f"virtual address {va:#x} is not a 64-bit value")
    base_code = _error_bits(state, access)
    early = _before_the_walk(state, va, access, base_code)
    if early is not None:
        return early
    prof = state.profile
    table = state.root
    eff_rw = eff_us = 1
    eff_xd = 0
    steps: list[Step] = []
    used: list[tuple[int, int]] = []  # (entry address, raw) of entries the walk used
    phys = state.phys_mask
    for level, rsvd_table, leaf_kind, rsvd_leaf in state.walk_plan:
        e_addr = table | (((va >> level.shift) & 0x1FF) << 3)
        try:
            raw = memory.read_u64(e_addr)
        except PhysicalAddressError:
            raw = _unbacked(prof, level, e_addr, va)
        if leaf_kind is not None and raw & BIT_PS:
            kind, rsvd, is_leaf = leaf_kind, rsvd_leaf, True
        else:
            kind, rsvd, is_leaf = level.table_kind, rsvd_table, level.number == 1
        steps.append(Step(level, e_addr, raw, kind))
        if not raw & 1:
            return _fault(
                prof,
                memory,
                va,
                base_code,
                f"{kind.sdm_name} not present",
                level.number,
                steps,
                used,
                (),
                update_ad,
            )
        if raw & rsvd or (kind is Kind.PDPTE_1G and prof.a_on_1g_leaf_before_checks):
            fault = _reserved_fault(
                state, memory, va, base_code, kind, level, e_addr, raw, rsvd, steps, used, update_ad
            )
            if fault is not None:
                return fault
        eff_rw &= (raw >> 1) & 1
        eff_us &= (raw >> 2) & 1
        eff_xd |= raw >> 63
        if is_leaf:
            break
        used.append((e_addr, raw))
        table = raw & phys
    rights = Rights(bool(eff_rw), bool(eff_us), not (state.nxe and eff_xd), (raw & PK_MASK) >> PK_SHIFT)
    return _complete(
        state, memory, va, access, base_code, rights, kind, level, e_addr, raw, steps, used, update_ad
    )


def _before_the_walk(state: PagingState, va: int, access: Access, base_code: int) -> Result | None:
    """What happens before any table is read: #GP(0) for a non-canonical address (SDM §6.15 /
    §3.3.7.1: no table read, CR2 untouched), and the profile's CPL3 blind ranges."""
    prof = state.profile
    if not state.canonical(va):
        return GeneralProtection(
            va,
            0,
            va if prof.gp_writes_cr2 else None,
            f"non-canonical address for {state.va_bits}-bit linear addresses",
        )
    if prof.cpl3_blind_ranges and access.user_access:
        for start, end in prof.cpl3_blind_ranges:
            if start <= va < end:
                code = base_code | (PF_ID if access.kind == "fetch" else 0)
                return PageFault(
                    va,
                    code,
                    va,
                    f"profile {prof.name}: CPL3 accesses to "
                    f"{start:#x}-{end:#x} never reach the guest's tables",
                    (),
                    None,
                )
    return None


def _unbacked(prof: Profile, level: Level, e_addr: int, va: int) -> int:
    """An entry outside the image: what the profile reads there (zeros, ones), or an error."""
    if prof.unbacked_read == "zero":
        return 0
    if prof.unbacked_read == "ones":
        return (1 << 64) - 1
    raise PhysicalAddressError(
        f"{level.table} entry at {e_addr:#x} (for va {va:#x}) lies outside the image", e_addr
    ) from None


def _reserved_fault(
    state: PagingState,
    memory: TableMemory,
    va: int,
    base_code: int,
    kind: Kind,
    level: Level,
    e_addr: int,
    raw: int,
    rsvd: int,
    steps: list[Step],
    used: list[tuple[int, int]],
    update_ad: bool,
) -> PageFault | None:
    """The #PF with RSVD for a present entry with reserved bits set, or None when none are."""
    prof = state.profile
    code = base_code | PF_RSVD | (PF_P if prof.rsvd_sets_p else 0)
    if kind is Kind.PDPTE_1G and prof.a_on_1g_leaf_before_checks:
        # QEMU/unicorn: the high reserved bits are checked, then A is set, then the 1G frame
        # alignment bits and the rights are checked (docs/paging.md §12.1).
        low = masks_for(kind, state.m, state.vendor).rsvd & ((1 << 30) - 1)
        if raw & (rsvd & ~low):
            bad = raw & rsvd & ~low
            return _fault(
                prof,
                memory,
                va,
                code,
                f"reserved bits {bad:#x} set in {kind.sdm_name}",
                level.number,
                steps,
                used,
                (),
                update_ad,
            )
        if raw & low:
            return _fault(
                prof,
                memory,
                va,
                code,
                f"reserved bits {raw & low:#x} set in {kind.sdm_name}",
                level.number,
                steps,
                used,
                [(e_addr, raw)],
                update_ad,
            )
        return None
    return _fault(
        prof,
        memory,
        va,
        code,
        f"reserved bits {raw & rsvd:#x} set in {kind.sdm_name}",
        level.number,
        steps,
        used,
        (),
        update_ad,
    )


def _fault(
    prof: Profile,
    memory: TableMemory,
    va: int,
    code: int,
    reason: str,
    level: int | None,
    steps: list[Step],
    used: list[tuple[int, int]],
    extra_a: Sequence[tuple[int, int]],
    update_ad: bool,
) -> PageFault:
    """A #PF ending the walk, with the A writes the profile makes on a faulting walk: in the
    non-leaf entries used (profile `used`) and in `extra_a`."""
    writes: list[tuple[int, int]] = []
    if prof.a_on_faulting_walk == "used":
        writes = [(a, r | BIT_A) for a, r in used if not r & BIT_A]
    writes += [(a, r | BIT_A) for a, r in extra_a if not r & BIT_A]
    if update_ad:
        for a, r in writes:
            memory.write_u64(a, r)
    return PageFault(va, code, va, reason, tuple(steps), level, tuple(writes))


def _complete(
    state: PagingState,
    memory: TableMemory,
    va: int,
    access: Access,
    base_code: int,
    rights: Rights,
    kind: Kind,
    level: Level,
    e_addr: int,
    leaf_raw: int,
    steps: list[Step],
    used: list[tuple[int, int]],
    update_ad: bool,
) -> Result:
    """A complete translation: its rights decide the access (a #PF with P, and PK when the key
    denies); else the physical address and the A/D writes (A in every entry used, D in the leaf
    on a write)."""
    prof = state.profile
    denied, key_denied, reason = check_rights(state, rights, access)
    if denied:
        extra = [(e_addr, leaf_raw)] if kind is Kind.PDPTE_1G and prof.a_on_1g_leaf_before_checks else []
        return _fault(
            prof,
            memory,
            va,
            base_code | PF_P | (PF_PK if key_denied else 0),
            reason,
            None,
            steps,
            used,
            extra,
            update_ad,
        )
    size = kind.page_size
    assert size is not None  # a leaf kind: 4K, 2M or 1G
    frame = leaf_raw & state.phys_mask & ~(size - 1)
    pa = frame | (va & (size - 1))
    writes = [(a, r | BIT_A) for a, r in used if not r & BIT_A]
    new_leaf = leaf_raw | BIT_A | (BIT_D if access.kind == "write" else 0)
    if new_leaf != leaf_raw:
        writes.append((e_addr, new_leaf))
    if update_ad:
        for a, r in writes:
            memory.write_u64(a, r)
    return Translation(va, pa, size, level.number, rights, tuple(steps), tuple(writes))


def error_code_dont_care(state: PagingState, va: int, access: Access) -> int:
    """Error-code bits an oracle of `state.profile` may report either way for this access (0 for
    the manuals' profiles): P|RSVD inside the profile's CPL3 blind ranges."""
    if state.profile.cpl3_blind_ranges and access.user_access:
        for start, end in state.profile.cpl3_blind_ranges:
            if start <= va < end:
                return PF_P | PF_RSVD
    return 0


def debug_translate(state: PagingState, memory: EntryReader, va: int) -> tuple[int, int] | None:
    """The translation a debugger's walker reports (QEMU's `gva2gpa`/`x`, docs/paging.md §12.1/§2.2 of
    docs/oracles.md §5): P and PS only — no rights, no reserved-bit checks, no A/D — and the
    address taken from bits 51:12 of the leaf, so reserved bits pass into it. (pa, page size) or
    None for a non-canonical or unmapped address."""
    if not state.canonical(va):
        return None
    table = state.cr3 & ADDR_MASK_52
    for lv in state.levels:
        raw = memory.read_u64(table | (lv.index(va) << 3))
        if not raw & 1:
            return None
        if lv.number == 1 or (lv.leaf_kind is not None and raw & BIT_PS):
            size = 1 << lv.shift
            return (raw & ADDR_MASK_52 & ~(size - 1)) | (va & (size - 1)), size
        table = raw & ADDR_MASK_52
    return None


def translate(state: PagingState, memory: TableMemory, va: int, access: Access | None = None) -> int | None:
    """The physical address of `va`, or None when the access faults."""
    r = walk(state, memory, va, access)
    return r.pa if isinstance(r, Translation) else None
