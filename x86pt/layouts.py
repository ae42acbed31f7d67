"""construct declarations of every entry kind, generated from the field table in `fields`.

Only declarations and the per-entry encode/decode API live here (cf. pyelftools' structs.py). A
64-bit entry is stored little-endian, so the layout is ByteSwapped(BitStruct(...)) with fields
from bit 63 down to bit 0 (plain BitStruct on the raw bytes would read byte 0 first).
construct is slow per entry (~25 µs); walks and scans use the shift/mask path `fields.decode_fast`,
and tests prove both paths agree.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import construct as cs

from x86pt.errors import BadInputError
from x86pt.fields import Kind, Role, fields_for


@lru_cache(maxsize=None)
def layout(kind: Kind, maxphyaddr: int = 52, vendor: str = "intel") -> cs.Construct:
    subcons = []
    for f in fields_for(Kind(kind), maxphyaddr, vendor):
        if f.width == 1 and f.role in (Role.FLAG, Role.PS, Role.PAT, Role.XD):
            subcons.append(f.name / cs.Flag)
        else:
            subcons.append(f.name / cs.BitsInteger(f.width))
    return cs.ByteSwapped(cs.BitStruct(*subcons))


def _plain(container: Any) -> dict[str, int]:
    return {k: int(v) for k, v in container.items() if not k.startswith("_")}


def decode(raw: int | bytes, kind: Kind, maxphyaddr: int = 52, vendor: str = "intel") -> dict[str, int]:
    """Decode one entry with construct. Flags come back as 0/1 ints, like `decode_fast`."""
    data = raw if isinstance(raw, (bytes, bytearray)) else int(raw).to_bytes(8, "little")
    if len(data) != 8:
        raise BadInputError(f"an entry is 8 bytes, got {len(data)}")
    try:
        return _plain(layout(Kind(kind), maxphyaddr, vendor).parse(bytes(data)))
    except cs.ConstructError as e:  # one boundary for construct's errors
        raise BadInputError(f"cannot decode {Kind(kind).value}: {e}") from None


def encode(values: dict[str, int], kind: Kind, maxphyaddr: int = 52, vendor: str = "intel") -> int:
    """Encode one entry with construct; fields not given are 0."""
    kind = Kind(kind)
    fs = fields_for(kind, maxphyaddr, vendor)
    names = {f.name for f in fs}
    unknown = sorted(set(values) - names)
    if unknown:
        raise BadInputError(
            f"{kind.value} has no field {unknown[0]!r} (fields: {', '.join(f.name for f in fs)})"
        )
    full = {}
    for f in fs:
        v = int(values.get(f.name, 0))
        if not 0 <= v < (1 << f.width):
            raise BadInputError(f"{kind.value}.{f.name}={v:#x} does not fit in {f.width} bit(s)")
        full[f.name] = bool(v) if f.width == 1 and f.role is not Role.IGN and f.role is not Role.RSVD else v
    try:
        return int.from_bytes(layout(kind, maxphyaddr, vendor).build(full), "little")
    except (cs.ConstructError, KeyError) as e:
        raise BadInputError(f"cannot encode {kind.value}: {e}") from None
