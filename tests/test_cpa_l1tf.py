# SPDX-License-Identifier: GPL-2.0-or-later
"""L1TF inversion in models imported from an image (pgtable-invert.h: a non-present, non-zero
entry stores its frame bit-inverted over PTE_PFN_MASK; pte_pfn/pmd_pfn undo it).

Regression for issue 10's demo false alarm: the demo imports its model from an image (inversion
on) and replays a generated workload whose kfence `oob` writer toggled P on the raw word, leaving
a non-present PTE with a non-inverted frame; the validator, decoding it as pte_pfn() does, saw
page 0x10fe4a000 map frame 0xffffef01b5000. Expected words are written from the kernel's
constants (__PAGE_KERNEL = 0x8000000000000163, large leaf 0x...1e3), not from the model."""

from __future__ import annotations

from x86pt.cpa.importer import model_from_image
from x86pt.cpa.layout import demo_layout
from x86pt.cpa.trace import parse_trace, replay
from x86pt.demo import linux_like_image

PO = 0xFFFF888000000000
PFN_MASK = 0x000FFFFFFFFFF000


def _model(policy="none"):
    mem, st, _ = linux_like_image()
    return model_from_image((mem, st), demo_layout(), "6.15", policy)


def _pte(m, va):
    lvl, e = m.leaf(va)
    assert lvl == 1
    return e


def test_oob_write_keeps_the_frame_of_an_inverted_model():
    """set_memory_4k then kfence-style P toggles: non-present = inverted frame, present again =
    the original word; the validator holds throughout (it stopped at the oob op before)."""
    m = _model()
    assert m.l1tf_invert
    pa = 0x10FE4A000
    ops = parse_trace([f"set_memory_4k {PO + pa:#x} 1", f"oob {PO + pa:#x} set=0x0 clr=0x1"])
    r = replay(m, ops, validate=True, samples=0)
    assert r.violation is None, r.violation
    # 6.15: set_memory_4k adds _PAGE_KERNEL_4K (bit 11) to __PAGE_KERNEL; oob clears P, so the
    # word is pfn_pte(pfn, 0x8000000000000962): the frame inverted over bits 12..51
    assert _pte(m, PO + pa) == ((~pa & PFN_MASK) | 0x8000000000000962)
    assert m.translate(PO + pa)[0] == pa >> 12
    r = replay(m, parse_trace([f"oob {PO + pa:#x} set=0x1 clr=0x0"]), validate=True, samples=0)
    assert r.violation is None, r.violation
    assert _pte(m, PO + pa) == pa | 0x8000000000000963


def test_in_place_np_of_a_whole_2m_leaf_inverts_and_p_restores():
    """set_memory_np over one whole aligned 2M leaf rewrites it in place (docs/cpa.md §4.4 step 10,
    pfn_pte(old_pfn, prot)): prot = 4k_2_large((0x...163 & ~P)) with G cleared (protnone) =
    0x8000000000000062, frame inverted; set_memory_p brings P back with PSE and without G."""
    m = _model()
    pa = 0x20000000  # a 2M leaf of the demo's direct map
    assert m.leaf(PO + pa) == (2, pa | 0x80000000000001E3)
    r = replay(m, parse_trace([f"set_memory_np {PO + pa:#x} 512"]), validate=True, samples=0)
    assert r.violation is None, r.violation
    assert m.leaf(PO + pa) == (2, (~pa & PFN_MASK) | 0x8000000000000062)
    assert m.translate(PO + pa + 0x5000)[0] == (pa + 0x5000) >> 12
    r = replay(m, parse_trace([f"set_memory_p {PO + pa:#x} 512"]), validate=True, samples=0)
    assert r.violation is None, r.violation
    assert m.leaf(PO + pa) == (2, pa | 0x80000000000000E3)


def test_generated_model_keeps_raw_words():
    """Without inversion (generated models) the oob writer is a plain P toggle."""
    from x86pt.cpa.layout import PRESETS
    from x86pt.cpa.ops import CpaModel

    m = CpaModel(PRESETS["laptop-4g"], "6.1", "none")
    pa = 0x20005000
    r = replay(
        m,
        parse_trace([f"set_memory_4k {PO + pa:#x} 1", f"oob {PO + pa:#x} set=0x0 clr=0x1"]),
        validate=True,
        samples=0,
    )
    assert r.violation is None
    assert _pte(m, PO + pa) == pa | 0x8000000000000162
