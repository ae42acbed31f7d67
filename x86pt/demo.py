"""`x86pt demo`: an embedded Linux-like address space, and a tour of what x86pt does with it.

The image is built here (no file needed): the direct map at PAGE_OFFSET with 1G/2M pages and 4K at
the low edge, the kernel image (text ROX, rodata RO, data RW NX), a module area of 4K pages whose
frames alias the direct map, and a few user pages. Other parts of x86pt add their own sections
through `demo_section(ctx)` in their cli module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from dataclasses import dataclass, field

from x86pt.build import Builder

# The embedded machine's address space (RAM, PAGE_OFFSET, kernel text, modules) is the CPA
# model's `demo` layout; both read it from x86pt/cpa/layout.py.
from x86pt.cpa.layout import DEMO_KERNEL_TEXT as KERNEL_TEXT
from x86pt.cpa.layout import DEMO_RAM as RAM
from x86pt.cpa.layout import MODULES_VADDR as MODULES
from x86pt.cpa.layout import PAGE_OFFSET
from x86pt.errors import BadInputError
from x86pt.memory.sparse import SparseMemory
from x86pt.state import CR4_PGE, CR4_SMAP, CR4_SMEP, PagingState

# Linux's kernel protections (docs/cpa.md §2.2): __PAGE_KERNEL = P|RW|A|D|G|NX, ..._RO = P|A|G|NX,
# ..._ROX = P|A|G; user pages get US.
KERNEL = "p rw a d g nx"
KERNEL_RO = "p a g nx"
KERNEL_ROX = "p a g"


def linux_like_image(levels: int = 4) -> tuple[SparseMemory, PagingState, dict[str, int]]:
    """Build the demo address space; returns (memory, state, named addresses)."""
    b = Builder(levels=levels, maxphyaddr=46, table_base=0x7E00000, table_flags="p rw us a")
    # Direct map: 4K pages over the first 2M (RAM only; the 640K-1M hole stays unmapped),
    # 2M pages up to 1G, 1G pages where whole gigabytes are RAM.
    for start, end in RAM:
        pa = start
        while pa < end:
            if pa % (1 << 30) == 0 and pa + (1 << 30) <= end and pa >= (1 << 30):
                b.map(PAGE_OFFSET + pa, pa, 1 << 30, 1 << 30, KERNEL)
                pa += 1 << 30
            elif pa % (1 << 21) == 0 and pa + (1 << 21) <= end and pa >= (1 << 21):
                b.map(PAGE_OFFSET + pa, pa, 1 << 21, 1 << 21, KERNEL)
                pa += 1 << 21
            else:
                b.map(PAGE_OFFSET + pa, pa, 4096, 4096, KERNEL)
                pa += 4096
    # Kernel image at phys 16M: text 8M ROX (2M pages), rodata 4M RO, data+bss 2M RW NX in 4K pages.
    b.map(KERNEL_TEXT, 0x1000000, 8 << 20, 1 << 21, KERNEL_ROX)
    b.map(KERNEL_TEXT + (8 << 20), 0x1800000, 4 << 20, 1 << 21, KERNEL_RO)
    b.map(KERNEL_TEXT + (12 << 20), 0x1C00000, 2 << 20, 4096, KERNEL)
    # A module: 3 pages of text (ROX) and 2 of data, frames borrowed from the direct map.
    b.map(MODULES, 0x3A000000, 3 * 4096, 4096, KERNEL_ROX)
    b.map(MODULES + 3 * 4096, 0x3A003000, 2 * 4096, 4096, KERNEL)
    # A user process: text r-x, data rw nx, a stack page, all with US.
    b.map(0x400000, 0x5000000, 2 * 4096, 4096, "p us a")
    b.map(0x600000, 0x5002000, 4096, 4096, "p rw us a d nx")
    b.map(0x7FFFFFFDE000, 0x5003000, 4096, 4096, "p rw us a d nx")
    st = b.state(cr4=CR4_PGE | CR4_SMEP | CR4_SMAP)
    b.memory.control_registers = {
        "cr0": st.cr0,
        "cr3": st.cr3,
        "cr4": st.cr4,
        "efer": st.efer,
        "maxphyaddr": st.m,
    }
    names = {
        "PAGE_OFFSET": PAGE_OFFSET,
        "kernel text": KERNEL_TEXT,
        "modules": MODULES,
        "user text": 0x400000,
        "user data": 0x600000,
        "user stack": 0x7FFFFFFDE000,
    }
    return b.memory, st, names


@dataclass
class DemoContext:
    memory: SparseMemory
    state: PagingState
    image_path: str
    out_dir: str
    json: bool = False
    names: dict[str, int] = field(default_factory=dict)

    # One line per section that did not reach its expected verdict; run_demo exits 1 then.
    failures: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        if not self.json:
            print(f"\n== {text} " + "=" * max(0, 74 - len(text)))

    def fail(self, section: str, message: str) -> None:
        """Record that `section` reached the wrong verdict (the demo then exits 1)."""
        self.failures.append(f"{section}: {message}")


def run_demo(args: argparse.Namespace) -> int:
    from x86pt.memory import write_image
    from x86pt.plugins import command_modules
    from x86pt.describe import render_result, result_json
    from x86pt.walk import Access, walk

    out_dir = args.out or tempfile.mkdtemp(prefix="x86pt-demo-")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise BadInputError(f"--out {out_dir}: exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"--out {out_dir}: cannot create the directory: {e.strerror}") from None
    memory, state, names = linux_like_image()
    image_path = os.path.join(out_dir, "linux-like.elf")
    write_image(memory, state, image_path, "elf")
    ctx = DemoContext(memory, state, image_path, out_dir, bool(getattr(args, "json", False)), names)
    if not ctx.json:
        print("x86pt demo: an embedded Linux-like address space (4-level, 6 GiB of RAM).")
        print(f"image written to {image_path} (ELF core, QEMU note layout, {len(memory.pages)} table pages)")
        print(f"state: {state.describe()}")
    ctx.heading("Walks (x86pt walk IMAGE VA --access ... [--user])")
    # Each walk with the outcome the image was built to give (SDM Vol. 3A §4.6: WP, SMAP, SMEP,
    # US; §4.5: canonical addresses); a different outcome fails the demo.
    cases = [
        (PAGE_OFFSET + 0x12345678, Access("read"), "direct map, inside a 2M page", "ok"),
        (PAGE_OFFSET + 0x140000000, Access("write"), "direct map, 1G page", "ok"),
        (KERNEL_TEXT + 0x1234, Access("fetch"), "kernel text (ROX)", "ok"),
        (KERNEL_TEXT + 0x1234, Access("write"), "kernel text is read-only (WP=1)", "page_fault"),
        (MODULES + 0x1000, Access("fetch"), "module text, a 4K alias of the direct map", "ok"),
        (0x600010, Access("write", user=True), "user data", "ok"),
        (0x600010, Access("read"), "SMAP: kernel read of user data with AC=0", "page_fault"),
        (0x600010, Access("read", ac=True), "... with EFLAGS.AC=1", "ok"),
        (0x400000, Access("fetch"), "SMEP: kernel fetch from user text", "page_fault"),
        (0x401000, Access("write", user=True), "user write to its text", "page_fault"),
        (0x800000, Access("read", user=True), "unmapped user address", "page_fault"),
        (0x0000800000000000, Access("read"), "non-canonical", "general_protection"),
    ]
    results = []
    for va, acc, what, expect in cases:
        r = walk(state, memory, va, acc)
        results.append(r)
        if r.outcome != expect:
            ctx.fail("walk", f"{what}: {r.outcome}, expected {expect}")
        if ctx.json:
            print(
                __import__("json").dumps(
                    {
                        "section": "walk",
                        "what": what,
                        "access": acc.describe(),
                        **{k: v for k, v in result_json(r).items() if k != "steps"},
                    }
                )
            )
        else:
            print(f"-- {what}: {acc.describe()}")
            print(render_result(r, steps=(what == "module text, a 4K alias of the direct map")))
    for mod in command_modules():
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError:
            continue
        section = getattr(m, "demo_section", None)
        if section is not None:
            section(ctx)
    if not ctx.json:
        print(f"\nFiles are in {out_dir}. Try: python -m x86pt walk {image_path} {KERNEL_TEXT:#x}")
    sys.stdout.flush()
    if ctx.failures:
        for f in ctx.failures:
            print(f"demo: FAILED {f}", file=sys.stderr)
        return 1
    return 0
