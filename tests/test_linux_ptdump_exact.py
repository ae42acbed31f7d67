"""`x86pt dump IMAGE --format ptdump --markers linux --layout layout.json` is byte-identical to
the kernel's own /sys/kernel/debug/page_tables/kernel text, for every captured step of
fixtures/linux/* (Debian 6.1 and 6.12 kernels under QEMU, 4-level and 5-level, KASLR on and off;
each run's meta.json names the kernel and QEMU versions). The expectation is the kernel's text
(ptdump.txt), never x86pt's output.

The ESPfix area is compared too, with nothing cut: the kernel prints its first 16 lines and then
"... N entries skipped ... " (dump_pagetables.c, address marker max_lines), and x86pt reproduces
both the lines and N.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re

import pytest

from harness.linux.collect import load_json, materialize, read_artifact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_DIRS = sorted(
    os.path.dirname(p) for p in glob.glob(os.path.join(ROOT, "fixtures", "linux", "*", "meta.json"))
)
STEPS = [(r, s) for r in RUN_DIRS for s in sorted(glob.glob(os.path.join(r, "step-*")))]
pytestmark = pytest.mark.skipif(not STEPS, reason="no fixtures/linux runs committed")
SKIPPED = re.compile(r"^\.\.\. \d+ entries skipped \.\.\. $", re.M)


def _id(x) -> str:
    return f"{os.path.basename(x[0])}/{os.path.basename(x[1])}"


def _x86pt(*args: str) -> tuple[int, bytes, str]:
    """Run an x86pt command in-process: (exit code, stdout bytes, stderr text)."""
    from x86pt.cli import main

    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()  # dump writes .buffer
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    out.flush()
    return rc, out.buffer.getvalue(), err.getvalue()


def _first_diff(got: str, want: str) -> str:
    g, w = got.splitlines(keepends=True), want.splitlines(keepends=True)
    for i, (a, b) in enumerate(zip(g, w)):
        if a != b:
            return f"line {i + 1}: kernel {b!r} x86pt {a!r}"
    return f"kernel has {len(w)} lines, x86pt {len(g)}"


@pytest.mark.parametrize("run_dir,step_dir", STEPS, ids=[_id(x) for x in STEPS])
def test_dump_is_the_kernel_text_byte_for_byte(run_dir, step_dir, tmp_path):
    elf = materialize(step_dir, "tables.elf", str(tmp_path))
    kernel = read_artifact(step_dir, "ptdump.txt")
    rc, got, err = _x86pt(
        "dump",
        elf,
        "--format",
        "ptdump",
        "--markers",
        "linux",
        "--layout",
        os.path.join(run_dir, "layout.json"),
    )
    assert rc == 0 and err == "", err
    # the ESPfix truncation is part of what is compared, not cut away
    assert len(SKIPPED.findall(kernel.decode())) == 1
    assert got == kernel, _first_diff(got.decode(), kernel.decode())


def _kaslr_run() -> str | None:
    for r in RUN_DIRS:
        lay = load_json(os.path.join(r, "layout.json"))
        if int(lay["vmalloc_base"], 16) not in (0xFFFFC90000000000, 0xFFA0000000000000):
            return r
    return None


def test_fixtures_cover_kaslr_and_la57():
    """The byte-identity above only means something if the set includes randomized bases and a
    guest that really ran with 5-level paging (layout.json la57, from the guest's CR4)."""
    lays = [load_json(os.path.join(r, "layout.json")) for r in RUN_DIRS]
    assert any(lay.get("la57") for lay in lays)
    assert any(not lay.get("la57") for lay in lays)
    assert _kaslr_run() is not None
    assert {lay["release"].split(".")[0] + "." + lay["release"].split(".")[1] for lay in lays} >= {
        "6.1",
        "6.12",
    }


def test_explicit_bases_equal_layout_and_defaults_do_not_fit_kaslr(tmp_path):
    """--page-offset/--vmalloc-base/--vmemmap-base give what --layout gives; without them the
    nokaslr defaults put the markers elsewhere, so the text differs from the kernel's."""
    run = _kaslr_run()
    step = sorted(glob.glob(os.path.join(run, "step-*")))[0]
    elf = materialize(step, "tables.elf", str(tmp_path))
    lay = load_json(os.path.join(run, "layout.json"))
    kernel = read_artifact(step, "ptdump.txt")
    base = ("dump", elf, "--format", "ptdump", "--markers", "linux")
    rc, got, _ = _x86pt(
        *base,
        "--page-offset",
        lay["page_offset_base"],
        "--vmalloc-base",
        lay["vmalloc_base"],
        "--vmemmap-base",
        lay["vmemmap_base"],
    )
    assert rc == 0 and got == kernel
    rc, got, _ = _x86pt(*base)
    assert rc == 0 and got != kernel
    # an option overrides the layout file's value
    rc, got, _ = _x86pt(
        *base, "--layout", os.path.join(run, "layout.json"), "--vmalloc-base", "0xffffc90000000000"
    )
    assert rc == 0 and got != kernel


@pytest.mark.parametrize(
    "content,what",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"vmalloc_base": "0xzz"}', "vmalloc_base"),
        (b'{"page_offset_base": true}', "page_offset_base"),
        (b'{"vmemmap_base": "0x10000000000000000"}', "vmemmap_base"),
    ],
)
def test_bad_layout_is_one_line_exit_2(tmp_path, content, what):
    from x86pt.build import Builder
    from x86pt.memory import write_image

    b = Builder(levels=4)
    b.map(0x400000, 0x5000000, 4096, 4096, "p rw")
    img = str(tmp_path / "t.elf")
    write_image(b.memory, b.state(), img, "elf")
    lay = tmp_path / "layout.json"
    lay.write_bytes(content)
    rc, out, err = _x86pt("dump", img, "--markers", "linux", "--layout", str(lay))
    assert rc == 2 and out == b""
    assert err.count("\n") == 1 and err.startswith("x86pt: error: ") and what in err, err


def test_missing_layout_file(tmp_path):
    rc, _, err = _x86pt("dump", str(tmp_path / "none.elf"), "--layout", str(tmp_path / "nope.json"))
    assert rc == 2 and err.startswith("x86pt: error: ") and err.count("\n") == 1, err
