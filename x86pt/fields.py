"""One table of level facts and one table of entry fields (Intel SDM Vol. 3A §4.5, tables 4-15
to 4-20; AMD APM Vol. 2 §5.3). Everything else — construct layouts, the shift/mask fast path, the
walker, dump renderers, the CPA model — is generated from or reads these two tables.

A field's bit range may depend on MAXPHYADDR (the address field ends at bit M-1, bits 51:M are
reserved) and on the vendor (AMD reserves bit 8 of PML4E/PML5E). `fields_for()` resolves both and
returns a list that covers bits 63..0 exactly once.
"""

from __future__ import annotations

import enum
from collections import namedtuple
from functools import lru_cache

from x86pt.errors import BadInputError

TYPE_CHECKING = False  # mypy reads any name TYPE_CHECKING as true
if TYPE_CHECKING:
    from typing import NamedTuple


class Kind(str, enum.Enum):
    """Entry kinds. PDPTE/PDE that map the next table and those that are leaves (PS=1) are
    different formats, so they are different kinds."""

    PML5E = "pml5e"
    PML4E = "pml4e"
    PDPTE = "pdpte"  # PDPTE referencing a page directory (PS=0)
    PDPTE_1G = "pdpte1g"  # PDPTE mapping a 1-GByte page (PS=1)
    PDE = "pde"  # PDE referencing a page table (PS=0)
    PDE_2M = "pde2m"  # PDE mapping a 2-MByte page (PS=1)
    PTE = "pte"  # PTE mapping a 4-KByte page

    @property
    def is_leaf(self) -> bool:
        return self in (Kind.PDPTE_1G, Kind.PDE_2M, Kind.PTE)

    @property
    def level(self) -> "Level":
        return LEVEL_OF_KIND[self]

    @property
    def page_size(self) -> int | None:
        """Bytes mapped by a leaf of this kind; None for entries that reference a table."""
        return {Kind.PDPTE_1G: 1 << 30, Kind.PDE_2M: 1 << 21, Kind.PTE: 1 << 12}.get(self)

    @property
    def frame_shift(self) -> int:
        """Lowest address bit of what the entry's address field points at."""
        return {Kind.PDPTE_1G: 30, Kind.PDE_2M: 21}.get(self, 12)

    @property
    def sdm_name(self) -> str:
        return _SDM_NAMES[self]


_SDM_NAMES = {
    Kind.PML5E: "PML5E",
    Kind.PML4E: "PML4E",
    Kind.PDPTE: "PDPTE (table)",
    Kind.PDPTE_1G: "PDPTE (1GB page)",
    Kind.PDE: "PDE (table)",
    Kind.PDE_2M: "PDE (2MB page)",
    Kind.PTE: "PTE",
}


# Level, Field and Masks are named tuples, not dataclasses: importing `dataclasses` (inspect, ast,
# dis, tokenize) and generating three classes' methods would cost `x86pt decode` several ms at
# start-up (docs/startup.md). Attributes are read-only either way. Their tuple bases are built with
# collections.namedtuple, not typing.NamedTuple: importing typing costs `x86pt decode` about 2 ms.
# mypy reads the typed declarations under TYPE_CHECKING; tests/test_startup.py checks that they name
# the same fields in the same order with the same defaults as the bases built at run time.
if TYPE_CHECKING:

    class _Level(NamedTuple):
        number: int
        table: str  # SDM table name
        shift: int  # lowest VA bit of this level's index; one entry spans 1 << shift bytes
        table_kind: Kind  # kind of an entry of this level when PS=0 (for level 1: the 4K leaf)
        leaf_kind: Kind | None  # kind of an entry of this level when PS=1, if PS makes a leaf here
        linux4: str  # Linux name of the level with 4-level paging (p4d folded into pgd)
        linux5: str  # Linux name with 5-level paging

    class _Field(NamedTuple):
        name: str
        hi: int
        lo: int
        role: Role
        doc: str = ""

    class _Masks(NamedTuple):
        kind: Kind
        addr: int  # in-place mask of the address field
        rsvd: int  # OR of the RSVD fields (state-dependent rules like XD/NXE are added by walk)
        shifts: tuple[tuple[str, int, int], ...]  # (name, lo, width-mask) for decode_fast

else:
    _Level = namedtuple("_Level", "number table shift table_kind leaf_kind linux4 linux5")
    _Field = namedtuple("_Field", "name hi lo role doc", defaults=("",))
    _Masks = namedtuple("_Masks", "kind addr rsvd shifts")


class Level(_Level):
    """Facts of one paging-structure level. `number` is the SDM level (5 = PML5 ... 1 = PT).

    `leaf_kind` says which kind an entry *of this level* becomes when its own PS bit (bit 7) is
    set: the PS bit belongs to the entry that is the leaf, never to the entry above it.
    """

    __slots__ = ()

    @property
    def span(self) -> int:
        return 1 << self.shift

    def index(self, va: int) -> int:  # type: ignore[override]  # not tuple.index: the VA's index
        return (va >> self.shift) & 0x1FF

    def kind_of(self, raw: int) -> Kind:
        """Kind of the entry `raw` at this level: PS (bit 7) selects the leaf format where the
        level has one. Bit 7 of a PTE is PAT and of a PML4E/PML5E is reserved: no leaf there."""
        if self.leaf_kind is not None and raw & BIT_PS:
            return self.leaf_kind
        return self.table_kind

    def linux_name(self, levels: int) -> str:
        return self.linux5 if levels == 5 else self.linux4


LEVELS: dict[int, Level] = {
    5: Level(5, "PML5", 48, Kind.PML5E, None, "-", "pgd"),
    4: Level(4, "PML4", 39, Kind.PML4E, None, "pgd", "p4d"),
    3: Level(3, "PDPT", 30, Kind.PDPTE, Kind.PDPTE_1G, "pud", "pud"),
    2: Level(2, "PD", 21, Kind.PDE, Kind.PDE_2M, "pmd", "pmd"),
    1: Level(1, "PT", 12, Kind.PTE, None, "pte", "pte"),
}

LEVEL_OF_KIND: dict[Kind, Level] = {
    Kind.PML5E: LEVELS[5],
    Kind.PML4E: LEVELS[4],
    Kind.PDPTE: LEVELS[3],
    Kind.PDPTE_1G: LEVELS[3],
    Kind.PDE: LEVELS[2],
    Kind.PDE_2M: LEVELS[2],
    Kind.PTE: LEVELS[1],
}


def levels_for(paging_levels: int) -> tuple[Level, ...]:
    """The levels a walk visits, top down. 4- vs 5-level paging is a row, not a branch."""
    if paging_levels not in (4, 5):
        raise BadInputError(f"paging levels must be 4 or 5, not {paging_levels}")
    return tuple(LEVELS[n] for n in range(paging_levels, 0, -1))


class Role(str, enum.Enum):
    FLAG = "flag"  # a 1-bit attribute (p, rw, us, pwt, pcd, a, d, g)
    PS = "ps"  # page size: 0 in table formats, 1 in large-leaf formats
    PAT = "pat"  # PAT index bit (bit 7 in a PTE, bit 12 in 2M/1G leaves)
    XD = "xd"  # execute-disable (reserved when EFER.NXE=0: a walk-time rule)
    PK = "pk"  # protection key, leaves only
    ADDR = "addr"  # physical address bits (value is the frame number at frame_shift)
    IGN = "ignored"  # ignored by the processor: software may use them
    RSVD = "reserved"  # must be 0 when P=1, else #PF with RSVD


class Field(_Field):
    """One field of an entry: bits hi..lo, its role, a note."""

    __slots__ = ()

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    @property
    def mask(self) -> int:
        """In-place mask of the field inside a 64-bit entry."""
        return ((1 << self.width) - 1) << self.lo

    def get(self, raw: int) -> int:
        return (raw >> self.lo) & ((1 << self.width) - 1)


VENDORS = ("intel", "amd")
_LEAVES = (Kind.PDPTE_1G, Kind.PDE_2M, Kind.PTE)
_TOP = (Kind.PML5E, Kind.PML4E)


@lru_cache(maxsize=None)
def fields_for(kind: Kind, maxphyaddr: int = 52, vendor: str = "intel") -> tuple[Field, ...]:
    """The fields of one entry kind, from bit 63 down to bit 0, covering all 64 bits once.

    SDM Vol. 3A tables 4-15 (PML5E), 4-15/4-16 (PML4E), 4-17 (PDPTE 1G), 4-18 (PDPTE), 4-19
    (PDE 2M), 4-20 (PDE), 4-21 (PTE); AMD APM Vol. 2 fig. 5-18..5-25 for the vendor row.
    """
    kind = Kind(kind)
    if not 32 <= maxphyaddr <= 52:
        raise BadInputError(f"MAXPHYADDR must be between 32 and 52, not {maxphyaddr}")
    if vendor not in VENDORS:
        raise BadInputError(f"vendor must be one of {', '.join(VENDORS)}, not {vendor!r}")
    leaf = kind in _LEAVES
    m = maxphyaddr
    out: list[Field] = [Field("xd", 63, 63, Role.XD, "execute-disable (reserved if EFER.NXE=0)")]
    if leaf:
        out.append(Field("pk", 62, 59, Role.PK, "protection key (leaf only; used if CR4.PKE/PKS)"))
        out.append(Field("ign_hi", 58, 52, Role.IGN, "ignored"))
    else:
        out.append(Field("ign_hi", 62, 52, Role.IGN, "ignored (a key here is not used)"))
    if m < 52:
        out.append(Field("rsvd_hi", 51, m, Role.RSVD, "above MAXPHYADDR: reserved"))
    fshift = kind.frame_shift
    out.append(
        Field(
            "addr",
            m - 1,
            fshift,
            Role.ADDR,
            "physical address of the page frame" if leaf else "physical address of the next paging structure",
        )
    )
    if kind is Kind.PDPTE_1G:
        out.append(Field("rsvd_lo", 29, 13, Role.RSVD, "1G frame alignment: reserved"))
        out.append(Field("pat", 12, 12, Role.PAT, "PAT index bit 2 (large-page position)"))
    elif kind is Kind.PDE_2M:
        out.append(Field("rsvd_lo", 20, 13, Role.RSVD, "2M frame alignment: reserved"))
        out.append(Field("pat", 12, 12, Role.PAT, "PAT index bit 2 (large-page position)"))
    out.append(Field("avl", 11, 9, Role.IGN, "ignored (Linux SOFTW1..3; bit 11 is HLAT restart)"))
    if leaf:
        out.append(Field("g", 8, 8, Role.FLAG, "global (with CR4.PGE)"))
    elif kind in _TOP and vendor == "amd":
        out.append(Field("rsvd8", 8, 8, Role.RSVD, "AMD: bit 8 of PML4E/PML5E must be zero"))
    else:
        out.append(Field("ign8", 8, 8, Role.IGN, "ignored"))
    if kind is Kind.PTE:
        out.append(Field("pat", 7, 7, Role.PAT, "PAT index bit 2 (4K position)"))
    elif kind in _TOP:
        out.append(Field("ps", 7, 7, Role.RSVD, "PS: reserved (must be 0) in PML4E/PML5E"))
    else:
        out.append(Field("ps", 7, 7, Role.PS, "page size: 1 maps a page, 0 a table"))
    if leaf:
        out.append(Field("d", 6, 6, Role.FLAG, "dirty"))
    else:
        out.append(Field("ign6", 6, 6, Role.IGN, "ignored"))
    out += [
        Field("a", 5, 5, Role.FLAG, "accessed"),
        Field("pcd", 4, 4, Role.FLAG, "page-level cache disable"),
        Field("pwt", 3, 3, Role.FLAG, "page-level write-through"),
        Field("us", 2, 2, Role.FLAG, "user/supervisor (1: user-mode accesses allowed)"),
        Field("rw", 1, 1, Role.FLAG, "read/write (0: writes may be denied)"),
        Field("p", 0, 0, Role.FLAG, "present"),
    ]
    # The table must tile the entry: a gap or an overlap is a bug in this module.
    bit = 63
    for f in out:
        assert f.hi == bit and f.lo <= f.hi, (kind, f)
        bit = f.lo - 1
    assert bit == -1, kind
    return tuple(out)


def field_named(kind: Kind, name: str, maxphyaddr: int = 52, vendor: str = "intel") -> Field:
    for f in fields_for(Kind(kind), maxphyaddr, vendor):
        if f.name == name:
            return f
    names = ", ".join(f.name for f in fields_for(Kind(kind), maxphyaddr, vendor))
    raise BadInputError(f"{Kind(kind).value} has no field {name!r} (fields: {names})")


# In-place masks of single entry bits, read off the field table (never written by hand). A name
# holds wherever the field sits at that bit: P/RW/US/PWT/PCD/A in every kind, D and G in leaves,
# PS in PDPTE/PDE, XD in every kind; the PAT bit moves (bit 7 in a PTE, bit 12 in 2M/1G leaves).
_PTE_FIELD = {f.name: f for f in fields_for(Kind.PTE)}
_PDE_2M_FIELD = {f.name: f for f in fields_for(Kind.PDE_2M)}
BIT_P = _PTE_FIELD["p"].mask
BIT_RW = _PTE_FIELD["rw"].mask
BIT_US = _PTE_FIELD["us"].mask
BIT_PWT = _PTE_FIELD["pwt"].mask
BIT_PCD = _PTE_FIELD["pcd"].mask
BIT_A = _PTE_FIELD["a"].mask
BIT_D = _PTE_FIELD["d"].mask
BIT_PS = _PDE_2M_FIELD["ps"].mask
BIT_PAT_4K = _PTE_FIELD["pat"].mask
BIT_PAT_LARGE = _PDE_2M_FIELD["pat"].mask
BIT_G = _PTE_FIELD["g"].mask
BIT_8 = next(
    f.mask for f in fields_for(Kind.PML4E, 52, "amd") if f.name == "rsvd8"
)  # AMD: reserved in PML4E/PML5E
BIT_XD = _PTE_FIELD["xd"].mask
PK_MASK = _PTE_FIELD["pk"].mask
PK_SHIFT = _PTE_FIELD["pk"].lo
ADDR_MASK_52 = _PTE_FIELD["addr"].mask  # bits 51:12, the widest address field (M = 52)


class Masks(_Masks):
    """Shift/mask constants for the hot paths, derived from `fields_for` (never written by hand)."""

    __slots__ = ()


@lru_cache(maxsize=None)
def masks_for(kind: Kind, maxphyaddr: int = 52, vendor: str = "intel") -> Masks:
    fs = fields_for(Kind(kind), maxphyaddr, vendor)
    addr = sum(f.mask for f in fs if f.role is Role.ADDR)
    rsvd = sum(f.mask for f in fs if f.role is Role.RSVD)
    shifts = tuple((f.name, f.lo, (1 << f.width) - 1) for f in fs)
    return Masks(Kind(kind), addr, rsvd, shifts)


def decode_fast(raw: int, kind: Kind, maxphyaddr: int = 52, vendor: str = "intel") -> dict[str, int]:
    """Decode with shift/mask only (the path walks and scans use); equals the construct layout."""
    return {name: (raw >> lo) & m for name, lo, m in masks_for(Kind(kind), maxphyaddr, vendor).shifts}


def encode_fast(values: dict[str, int], kind: Kind, maxphyaddr: int = 52, vendor: str = "intel") -> int:
    raw = 0
    known = {name: (lo, m) for name, lo, m in masks_for(Kind(kind), maxphyaddr, vendor).shifts}
    for name, v in values.items():
        if name not in known:
            raise BadInputError(f"{Kind(kind).value} has no field {name!r}")
        lo, m = known[name]
        v = int(v)
        if not 0 <= v <= m:
            raise BadInputError(f"{Kind(kind).value}.{name}={v:#x} does not fit in {m.bit_length()} bits")
        raw |= v << lo
    return raw


def kind_from_name(name: str) -> Kind:
    """Accept the kind names users type: pml5e, pml4e, pdpte, pdpte1g, pde, pde2m, pte (and the
    Linux names pgd/p4d/pud/pmd as their table kinds)."""
    aliases = {
        "pud": Kind.PDPTE,
        "pmd": Kind.PDE,
        "pdpte_1g": Kind.PDPTE_1G,
        "pde_2m": Kind.PDE_2M,
        "pdpe": Kind.PDPTE,
        "1g": Kind.PDPTE_1G,
        "2m": Kind.PDE_2M,
        "4k": Kind.PTE,
    }
    s = name.strip().lower()
    if s in aliases:
        return aliases[s]
    try:
        return Kind(s)
    except ValueError:
        opts = ", ".join(k.value for k in Kind)
        raise BadInputError(f"unknown entry kind {name!r} (one of {opts})") from None
