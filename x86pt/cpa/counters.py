"""The numbers the kernel keeps about its direct map and the costs the model measures
(docs/cpa.md §5, §4.8): direct_pages_count[] as /proc/meminfo prints it, the vmstat events, the
cpa_stats debugfs figures, TLB flushes and page-table pages."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Counters:
    """Mutable while a replay runs; `snapshot()` gives a plain dict for records and plots."""

    # direct_pages_count[PG_LEVEL_4K..1G] (number of mappings per level)
    dpc4k: int = 0
    dpc2m: int = 0
    dpc1g: int = 0
    # vmstat (only counted when system_state == SYSTEM_RUNNING)
    split_2m: int = 0  # direct_map_level2_splits
    split_1g: int = 0  # direct_map_level3_splits
    collapse_2m: int = 0  # direct_map_level2_collapses (6.15 upstream)
    collapse_1g: int = 0  # direct_map_level3_collapses
    merge_2m: int = 0  # direct_map_level1_merges (2022 RFC; ideal uses these too)
    merge_1g: int = 0  # direct_map_level2_merges
    # every split/merge event, whatever the address (vmalloc, highmap, boot time)
    all_splits: int = 0
    all_merges: int = 0
    # cpa_stats (CONFIG_X86_CPA_STATISTICS)
    checked_1g: int = 0
    checked_2m: int = 0
    sameprot_1g: int = 0
    sameprot_2m: int = 0
    preserved_1g: int = 0
    preserved_2m: int = 0
    setchecked_4k: int = 0
    # TLB
    flush_all: int = 0  # flush_tlb_all (IPI to all CPUs, CR4.PGE toggle)
    flush_all_split: int = 0  # ... of which inside split_large_page
    flush_all_merge: int = 0  # ... of which after a collapse/merge
    flush_ranges: int = 0  # cpa_flush calls that used per-page invalidation
    invlpg_pages: int = 0  # pages invalidated one by one (on every CPU)
    local_flushes: int = 0  # debug_pagealloc / kfence: this CPU only
    wbinvd: int = 0
    clflush_pages: int = 0
    # page tables
    tables_allocated: int = 0  # by CPA splits
    tables_freed: int = 0  # by collapse / merge
    vmalloc_tables: int = 0  # allocated by vmap (not CPA)
    # calls
    cpa_calls: int = 0
    cpa_noop_calls: int = 0
    entries_written: int = 0
    static_conflicts: int = 0  # WARN "CPA conflict" (force_static_prot)
    wx_warnings: int = 0  # verify_rwx "CPA detected W^X violation"
    zero_pte_warnings: int = 0
    unaligned_warnings: int = 0
    errors: int = 0
    oob_writes: int = 0
    oob_rejected: int = 0  # kfence found no 4K PTE (WARN in kfence_protect_page)

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def meminfo(self, gbpages: bool) -> dict[str, int]:
        """/proc/meminfo DirectMap lines in kB (arch_report_meminfo); 1G only with gbpages."""
        out = {"DirectMap4k": self.dpc4k * 4, "DirectMap2M": self.dpc2m * 2048}
        if gbpages:
            out["DirectMap1G"] = self.dpc1g * 1048576
        return out

    def meminfo_text(self, gbpages: bool) -> str:
        """The DirectMap lines of /proc/meminfo, byte for byte (x86pt.census.meminfo_text)."""
        from x86pt.census import meminfo_text

        return meminfo_text(self.dpc4k, self.dpc2m, self.dpc1g, gbpages)

    def vmstat(self) -> dict[str, int]:
        return {
            "direct_map_level2_splits": self.split_2m,
            "direct_map_level3_splits": self.split_1g,
            "direct_map_level2_collapses": self.collapse_2m,
            "direct_map_level3_collapses": self.collapse_1g,
            "direct_map_level1_merges": self.merge_2m,
            "direct_map_level2_merges": self.merge_1g,
        }

    def cpa_stats(self) -> str:
        """The text of debugfs x86/cpa_stats."""
        return (
            f"1G pages checked:     {self.checked_1g:16d}\n"
            f"1G pages sameprot:    {self.sameprot_1g:16d}\n"
            f"1G pages preserved:   {self.preserved_1g:16d}\n"
            f"2M pages checked:     {self.checked_2m:16d}\n"
            f"2M pages sameprot:    {self.sameprot_2m:16d}\n"
            f"2M pages preserved:   {self.preserved_2m:16d}\n"
            f"4K pages set-checked: {self.setchecked_4k:16d}\n"
        )


SUMMARY_KEYS = (
    "DirectMap4k",
    "DirectMap2M",
    "DirectMap1G",
    "split_2m",
    "split_1g",
    "collapse_2m",
    "collapse_1g",
    "merge_2m",
    "merge_1g",
    "tables",
    "tables_allocated",
    "tables_freed",
    "flush_all",
    "invlpg_pages",
)
