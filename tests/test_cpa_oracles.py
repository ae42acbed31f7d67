"""Invariant (e) of the CPA validator: sampled replay steps probed on the comparison rig's oracles.

Expected values: the oracles themselves (unicorn 2.1.4, QEMU 7.2 TCG, the host's KVM) and the
#PF error codes of SDM Vol. 3A §4.7, which oracle_probe compares against the per-page reference.
The corruption test proves the comparison can fail: an exported image whose PTE for a page the op
changed lost its P bit must be reported as invariant (e).
"""

from __future__ import annotations

import struct

import pytest

from conftest import need_oracle
from x86pt.registry import availability
from x86pt.cli import main

LAYOUT = "server-64g-nogb"  # KVM here has no 1G pages; 2M leaves everywhere
DM_PAGE = 0xFFFF888100000000  # direct map of PA 4 GiB (2M-aligned: the first page is probed)

ORACLES = [pytest.param(n, marks=getattr(pytest.mark, n)) for n in ("unicorn", "kvm", "qemu")]


def _need(name: str) -> None:
    ok, why = availability(name)
    need_oracle(name, ok, why)


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cpaor") / "mixed.trace")
    assert (
        main(
            [
                "cpa",
                "generate",
                "mixed",
                "--ops",
                "150",
                "--seed",
                "3",
                "--layout",
                LAYOUT,
                "-o",
                path,
                "--quiet",
            ]
        )
        == 0
    )
    return path


@pytest.mark.parametrize("name", ORACLES)
def test_generated_trace_agrees(name, trace, capsys):
    _need(name)
    rc = main(
        [
            "cpa",
            "replay",
            trace,
            "--layout",
            LAYOUT,
            "--policy",
            "upstream",
            "--validate",
            "--oracle",
            name,
            "--oracle-sample",
            "3",
            "--oracle-seed",
            "5",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert "VIOLATION" not in out, out
    assert rc == 0
    line = next(ln for ln in out.splitlines() if f"oracle {name}:" in ln)
    assert f"oracle {name}: 3 steps" in line
    probes = int(line.split(" steps, ")[1].split(" probes")[0])
    assert probes > 0, line


def _corrupt_export(monkeypatch, va: int) -> None:
    """Clear P in the leaf that maps `va` in every exported image (the model itself is untouched,
    so (a)-(d) hold and only the oracle comparison against the reference can notice)."""
    from x86pt.cpa.ops import CpaModel

    real = CpaModel.export

    def export(self):
        mem = real(self)
        pa = self.pgd_pa
        for shift in (39, 30, 21, 12):
            slot = pa + 8 * ((va >> shift) & 511)
            e = struct.unpack("<Q", mem.read(slot, 8))[0]
            if shift == 12 or e & 0x80:
                mem.write(slot, struct.pack("<Q", e & ~1))
                return mem
            pa = e & 0x000FFFFFFFFFF000
        return mem

    monkeypatch.setattr(CpaModel, "export", export)


@pytest.mark.parametrize("name", ORACLES)
def test_corrupted_image_fires_e(name, tmp_path, monkeypatch, capsys):
    _need(name)
    path = tmp_path / "ro.trace"
    path.write_text(f"set_memory_ro {DM_PAGE:#x} 4\n")
    _corrupt_export(monkeypatch, DM_PAGE)
    repro = tmp_path / "mini.trace"
    rc = main(
        [
            "cpa",
            "replay",
            str(path),
            "--layout",
            LAYOUT,
            "--validate",
            "--oracle",
            name,
            "--oracle-every",
            "1",
            "--repro",
            str(repro),
            "--minimise-seconds",
            "5",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "invariant (e) violated" in out
    assert f"oracle {name}, CPL0 read of {DM_PAGE:#x}" in out
    assert "#PF 0x0" in out and "asks for ok" in out
    assert repro.read_text().count("set_memory_ro") == 1


def test_missing_oracle_is_skipped_with_a_message(tmp_path, capsys, monkeypatch):
    from harness.oracles.kvm import KvmOracle

    monkeypatch.setattr(KvmOracle, "available", staticmethod(lambda: (False, "not on this host (test)")))
    path = tmp_path / "ro.trace"
    path.write_text(f"set_memory_ro {DM_PAGE:#x} 4\n")
    rc = main(
        [
            "cpa",
            "replay",
            str(path),
            "--layout",
            LAYOUT,
            "--validate",
            "--oracle",
            "kvm",
            "--oracle-every",
            "1",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0
    assert "oracle kvm skipped: not on this host (test)" in cap.err + cap.out


def test_sample_evenly_and_changed_ranges():
    from x86pt.cpa.oracle_probe import changed_ranges, sample_evenly

    # a PMD entry (level 2) written for va 0x40000000 spans 512 pages; a page inside it merges
    key = ((0x40000000 >> 21) << 2) | 2
    r = changed_ranges([0x40001000, 0x80000000], {key})
    assert r == [(0x40000000, 512), (0x80000000, 1)]
    vas, total = sample_evenly(r, 4)
    assert total == 513 and len(vas) == 4 and vas[0] == 0x40000000
    assert len(set(vas)) == 4
