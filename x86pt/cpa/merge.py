"""Merge policies, side by side (docs/cpa.md §7):

* `none`        never merge (the kernel before 6.15, and every call but set_memory_rox after).
* `upstream`    v6.15 `cpa_collapse_large_pages`: only for calls with CPA_COLLAPSE
                (set_memory_rox), only the primary range's tables, PMD first then PUD.
* `nr-same-prot` Aaron Lu's 2022 RFC: tables born from splits keep `same_prot` and an
                incrementally maintained `nr_same_prot`; a table merges when the count reaches
                512 (4K->2M, then 2M->1G through the parent's counter). Writes that bypass CPA
                (kfence) do not adjust the count — exactly the weakness the review named.
* `ideal`       after every operation, merge every table the operation touched whose entries
                allow it (present, bit-identical flags, contiguous and aligned frames, no
                _PAGE_KERNEL_4K), cascading to 1G when gbpages is on. A table born from a
                forced split (set_memory_4k) is never merged, on every kernel: before 6.15 no
                bit records the request, but the best *correct* merge must not undo it (kfence
                writes that PTE later).
"""

from __future__ import annotations

from x86pt.cpa.kernel import (
    KERNEL_4K,
    P,
    PMD_PFN_MASK,
    PSE,
    PTE_PFN_MASK,
    PUD_PFN_MASK,
    U64,
    flags_of,
    k4_2_large,
)
from x86pt.cpa.space import KernelSpace
from x86pt.cpa.tables import M48, Table, is_run
from x86pt.errors import BadInputError

POLICIES = ("none", "upstream", "nr-same-prot", "ideal")
HI = ~M48 & U64


def _va(key: int, shift: int) -> int:
    v = key << shift
    return v | HI if v >> 47 else v


class Policy:
    name = "none"
    needs_touched = False

    def __init__(self, m: KernelSpace) -> None:
        self.m = m
        self.note = ""

    def collapse(self, addr: int, numpages: int) -> None:
        """cpa_flush's CPA_COLLAPSE hook."""

    def after_op(self, touched: set[int] | None) -> None:
        """Called by the replay driver after each operation."""

    def on_force_4k(self, addr: int, numpages: int) -> None:
        """A CPA call with force_split (set_memory_4k, its alias too) covers these pages."""

    # shared merge steps ------------------------------------------------------------------------
    def pte_table_mergeable(self, t: Table) -> bool:
        first = t[0]
        if not first & P or first & PTE_PFN_MASK & 0x1FF000:
            return False
        if first & KERNEL_4K:
            return False
        return is_run(t, 1 << 12)

    def pmd_table_mergeable(self, t: Table) -> bool:
        first = t[0]
        if not first & P or not first & PSE or first & PMD_PFN_MASK & 0x3FE00000:
            return False
        return is_run(t, 1 << 21)

    def merge_pte_table(self, key: int, rfc: bool) -> None:
        """Replace PTE table `key` by a 2M leaf made from its entry 0 (pfn_pmd + 4k_2_large)."""
        first = self.m.t1[key][0]
        new = (first & PTE_PFN_MASK) | k4_2_large(first & ~PTE_PFN_MASK & U64) | PSE
        self.m.free_queue.append(replace_table(self.m, 1, key, new, rfc))

    def merge_pmd_table(self, key: int, rfc: bool) -> None:
        """Replace PMD table `key` by a 1G leaf made from its entry 0."""
        first = self.m.t2[key][0]
        new = (first & PUD_PFN_MASK) | flags_of(first, 2)
        self.m.free_queue.append(replace_table(self.m, 2, key, new, rfc))

    def flush_and_free(self) -> None:
        m = self.m
        if m.free_queue:
            m.counters.flush_all += 1
            m.counters.flush_all_merge += 1
            if m.flush_hook is not None:
                m.flush_hook("all")
            for pa in m.free_queue:
                m.pool.release(pa)
                m.counters.tables_freed += 1
            m.free_queue.clear()


class Upstream(Policy):
    name = "upstream"

    def __init__(self, m: KernelSpace) -> None:
        super().__init__(m)
        if not m.version.collapse:
            self.note = f"kernel {m.version.name} has no CPA_COLLAPSE: upstream behaves as none"

    def collapse(self, addr: int, numpages: int) -> None:
        """cpa_collapse_large_pages (docs/cpa.md §7.2): candidates are the 2M-aligned addresses of the
        primary range; PMD collapse, then PUD collapse only where the PMD one succeeded."""
        m = self.m
        if not m.version.collapse:
            return
        end = addr + (numpages << 12)
        a = addr & ~((1 << 21) - 1)
        while a < end:
            v = a & M48
            t3 = m.t3.get(v >> 39)
            if t3 is not None:
                e3 = t3[(v >> 30) & 511]
                if e3 & P and not e3 & PSE:
                    t2 = m.t2[v >> 30]
                    e2 = t2[(v >> 21) & 511]
                    if e2 & P and not e2 & PSE and self.pte_table_mergeable(m.t1[v >> 21]):
                        self.merge_pte_table(v >> 21, False)
                        if m.layout.gbpages and self.pmd_table_mergeable(t2):
                            self.merge_pmd_table(v >> 30, False)
            a += 1 << 21
        self.flush_and_free()


class Ideal(Policy):
    name = "ideal"
    needs_touched = True

    def __init__(self, m: KernelSpace) -> None:
        super().__init__(m)
        self.pinned: set[int] = set()  # 2M regions (va >> 21) set_memory_4k asked to keep 4K

    def on_force_4k(self, addr: int, numpages: int) -> None:
        v = addr & self.m.vmask
        self.pinned.update(range(v >> 21, ((v + (numpages << 12) - 1) >> 21) + 1))

    def _pinned(self, tl: int, key: int, t: Table) -> bool:
        # a PMD table holding a pinned region never becomes mergeable (that entry stays a
        # pointer to the pinned PTE table), so only PTE tables are looked up
        return tl == 1 and key in self.pinned

    def after_op(self, touched: set[int] | None) -> None:
        if not touched:
            return
        m = self.m
        pte_tables: set[int] = set()
        for ek in touched:
            tl, k = ek & 3, ek >> 2
            if tl == 1:
                pte_tables.add(k >> 9)
            elif tl == 2:
                pte_tables.add(k)
        pmd_tables: set[int] = set()
        for key in pte_tables:
            t = m.t1.get(key)
            if t is not None and not self._pinned(1, key, t) and self.pte_table_mergeable(t):
                # the table must still hang where its key says (it does, by construction)
                self.merge_pte_table(key, True)
                pmd_tables.add(key >> 9)
        if m.layout.gbpages:
            for ek in touched:
                if ek & 3 == 2:
                    pmd_tables.add(ek >> 11)
            for key in pmd_tables:
                t = m.t2.get(key)
                if t is not None and not self._pinned(2, key, t) and self.pmd_table_mergeable(t):
                    self.merge_pmd_table(key, True)
        self.flush_and_free()


class NrSameProt(Policy):
    """The RFC's bookkeeping. `st[tl][key] = [same_prot, nr_same_prot]` for split-born tables."""

    name = "nr-same-prot"

    def __init__(self, m: KernelSpace) -> None:
        super().__init__(m)
        self.st: dict[int, dict[int, list[int]]] = {1: {}, 2: {}}
        m.nsp = self

    def new_table(self, tl: int, key: int, children: Table, ref: int) -> None:
        self.st[tl][key] = [ref, 512]

    def adjust(self, tl: int, key: int, t: Table, i: int, old: int, new: int) -> None:
        """set_pte_adjust_nr_same_prot."""
        d = self.st.get(tl)
        if d is None:
            return
        s = d.get(key)
        if s is None:
            return
        sp = s[0]
        po, pn = flags_of(old, tl), flags_of(new, tl)
        if po == sp and pn != sp:
            s[1] -= 1
        elif po != sp and pn == sp:
            s[1] += 1
        if s[1] == 0:  # re-baseline on entry 0 and recount
            s[0] = sp = flags_of(t[0], tl)
            s[1] = sum(1 for e in t if flags_of(e, tl) == sp)
        if s[1] == 512 and sp & P and (tl == 1 or sp & PSE):
            self.merge_splitted_mapping(tl, key, sp)

    def forget(self, tl: int, key: int) -> None:
        """Table `key` was freed outside CPA (vmap's pmd_free_pte_page)."""
        self.st[tl].pop(key, None)

    def merge_splitted_mapping(self, tl: int, key: int, sp: int) -> None:
        """Merge without any PFN contiguity test (tables born from splits are contiguous)."""
        m = self.m
        del self.st[tl][key]
        first = (m.t1 if tl == 1 else m.t2)[key][0]
        new = (first & PTE_PFN_MASK) | (k4_2_large(sp) | PSE if tl == 1 else sp)
        pa = replace_table(m, tl, key, new, True)  # may cascade through the parent's count
        m.counters.flush_all += 1  # flush_tlb_all inside pgd_lock
        m.counters.flush_all_merge += 1
        if m.flush_hook is not None:
            m.flush_hook("all")
        m.pool.release(pa)
        m.counters.tables_freed += 1

    def recount(self, tl: int, key: int) -> tuple[int, int] | None:
        """(stored, actual) count for a tracked table, for the validator."""
        s = self.st.get(tl, {}).get(key)
        if s is None:
            return None
        t = (self.m.t1 if tl == 1 else self.m.t2)[key]
        return s[1], sum(1 for e in t if flags_of(e, tl) == s[0])


def replace_table(m: KernelSpace, tl: int, key: int, new: int, rfc: bool) -> int:
    """Drop PTE (tl 1) or PMD (tl 2) table `key` and write the large leaf `new` into its parent
    entry through the CPA write, with the collapse/merge accounting. Returns the freed table's
    physical page (the caller flushes the TLB before the page goes back to the pool)."""
    tables, parents = (m.t1, m.t2) if tl == 1 else (m.t2, m.t3)
    del tables[key]
    parent = parents[key >> 9]
    pa = parent[key & 511] & PTE_PFN_MASK
    m.counters.all_merges += 1
    if m.virt_addr_counted(_va(key, 21 if tl == 1 else 30)):
        m.collapse_page_count(tl + 1, rfc)
    m.write(tl + 1, key >> 9, parent, key & 511, new)
    return pa


def make_policy(name: str, m: KernelSpace) -> Policy:
    cls = {"none": Policy, "upstream": Upstream, "nr-same-prot": NrSameProt, "ideal": Ideal}.get(name)
    if cls is None:
        raise BadInputError(f"unknown merge policy {name!r} (one of {', '.join(POLICIES)})")
    return cls(m)
