"""The encoder side: allocate paging structures in a memory and map ranges with a page size and
flags. Entries are composed from the field table (fields.encode_fast), never from hand-written
bit constants."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from x86pt.errors import BadInputError, BudgetError
from x86pt.fields import (
    ADDR_MASK_52,
    BIT_A,
    BIT_D,
    BIT_P,
    BIT_PAT_4K,
    BIT_PAT_LARGE,
    BIT_PS,
    BIT_RW,
    BIT_US,
    LEVELS,
    Kind,
    encode_fast,
    levels_for,
    masks_for,
)
from x86pt.memory.base import PAGE, MemoryBase
from x86pt.memory.sparse import SparseMemory
from x86pt.numbers import parse_int, parse_size
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PagingState,
    Profile,
    profile_named,
)

PAGE_SIZES = {1 << 12: 1, 1 << 21: 2, 1 << 30: 3}
# Leaf entries one Builder writes at most, checked before any table is allocated: 2^20 PTEs map
# 4 GiB in 4K pages (or 2 TiB in 2M pages) and need 2,048 tables (8 MiB for the sparse image);
# building that many takes about a second.
from x86pt.limits import DEFAULT_MAX_BUILD_ENTRIES  # noqa: E402  (one definition)

FLAG_WORDS = {
    "p",
    "rw",
    "us",
    "pwt",
    "pcd",
    "a",
    "d",
    "g",
    "pat",
    "xd",
    "nx",
    "user",
    "w",
    "global",
    "ro",
    "x",
}


def parse_flags(
    spec: str | int | dict[str, Any] | None, default: dict[str, int] | None = None
) -> dict[str, int]:
    """Flags as users write them: 'rw us nx g', a dict, or an int of raw low bits (+bit 63)."""
    out = dict(default or {})
    if spec is None:
        return out
    if isinstance(spec, dict):
        for k, v in spec.items():
            out[str(k)] = int(v)
        return _normalise(out)
    if isinstance(spec, int):
        raise BadInputError("give flags as words ('rw us nx') or a table, not a number")
    for word in str(spec).replace(",", " ").replace("|", " ").split():
        w = word.lower()
        neg = w.startswith(("!", "-"))
        w = w.lstrip("!-")
        if "=" in w:
            k, v = w.split("=", 1)
            out[k] = parse_int(v, f"flag {k}")
            continue
        if w not in FLAG_WORDS:
            raise BadInputError(f"unknown flag {word!r} (known: {', '.join(sorted(FLAG_WORDS))})")
        if w == "ro":
            out["rw"] = 0
        elif w == "x":
            out["xd"] = 0
        else:
            out[w] = 0 if neg else 1
    return _normalise(out)


def _normalise(d: dict[str, int]) -> dict[str, int]:
    alias = {"nx": "xd", "user": "us", "w": "rw", "global": "g"}
    out: dict[str, int] = {}
    for k, v in d.items():
        out[alias.get(k, k)] = int(v)
    return out


def entry_value(
    kind: Kind, target: int, flags: dict[str, int], maxphyaddr: int = 52, vendor: str = "intel"
) -> int:
    """Compose an entry of `kind` pointing at physical address `target` with `flags`
    (field names: p rw us pwt pcd a d g pat xd pk avl ...). `p` defaults to 1."""
    kind = Kind(kind)
    shift = kind.frame_shift
    if target & ((1 << shift) - 1):
        raise BadInputError(f"{kind.value} target {target:#x} is not {1 << shift:#x}-aligned")
    if target >> maxphyaddr:
        raise BadInputError(f"{kind.value} target {target:#x} is above MAXPHYADDR {maxphyaddr}")
    values = {"p": 1}
    values.update(flags)
    if kind in (Kind.PDPTE_1G, Kind.PDE_2M):
        values["ps"] = 1
    values["addr"] = target >> shift
    return encode_fast(values, kind, maxphyaddr, vendor)


@dataclass
class Builder:
    """Build IA-32e page tables in a (sparse) memory.

    Tables are allocated bottom-up from `table_base`. Entries that reference a table get
    `table_flags` (default P|RW|US: permissive, so the leaf decides, as Linux's _PAGE_TABLE).
    """

    memory: SparseMemory = field(default_factory=SparseMemory)
    levels: int = 4
    maxphyaddr: int = 52
    vendor: str = "intel"
    table_base: int = 0x100000
    table_limit: int | None = None
    table_flags: str | dict[str, int] | None = "p rw us a"
    max_entries: int = DEFAULT_MAX_BUILD_ENTRIES

    def __post_init__(self) -> None:
        self.entries_written = 0
        if self.memory is None:  # memory=None given: a new memory, as the default
            self.memory = SparseMemory()
        self._levels = levels_for(self.levels)
        self._next = self.table_base
        self.tables: list[int] = []
        self._tflags = parse_flags(self.table_flags)
        self.root = self.alloc_table()

    # -- allocation ------------------------------------------------------------------------------
    def alloc_table(self) -> int:
        pa = self._next
        if self.table_limit is not None and pa + PAGE > self.table_limit:
            raise BadInputError(f"out of table space at {pa:#x} (limit {self.table_limit:#x})")
        self._next += PAGE
        self.memory.write(pa, bytes(PAGE))
        self.tables.append(pa)
        return pa

    # -- entries ---------------------------------------------------------------------------------
    @overload
    def entry_address(self, va: int, level: int, create: Literal[True] = True) -> int: ...

    @overload
    def entry_address(self, va: int, level: int, create: bool) -> int | None: ...

    def entry_address(self, va: int, level: int, create: bool = True) -> int | None:
        """Address of the entry of `level` (5..1) for `va`, creating tables above it if asked."""
        table = self.root
        for lv in self._levels:
            e_addr = table | (lv.index(va) << 3)
            if lv.number == level:
                return e_addr
            raw = self.memory.read_u64(e_addr)
            if raw & 1 and lv.kind_of(raw).is_leaf:
                raise BadInputError(f"va {va:#x}: a {lv.kind_of(raw).sdm_name} leaf is in the way")
            if not raw & 1:
                if not create:
                    return None
                new = self.alloc_table()
                raw = entry_value(lv.table_kind, new, self._tflags, self.maxphyaddr, self.vendor)
                self.memory.write_u64(e_addr, raw)
            table = raw & masks_for(lv.table_kind, self.maxphyaddr, self.vendor).addr
        raise BadInputError(f"level {level} is not walked with {self.levels}-level paging")

    def set_entry(self, va: int, level: int, raw: int) -> int:
        addr = self.entry_address(va, level)
        self.memory.write_u64(addr, raw)
        return addr

    def get_entry(self, va: int, level: int) -> int | None:
        addr = self.entry_address(va, level, create=False)
        return None if addr is None else self.memory.read_u64(addr)

    def map(
        self,
        va: int,
        pa: int,
        size: int,
        page_size: int = PAGE,
        flags: str | dict[str, int] | None = "rw",
        *,
        pk: int = 0,
    ) -> None:
        """Map [va, va+size) to [pa, pa+size) with leaves of `page_size` (4K, 2M or 1G)."""
        if page_size not in PAGE_SIZES:
            raise BadInputError(f"page size must be 4K, 2M or 1G, not {page_size:#x}")
        if size <= 0 or va % page_size or pa % page_size or size % page_size:
            raise BadInputError(
                f"map {va:#x}->{pa:#x} size {size:#x}: not aligned to the page size {page_size:#x}"
            )
        va_bits = 57 if self.levels == 5 else 48
        half = 1 << (va_bits - 1)
        top = (1 << 64) - half
        for v in (va, va + size - 1):
            if not (v < half or top <= v < 1 << 64):
                raise BadInputError(
                    f"map {va:#x}+{size:#x}: {v:#x} is not canonical for "
                    f"{self.levels}-level paging (bits 63:{va_bits - 1} must be equal)"
                )
        if va < half <= va + size - 1:
            raise BadInputError(f"map {va:#x}+{size:#x}: crosses the non-canonical hole")
        if pa + size > 1 << self.maxphyaddr:
            raise BadInputError(
                f"map {va:#x}->{pa:#x} size {size:#x}: ends above MAXPHYADDR ({self.maxphyaddr} bits)"
            )
        n = size // page_size
        if self.entries_written + n > self.max_entries:
            raise BudgetError(
                f"map {va:#x} size {size:#x} in {page_size >> 10}K pages: {n} entries, "
                f"more than the limit of {self.max_entries} leaf entries per image "
                f"(raise it with --max-entries N)"
            )
        self.entries_written += n
        level = PAGE_SIZES[page_size]
        lv = LEVELS[level]
        kind = lv.leaf_kind if level > 1 else Kind.PTE
        assert kind is not None  # a 2M or 1G page: PDE and PDPTE have a leaf kind
        fl = parse_flags(flags)
        if pk:
            fl["pk"] = pk
        # The flags part of every leaf is the same: encode it once and OR in the frame address
        # (aligned and below MAXPHYADDR, checked above). Tables are looked up once per 512 leaves.
        template = entry_value(kind, 0, fl, self.maxphyaddr, self.vendor)
        read, write = self.memory.read_u64, self.memory.write_u64
        table, table_key = 0, None
        for off in range(0, size, page_size):
            v = va + off
            key = v >> (lv.shift + 9)
            if key != table_key:
                table, table_key = self.entry_address(v, level) & ~0xFFF, key
            addr = table | (lv.index(v) << 3)
            old = read(addr)
            if old & 1 and level > 1 and not lv.kind_of(old).is_leaf:
                raise BadInputError(
                    f"va {v:#x}: a table is mapped where a {page_size >> 10}K page is asked for"
                )
            write(addr, template | (pa + off))

    def unmap(self, va: int, level: int = 1) -> None:
        addr = self.entry_address(va, level, create=False)
        if addr is not None:
            self.memory.write_u64(addr, 0)

    def state(
        self,
        *,
        cr0: int = CR0_PE | CR0_PG | CR0_WP,
        cr4: int = CR4_PAE,
        efer: int = EFER_LME | EFER_LMA | EFER_NXE,
        pkru: int = 0,
        pkrs: int = 0,
        profile: Profile | str = "intel",
        maxphyaddr: int | None = None,
    ) -> PagingState:
        cr4 |= CR4_PAE  # IA-32e paging needs PAE; LA57 follows the tree's depth
        if self.levels == 5:
            cr4 |= CR4_LA57
        prof = profile_named(profile) if isinstance(profile, str) else profile
        return PagingState(
            cr3=self.root,
            cr0=cr0,
            cr4=cr4,
            efer=efer,
            pkru=pkru,
            pkrs=pkrs,
            profile=prof,
            maxphyaddr=maxphyaddr
            if maxphyaddr is not None
            else (self.maxphyaddr if self.maxphyaddr < 52 else None),
        )


# -- TOML spec -> image ------------------------------------------------------------------------------
MAX_DATA_BYTES = 1 << 24  # one [[data]] block


def _section(doc: dict[str, Any], name: str, source: str, keys: set[str]) -> dict[str, Any]:
    sec = doc.get(name, {})
    if not isinstance(sec, dict):
        raise BadInputError(f"{source}: [{name}] must be a table")
    _keys(sec, f"{source}: [{name}]", keys, set())
    return sec


def _array(doc: dict[str, Any], name: str, source: str) -> list[dict[str, Any]]:
    arr = doc.get(name, [])
    if not isinstance(arr, list) or not all(isinstance(x, dict) for x in arr):
        raise BadInputError(f"{source}: {name} must be an array of tables ([[{name}]])")
    return arr


def _keys(d: dict[str, Any], where: str, known: set[str], required: set[str]) -> None:
    extra = sorted(set(d) - known)
    if extra:
        raise BadInputError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
    missing = sorted(required - set(d))
    if missing:
        raise BadInputError(f"{where}: missing key {missing[0]!r}")


def _scalar(v: object, what: str) -> int | str:
    """A number as TOML gives it: an integer or a string (decimal, 0x-hex, size suffix)."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise BadInputError(f"{what}: expected a number or a string, not {type(v).__name__}")
    return v


def _text(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise BadInputError(f"{what}: expected a string, not {type(v).__name__}")
    return v


def _cr4_la57(v: object, source: str) -> bool:
    return bool(parse_int(_scalar(v, f"{source}: registers.cr4"), f"{source}: registers.cr4") & CR4_LA57)


def build_from_spec(
    text: str, source: str = "spec", *, max_entries: int = DEFAULT_MAX_BUILD_ENTRIES
) -> tuple[SparseMemory, PagingState]:
    """Build an image from a TOML spec:

    [image]      levels = 4, maxphyaddr = 46, vendor = "intel", tables = "0x100000",
                 profile = "intel"
    [registers]  cr0, cr4, efer, pkru, pkrs   (cr3 is the built root; LA57 follows levels)
    [[map]]      va, pa, size, page = "4K"|"2M"|"1G", flags = "rw us nx g ...", pk = 0
    [[entry]]    va, level = 1..5, value   (a raw entry, written after the maps)
    [[data]]     pa, u64 = [...] or hex = "..."   (bytes at a physical address)
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadInputError(f"{source}: bad TOML: {e}") from None
    except RecursionError:
        raise BadInputError(f"{source}: bad TOML: nested too deeply") from None
    known = {"image", "registers", "map", "entry", "data"}
    extra = sorted(set(doc) - known)
    if extra:
        raise BadInputError(f"{source}: unknown section [{extra[0]}] (known: {', '.join(sorted(known))})")
    img = _section(
        doc, "image", source, {"levels", "maxphyaddr", "vendor", "tables", "profile", "table_flags"}
    )
    regs = _section(doc, "registers", source, {"cr0", "cr4", "efer", "pkru", "pkrs"})
    levels = parse_int(
        _scalar(img.get("levels", 4), f"{source}: image.levels"), f"{source}: image.levels", lo=4, hi=5
    )
    vendor = img.get("vendor")
    if vendor is not None and _text(vendor, f"{source}: image.vendor") not in ("intel", "amd"):
        raise BadInputError(f"{source}: image.vendor must be intel or amd, not {vendor!r}")
    # The walk takes its vendor rules from the profile: vendor = "amd" alone means the AMD
    # manual's profile; a profile of the other vendor is a contradiction, not a silent choice.
    prof = profile_named(_text(img.get("profile", vendor or "intel"), f"{source}: image.profile"))
    if vendor is not None and vendor != prof.vendor:
        raise BadInputError(
            f"{source}: image.vendor {vendor!r} contradicts profile {prof.name!r} (vendor {prof.vendor})"
        )
    vendor = prof.vendor
    m = parse_int(
        _scalar(img.get("maxphyaddr", prof.maxphyaddr), f"{source}: image.maxphyaddr"),
        f"{source}: image.maxphyaddr",
        lo=32,
        hi=52,
    )
    tflags = img.get("table_flags", "p rw us a")
    if not isinstance(tflags, str):
        raise BadInputError(f"{source}: image.table_flags must be a string of flag words")
    b = Builder(
        levels=levels,
        maxphyaddr=m,
        vendor=vendor,
        table_base=parse_int(
            _scalar(img.get("tables", 0x100000), f"{source}: image.tables"),
            f"{source}: image.tables",
            hi=(1 << m) - PAGE,
        ),
        table_flags=tflags,
        max_entries=max_entries,
    )
    for i, mp in enumerate(_array(doc, "map", source)):
        where = f"{source}: map #{i + 1}"
        _keys(mp, where, {"va", "pa", "size", "page", "flags", "pk"}, {"va"})
        va = parse_int(_scalar(mp["va"], f"{where} va"), f"{where} va")
        pa = parse_int(_scalar(mp.get("pa", 0), f"{where} pa"), f"{where} pa")
        page = parse_size(_scalar(mp.get("page", "4K"), f"{where} page"), f"{where} page")
        size = parse_size(_scalar(mp.get("size", page), f"{where} size"), f"{where} size")
        flags = mp.get("flags", "rw")
        if not isinstance(flags, str):
            raise BadInputError(f"{where}: flags must be a string of flag words ('rw us nx')")
        pk = parse_int(_scalar(mp.get("pk", 0), f"{where} pk"), f"{where} pk", hi=15)
        try:
            b.map(va, pa, size, page, flags, pk=pk)
        except BadInputError as e:
            raise type(e)(f"{where}: {e}") from None
    for i, en in enumerate(_array(doc, "entry", source)):
        where = f"{source}: entry #{i + 1}"
        _keys(en, where, {"va", "level", "value"}, {"va", "value"})
        lvl = parse_int(_scalar(en.get("level", 1), f"{where} level"), f"{where} level", lo=1, hi=levels)
        try:
            b.set_entry(
                parse_int(_scalar(en["va"], f"{where} va"), f"{where} va"),
                lvl,
                parse_int(_scalar(en["value"], f"{where} value"), f"{where} value"),
            )
        except BadInputError as e:
            raise type(e)(f"{where}: {e}") from None
    for i, d in enumerate(_array(doc, "data", source)):
        where = f"{source}: data #{i + 1}"
        _keys(d, where, {"pa", "u64", "hex"}, {"pa"})
        pa = parse_int(_scalar(d["pa"], f"{where} pa"), f"{where} pa", hi=(1 << m) - 1)
        u64 = d.get("u64", [])
        if not isinstance(u64, list):
            raise BadInputError(f"{where}: u64 must be an array of numbers")
        if pa + 8 * len(u64) > 1 << m or len(u64) > MAX_DATA_BYTES // 8:
            raise BadInputError(
                f"{where}: u64 runs past MAXPHYADDR or is longer than {MAX_DATA_BYTES // 8} qwords"
            )
        for j, v in enumerate(u64):
            b.memory.write_u64(pa + 8 * j, parse_int(_scalar(v, f"{where} u64[{j}]"), f"{where} u64[{j}]"))
        if "hex" in d:
            h = _text(d["hex"], f"{where} hex")
            if len(h) > 2 * MAX_DATA_BYTES:
                raise BadInputError(f"{where}: hex is longer than {MAX_DATA_BYTES} bytes")
            try:
                data = bytes.fromhex(h)
            except ValueError:
                raise BadInputError(f"{where}: bad hex") from None
            if pa + len(data) > 1 << m:
                raise BadInputError(f"{where}: hex runs past MAXPHYADDR")
            b.memory.write(pa, data)
    if "cr4" in regs and levels == 4 and _cr4_la57(regs["cr4"], source):
        raise BadInputError(
            f"{source}: registers.cr4 sets LA57 but image.levels is 4 "
            "(the tree's depth decides LA57; leave the bit clear)"
        )
    reg = {
        k: parse_int(
            _scalar(regs[k], f"{source}: registers.{k}"),
            f"{source}: registers.{k}",
            hi=0xFFFFFFFF if k in ("pkru", "pkrs") else (1 << 64) - 1,
        )
        for k in regs
    }
    st = b.state(
        cr0=reg.get("cr0", CR0_PE | CR0_PG | CR0_WP),
        cr4=reg.get("cr4", CR4_PAE),
        efer=reg.get("efer", EFER_LME | EFER_LMA | EFER_NXE),
        pkru=reg.get("pkru", 0),
        pkrs=reg.get("pkrs", 0),
        profile=prof,
        maxphyaddr=m,
    )
    st.check()
    b.memory.control_registers = {
        "cr0": st.cr0,
        "cr3": st.cr3,
        "cr4": st.cr4,
        "efer": st.efer,
        "pkru": st.pkru,
        "pkrs": st.pkrs,
        "maxphyaddr": st.m,
    }
    return b.memory, st


def split_2m(
    memory: MemoryBase, state: PagingState, va: int, table_pa: int, ro_pages: range = range(0)
) -> None:
    """Replace the 2M leaf mapping `va` by a PT at `table_pa` with 512 PTEs of the same frames
    and flags (what Linux's split_large_page() does: PS dropped, the PAT bit moved from bit 12
    to bit 7), then clear RW on `ro_pages` (indices). The PDE then points at the PT with
    P|RW|A|D and the 2M leaf's US."""
    from x86pt.walk import Translation, walk

    r = walk(state, memory, va)
    if not isinstance(r, Translation) or r.page_size != 1 << 21:
        raise BadInputError(f"{va:#x} is not mapped by a 2M page")
    pde = r.steps[-1]
    flags = pde.raw & ~ADDR_MASK_52  # bit 12 (the 2M PAT) is in the address mask
    pte_flags = (flags & ~BIT_PS) | (BIT_PAT_4K if pde.raw & BIT_PAT_LARGE else 0)
    frame = pde.raw & state.phys_mask & ~((1 << 21) - 1)
    for i in range(512):
        v = frame + (i << 12) | pte_flags
        if i in ro_pages:
            v &= ~BIT_RW
        memory.write_u64(table_pa + 8 * i, v)
    memory.write_u64(pde.entry_addr, table_pa | BIT_P | BIT_RW | BIT_A | BIT_D | (pde.raw & BIT_US))
