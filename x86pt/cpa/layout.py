"""The kernel address space the CPA model works on: physical RAM (an e820-like list with holes),
the direct map at PAGE_OFFSET, the kernel image ("highmap") with its section symbols, and the
module/vmalloc area. Presets: a 4 GiB laptop, a 64 GiB and a 1 TiB server, and the layout of the
`x86pt demo` image.

Addresses follow the x86-64 4-level layout of Documentation/arch/x86/x86_64/mm.rst without KASLR.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from x86pt.errors import BadInputError, BudgetError
from x86pt.numbers import parse_int

GiB = 1 << 30
MiB = 1 << 20

# The x86-64 4-level layout without KASLR (Documentation/arch/x86/x86_64/mm.rst).
PAGE_OFFSET = 0xFFFF888000000000  # the direct map
START_KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map, the kernel image ("highmap")
MODULES_VADDR = 0xFFFFFFFFC0000000  # with KERNEL_IMAGE_SIZE = 1 GiB (KASLR kernels)

# The machine of `x86pt demo`'s embedded image (x86pt/demo.py builds its tables from these):
# RAM as an e820-like list, 0-640K, 1M-3G, 4G-6G, and the kernel text at 16 MiB.
DEMO_RAM = ((0x0, 0x9F000), (0x100000, 0xC0000000), (0x100000000, 0x180000000))
DEMO_KERNEL_TEXT = START_KERNEL_MAP + 0x1000000


@dataclass(frozen=True)
class KernelImage:
    """Physical addresses of the linker symbols CPA looks at (docs/cpa.md §4.6, §4.7), page aligned.
    Defaults mimic a distribution kernel loaded at CONFIG_PHYSICAL_START = 16 MiB; rodata starts
    2M-aligned (X86_ALIGN_RODATA_BEGIN) and the other ends are not, so boot leaves 4K pieces in
    the highmap as a real kernel does (docs/cpa.md §11)."""

    text: int = 0x1000000  # _text
    etext: int = 0x1E03000  # PFN_ALIGN(_etext)
    start_rodata: int = 0x2000000  # __start_rodata
    end_rodata: int = 0x2A13000  # __end_rodata
    end_rodata_hpage_align: int = 0x2C00000
    sdata: int = 0x2C00000  # _sdata
    init_begin: int = 0x3373000  # __init_begin
    init_end: int = 0x37BA000  # __init_end
    brk_end: int = 0x3E3F000  # _brk_end

    def check(self) -> None:
        seq = [
            self.text,
            self.etext,
            self.start_rodata,
            self.end_rodata,
            self.end_rodata_hpage_align,
            self.sdata,
            self.brk_end,
        ]
        if any(a > b for a, b in zip(seq, seq[1:])) or any(x & 0xFFF for x in seq):
            raise BadInputError(
                "kernel image symbols must be page aligned and in order "
                "_text <= _etext <= __start_rodata <= ... <= _brk_end"
            )


@dataclass(frozen=True)
class Layout:
    name: str
    ram: tuple[tuple[int, int], ...]  # e820 RAM ranges [start, end), sorted
    gbpages: bool = True  # direct_gbpages (CPU GBPAGES, no nogbpages)
    pti: bool = False  # PTI: no _PAGE_GLOBAL on kernel mappings
    page_offset: int = PAGE_OFFSET
    start_kernel_map: int = START_KERNEL_MAP
    phys_base: int = 0
    kernel_image_size: int = GiB  # KERNEL_IMAGE_SIZE with KASLR support
    modules_vaddr: int = MODULES_VADDR
    modules_end: int = 0xFFFFFFFFFF000000
    vmalloc_start: int = 0xFFFFC90000000000
    vmalloc_end: int = 0xFFFFE90000000000
    kernel: KernelImage = field(default_factory=KernelImage)
    # Page-table pages come from here (memblock/buddy in the kernel); reserved from workloads.
    table_pool: tuple[tuple[int, int], ...] = ((0x200000, 0x1000000), (0x4000000, 0x10000000))
    reserved_below: int = 0x10000000  # workloads allocate frames above this

    def check(self) -> None:
        self.kernel.check()
        last = 0
        for s, e in self.ram:
            if s >= e or s < last or s & 0xFFF or e & 0xFFF:
                raise BadInputError(
                    f"layout {self.name}: bad RAM range {s:#x}-{e:#x} (page aligned, sorted, not overlapping)"
                )
            last = e
        check_direct_map_size(self.ram, self.gbpages, f"layout {self.name}")

    @property
    def ram_bytes(self) -> int:
        return sum(e - s for s, e in self.ram)

    @property
    def max_pfn(self) -> int:
        return self.ram[-1][1] >> 12 if self.ram else 0

    def to_json(self) -> dict[str, Any]:
        """Every field, so layout_from_json(to_json()) gives the same layout back."""
        return {
            "name": self.name,
            "ram": [[hex(s), hex(e)] for s, e in self.ram],
            "gbpages": self.gbpages,
            "pti": self.pti,
            **{k: hex(getattr(self, k)) for k in ADDRESS_FIELDS},
            "table_pool": [[hex(s), hex(e)] for s, e in self.table_pool],
            "kernel": {k: hex(v) for k, v in self.kernel.__dict__.items()},
        }


# The Layout fields a layout JSON may give as numbers (besides ram, table_pool and kernel).
ADDRESS_FIELDS = (
    "page_offset",
    "start_kernel_map",
    "phys_base",
    "kernel_image_size",
    "modules_vaddr",
    "modules_end",
    "vmalloc_start",
    "vmalloc_end",
    "reserved_below",
)

PRESETS: dict[str, Layout] = {
    # A 4 GiB laptop: firmware holes below 4G, the rest remapped above 4G.
    "laptop-4g": Layout(
        "laptop-4g",
        ((0x0, 0x9F000), (0x100000, 0x76D55000), (0x76E00000, 0x7A2FF000), (0x100000000, 0x16F800000)),
    ),
    # A 64 GiB server: 1G pages cover almost everything.
    "server-64g": Layout(
        "server-64g",
        ((0x0, 0x9A000), (0x100000, 0x6A2F4000), (0x6B7FF000, 0x6B800000), (0x100000000, 0x1080000000)),
    ),
    # A 1 TiB server.
    "server-1t": Layout("server-1t", ((0x0, 0x9B000), (0x100000, 0x5DFE3000), (0x100000000, 0x10080000000))),
}
PRESETS["server-64g-nogb"] = replace(PRESETS["server-64g"], name="server-64g-nogb", gbpages=False)


def demo_layout() -> Layout:
    """The layout of `x86pt demo`'s embedded image (x86pt/demo.py)."""
    text = DEMO_KERNEL_TEXT - START_KERNEL_MAP
    k = KernelImage(
        text=text,
        etext=text + (8 << 20),
        start_rodata=text + (8 << 20),
        end_rodata=text + (12 << 20),
        end_rodata_hpage_align=text + (12 << 20),
        sdata=text + (12 << 20),
        init_begin=text + (12 << 20),
        init_end=text + (12 << 20),
        brk_end=text + (14 << 20),
    )
    return Layout(
        "demo",
        DEMO_RAM,
        gbpages=True,
        page_offset=PAGE_OFFSET,
        start_kernel_map=START_KERNEL_MAP,
        modules_vaddr=MODULES_VADDR,
        kernel_image_size=MODULES_VADDR - START_KERNEL_MAP,  # 1 GiB (KASLR layout)
        modules_end=MODULES_VADDR + (1 << 30) - (16 << 20),
        kernel=k,
        table_pool=((0x8000000, 0x10000000),),
        reserved_below=0x10000000,
    )


def layout_named(name: str) -> Layout:
    """A preset name, 'demo', or a JSON file {"name", "ram": [[start, end], ...], "gbpages",
    "pti", "kernel": {"text": ..., ...}}."""
    if name in PRESETS:
        return PRESETS[name]
    if name == "demo":
        return demo_layout()
    if name.endswith(".json"):
        try:
            with open(name, "r", encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise BadInputError(f"cannot read layout {name}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise BadInputError(f"layout {name}:{e.lineno}: bad JSON: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise BadInputError(f"layout {name}: not UTF-8 text (byte {e.start})") from None
        except RecursionError:
            raise BadInputError(f"layout {name}: bad JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer longer than Python's digit limit
            raise BadInputError(f"layout {name}: bad JSON: {str(e).splitlines()[0]}") from None
        return layout_from_json(d, name)
    raise BadInputError(f"unknown layout {name!r} (presets: {', '.join(PRESETS)}, demo, or FILE.json)")


def layout_from_json(d: dict[str, Any], source: str = "layout") -> Layout:
    if not isinstance(d, dict) or "ram" not in d:
        raise BadInputError(f'{source}: a layout is an object with at least "ram"')
    try:
        ram = tuple(
            (parse_int(s, f"{source} ram start"), parse_int(e, f"{source} ram end")) for s, e in d["ram"]
        )
    except (TypeError, ValueError):
        raise BadInputError(f"{source}: ram must be a list of [start, end] pairs") from None
    kd = d.get("kernel", {})
    if not isinstance(kd, dict):
        raise BadInputError(f"{source}: kernel must be an object of symbol: address")
    known = set(KernelImage.__dataclass_fields__)
    bad = sorted(set(kd) - known)
    if bad:
        raise BadInputError(f"{source}: unknown kernel symbol {bad[0]!r} (known: {', '.join(sorted(known))})")
    k = KernelImage(**{key: parse_int(v, f"{source} kernel.{key}") for key, v in kd.items()})
    lay = Layout(
        str(d.get("name", source)),
        ram,
        gbpages=bool(d.get("gbpages", True)),
        pti=bool(d.get("pti", False)),
        kernel=k,
    )
    for key in ADDRESS_FIELDS:
        if key in d:
            # an int field named at run time: replace() cannot check a computed keyword
            value: dict[str, Any] = {key: parse_int(d[key], f"{source} {key}")}
            lay = replace(lay, **value)
    if "table_pool" in d:
        try:
            pool = tuple(
                (parse_int(a, f"{source} table_pool start"), parse_int(b, f"{source} table_pool end"))
                for a, b in d["table_pool"]
            )
        except (TypeError, ValueError):
            raise BadInputError(f"{source}: table_pool must be a list of [start, end] pairs") from None
        lay = replace(lay, table_pool=pool)
    lay.check()
    return lay


# Bounds checked before the model allocates anything. 4-level paging gives the direct map 64 TiB
# (MAX_PHYSMEM_BITS = 46, arch/x86/include/asm/sparsemem.h), and the model maps it with one Python
# int per leaf: 2^21 leaves (4 TiB in 2M pages, all of 64 TiB in 1G pages) build in about 2 s.
MAX_PHYSMEM_BITS = 46
MAX_MAP_LEAVES = 1 << 21


def direct_map_leaves(ranges: Iterable[tuple[int, int]], gbpages: bool) -> int:
    """Leaves init_memory_mapping would write for `ranges` ([start, end) byte pairs)."""
    return sum((e - s) // size for a, b in ranges for s, e, size in split_mem_range(a, b, gbpages))


def check_direct_map_size(ranges: Sequence[tuple[int, int]], gbpages: bool, what: str) -> None:
    """Refuse RAM the 4-level direct map cannot hold, or more leaves than MAX_MAP_LEAVES."""
    for s, e in ranges:
        if e > 1 << MAX_PHYSMEM_BITS:
            raise BudgetError(
                f"{what}: RAM {s:#x}-{e:#x} ends above 64 TiB, the 4-level direct "
                f"map's size (MAX_PHYSMEM_BITS = {MAX_PHYSMEM_BITS})"
            )
    n = direct_map_leaves(ranges, gbpages)
    if n > MAX_MAP_LEAVES:
        raise BudgetError(
            f"{what}: the direct map would need {n} leaves, more than the model's "
            f"limit of {MAX_MAP_LEAVES} (4 TiB in 2M pages; 1G pages need fewer)"
        )


def split_mem_range(start: int, end: int, gbpages: bool) -> list[tuple[int, int, int]]:
    """[start, end) cut into (start, end, page_size) pieces the way init_memory_mapping does:
    4K up to the first 2M boundary, 2M up to the first 1G boundary, 1G body (if gbpages), then
    2M and a 4K tail (arch/x86/mm/init.c split_mem_range)."""
    out: list[tuple[int, int, int]] = []

    def add(s: int, e: int, size: int) -> None:
        if s < e:
            out.append((s, e, size))

    pmd_s = min(-(-start // (1 << 21)) << 21, end)
    add(start, pmd_s, 4096)
    pmd_e = (end >> 21) << 21
    if gbpages:
        pud_s = min(-(-pmd_s // GiB) * GiB, pmd_e)
        pud_e = max((pmd_e // GiB) * GiB, pud_s)
        add(pmd_s, pud_s, 1 << 21)
        add(pud_s, pud_e, GiB)
        add(pud_e, pmd_e, 1 << 21)
    else:
        add(pmd_s, pmd_e, 1 << 21)
    add(max(pmd_e, pmd_s), end, 4096)
    return [p for p in out if p[0] < p[1]]
