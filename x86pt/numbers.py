"""Numbers as users type them: decimal or 0x-hex, with optional _ separators and K/M/G/T suffixes
where sizes are asked for."""
from x86pt.errors import BadInputError

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_int(text: str | int, what: str = "number", *, lo: int | None = 0,
              hi: int | None = (1 << 64) - 1) -> int:
    """Parse `text` as decimal or 0x-hex. Raise BadInputError naming `what` on anything else."""
    if isinstance(text, bool):
        raise BadInputError(f"bad {what}: {text!r} (expected decimal or 0x-hex)")
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
            raise BadInputError(f"bad {what}: {text!r} (expected decimal or 0x-hex)") from None
    if lo is not None and value < lo:
        raise BadInputError(f"bad {what}: {text!r} is below {lo:#x}")
    if hi is not None and value > hi:
        raise BadInputError(f"bad {what}: {text!r} is above {hi:#x}")
    return value


def parse_size(text: str | int, what: str = "size") -> int:
    """A byte count: decimal, 0x-hex, or a number with a K/M/G/T suffix (binary units)."""
    if isinstance(text, int):
        return parse_int(text, what)
    s = str(text).strip()
    if s and s[-1].lower() in _SUFFIX and not s.lower().startswith("0x"):
        return parse_int(s[:-1], what) * _SUFFIX[s[-1].lower()]
    if s.lower().endswith("ib") and len(s) > 2 and s[-3].lower() in _SUFFIX:
        return parse_int(s[:-3], what) * _SUFFIX[s[-3].lower()]
    return parse_int(s, what)
