# SPDX-License-Identifier: GPL-2.0-or-later
"""`x86pt cpa` as a user meets it: no file appears unless an option names it, --dump-at N is the
image after the first N ops, bad option values are one-line refusals (exit 2), generate --json.
Every command runs in a temporary working folder, in-process."""

from __future__ import annotations

import json
import os

import pytest

from x86pt.cli import main

PO = 0xFFFF888000000000
PAGE = PO + 0x20005000  # a direct-map page inside a 2M leaf (server-64g)
# set_memory_4k of a kfence pool page, then kfence's raw P clear: nr-same-prot's counter drifts
# (invariant (d), the RFC's documented weakness) on every kernel rule set
KFENCE = f"set_memory_4k {PO + 0x20000000:#x} 1\noob {PO + 0x20007000:#x} set=0x0 clr=0x1\n"


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def test_violation_writes_nothing_unasked(cwd, capsys):
    (cwd / "k.trace").write_text(KFENCE)
    rc = main(["cpa", "replay", "k.trace", "--policy", "nr-same-prot", "--kernel", "6.1", "--validate"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "VIOLATION (nr-same-prot): op 1: invariant (d)" in out
    assert "--repro PATH would save a minimal reproducer" in out
    assert sorted(os.listdir(cwd)) == ["k.trace"]


def test_compare_violation_writes_nothing_unasked(cwd, capsys):
    (cwd / "k.trace").write_text(KFENCE)
    rc = main(["cpa", "compare", "k.trace", "--kernel", "6.15", "--validate", "--json"])
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 1
    assert {r["policy"]: r["violation"] is None for r in recs} == {
        "none": True,
        "upstream": True,
        "nr-same-prot": False,
        "ideal": True,
    }
    assert sorted(os.listdir(cwd)) == ["k.trace"]


def test_repro_goes_where_asked(cwd, tmp_path, capsys):
    (cwd / "k.trace").write_text("set_memory_ro 0xffff888030000000 1\n" * 3 + KFENCE)
    out_dir = tmp_path / "elsewhere"
    out_dir.mkdir()
    rc = main(
        [
            "cpa",
            "replay",
            "k.trace",
            "--policy",
            "nr-same-prot",
            "--kernel",
            "6.1",
            "--validate",
            "--repro",
            str(out_dir / "mini.trace"),
            "--minimise-seconds",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and f"written to {out_dir / 'mini.trace'}" in out
    assert sorted(os.listdir(cwd)) == ["k.trace"]
    ops = [ln for ln in (out_dir / "mini.trace").read_text().splitlines() if not ln.startswith("#")]
    assert ops == KFENCE.strip().splitlines()  # the two ops that make the drift
    # compare: one file per failing policy, named after it
    rc = main(
        [
            "cpa",
            "compare",
            "k.trace",
            "--kernel",
            "6.1",
            "--validate",
            "--quiet",
            "--repro",
            str(out_dir / "c.trace"),
            "--minimise-seconds",
            "5",
        ]
    )
    capsys.readouterr()
    assert rc == 1 and sorted(os.listdir(out_dir)) == ["c-nr-same-prot.trace", "mini.trace"]


def _writable(path: str, va: int) -> bool:
    from x86pt.image import open_image
    from x86pt.walk import Access, walk

    img = open_image(path)
    return walk(img.state, img.memory, va, Access("write")).outcome == "ok"


def test_dump_at_is_after_the_first_n_ops(cwd, capsys):
    (cwd / "t.trace").write_text(f"set_memory_ro {PAGE:#x} 1\nset_memory_rw {PAGE:#x} 1\n")
    assert main(["cpa", "replay", "t.trace", "--dump-at", "1", "--dump-out", "one.elf", "--quiet"]) == 0
    assert main(["cpa", "replay", "t.trace", "--dump-at", "2", "--dump-out", "two.elf", "--quiet"]) == 0
    capsys.readouterr()
    assert not _writable(str(cwd / "one.elf"), PAGE)  # after set_memory_ro only
    assert _writable(str(cwd / "two.elf"), PAGE)  # after set_memory_rw too
    assert sorted(os.listdir(cwd)) == ["one.elf", "t.trace", "two.elf"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["replay", "t.trace", "--dump-at", "0", "--dump-out", "x.elf"], "--dump-at 0"),
        (["replay", "t.trace", "--dump-at", "3", "--dump-out", "x.elf"], "the trace has 2 ops"),
        (["replay", "t.trace", "--dump-at", "1"], "needs --dump-out"),
        (["compare", "t.trace", "--policies", ""], "--policies ''"),
        (["compare", "t.trace", "--policies", " , "], "name at least one"),
        (["replay", "t.trace", "--checks", "xyz"], "--checks 'xyz'"),
        (["replay", "t.trace", "--checks", ""], "--checks ''"),
        (["replay", "t.trace", "--minimise-seconds", "nan"], "--minimise-seconds nan"),
        (["replay", "t.trace", "--minimise-seconds", "inf"], "--minimise-seconds inf"),
    ],
)
def test_bad_values_are_refused_with_exit_2(cwd, capsys, argv, words):
    (cwd / "t.trace").write_text(f"set_memory_ro {PAGE:#x} 1\nset_memory_rw {PAGE:#x} 1\n")
    rc = main(["cpa", *argv, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], err
    assert sorted(os.listdir(cwd)) == ["t.trace"]


def test_generate_json(cwd, capsys):
    rc = main(["cpa", "generate", "kfence", "--ops", "40", "-o", "k.trace", "--json"])
    (rec,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert rec["output"] == "k.trace" and rec["ops"] == 40 and rec["workload"] == "kfence"
    lines = [ln.split()[0] for ln in (cwd / "k.trace").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 40
    assert rec["op_counts"] == {k: lines.count(k) for k in set(lines)}
    # arch_kfence_init_pool: set_memory_4k once per 2M region of the (unaligned) 2 MiB pool
    assert rec["op_counts"]["set_memory_4k"] == 2


def test_compare_plot_is_small_multiples_with_a_difference_column(cwd, capsys):
    """One column per policy plus the difference-to-baseline column (4 + 1 panels wide, 4
    metrics high): the PNG is written where --plot says and nowhere else."""
    import struct

    (cwd / "t.trace").write_text(f"set_memory_ro {PAGE:#x} 1\nset_memory_rw {PAGE:#x} 1\n")
    assert main(["cpa", "compare", "t.trace", "--plot", "cmp.png", "--quiet"]) == 0
    capsys.readouterr()
    head = (cwd / "cmp.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", head[16:24])
    assert w > 1.5 * h, (w, h)
    assert sorted(os.listdir(cwd)) == ["cmp.png", "t.trace"]
