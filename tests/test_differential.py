"""The differential runner and `x86pt conform`, driven by the ModelOracle (x86pt's own walker) so no
emulator is needed. A 'buggy oracle' is the model with a `deviate` hook: every deviation must be
reported with the state, the decoded walk, the decoded instruction and a repro that replays it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import matrix as mx
from harness.differential import (
    Batch,
    CaseInfo,
    OwnedEntry,
    compare_entries,
    disassemble,
    replay,
    run_conformance,
)
from x86pt.compare import compare_probe, model_run
from harness.matrix import MatrixFeatures, matrix_for
from harness.matrix_pack import MatrixSource
from x86pt.registry import availability, get_oracle
from x86pt.oracle import Probe, ProbeResult
from harness.oracles.model import ModelOracle, deviation
from harness.random_tables import RandomSource
from x86pt.cli import main
from x86pt.memory.sparse import SparseMemory
from x86pt.state import profile_named
from x86pt.walk import PageFault, Translation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample_source(profile="unicorn", n=1500, seed=5, extended=False):
    prof = profile_named(profile)
    m = matrix_for(MatrixFeatures.from_profile(prof), extended=extended)
    idx, _, _ = mx.select(m.size, sample=n, seed=seed)
    return MatrixSource(m, prof, indices=idx)


def test_the_model_agrees_with_itself():
    mms = []
    s = run_conformance(ModelOracle("unicorn"), _sample_source(), on_mismatch=mms.append)
    assert s.cases == 1500 and s.mismatches == 0 and not mms


def test_random_tables_agree_with_the_model_and_are_reproducible():
    prof = profile_named("unicorn")
    feat = MatrixFeatures.from_profile(prof)
    a = [b.probes for b in RandomSource(feat, prof, seed=9, cases=300).batches()]
    b = [b.probes for b in RandomSource(feat, prof, seed=9, cases=300).batches()]
    assert a == b
    s = run_conformance(ModelOracle("unicorn"), RandomSource(feat, prof, seed=9, cases=300))
    assert s.cases == 300 and s.mismatches == 0


def test_random_tables_cover_faults_large_pages_and_5_level():
    prof = profile_named("unicorn")
    feat = MatrixFeatures.from_profile(prof)
    sizes, codes, levels = set(), set(), set()
    for b in RandomSource(feat, prof, seed=4, cases=4000).batches():
        levels.add(b.state.paging_levels)
        results, _ = model_run(b.memory, b.state, b.probes)
        for r in results:
            if isinstance(r, Translation):
                sizes.add(r.page_size)
            elif isinstance(r, PageFault):
                codes.add(r.error_code)
    assert sizes == {4096, 1 << 21, 1 << 30}
    assert levels == {4, 5}
    assert any(c & 8 for c in codes) and any(c & 0x20 for c in codes) and 0 in codes


@pytest.mark.parametrize("field,value", [("error_code", 0x99), ("outcome", "ok"), ("cr2", 0x1234)])
def test_a_deviating_oracle_is_reported(field, value):
    dev = deviation(**{field: value}, when=lambda p, r: r.outcome == "page_fault")
    mms = []
    s = run_conformance(ModelOracle("unicorn", deviate=dev), _sample_source(n=300), on_mismatch=mms.append)
    assert s.mismatches == len(mms) > 0
    mm = mms[0]
    text = mm.render()
    assert "MISMATCH" in text and "state: cr0=" in text and "FAIL:" in text
    assert "L4 PML4" in text  # the decoded walk
    assert "qword ptr [rbx]" in text or "call rbx" in text  # capstone
    j = mm.to_json()
    assert j["type"] == "mismatch" and j["differences"] and j["walk"]


def test_a_wrong_physical_address_is_reported():
    dev = deviation(pa=0x1000, when=lambda p, r: r.outcome == "ok")
    mms = []
    run_conformance(ModelOracle("unicorn", deviate=dev), _sample_source(n=200), on_mismatch=mms.append)
    assert mms and any("physical address" in d for d in mms[0].differences)


def test_compare_probe_rules():
    profile_named("intel")
    pf = PageFault(0x1000, 0x9, 0x1000, "r", (), 1)
    p = Probe(0x1000)
    assert compare_probe(pf, ProbeResult("page_fault", 0x9, 0x1000), p) == []
    assert compare_probe(pf, ProbeResult("page_fault", 0x9, None), p) == []  # CR2 unknown
    assert compare_probe(pf, ProbeResult("page_fault", 0x8, 0x1000), p)
    assert compare_probe(pf, ProbeResult("ok", pa=0x2000), p)


def _entries_case(kind: str, raw: int) -> tuple[CaseInfo, SparseMemory]:
    mem = SparseMemory(1 << 30)
    mem.write_u64(0x3000, raw)
    return CaseInfo("t", None, (), (OwnedEntry(0x3000, raw, kind),)), mem


def test_entry_comparison_pte_exact_pde_a_dont_care_on_faults():
    case, model_after = _entries_case("pte", 0x1)
    oracle_after = SparseMemory(1 << 30)
    oracle_after.write_u64(0x3000, 0x21)  # the oracle set A in a PTE the model left alone
    assert compare_entries(case, [], model_after, oracle_after)
    case, model_after = _entries_case("pde", 0x1)
    assert compare_entries(case, [], model_after, oracle_after) == []  # non-leaf A: don't-care
    oracle_after.write_u64(0x3000, 0x41)  # but any other bit counts
    assert compare_entries(case, [], model_after, oracle_after)


def test_repro_replays_the_mismatch(tmp_path):
    dev = deviation(error_code=0x77, when=lambda p, r: r.outcome == "page_fault")
    mms = []
    run_conformance(ModelOracle("unicorn", deviate=dev), _sample_source(n=200), on_mismatch=mms.append)
    repro = json.loads(json.dumps(mms[0].repro))
    assert repro["entries"] and repro["probes"]
    # a minimal image: only the case's entries
    assert len(repro["entries"]) <= 6
    _, _, again = replay(ModelOracle("unicorn", deviate=dev), repro)
    assert again and again[0].differences == mms[0].differences
    _, _, none = replay(ModelOracle("unicorn"), repro)
    assert none == []


def test_disassembly_of_the_canonical_probes():
    assert disassemble(bytes.fromhex("488b03")) == "mov rax, qword ptr [rbx]"
    assert disassemble(bytes.fromhex("488913")) == "mov qword ptr [rbx], rdx"
    assert disassemble(bytes.fromhex("ffd3")) == "call rbx"


def test_registry_knows_every_backend():
    for name in ("unicorn", "qemu", "kvm", "qemu-monitor", "model"):
        ok, why = availability(name)
        assert isinstance(ok, bool) and (ok or why)
    assert get_oracle("model", profile="kvm-epyc-pvm").capabilities().maxphyaddr == 48
    ok, why = availability("nonsense")
    assert not ok and "unknown" in why


# -- the command ----------------------------------------------------------------------------------
def test_conform_cli_clean_run(capsys):
    rc = main(["conform", "--oracle", "model", "--profile", "unicorn", "--sample", "400", "--seed", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[-1] == "conform: 0 mismatches in 400 cases (model)"


def test_conform_cli_json_and_random(capsys):
    rc = main(["conform", "--oracle", "model", "--cases", "random", "--limit", "100", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summary = json.loads(lines[-2])
    assert summary["type"] == "summary" and summary["cases"] == 100
    assert lines[-1] == "conform: 0 mismatches in 100 cases (model)"


def test_conform_cli_shards_cover_the_limit(capsys):
    total = 0
    for i in (1, 2, 3):
        assert main(["conform", "--oracle", "model", "--limit", "300", "--shard", f"{i}/3"]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        total += int(last.split()[4])
    # --shard splits the run's selection (the first 300 cases): the shards cover it once
    assert total == 300


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--shard", "0/3"], "bad --shard"),
        (["--shard", "x"], "bad --shard"),
        (["--limit", "-1"], "bad --limit"),
        (["--oracle", "bogus"], "unknown oracle"),
        (["--repro", "/nonexistent/r.json"], "cannot read repro"),
    ],
)
def test_conform_cli_bad_input_is_one_line_exit_2(argv, msg, capsys):
    rc = main(["conform", "--oracle", "model", *argv] if "--oracle" not in argv else ["conform", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("x86pt: error:") and msg in err[0]


def test_conform_cli_bad_repro_file(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    assert main(["conform", "--oracle", "model", "--repro", str(p)]) == 2
    p.write_text(json.dumps({"x86pt_repro": 1, "state": {"cr3": "zz"}, "entries": [], "probes": []}))
    assert main(["conform", "--oracle", "model", "--repro", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(e.startswith("x86pt: error:") for e in err)


def test_conform_cli_mismatch_exit_status_and_repro_file(tmp_path, capsys, monkeypatch):
    import harness.cli as hcli

    real = hcli._open_oracle
    dev = deviation(error_code=0x55, when=lambda p, r: r.outcome == "page_fault" and p.access == "write")
    monkeypatch.setattr(
        hcli,
        "_open_oracle",
        lambda name, profile: ModelOracle("unicorn", deviate=dev) if name == "model" else real(name, profile),
    )
    rdir = tmp_path / "repros"
    rc = main(
        [
            "conform",
            "--oracle",
            "model",
            "--sample",
            "300",
            "--seed",
            "4",
            "--repro-dir",
            str(rdir),
            "--max-report",
            "1",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert out[-1].startswith("conform: ") and out[-1].endswith(" cases (model)")
    m = int(out[-1].split()[1])
    assert m > 0 and out[-1] == f"conform: {m} mismatches in 300 cases (model)"
    files = sorted(os.listdir(rdir))
    assert files
    # replaying with the same deviating oracle reproduces the mismatch ...
    assert main(["conform", "--oracle", "model", "--repro", str(rdir / files[0])]) == 1
    assert "FAIL: #PF error code" in capsys.readouterr().out
    # ... and with the honest model the repro runs and agrees
    monkeypatch.undo()
    rc = main(["conform", "--oracle", "model", "--profile", "unicorn", "--repro", str(rdir / files[0])])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "conform: 0 mismatches in 1 cases (model)"


def test_conform_progress_bar_goes_to_stderr():
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, "-m", "x86pt", "conform", "--oracle", "model", "--limit", "5000", "--progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "cases/s" in p.stderr and "5000/5000" in p.stderr
    assert p.stdout.strip().splitlines()[-1] == "conform: 0 mismatches in 5000 cases (model)"


def test_translation_only_oracle_is_judged_on_translations():
    """qemu-monitor answers gva2gpa only: it is compared with the debugger's view of the tables
    (present + PS; reserved bits pass into the address, per docs/oracles.md §5), so a wrong
    or missing translation is reported and a rights fault is not."""
    from harness.differential import check_batch
    from x86pt.oracle import BatchResult
    from x86pt.build import Builder

    b = Builder(maxphyaddr=40, table_base=0x200000)
    b.map(0x1000, 0x400000, 0x1000, 0x1000, "p")  # supervisor RO page
    pte = b.entry_address(0x1000, 1, create=False)
    b.memory.write_u64(pte, b.memory.read_u64(pte) | 1 << 51)  # reserved above M=40
    st = b.state(profile="qemu")
    probes = [Probe(0x1008, "write", user=True), Probe(0x2000)]
    batch = Batch(b.memory, st, probes, [CaseInfo("t#0", None, (0,)), CaseInfo("t#1", None, (1,))])
    from x86pt.compare import model_run

    results, model_after = model_run(b.memory, st, probes)
    right = BatchResult([ProbeResult("ok", pa=(1 << 51) | 0x400008), ProbeResult("page_fault")], b.memory)
    assert check_batch("qemu-monitor", batch, results, model_after, right) == []
    wrong = BatchResult([ProbeResult("ok", pa=0x400008), ProbeResult("ok", pa=0x5000)], b.memory)
    mms = check_batch("qemu-monitor", batch, results, model_after, wrong)
    assert [m.case.label for m in mms] == ["t#0", "t#1"]
    assert "the tables to 0x8000000400008" in mms[0].differences[0]
    assert "do not map it" in mms[1].differences[0]
