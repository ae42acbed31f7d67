"""Disassembly of the probe guest with capstone: the listing of the shipped blobs (with the
symbols build.sh recorded) and the decoding of one instruction at a guest RIP, for mismatch
reports. `python3 -m harness.guest.listing [RIP]`."""

from __future__ import annotations

import sys

import capstone

import harness.guest as guest


def _cs() -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def _regions() -> list[tuple[int, bytes]]:
    return [
        (guest.KBASE + guest.HARNESS_GPA, guest.blob("h_main.bin")),
        (guest.KBASE + guest.USTUB_GPA, guest.blob("h_ustub.bin")),
    ]


def listing(code_only: bool = True) -> str:
    """objdump-like text of the harness code and the user stubs. Data (GDT, TSS) follows the
    'isr_table' stubs; with code_only the listing stops at the GDT."""
    syms = guest.symbols()
    names: dict[int, list[str]] = {}
    for n, a in syms.items():
        names.setdefault(a, []).append(n)
    stop = syms.get("gdt")
    lines: list[str] = []
    md = _cs()
    for base, code in _regions():
        end = base + len(code)
        if code_only and stop is not None and base <= stop < end:
            code = code[: stop - base]
        for insn in md.disasm(code, base):
            for n in names.get(insn.address, ()):
                lines.append(f"{insn.address:016x} <{n}>:")
            lines.append(
                f"  {insn.address:016x}:  {insn.bytes.hex(' '):<30} {insn.mnemonic} {insn.op_str}".rstrip()
            )
    return "\n".join(lines) + "\n"


def symbol_at(rip: int) -> str:
    """'name+0xoff' for a harness RIP, '' when the RIP is outside the harness blobs."""
    if not any(b <= rip < b + len(c) for b, c in _regions()):
        return ""
    best = max(((a, n) for n, a in guest.symbols().items() if a <= rip), default=None)
    if best is None:
        return ""
    a, n = best
    return n if a == rip else f"{n}+{rip - a:#x}"


def decode_at(rip: int, code: bytes | None = None) -> str:
    """The instruction at guest `rip`: from the shipped blobs when the RIP is in the harness, else
    from `code` (bytes read at that RIP from the image). '' when nothing is known."""
    for base, blob in _regions():
        if base <= rip < base + len(blob):
            code = blob[rip - base : rip - base + 16]
            break
    if not code:
        return ""
    for insn in _cs().disasm(code, rip, count=1):
        where = symbol_at(rip)
        return f"{insn.mnemonic} {insn.op_str}".strip() + (f"  <{where}>" if where else "")
    return f"(bad instruction: {code[:16].hex(' ')})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.stdout.write(listing())
        return 0
    for a in argv:
        try:
            rip = int(a, 0)
        except ValueError:
            print(f"listing: error: not a number: {a!r}", file=sys.stderr)
            return 2
        print(f"{rip:#018x}: {decode_at(rip) or '(outside the harness)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
