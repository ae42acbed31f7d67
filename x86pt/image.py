"""An image = a physical memory source + the paging state to walk it with. Registers come from the
ELF core's notes when present and are overridden by command-line values."""

from __future__ import annotations

from dataclasses import dataclass

from x86pt.errors import BadInputError, X86ptError
from x86pt.memory import MemoryBase, open_memory
from x86pt.numbers import parse_int
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PagingState,
    profile_named,
)


@dataclass
class Image:
    memory: MemoryBase
    state: PagingState
    path: str
    notes: tuple[str, ...] = ()  # what was assumed (e.g. EFER not in the core)

    def close(self) -> None:
        self.memory.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


REGISTERS = ("cr0", "cr3", "cr4", "efer", "pkru", "pkrs")


def paging_state(
    regs: dict[str, int] | None = None,
    *,
    overrides: dict[str, int | str | None] | None = None,
    maxphyaddr: int | str | None = None,
    profile: str | None = None,
    profile_hint: str | None = None,
    source: str = "the image",
) -> tuple[PagingState, tuple[str, ...]]:
    """The paging state from an image's registers (`regs`, `profile_hint`), each overridden by a
    value in `overrides` (cr0 cr3 cr4 efer pkru pkrs: int or text as users type it), `maxphyaddr`
    and `profile`. Returns the state and what was assumed. An error caused by what the image
    says names `source`."""
    regs = dict(regs or {})
    given = {r: v for r, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(REGISTERS))
    if unknown:
        raise BadInputError(f"unknown register {unknown[0]!r} (one of {', '.join(REGISTERS)})")
    from_image = [
        r
        for r in (*REGISTERS, "maxphyaddr")
        if r in regs and r not in given and not (r == "maxphyaddr" and maxphyaddr is not None)
    ]
    notes: list[str] = []
    for reg in REGISTERS:
        v = given.get(reg)
        if v is not None:
            regs[reg] = parse_int(
                v, f"--{reg}", hi=(1 << 32) - 1 if reg in ("pkru", "pkrs") else (1 << 64) - 1
            )
    if "cr3" not in regs:
        raise BadInputError(f"no CR3: {source} has no CPU-state note; pass --cr3")
    if "cr0" not in regs:
        regs["cr0"] = CR0_PE | CR0_PG | CR0_WP
        notes.append("CR0 not given: assuming PE|PG|WP")
    if "cr4" not in regs:
        regs["cr4"] = CR4_PAE
        notes.append("CR4 not given: assuming PAE only")
    if "efer" not in regs:
        regs["efer"] = EFER_LME | EFER_LMA | EFER_NXE
        notes.append("EFER not in the image: assuming LME|LMA|NXE (pass --efer)")
    try:
        prof = profile_named(profile or profile_hint or "intel")
    except BadInputError as e:
        raise BadInputError(f"{source}: {e}; the image names it, pass --profile") from None
    m = maxphyaddr
    if m is not None:
        m = parse_int(m, "--maxphyaddr", lo=32, hi=52)
    elif "maxphyaddr" in regs:
        m = regs["maxphyaddr"]
    try:
        st = PagingState(
            cr0=regs["cr0"],
            cr3=regs["cr3"],
            cr4=regs["cr4"],
            efer=regs["efer"],
            pkru=regs.get("pkru", 0),
            pkrs=regs.get("pkrs", 0),
            profile=prof,
            maxphyaddr=m,
        )
    except BadInputError as e:
        culprits = [r for r in from_image if r in str(e).lower()]  # registers the error names
        if not culprits:
            raise
        raise BadInputError(
            f"{source}: {e}; the image's notes gave {', '.join(culprits)} (override with --{culprits[0]} N)"
        ) from None
    try:
        st.check()
    except X86ptError as e:
        if not from_image:
            raise
        raise type(e)(f"{source}: {e}") from None
    return st, tuple(notes)


def open_image(
    path: str,
    *,
    image_format: str | None = None,
    cr0: int | str | None = None,
    cr3: int | str | None = None,
    cr4: int | str | None = None,
    efer: int | str | None = None,
    pkru: int | str | None = None,
    pkrs: int | str | None = None,
    maxphyaddr: int | str | None = None,
    profile: str | None = None,
) -> Image:
    """Open the image at `path` (format detected unless `image_format`: elf, lime, raw) with the
    paging state its notes give, each register overridden by the value passed here (an int, or
    text as users type it: decimal or 0x-hex). A raw image needs at least `cr3`."""
    mem = open_memory(path, image_format)
    try:
        st, notes = paging_state(
            getattr(mem, "control_registers", {}),
            overrides={"cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer, "pkru": pkru, "pkrs": pkrs},
            maxphyaddr=maxphyaddr,
            profile=profile,
            profile_hint=getattr(mem, "profile_name", None),
            source=path,
        )
    except BaseException:
        mem.close()
        raise
    return Image(mem, st, path, notes)
