"""Numbers as users type them: decimal or 0x-hex, with optional _ separators and K/M/G/T suffixes
where sizes are asked for."""

from x86pt.errors import BadInputError

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _shown(text: object) -> str:
    """The value for an error message: repr, cut to 40 characters (a 5000-digit number or a long
    string stays one short line). Ints are shown by their length past 40 digits, since
    converting one to text beyond 4300 digits raises."""
    if isinstance(text, int) and not isinstance(text, bool) and text.bit_length() > 128:
        return f"<a {text.bit_length()}-bit integer>"
    r = repr(text)
    return r if len(r) <= 40 else r[:37] + "..."


def parse_int(
    text: str | int, what: str = "number", *, lo: int | None = 0, hi: int | None = (1 << 64) - 1
) -> int:
    """Parse `text` as decimal or 0x-hex. Raise BadInputError naming `what` on anything else."""
    shown = _shown(text)
    if isinstance(text, bool):
        raise BadInputError(f"bad {what}: {shown} (expected decimal or 0x-hex)")
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().replace("_", "")
        try:
            if s.lower().startswith(("0x", "-0x")):
                value = int(s, 16)
            elif s.lower().startswith("0b"):
                value = int(s, 2)
            else:
                value = int(s, 10)
        except ValueError:
            raise BadInputError(f"bad {what}: {shown} (expected decimal or 0x-hex)") from None
    if lo is not None and value < lo:
        raise BadInputError(f"bad {what}: {shown} is below {lo:#x}")
    if hi is not None and value > hi:
        raise BadInputError(f"bad {what}: {shown} is above {hi:#x}")
    return value


def parse_size(text: str | int, what: str = "size", *, hi: int = 1 << 64) -> int:
    """A byte count: decimal, 0x-hex, or a number with a K/M/G/T suffix (binary units), at most
    `hi` (default 2^64, the whole address space)."""
    if isinstance(text, int):
        return parse_int(text, what, hi=hi)
    s = str(text).strip()
    if s and s[-1].lower() in _SUFFIX and not s.lower().startswith("0x"):
        value = parse_int(s[:-1], what, hi=None) * _SUFFIX[s[-1].lower()]
    elif s.lower().endswith("ib") and len(s) > 2 and s[-3].lower() in _SUFFIX:
        value = parse_int(s[:-3], what, hi=None) * _SUFFIX[s[-3].lower()]
    else:
        value = parse_int(s, what, hi=None)
    if value > hi:
        raise BadInputError(f"bad {what}: {_shown(text)} is above {hi:#x}")
    return value
