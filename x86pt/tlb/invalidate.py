# SPDX-License-Identifier: GPL-2.0-or-later
"""The instructions that invalidate (SDM §4.10.4.1): INVLPG, INVPCID, MOV to CR0/CR3/CR4, on one
logical processor's caches."""

from __future__ import annotations


from x86pt.state import CR0_PG, CR4_LA57, CR4_PAE, CR4_PCIDE, CR4_PGE, CR4_SMEP
from x86pt.tlb.cache import Caches
from x86pt.tlb.entries import CR3_NOFLUSH, U64, GeneralProtection, _sx


class Cpu(Caches):
    """One logical processor: its control registers (a PagingState), the TLB and paging-structure-
    cache entries it may hold (Caches), and the instructions that invalidate them."""

    # -- the instructions of SDM §4.10.4.1 ---------------------------------------------------
    def invlpg(self, va: int) -> None:
        """INVLPG: TLB entries of the current PCID for the page number of va — of every page
        size, so the whole large page that holds va — and global entries for it regardless of
        PCID; and every paging-structure-cache entry of the current PCID, whatever its address.
        A non-canonical operand makes INVLPG a NOP (SDM Vol. 2A INVLPG)."""
        va &= U64
        if not self.state.canonical(va):
            return
        pcid = self.pcid
        self._drop_tlb_at(va, lambda e: e.pcid == pcid or e.global_)
        self._drop_psc(lambda p: p.pcid == pcid)

    def invpcid(self, kind: int, pcid: int = 0, va: int = 0) -> None:
        """INVPCID types 0-3 (SDM §4.10.4.1; Vol. 2A INVPCID). The model removes only what the
        SDM says is removed; that an implementation may remove more is inside the model's set.
        Type 0 removes the non-global TLB entries for va's page number and PCID and the
        paging-structure-cache entries of that PCID that would be used for va."""
        if kind not in (0, 1, 2, 3):
            raise GeneralProtection(f"#GP(0): INVPCID type {kind} is not defined")
        if not 0 <= pcid <= 0xFFF:
            raise GeneralProtection(f"#GP(0): INVPCID descriptor bits 63:12 must be 0 (pcid {pcid:#x})")
        pcide = bool(self.state.cr4 & CR4_PCIDE)
        if kind in (0, 1) and not pcide and pcid:
            raise GeneralProtection("#GP(0): INVPCID type 0/1 with a non-zero PCID while CR4.PCIDE=0")
        if kind == 0:
            va &= U64
            if not self.state.canonical(va):
                raise GeneralProtection(f"#GP(0): INVPCID type 0 with non-canonical address {va:#x}")
            self._drop_tlb_at(va, lambda e: e.pcid == pcid and not e.global_)
            self._drop_psc(lambda p: p.pcid == pcid and p.base <= _sx(self.state, va) < p.base + p.span)
        elif kind == 1:
            self._drop_tlb(lambda e: e.pcid == pcid and not e.global_)
            self._drop_psc(lambda p: p.pcid == pcid)
        elif kind == 2:
            self.flush_everything()
        else:
            self._drop_tlb(lambda e: not e.global_)
            self.psc.clear()

    def mov_cr3(self, value: int) -> None:
        """MOV to CR3 (SDM §4.10.4.1). PCIDE=0: all non-global entries of PCID 000H and all its
        paging-structure-cache entries. PCIDE=1, bit 63 clear: the same for the PCID in bits
        11:0 of the source. PCIDE=1, bit 63 set: nothing (and bit 63 is not stored)."""
        value &= U64
        pcide = bool(self.state.cr4 & CR4_PCIDE)
        noflush = pcide and bool(value & CR3_NOFLUSH)
        if pcide:
            value &= ~CR3_NOFLUSH
        if value & ~self.state.phys_mask & ~0xFFF:
            raise GeneralProtection(f"#GP(0): MOV to CR3 with reserved bits set ({value:#x})")
        self.state = self.state.replace(cr3=value)
        if noflush:
            return
        pcid = self.pcid
        self._drop_tlb(lambda e: e.pcid == pcid and not e.global_)
        self._drop_psc(lambda p: p.pcid == pcid)

    def mov_cr4(self, value: int) -> None:
        """MOV to CR4 (SDM §4.10.4.1): a change of PGE, or PCIDE 1->0, removes everything
        (global entries and all PCIDs); a change of PAE, or SMEP 0->1, removes every entry of
        the current PCID. PCIDE 0->1 removes nothing and needs CR3[11:0] = 0 (§4.10.1). A profile
        with pcide_off_flushes=False (QEMU's TCG) removes nothing for PCIDE 1->0."""
        old = self.state.cr4
        value &= U64
        if (value ^ old) & CR4_LA57:
            raise GeneralProtection("#GP(0): CR4.LA57 cannot change while IA-32e paging is on")
        if value & CR4_PCIDE and not old & CR4_PCIDE and self.state.cr3 & 0xFFF:
            raise GeneralProtection("#GP(0): CR4.PCIDE set while CR3[11:0] is not 0")
        cur = self.pcid
        self.state = self.state.replace(cr4=value)
        pcide_off = bool(old & CR4_PCIDE and not value & CR4_PCIDE)
        if (value ^ old) & CR4_PGE or (pcide_off and self.state.profile.pcide_off_flushes):
            self.flush_everything()
        elif (value ^ old) & CR4_PAE or (value & CR4_SMEP and not old & CR4_SMEP):
            self._drop_tlb(lambda e: e.pcid == cur)
            self._drop_psc(lambda p: p.pcid == cur)

    def mov_cr0(self, value: int) -> None:
        """MOV to CR0: clearing PG removes everything (SDM §4.10.4.1)."""
        old = self.state.cr0
        self.state = self.state.replace(cr0=value & U64)
        if old & CR0_PG and not value & CR0_PG:
            self.flush_everything()

    def toggle_pge(self) -> None:
        """What the kernel's __flush_tlb_global does without INVPCID: CR4.PGE off, then on."""
        cr4 = self.state.cr4
        self.mov_cr4(cr4 ^ CR4_PGE)
        self.mov_cr4(cr4)
