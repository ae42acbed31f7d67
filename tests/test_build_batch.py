"""Builder <-> walker (what the builder maps, the walker finds), the TOML spec, and the batch
translator against the scalar walker on random trees (every level's bits random)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from x86pt.batch import OUTCOME_NAMES, translate_batch
from x86pt.build import Builder, build_from_spec
from x86pt.errors import BadInputError, BudgetError
from x86pt.memory.sparse import SparseMemory
from x86pt.state import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_PKS,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PagingState,
    PROFILES,
)
from x86pt.walk import Access, Translation, walk

SIZES = {4096: 1, 1 << 21: 2, 1 << 30: 3}


@st.composite
def mappings(draw):
    out = []
    used = set()
    for _ in range(draw(st.integers(1, 6))):
        size = draw(st.sampled_from(list(SIZES)))
        slot = draw(st.integers(0, 255))
        hi = draw(st.sampled_from([0, 0xFFFF800000000000]))
        va = hi | (slot << 39) | (draw(st.integers(0, 511)) << 30)
        if size < (1 << 30):
            va |= draw(st.integers(0, 511)) << 21
        if size == 4096:
            va |= draw(st.integers(0, 511)) << 12
        if (va >> 30) in used:
            continue
        used.add(va >> 30)
        pa = draw(st.integers(0, (1 << 12) - 1)) * (1 << 30) + (
            draw(st.integers(0, 511)) * size if size < (1 << 30) else 0
        )
        pa &= ~(size - 1)
        flags = draw(
            st.fixed_dictionaries(
                {
                    "rw": st.integers(0, 1),
                    "us": st.integers(0, 1),
                    "xd": st.integers(0, 1),
                    "g": st.integers(0, 1),
                }
            )
        )
        out.append((va, pa, size, flags))
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps=mappings(), off=st.integers(0, 4095))
def test_what_the_builder_maps_the_walker_finds(maps, off):
    b = Builder(maxphyaddr=46, table_base=0x100000)
    for va, pa, size, flags in maps:
        b.map(va, pa, size, size, {**flags, "p": 1})
    st_ = b.state()
    for va, pa, size, flags in maps:
        r = walk(st_, b.memory, va + off, Access("read"))
        assert isinstance(r, Translation)
        assert (r.pa, r.page_size) == (pa + off, size)
        assert (r.rights.writable, r.rights.user, r.rights.executable) == (
            bool(flags["rw"]),
            bool(flags["us"]),
            not flags["xd"],
        )


def test_builder_refuses_overlaps_and_misalignment():
    b = Builder()
    b.map(0x40000000, 0, 1 << 21, 1 << 21, "rw")
    with pytest.raises(BadInputError, match="in the way"):
        b.map(0x40001000, 0, 4096, 4096, "rw")
    b.map(0x80000000, 0, 4096, 4096, "rw")
    with pytest.raises(BadInputError, match="table is mapped"):
        b.map(0x80000000, 0, 1 << 21, 1 << 21, "rw")
    with pytest.raises(BadInputError, match="aligned"):
        b.map(0x1000, 0x800, 4096, 4096, "rw")
    with pytest.raises(BadInputError, match="unknown flag"):
        b.map(0x1000, 0, 4096, 4096, "rw bogus")


SPEC = """
[image]
levels = 4
maxphyaddr = 40
tables = "0x200000"
[registers]
cr4 = "0x300020"   # PAE|SMEP|SMAP
[[map]]
va = "0xffff888000000000"
pa = 0
size = "1G"
page = "2M"
flags = "rw nx g"
[[map]]
va = "0x400000"
pa = "0x1000000"
size = "8K"
flags = "us"
[[entry]]
va = "0x500000"
level = 1
value = "0x0000000001234067"
"""


def test_toml_spec_builds_the_described_image():
    mem, st_ = build_from_spec(SPEC)
    assert st_.m == 40 and st_.smep and st_.smap and st_.cr3 == 0x200000
    r = walk(st_, mem, 0xFFFF888000123456, Access("write"))
    assert isinstance(r, Translation) and r.pa == 0x123456 and r.page_size == 1 << 21
    r = walk(st_, mem, 0x401008, Access("fetch", user=True))
    assert isinstance(r, Translation) and r.pa == 0x1001008
    r = walk(st_, mem, 0x500010, Access("write", user=True))
    assert isinstance(r, Translation) and r.pa == 0x1234010


@pytest.mark.parametrize(
    "text,msg",
    [
        ("[image]\nlevels = 3\n", "levels"),
        ("[[map]]\nva = 'zz'\n", "bad"),
        ("[[map]]\npa = 0\n", "missing key 'va'"),
        ("[oops]\n", "unknown section"),
        ("[[map]]\nva = '0x1000'\nflags = 'rw wat'\n", "unknown flag"),
        ("this is not toml = = =", "bad TOML"),
        # wrong types and keys (were TypeError/KeyError, exit 3)
        ("image = 5\n", r"\[image\] must be a table"),
        ("map = 5\n", "array of tables"),
        ("[[map]]\nva = 0\nsize = [1]\n", "expected a number or a string, not list"),
        ("[[map]]\nva = true\n", "not bool"),
        ("[[map]]\nva = 0\nflags = 3\n", "flags must be a string"),
        ("[[map]]\nva = 0\nwat = 1\n", "unknown key 'wat'"),
        ("[[entry]]\nva = 0\n", "missing key 'value'"),
        ("[[entry]]\nva = 0\nlevel = 9\nvalue = 1\n", "level"),
        ("[image]\nmaxphyaddr = 60\n", "maxphyaddr"),
        ("[image]\nvendor = 'via'\n", "intel or amd"),
        ("[[data]]\npa = 0\nhex = 'zz'\n", "bad hex"),
        ("[[data]]\npa = '0x3ffffffffffc'\nu64 = [1]\n", "past MAXPHYADDR"),  # 4 bytes left below 2^46
        ("[registers]\ncr4 = 0x1020\n", "LA57 but image.levels is 4"),
        ("[registers]\npkru = 0x100000000\n", "pkru"),
        ("[image]\ntables = '0x400000000000'\n", "tables"),  # 2^46: no room below M=46
        # 0x0000800000000000 is not canonical with 48-bit VAs (bit 47 set, 63:48 clear): it used to land
        # at 0xffff800000000000 because the index bits ignore bits 63:48.
        ("[[map]]\nva = '0x0000800000000000'\n", "not canonical"),
        ("[[map]]\nva = '0x7ffffffff000'\nsize = '8K'\n", "not canonical"),
        # the last page of a 36-bit space plus one more: ends at 2^36 + 0x1000
        ("[image]\nmaxphyaddr = 36\n[[map]]\nva = 0\npa = '0xffffff000'\nsize = '8K'\n", "above MAXPHYADDR"),
    ],
)
def test_bad_specs_are_one_line_errors(text, msg):
    with pytest.raises(BadInputError, match=msg) as ei:
        build_from_spec(text)
    assert "\n" not in str(ei.value)


def test_build_budget_refused_before_any_table():
    # 256 TiB in 4K pages is 2^36 leaves, far above the default 2^20: refused by arithmetic alone.
    b = Builder()
    with pytest.raises(BudgetError, match="--max-entries"):
        b.map(0xFFFF800000000000, 0, 1 << 46, 4096)
    assert b.tables == [0x100000] and b.entries_written == 0  # only the root
    # 3 pages against a limit of 2: the second map is refused, the first stays.
    b = Builder(max_entries=2)
    b.map(0x1000, 0x5000, 0x1000)
    with pytest.raises(BudgetError, match="limit of 2 leaf entries"):
        b.map(0x2000, 0x6000, 0x2000)


def test_map_leaf_values_by_hand():
    # 4-level, M=46: 2 PTEs at va 0x1ff000 / 0x200000 (two different page tables), flags rw us nx g.
    # PTE = frame | G(1<<8) | US(1<<2) | RW(1<<1) | P | XD(1<<63)
    b = Builder(maxphyaddr=46)
    b.map(0x1FF000, 0x7000, 0x2000, 4096, "rw us nx g")
    flags = (1 << 63) | (1 << 8) | 4 | 2 | 1
    assert b.get_entry(0x1FF000, 1) == 0x7000 | flags
    assert b.get_entry(0x200000, 1) == 0x8000 | flags
    # 2M leaf with pat: PDE = frame | PAT(1<<12) | PS(1<<7) | P ; ro, x
    b.map(0x40000000, 0x200000, 1 << 21, 1 << 21, "ro x pat")
    assert b.get_entry(0x40000000, 2) == 0x200000 | (1 << 12) | (1 << 7) | 1


# -- batch vs scalar on random trees ---------------------------------------------------------------------
def random_tree(rng: np.random.Generator, levels: int, m: int):
    """A tree whose every entry has random low flags, sometimes reserved bits and PS, a random key."""
    mem = SparseMemory(size=1 << 40)
    tables = [0x100000 + i * 0x1000 for i in range(24)]
    frames = 0x4000000
    for t in tables:
        ents = np.zeros(512, dtype=np.uint64)
        for i in rng.choice(512, size=24, replace=False):
            v = int(rng.integers(0, 1 << 7)) | (int(rng.integers(0, 2)) << 8)
            if rng.random() < 0.85:
                v |= 1
            if rng.random() < 0.6:
                v |= tables[int(rng.integers(0, len(tables)))]  # points at some table
            else:
                v |= frames + int(rng.integers(0, 1 << 10)) * 0x200000
            if rng.random() < 0.1 and m < 52:
                v |= 1 << int(rng.integers(m, 52))  # reserved high bit
            if rng.random() < 0.05:
                v |= 1 << int(rng.integers(13, 21))  # large-frame hole
            if rng.random() < 0.3:
                v |= 1 << 63
            v |= int(rng.integers(0, 16)) << 59
            ents[i] = v
        mem.write(t, ents.tobytes())
    return mem, tables


@pytest.mark.parametrize("seed", range(12))
def test_batch_equals_scalar_walk_on_random_trees(seed):
    rng = np.random.default_rng(seed)
    levels = 5 if seed % 3 == 0 else 4
    m = [40, 46, 48, 52][seed % 4]
    mem, tables = random_tree(rng, levels, m)
    prof = list(PROFILES.values())[seed % len(PROFILES)]
    cr0 = CR0_PE | CR0_PG | (CR0_WP if rng.random() < 0.7 else 0)
    cr4 = CR4_PAE | (CR4_LA57 if levels == 5 else 0)
    for bit in (CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_PKS):
        if rng.random() < 0.5:
            cr4 |= bit
    efer = EFER_LME | EFER_LMA | (EFER_NXE if rng.random() < 0.7 else 0)
    st_ = PagingState(
        cr3=tables[0],
        cr0=cr0,
        cr4=cr4,
        efer=efer,
        pkru=int(rng.integers(0, 1 << 32)),
        pkrs=int(rng.integers(0, 1 << 32)),
        profile=prof,
        maxphyaddr=m,
    )
    n = 3000
    # VAs made by random descents through populated entries, so many walks complete.
    tset = set(tables)
    pop = {t: np.nonzero(mem.table(t))[0] for t in tables}
    vas = np.zeros(n, dtype=np.uint64)
    for i in range(n):
        t, va = tables[0], 0
        for k in range(levels):
            choices = pop.get(t)
            ix = (
                int(rng.choice(choices))
                if choices is not None and len(choices) and rng.random() < 0.95
                else int(rng.integers(0, 512))
            )
            va |= ix << (12 + 9 * (levels - 1 - k))
            nxt = int(mem.read_u64(t + 8 * ix)) & 0xFFFFFFFFF000 if t in tset else 0
            t = nxt if nxt in tset else None
        vas[i] = va | int(rng.integers(0, 4096))
    top = 57 if levels == 5 else 48
    neg = vas >> np.uint64(top - 1) & np.uint64(1)
    vas = np.where(neg == 1, vas | np.uint64(((1 << 64) - 1) ^ ((1 << top) - 1)), vas)
    flip = rng.random(n) < 0.03  # some non-canonical
    vas = np.where(flip, vas ^ np.uint64(1 << 60), vas)
    acc = rng.integers(0, 3, size=n)
    user = rng.random(n) < 0.5
    ac = rng.random(n) < 0.5
    implicit = rng.random(n) < 0.1
    got = translate_batch(st_, mem, vas, acc, user, ac, implicit)
    kinds = ("read", "write", "fetch")
    outcomes = set()
    for i in range(n):
        r = walk(
            st_,
            mem,
            int(vas[i]),
            Access(kinds[acc[i]], user=bool(user[i]), ac=bool(ac[i]), implicit=bool(implicit[i])),
        )
        outcomes.add(r.outcome)
        assert OUTCOME_NAMES[got.outcome[i]] == r.outcome, (i, hex(int(vas[i])), r)
        if isinstance(r, Translation):
            assert (int(got.pa[i]), int(got.page_size[i])) == (r.pa, r.page_size)
        else:
            assert int(got.error_code[i]) == r.error_code, (i, hex(int(vas[i])), r)
    assert {"ok", "page_fault", "general_protection"} <= outcomes  # the sample exercised all paths


AMD_SPEC = """
[image]
{image}
maxphyaddr = 48
[[map]]
va = "0x8000000000"
pa = "0x400000"
flags = "rw"
[[entry]]
va = "0x8000000000"
level = 4
value = "0x0000000000101127"
"""


@pytest.mark.parametrize(
    "image,expect",
    [('vendor = "amd"', 0x9), ('profile = "amd"', 0x9), ('vendor = "intel"', None), ("", None)],
)
def test_spec_vendor_decides_the_walks_rules(image, expect):
    """PML4E bit 8 (0x100 in 0x101127) is MBZ on AMD (APM Vol. 2 §5.3.3): P|RSVD = 0x9; Intel
    ignores it (SDM Table 4-15). `vendor` in the spec must reach the walk, not only the encoder."""
    from x86pt.build import build_from_spec
    from x86pt.walk import Access, PageFault, walk

    mem, st = build_from_spec(AMD_SPEC.format(image=image))
    r = walk(st, mem, 0x8000000000, Access("read"))
    if expect is None:
        assert not isinstance(r, PageFault) and r.pa == 0x400000
    else:
        assert isinstance(r, PageFault) and r.error_code == expect


def test_spec_vendor_contradicting_the_profile_is_refused():
    from x86pt.build import build_from_spec
    from x86pt.errors import BadInputError

    with pytest.raises(BadInputError, match="contradicts profile"):
        build_from_spec(AMD_SPEC.format(image='vendor = "amd"\nprofile = "intel"'))
