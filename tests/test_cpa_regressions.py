"""Regressions of the CPA model. The highmap alias at the kernel image's end: cpa_process_alias() (arch/x86/mm/pat/set_memory.c,
v6.1-v6.18) skips the highmap alias only when the primary address is `within(vaddr, _text,
_brk_end)`, and within() excludes its end. So a call whose address is exactly _brk_end's highmap
address (its frame still below roundup(_brk_end, PMD_SIZE), inside the highmap frames) processes
the alias, and an alias call sets force_flush_all: the call ends with one flush_tlb_all instead
of a one-page flush. One page below _brk_end is within: no alias, a one-page flush."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import pytest

from x86pt.cpa.layout import layout_named
from x86pt.cpa.trace import new_model


def _call(kernel: str, delta: int) -> int:
    """4K pages set-checked (x86/cpa_stats' cpa_4k_install: one per 4K PTE __change_page_attr
    sets) by set_memory_ro of the one highmap page at _brk_end + delta."""
    m = new_model(layout_named("server-64g"), kernel, "none")
    assert m.layout.kernel.brk_end % (2 << 20), "the case needs a _brk_end that is not 2M aligned"
    before = m.counters.setchecked_4k
    assert m.set_memory_ro(m.brk_end_va + delta, 1) == 0
    return m.counters.setchecked_4k - before


@pytest.mark.parametrize("kernel", ["6.1", "6.15"])
def test_a_call_at_brk_end_processes_the_highmap_alias(kernel):
    """At _brk_end: the primary PTE, its direct-map alias and the (redundant) highmap alias."""
    assert _call(kernel, 0) == 3


@pytest.mark.parametrize("kernel", ["6.1", "6.15"])
def test_a_call_just_below_brk_end_is_within_the_image(kernel):
    """One page below: within [_text, _brk_end), so only the primary PTE and its direct-map alias."""
    assert _call(kernel, -0x1000) == 2


@pytest.mark.parametrize("name", ["laptop-4g", "server-64g", "server-1t", "demo"])
def test_layout_json_round_trips(name):
    """A layout written as JSON and read back is the same layout (every field, the demo's
    modules_end and kernel_image_size included)."""
    from x86pt.cpa.layout import layout_from_json

    lay = layout_named(name)
    back = layout_from_json(lay.to_json(), "t")
    assert back == lay
