"""The encoder side: allocate paging structures in a memory and map ranges with a page size and
flags. Entries are composed from the field table (fields.encode_fast), never from hand-written
bit constants."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass

from x86pt.errors import BadInputError
from x86pt.fields import Kind, LEVELS, Level, encode_fast, levels_for, masks_for
from x86pt.memory.base import PAGE
from x86pt.memory.sparse import SparseMemory
from x86pt.numbers import parse_int, parse_size
from x86pt.state import (CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, EFER_LMA, EFER_LME,
                         EFER_NXE, PagingState, Profile, PROFILES, profile_named)

PAGE_SIZES = {1 << 12: 1, 1 << 21: 2, 1 << 30: 3}
FLAG_WORDS = {"p", "rw", "us", "pwt", "pcd", "a", "d", "g", "pat", "xd", "nx", "user", "w",
              "global", "ro", "x"}


def parse_flags(spec: str | int | dict | None, default: dict[str, int] | None = None) -> dict[str, int]:
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


def entry_value(kind: Kind, target: int, flags: dict[str, int], maxphyaddr: int = 52,
                vendor: str = "intel") -> int:
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

    memory: SparseMemory | None = None
    levels: int = 4
    maxphyaddr: int = 52
    vendor: str = "intel"
    table_base: int = 0x100000
    table_limit: int | None = None
    table_flags: str | dict | None = "p rw us a"

    def __post_init__(self) -> None:
        if self.memory is None:
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

    def map(self, va: int, pa: int, size: int, page_size: int = PAGE,
            flags: str | dict | None = "rw", *, pk: int = 0) -> None:
        """Map [va, va+size) to [pa, pa+size) with leaves of `page_size` (4K, 2M or 1G)."""
        if page_size not in PAGE_SIZES:
            raise BadInputError(f"page size must be 4K, 2M or 1G, not {page_size:#x}")
        if size <= 0 or va % page_size or pa % page_size or size % page_size:
            raise BadInputError(f"map {va:#x}->{pa:#x} size {size:#x}: not aligned to the page "
                                f"size {page_size:#x}")
        level = PAGE_SIZES[page_size]
        lv = LEVELS[level]
        kind = lv.leaf_kind if level > 1 else Kind.PTE
        fl = parse_flags(flags)
        if pk:
            fl["pk"] = pk
        for off in range(0, size, page_size):
            v = va + off
            addr = self.entry_address(v, level)
            old = self.memory.read_u64(addr)
            if old & 1 and level > 1 and not lv.kind_of(old).is_leaf:
                raise BadInputError(f"va {v:#x}: a table is mapped where a {page_size >> 10}K page "
                                    "is asked for")
            self.memory.write_u64(addr, entry_value(kind, pa + off, fl, self.maxphyaddr, self.vendor))

    def unmap(self, va: int, level: int = 1) -> None:
        addr = self.entry_address(va, level, create=False)
        if addr is not None:
            self.memory.write_u64(addr, 0)

    def state(self, *, cr0: int = CR0_PE | CR0_PG | CR0_WP, cr4: int = CR4_PAE,
              efer: int = EFER_LME | EFER_LMA | EFER_NXE, pkru: int = 0, pkrs: int = 0,
              profile: Profile | str = "intel", maxphyaddr: int | None = None) -> PagingState:
        cr4 |= CR4_PAE          # IA-32e paging needs PAE; LA57 follows the tree's depth
        if self.levels == 5:
            cr4 |= CR4_LA57
        prof = profile_named(profile) if isinstance(profile, str) else profile
        return PagingState(cr3=self.root, cr0=cr0, cr4=cr4, efer=efer, pkru=pkru, pkrs=pkrs,
                           profile=prof, maxphyaddr=maxphyaddr if maxphyaddr is not None else
                           (self.maxphyaddr if self.maxphyaddr < 52 else None))


# -- TOML spec -> image ------------------------------------------------------------------------------
def build_from_spec(text: str, source: str = "spec") -> tuple[SparseMemory, PagingState]:
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
    img = doc.get("image", {})
    regs = doc.get("registers", {})
    known = {"image", "registers", "map", "entry", "data"}
    extra = sorted(set(doc) - known)
    if extra:
        raise BadInputError(f"{source}: unknown section [{extra[0]}] (known: {', '.join(sorted(known))})")
    levels = int(img.get("levels", 4))
    prof_name = str(img.get("profile", "intel"))
    prof = profile_named(prof_name)
    m = int(img.get("maxphyaddr", prof.maxphyaddr))
    b = Builder(levels=levels, maxphyaddr=m, vendor=str(img.get("vendor", prof.vendor)),
                table_base=parse_int(img.get("tables", 0x100000), "image.tables"),
                table_flags=img.get("table_flags", "p rw us a"))
    for i, mp in enumerate(doc.get("map", [])):
        where = f"{source}: map #{i + 1}"
        try:
            va = parse_int(mp["va"], f"{where} va")
            pa = parse_int(mp.get("pa", 0), f"{where} pa")
            page = parse_size(mp.get("page", "4K"), f"{where} page")
            size = parse_size(mp.get("size", page), f"{where} size")
        except KeyError as e:
            raise BadInputError(f"{where}: missing {e.args[0]}") from None
        try:
            b.map(va, pa, size, page, mp.get("flags", "rw"), pk=int(mp.get("pk", 0)))
        except BadInputError as e:
            raise BadInputError(f"{where}: {e}") from None
    for i, en in enumerate(doc.get("entry", [])):
        where = f"{source}: entry #{i + 1}"
        b.set_entry(parse_int(en["va"], f"{where} va"), int(en.get("level", 1)),
                    parse_int(en["value"], f"{where} value"))
    for i, d in enumerate(doc.get("data", [])):
        where = f"{source}: data #{i + 1}"
        pa = parse_int(d["pa"], f"{where} pa")
        if "u64" in d:
            for j, v in enumerate(d["u64"]):
                b.memory.write_u64(pa + 8 * j, parse_int(v, f"{where} u64"))
        if "hex" in d:
            try:
                b.memory.write(pa, bytes.fromhex(str(d["hex"])))
            except ValueError:
                raise BadInputError(f"{where}: bad hex") from None
    st = b.state(cr0=parse_int(regs.get("cr0", CR0_PE | CR0_PG | CR0_WP), "cr0"),
                 cr4=parse_int(regs.get("cr4", CR4_PAE), "cr4"),
                 efer=parse_int(regs.get("efer", EFER_LME | EFER_LMA | EFER_NXE), "efer"),
                 pkru=parse_int(regs.get("pkru", 0), "pkru", hi=0xFFFFFFFF),
                 pkrs=parse_int(regs.get("pkrs", 0), "pkrs", hi=0xFFFFFFFF),
                 profile=prof, maxphyaddr=m)
    b.memory.control_registers = {"cr0": st.cr0, "cr3": st.cr3, "cr4": st.cr4, "efer": st.efer,
                                  "pkru": st.pkru, "pkrs": st.pkrs, "maxphyaddr": st.m}
    return b.memory, st
