"""Pure functions that turn entries and walk results into text or JSON-ready dicts (cf.
pyelftools' descriptions.py). They never read memory."""

from __future__ import annotations

from functools import lru_cache

from x86pt.fields import BIT_P, LEVELS, PK_MASK, PK_SHIFT, Kind, Role, decode_fast, fields_for

TYPE_CHECKING = False
if TYPE_CHECKING:  # x86pt.state and x86pt.walk load on first use: `x86pt decode` needs neither
    from typing import Any  # nor typing (about 2 ms at start-up)

    from x86pt.state import PagingState
    from x86pt.walk import Result, Step

# The order flags are printed in: the low attribute bits, then PS, G, PAT, XD.
_FLAG_ORDER = ("p", "rw", "us", "pwt", "pcd", "a", "d", "ps", "g", "pat", "xd")


def decode_entry(
    raw: int, kind: Kind, maxphyaddr: int = 52, vendor: str = "intel", state: PagingState | None = None
) -> dict[str, Any]:
    """Every field of the entry, with its bits, role and value; reserved bits that are set are
    listed (with `state`, the walk-time rules — XD without NXE, PS without 1G pages — too)."""
    fields: list[dict[str, Any]] = []
    flagged = 0
    for f in fields_for(kind, maxphyaddr, vendor):
        v = f.get(raw)
        item: dict[str, Any] = {
            "name": f.name,
            "bits": f"{f.hi}:{f.lo}" if f.hi != f.lo else str(f.lo),
            "role": f.role.value,
            "value": v,
        }
        if f.role is Role.ADDR:
            item["address"] = hex(v << f.lo)
        if f.role is Role.RSVD and v:
            flagged |= f.get(raw) << f.lo
        fields.append(item)
    if state is not None:
        from x86pt.fields import LEVEL_OF_KIND
        from x86pt.state import rsvd_mask

        flagged = raw & rsvd_mask(state, LEVEL_OF_KIND[kind], kind)
    present = bool(raw & BIT_P)
    return {
        "kind": kind.value,
        "name": kind.sdm_name,
        "raw": f"{raw:#018x}",
        "present": present,
        "reserved_set": hex(flagged) if flagged and present else None,
        "reserved_set_if_present": hex(flagged) if flagged else None,
        "fields": fields,
    }


@lru_cache(maxsize=None)
def _flag_masks(kind: Kind) -> tuple[tuple[int, str], ...]:
    """(in-place mask, name) of the flags `kind` has, from the field table: a bit that is reserved
    in this kind (PS in a PML4E) or another field (bit 7 of a PTE is PAT, not PS) is not a flag."""
    fields = {f.name: f for f in fields_for(kind) if f.role is not Role.RSVD}
    return tuple((fields[n].mask, n) for n in _FLAG_ORDER if n in fields)


def entry_flags(raw: int, kind: Kind, *, lower: bool = False, pkey: bool = True) -> str:
    """The flags set in an entry of `kind` as words, e.g. 'P RW US A D XD PK=1' — the library's
    one flag-to-text. `lower` gives 'p rw us a d xd' (the JSON/CSV column, the spelling `build`
    reads); `pkey` adds a leaf's non-zero protection key."""
    words = [name for mask, name in _flag_masks(Kind(kind)) if raw & mask]
    if not lower:
        words = [w.upper() for w in words]
    if pkey and Kind(kind).is_leaf and raw & PK_MASK:
        words.append(f"PK={(raw & PK_MASK) >> PK_SHIFT}")
    return " ".join(words)


def leaf_flags(raw: int, level: int) -> str:
    """entry_flags of a leaf at SDM `level` (1: 4K PTE, 2: 2M PDE, 3: 1G PDPTE), lower case, no key."""
    lv = LEVELS[level]
    return entry_flags(raw, lv.leaf_kind or lv.table_kind, lower=True, pkey=False)


def render_decode(d: dict[str, Any]) -> str:
    lines = [f"{d['name']}  {d['raw']}" + ("" if d["present"] else "  (not present: bits 63:1 ignored)")]
    for f in d["fields"]:
        mark = ""
        if f["role"] == "reserved" and f["value"]:
            mark = "  <- RESERVED BIT SET" + ("" if d["present"] else " (ignored: P=0)")
        val = f.get("address") or (
            hex(f["value"])
            if f["value"] > 1 or f["role"] in ("ignored", "reserved", "pk")
            else str(f["value"])
        )
        lines.append(f"  {f['bits']:>6}  {f['name']:<8} {val:<20} {f['role']}{mark}")
    if d["reserved_set"]:
        lines.append(f"  reserved bits set: {d['reserved_set']} -> #PF with RSVD on any walk through it")
    return "\n".join(lines)


def error_code_names(code: int) -> str:
    from x86pt.state import PF_ID, PF_P, PF_PK, PF_RSVD, PF_U, PF_W

    names = [
        n
        for bit, n in (
            (PF_P, "P"),
            (PF_W, "W"),
            (PF_U, "U"),
            (PF_RSVD, "RSVD"),
            (PF_ID, "I/D"),
            (PF_PK, "PK"),
        )
        if code & bit
    ]
    return "|".join(names) if names else "0"


def result_json(r: Result) -> dict[str, Any]:
    from x86pt.walk import PageFault, Translation

    base: dict[str, Any] = {"va": hex(r.va), "outcome": r.outcome}
    if isinstance(r, Translation):
        base.update(
            pa=hex(r.pa),
            page_size=r.page_size,
            level=r.level,
            error_code=None,
            cr2=None,
            rights={
                "user": r.rights.user,
                "writable": r.rights.writable,
                "executable": r.rights.executable,
                "pkey": r.rights.pkey,
            },
        )
    elif isinstance(r, PageFault):
        base.update(pa=None, page_size=None, error_code=r.error_code, cr2=hex(r.cr2), reason=r.reason)
    else:
        base.update(
            pa=None,
            page_size=None,
            error_code=r.error_code,
            cr2=None if r.cr2 is None else hex(r.cr2),
            reason=r.reason,
        )
    base["steps"] = [
        s.to_json() | {"flags": entry_flags(s.raw, s.kind), "fields": decode_fast(s.raw, s.kind)}
        for s in r.steps
    ]
    return base


def describe_step(step: Step, state: PagingState | None = None, va: int | None = None) -> str:
    """One walk step on one line: table[index] @ entry address = raw, kind, target, flags, notes."""
    from x86pt.fields import masks_for

    idx = "" if va is None else f"[{(va >> step.level.shift) & 0x1FF:3d}]"
    m = state.m if state is not None else 52
    vendor = state.vendor if state is not None else "intel"
    kind = step.kind
    target = step.raw & masks_for(kind, m, vendor).addr
    arrow = f"-> {'frame' if kind.is_leaf else 'table'} {target:#x}" if step.raw & 1 else "not present"
    notes = []
    if step.raw & 1:
        pk = (step.raw & PK_MASK) >> PK_SHIFT
        if kind.is_leaf and pk:
            notes.append(f"pkey={pk}")
        avl = (step.raw >> 9) & 7
        if avl:
            notes.append(f"avl={avl:#x}")
        if state is not None:
            from x86pt.state import rsvd_mask

            bad = step.raw & rsvd_mask(state, step.level, kind)
            if bad:
                notes.append(f"RESERVED {bad:#x}")
    return (
        f"  {step.level.table:<4}{idx} @ {step.entry_addr:#014x} = {step.raw:#018x}  "
        f"{kind.sdm_name:<16} {arrow:<24} {entry_flags(step.raw, kind)}"
        + ("  " + " ".join(notes) if notes else "")
    )


def render_result(r: Result, *, steps: bool = False, state: PagingState | None = None) -> str:
    from x86pt.walk import GeneralProtection, PageFault, Translation

    lines = []
    if steps:
        for s in r.steps:
            lines.append(describe_step(s, state, r.va))
    if isinstance(r, Translation):
        size = {1 << 12: "4K", 1 << 21: "2M", 1 << 30: "1G"}[r.page_size]
        rt = r.rights
        lines.append(
            f"{r.va:#018x} -> {r.pa:#x}  ({size} page, {'user' if rt.user else 'supervisor'}, "
            f"{'rw' if rt.writable else 'ro'}, {'x' if rt.executable else 'nx'}"
            + (f", pkey {rt.pkey}" if rt.pkey else "")
            + ")"
        )
    elif isinstance(r, PageFault):
        lines.append(
            f"{r.va:#018x}: #PF error code {r.error_code:#x} ({error_code_names(r.error_code)}), "
            f"CR2={r.cr2:#x}: {r.reason}"
        )
    elif isinstance(r, GeneralProtection):
        lines.append(f"{r.va:#018x}: #GP({r.error_code}): {r.reason}")
    return "\n".join(lines)
