"""The core CLI end to end (a subprocess per call, as a user runs it), and every kind of bad input
named in the project's standards: one line on stderr, non-zero exit, no traceback, no hang."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": ROOT}


def x86pt(*args, stdin=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "x86pt", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )


def one_line_error(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


SPEC = """
[image]
maxphyaddr = 46
tables = "0x100000"
[registers]
cr4 = "0x300020"
[[map]]
va = "0xffff888000000000"
pa = 0
size = "4M"
page = "2M"
flags = "rw nx g"
[[map]]
va = "0x400000"
pa = "0x2000000"
size = "4K"
flags = "us"
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    spec = d / "s.toml"
    spec.write_text(SPEC)
    out = d / "img.elf"
    p = x86pt("build", spec, "-o", out)
    assert p.returncode == 0, p.stderr
    raw = d / "img.raw"
    assert x86pt("build", spec, "-o", raw).returncode == 0
    return str(out), str(raw), d


def test_decode_flags_reserved_bits():
    p = x86pt("decode", "0x0000800000001067", "--kind", "pte", "--maxphyaddr", "46", "--json")
    d = json.loads(p.stdout)
    assert d["reserved_set"] == hex(1 << 47)
    p = x86pt("decode", "0x80000000400000e3", "--kind", "pde")  # PS=1 picks the 2M format
    assert "PDE (2MB page)" in p.stdout and "RESERVED" not in p.stdout


def test_encode_builds_the_manual_value():
    # P|RW|US|A|D|PS|G + frame 0x40000000 + XD, written out by hand: 0x80000000400001e7
    p = x86pt("encode", "--kind", "pde2m", "p", "rw", "us", "a", "d", "g", "xd", "pa=0x40000000")
    assert p.stdout.strip() == "0x80000000400001e7"


def test_translate_and_walk_from_elf_notes(image):
    elf, _raw, _ = image
    p = x86pt("translate", elf, "0xffff888000123456", "--json")
    d = json.loads(p.stdout)
    assert d["pa"] == "0x123456" and d["page_size"] == 2 << 20
    p = x86pt("walk", elf, "0x400010", "--access", "write", "--user")
    assert "#PF error code 0x7" in p.stdout and "PML4[  0]" in p.stdout
    p = x86pt("translate", elf, "0x400000", "--access", "fetch")  # SMEP from the note's CR4
    assert "0x11" in p.stdout


def test_raw_images_need_cr3(image):
    _elf, raw, _ = image
    one_line_error(x86pt("translate", raw, "0x400000"), "pass --cr3")
    p = x86pt("translate", raw, "0x400000", "--cr3", "0x100000", "--json")
    assert json.loads(p.stdout)["pa"] == "0x2000000"


def test_probe_interface(image):
    elf, _raw, d = image
    probes = d / "p.jsonl"
    probes.write_text(
        '{"va": "0x400008", "access": "read", "user": true}\n'
        '{"va": "0x400008", "access": "write", "user": true}\n'
        '{"va": "0x0000800000000000"}\n'
    )
    p = x86pt("probe", elf, "--probes", probes, "--json", "--profile", "intel")
    recs = [json.loads(l) for l in p.stdout.splitlines()]
    assert recs[0] == {
        "va": "0x400008",
        "access": "read",
        "user": True,
        "outcome": "ok",
        "pa": "0x2000008",
        "page_size": 4096,
        "error_code": None,
        "cr2": None,
    }
    assert recs[1]["outcome"] == "page_fault" and recs[1]["error_code"] == 7 and recs[1]["cr2"] == "0x400008"
    assert recs[2]["outcome"] == "general_protection" and recs[2]["cr2"] is None
    before = open(elf, "rb").read()
    p = x86pt("probe", elf, "--probes", probes, "--json", "--update-ad")
    assert [json.loads(l)["outcome"] for l in p.stdout.splitlines()] == [
        "ok",
        "page_fault",
        "general_protection",
    ]
    assert open(elf, "rb").read() == before  # input never written


def test_demo_runs_without_arguments():
    p = x86pt("demo", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "SMEP" in p.stdout and "#GP(0)" in p.stdout


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["decode", "0xZZ", "--kind", "pte"], "bad entry value"),
        (["decode", "1", "--kind", "pxe"], "unknown entry kind"),
        (["decode", "-5", "--kind", "pte"], "below"),
        (["decode", str(1 << 64), "--kind", "pte"], "above"),
        (["encode", "--kind", "pte", "pk=99"], "does not fit"),
        (["encode", "--kind", "pte", "frob=1"], "no field"),
        (["translate", "/nonexistent/img", "0x1000"], "no such image"),
    ],
)
def test_bad_arguments(args, needle):
    one_line_error(x86pt(*args), needle)


def test_truncated_image_and_pointer_past_the_end(image, tmp_path):
    elf, raw, _ = image
    data = open(elf, "rb").read()
    t = tmp_path / "trunc.elf"
    t.write_bytes(data[: len(data) // 2])
    one_line_error(x86pt("translate", t, "0x400000"), "truncated")
    small = tmp_path / "small.raw"
    small.write_bytes(open(raw, "rb").read()[:0x101000])  # PML4 only: PDPT pointer past the end
    one_line_error(x86pt("translate", small, "0x400000", "--cr3", "0x100000"), "outside the image")


def test_looping_tables_terminate(tmp_path):
    img = bytearray(0x3000)
    struct.pack_into("<Q", img, 0x1000, 0x1000 | 7)  # PML4[0] -> itself
    struct.pack_into("<Q", img, 0x1000 + 8 * 511, 0x1000 | 7)
    p = tmp_path / "loop.raw"
    p.write_bytes(bytes(img))
    r = x86pt("walk", p, "0x0", "0xffffff8000000000", "--cr3", "0x1000", timeout=30)
    assert r.returncode == 0 and r.stdout.count("PML4") >= 2


def test_malformed_elf(tmp_path):
    p = tmp_path / "bad.elf"
    p.write_bytes(b"\x7fELF" + bytes(10))
    one_line_error(x86pt("translate", p, "0x1000"), "truncated ELF header")


@pytest.mark.parametrize(
    "line,needle",
    [
        ("{not json", ":2: bad JSON"),
        ('{"va": "0xZ"}', "va"),
        ('{"va": "0x1000", "access": "exec"}', "access must be"),
        ('{"va": "0x1000", "user": "yes"}', "true or false"),
        ('{"va": "0x1000", "colour": 1}', "unknown key"),
        ("[1, 2]", "an object"),
    ],
)
def test_bad_probe_lines(image, tmp_path, line, needle):
    elf, _raw, _ = image
    f = tmp_path / "p.jsonl"
    f.write_text('{"va": "0x400000"}\n' + line + "\n")
    one_line_error(x86pt("probe", elf, "--probes", f), needle)


def test_bad_numbers_in_state_options(image):
    elf, _raw, _ = image
    one_line_error(x86pt("translate", elf, "0x1000", "--cr3", "12x"), "--cr3")
    one_line_error(x86pt("translate", elf, "0x1000", "--maxphyaddr", "60"), "maxphyaddr")
    one_line_error(x86pt("translate", elf, "0x1000", "--profile", "via"), "unknown profile")
    one_line_error(x86pt("translate", elf, "0x1000", "--cr0", "0x1"), "not IA-32e")


def test_build_writes_atomically_and_reports_bad_specs(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text("[[map]]\nva = '0x1001'\n")
    one_line_error(x86pt("build", spec, "-o", tmp_path / "o.elf"), "aligned")
    assert not (tmp_path / "o.elf").exists()
    one_line_error(x86pt("build", tmp_path / "none.toml", "-o", tmp_path / "o.elf"), "cannot read spec")
