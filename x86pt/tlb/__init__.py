# SPDX-License-Identifier: GPL-2.0-or-later
"""An architectural model of the TLBs and paging-structure caches of N logical processors
(Intel SDM Vol. 3A §4.10), and the kernel's TLB flushes as trace operations.

The SDM lets a processor cache a translation whenever the paging structures give one (also for
prefetches and speculative accesses, §4.10.2.3), keep it after software changes the structures,
and drop it at any time (§4.10.2.2). So the model never guesses what one CPU holds: each CPU
carries the set of entries it *may* hold, fills add to it, and only the invalidations the SDM
requires (§4.10.4.1) remove from it. `may_use()` answers with the set of translations a CPU may
use for an address — the cached ones it may hold plus every walk it may make, from CR3 or from a
paging-structure-cache entry — never with one guess.

What one TLB entry holds (§4.10.2.2): the page frame, R/W and U/S ANDed and XD ORed over the walk,
the protection key, the dirty flag of the leaf, the PCID it was made under and whether it is
global (G=1 in the leaf with CR4.PGE=1, §4.10.2.4). A 2M/1G translation is one entry for the
whole page; a processor that splits it into 4K pieces is indistinguishable by the §4.10.2.3 rule
that INVLPG and page faults remove all of them.

What a paging-structure-cache entry holds (§4.10.3.1): for a PML5E/PML4E/PDPTE/PDE that
references a table, the table's address and the rights accumulated down to that entry. Entries
are never global; they belong to the PCID they were made under.

Also here: `differences()` (every range where a cached translation differs from the tables, benign
or dangerous), and the trace operations `flush_tlb_all`, `flush_tlb_kernel_range`, `invlpg`,
`touch`, ... with `apply_tlb_op()`, a pure function of a `TlbSystem` for `cpa replay --tlb`.

The package, one concern per module, bottom up: `entries` (the records and a walk from a cached
point), `cache` (one CPU's caches, fills and drop primitives), `invalidate` (`Cpu`: INVLPG,
INVPCID, MOV to CR0/CR3/CR4), `differences` (stale translations and their windows), `system`
(`TlbSystem`: N CPUs over one memory), `kernel` (the kernel's flushes and the trace operations),
`replay` (`TlbReplay`, the replay driver's side). Every public name is importable from here.
"""

from x86pt.tlb.differences import KINDS, Difference, Window, WindowTracker, cpu_differences, merge_differences
from x86pt.fields import BIT_G
from x86pt.tlb.entries import (
    CR3_NOFLUSH,
    PAGE,
    PAGE_SIZES,
    SIZE_1G,
    SIZE_2M,
    TLB_FLUSH_ALL,
    TLB_SINGLE_PAGE_FLUSH_CEILING,
    U64,
    GeneralProtection,
    PscEntry,
    TlbEntry,
    Use,
)
from x86pt.tlb.invalidate import Cpu
from x86pt.tlb.kernel import (
    ACCESS_WORDS,
    TLB_OPS,
    FlushDone,
    apply_tlb_op,
    flush_tlb_kernel_range,
    format_tlb_op,
    kernel_range_plan,
    parse_tlb_line,
)
from x86pt.tlb.replay import FLUSH_OPS, TlbReplay
from x86pt.tlb.system import TlbSystem

__all__ = [
    "ACCESS_WORDS",
    "BIT_G",
    "CR3_NOFLUSH",
    "FLUSH_OPS",
    "KINDS",
    "PAGE",
    "PAGE_SIZES",
    "SIZE_1G",
    "SIZE_2M",
    "TLB_FLUSH_ALL",
    "TLB_OPS",
    "TLB_SINGLE_PAGE_FLUSH_CEILING",
    "U64",
    "Cpu",
    "Difference",
    "FlushDone",
    "GeneralProtection",
    "PscEntry",
    "TlbEntry",
    "TlbReplay",
    "TlbSystem",
    "Use",
    "Window",
    "WindowTracker",
    "apply_tlb_op",
    "cpu_differences",
    "flush_tlb_kernel_range",
    "format_tlb_op",
    "kernel_range_plan",
    "merge_differences",
    "parse_tlb_line",
]
