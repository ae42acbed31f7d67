"""The protections CPA enforces whatever the caller asks (docs/cpa.md §4.6): static_protections
(kernel text stays executable, rodata read-only, and the text's large pages stay read-only once
mark_rodata_ro ran) and the warn-only W^X check verify_rwx. Both read the kernel space only.
"""

from __future__ import annotations

from x86pt.cpa.kernel import NX, RW, P
from x86pt.cpa.space import KernelSpace


def static_protections(m: KernelSpace, prot: int, start: int, pfn: int, npg: int, lpsize: int) -> int:
    """static_protections: `prot` without the bits a protected range forbids for the npg pages
    at start (pfn), looked at as a large page of lpsize bytes (0: 4K); 64-bit, no PCI BIOS rule."""
    if not prot & P:
        return prot
    end = start + npg * 4096 - 1
    forbidden = 0
    if start <= m.etext_va - 1 and m.text_va <= end:  # protect_kernel_text
        forbidden = NX
    if m.kernel_set_to_readonly and (lpsize != npg * 4096 or start & (lpsize - 1)):
        if start <= m.hpage_align_va - 1 and m.text_va <= end:  # protect_kernel_text_ro
            if m.lookup(start)[0] != 1:
                forbidden |= RW
    if m.kernel_set_to_readonly and pfn <= m.rodata_epfn and m.rodata_spfn <= pfn + npg - 1:
        forbidden |= RW  # protect_rodata
    return prot & ~forbidden


def verify_rwx(m: KernelSpace, old: int, new: int) -> None:
    """verify_rwx: warn-only W^X check (upper levels are _KERNPG_TABLE: RW, executable)."""
    if m.version.verify_rwx and (old ^ new) & (RW | NX) and (new & (RW | NX)) == RW:
        m.counters.wx_warnings += 1
