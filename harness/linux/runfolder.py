# SPDX-License-Identifier: GPL-2.0-or-later
"""Reading a run folder (docs/formats.md §8): its JSON files, its artefacts plain or xz-compressed
as fixtures keep them, what the run says about itself (run_meta), and its layout in the CPA
model's format (cpa_layout)."""

from __future__ import annotations

import json

from x86pt.errors import BadInputError


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise BadInputError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}: bad JSON: {e.msg}") from None


def run_meta(run_dir: str) -> dict:
    """What a run says about itself: run.json, written by every `x86pt linux run` (fresh runs and
    fixtures alike); a fixture's meta.json (source, versions, config) is read when run.json is
    missing, and its keys fill in what run.json lacks."""
    import os

    paths = [os.path.join(run_dir, n) for n in ("run.json", "meta.json")]
    have = [p for p in paths if os.path.exists(p)]
    if not have:
        raise BadInputError(f"{run_dir} has neither run.json nor meta.json (not an x86pt linux run)")
    meta: dict = {}
    for p in reversed(have):  # run.json last: it wins
        meta.update(load_json(p))
    return meta


def read_artifact(directory: str, name: str) -> bytes:
    """A run's file by name, plain or xz-compressed (`name.xz`, as fixtures keep big files)."""
    import lzma
    import os

    p = os.path.join(directory, name)
    try:
        if os.path.exists(p):
            with open(p, "rb") as f:
                return f.read()
        with open(p + ".xz", "rb") as f:
            return lzma.decompress(f.read())
    except FileNotFoundError:
        raise BadInputError(f"{p}: no such file (nor {name}.xz)") from None
    except lzma.LZMAError as e:
        raise BadInputError(f"{p}.xz: bad xz data: {e}") from None
    except OSError as e:
        raise BadInputError(f"cannot read {p}: {e.strerror}") from None


def materialize(directory: str, name: str, dest: str) -> str:
    """Path of `name` as a plain file: itself, or decompressed into `dest` (for xz fixtures)."""
    import os

    p = os.path.join(directory, name)
    if os.path.exists(p):
        return p
    from x86pt.memory.atomic import write_bytes_atomic

    out = os.path.join(dest, name)
    write_bytes_atomic(out, read_artifact(directory, name))
    return out


START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map: the highmap's base (x86-64)


def cpa_layout(layout: dict, name: str = "linux") -> dict:
    """The run's layout in the CPA model's layout format (x86pt.cpa.layout.layout_from_json):
    RAM ranges from /proc/iomem, the kernel image symbols as physical addresses (highmap VA -
    __START_KERNEL_map + phys_base), PAGE_OFFSET and gbpages as the guest had them."""
    sym = {k: int(v, 16) for k, v in layout.get("symbols", {}).items()}
    phys_base = int(layout.get("phys_base", "0x0"), 16)

    def pa(name: str) -> int:
        return sym[name] - START_KERNEL_MAP + phys_base

    def page_up(x: int) -> int:
        return (x + 0xFFF) & ~0xFFF

    ram = []
    for r in layout.get("iomem", []):
        if r["name"] == "System RAM":  # whole pages only (the first range ends at 0x9fc00)
            lo, hi = page_up(int(r["start"], 16)), int(r["end"], 16) & ~0xFFF
            if lo < hi:
                ram.append([hex(lo), hex(hi)])
    out: dict = {"name": name, "ram": ram, "gbpages": bool(layout.get("gbpages", True)), "pti": False}
    if "page_offset_base" in layout:
        out["page_offset"] = layout["page_offset_base"]
    need = (
        "_text",
        "_etext",
        "__start_rodata",
        "__end_rodata",
        "_sdata",
        "__init_begin",
        "__init_end",
        "__brk_base",
    )
    if all(n in sym for n in need):
        end_ro = sym.get("__end_rodata_hpage_align", (sym["__end_rodata"] + (2 << 20) - 1) & ~((2 << 20) - 1))
        out["kernel"] = {
            "text": hex(pa("_text")),
            "etext": hex(page_up(pa("_etext"))),
            "start_rodata": hex(pa("__start_rodata")),
            "end_rodata": hex(page_up(pa("__end_rodata"))),
            "end_rodata_hpage_align": hex(end_ro - START_KERNEL_MAP + phys_base),
            "sdata": hex(pa("_sdata")),
            "init_begin": hex(pa("__init_begin")),
            "init_end": hex(pa("__init_end")),
            # _brk_end's value when the run captured it, else __brk_base (older runs)
            "brk_end": hex(
                page_up(
                    int(layout["brk_end_value"], 16) - START_KERNEL_MAP + phys_base
                    if "brk_end_value" in layout
                    else pa("__brk_base")
                )
            ),
        }
    return out
