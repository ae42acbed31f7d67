"""An image = a physical memory source + the paging state to walk it with. Registers come from the
ELF core's notes when present and are overridden by command-line values."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from x86pt.cliargs import add_state_args  # noqa: F401  (re-exported: callers import it from here)
from x86pt.errors import BadInputError, X86ptError
from x86pt.memory import MemoryBase, open_memory
from x86pt.numbers import parse_int
from x86pt.state import (CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE,
                         PagingState, profile_named)


@dataclass
class Image:
    memory: MemoryBase
    state: PagingState
    path: str
    notes: tuple[str, ...] = ()     # what was assumed (e.g. EFER not in the core)

    def close(self) -> None:
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def state_from_args(args: argparse.Namespace, regs: dict[str, int] | None = None,
                    profile_hint: str | None = None,
                    source: str = "the image") -> tuple[PagingState, tuple[str, ...]]:
    """The paging state from the image's registers (`regs`, `profile_hint`) overridden by the
    command line. An error caused by what the image says names `source`."""
    regs = dict(regs or {})
    from_image = [r for r in ("cr0", "cr3", "cr4", "efer", "pkru", "pkrs", "maxphyaddr")
                  if r in regs and getattr(args, r, None) is None]
    notes: list[str] = []
    for reg in ("cr0", "cr3", "cr4", "efer", "pkru", "pkrs"):
        v = getattr(args, reg, None)
        if v is not None:
            regs[reg] = parse_int(v, f"--{reg}", hi=(1 << 32) - 1 if reg in ("pkru", "pkrs") else (1 << 64) - 1)
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
        prof = profile_named(getattr(args, "profile", None) or profile_hint or "intel")
    except BadInputError as e:
        raise BadInputError(f"{source}: {e}; the image names it, pass --profile") from None
    m = getattr(args, "maxphyaddr", None)
    if m is not None:
        m = parse_int(m, "--maxphyaddr", lo=32, hi=52)
    elif "maxphyaddr" in regs:
        m = regs["maxphyaddr"]
    try:
        st = PagingState(cr0=regs["cr0"], cr3=regs["cr3"], cr4=regs["cr4"], efer=regs["efer"],
                         pkru=regs.get("pkru", 0), pkrs=regs.get("pkrs", 0), profile=prof,
                         maxphyaddr=m)
    except BadInputError as e:
        culprits = [r for r in from_image if r in str(e).lower()]   # registers the error names
        if not culprits:
            raise
        raise BadInputError(f"{source}: {e}; the image's notes gave {', '.join(culprits)} "
                            f"(override with --{culprits[0]} N)") from None
    try:
        st.check()
    except X86ptError as e:
        if not from_image:
            raise
        raise type(e)(f"{source}: {e}") from None
    return st, tuple(notes)


def open_image(path: str, args: argparse.Namespace | None = None) -> Image:
    args = args or argparse.Namespace()
    mem = open_memory(path, getattr(args, "image_format", None))
    try:
        st, notes = state_from_args(args, getattr(mem, "control_registers", {}),
                                    getattr(mem, "profile_name", None), path)
    except BaseException:
        mem.close()
        raise
    return Image(mem, st, path, notes)
