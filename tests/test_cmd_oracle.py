"""The command oracle (x86pt/cmdoracle.py, docs/oracle-protocol.md) and its reference adapter
(examples/cmd_oracle_adapter.py).

Expectations come from elsewhere than the code under test: the in-process unicorn oracle's own
answers (the adapter must give the same), lines of the protocol written here by hand, and
programs written here that break the protocol in one known way each."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

from x86pt.cmdoracle import CmdOracle
from x86pt.cmdprotocol import check, check_result, schema
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.registry import availability, get_oracle, oracle_list

from conftest import need_oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER = os.path.join(REPO, "examples", "cmd_oracle_adapter.py")
ADAPTER_CMD = f"cmd:{shlex.quote(sys.executable)} {shlex.quote(ADAPTER)}"


def _unicorn():
    ok, why = availability("unicorn")
    need_oracle("unicorn", ok, why)


def conform(oracle: str, *args: str, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "x86pt", "conform", "--oracle", oracle, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


# -- the schema ----------------------------------------------------------------------------------------
def test_the_published_schema_is_the_one_the_library_reads():
    with open(os.path.join(REPO, "docs", "oracle-protocol.schema.json"), encoding="utf-8") as f:
        assert json.load(f) == schema()


SUPPORTED = {
    "$ref",
    "anyOf",
    "type",
    "enum",
    "const",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "minLength",
    "pattern",
    "description",
    "$schema",
    "$id",
    "title",
    "$defs",
}


def test_the_schema_uses_only_keywords_the_validator_implements():
    def walk(node, under_properties=False):
        if isinstance(node, dict):
            for k, v in node.items():
                if not under_properties:
                    assert k in SUPPORTED, k
                walk(v, under_properties=k in ("properties", "$defs") and not under_properties)
        elif isinstance(node, list):
            for x in node:
                walk(x)

    walk(schema())


_GOOD = [
    pytest.param(x)
    for x in [
        {"outcome": "ok", "pa": "0x201000", "value": "0x20100c3"},
        {"outcome": "ok", "pa": 2101248},
        {"outcome": "page_fault", "error_code": 7, "cr2": "0x401008", "vector": 14},
        {
            "outcome": "general_protection",
            "error_code": 0,
            "cr2": None,
            "pa": None,
            "value": None,
            "vector": 13,
            "detail": "non-canonical",
        },
        {"outcome": "ok", "pa": "0xFFFFFFFFFFFFFFFF"},
    ]
]


@pytest.mark.parametrize("line", _GOOD)
def test_hand_written_result_lines_are_valid(line):
    assert check(line, "result") is None


_BAD = [
    pytest.param(*x)
    for x in [
        ({"error_code": 7}, "'outcome' is missing"),
        ({"outcome": "crash"}, "is not one of"),
        ({"outcome": "page_fault", "error_code": -1}, "error_code"),
        ({"outcome": "page_fault", "error_code": "7"}, "error_code"),
        ({"outcome": "ok", "pa": "12345"}, "$.pa"),
        ({"outcome": "ok", "pa": "0x" + "1" * 17}, "$.pa"),
        ({"outcome": "ok", "pa": 1 << 64}, "$.pa"),
        ({"outcome": "ok", "pa": True}, "$.pa"),
        ({"outcome": "ok", "vector": 256}, "$.vector"),
        ([], "expected object"),
    ]
]


@pytest.mark.parametrize("line, says", _BAD)
def test_hand_written_bad_result_lines_are_refused(line, says):
    err = check(line, "result")
    assert err is not None and says in err, err


def test_the_fast_result_check_agrees_with_the_schema():
    import random

    rng = random.Random(1)
    pool = [
        None,
        0,
        1,
        -1,
        7,
        255,
        256,
        0xFFFFFFFF,
        1 << 32,
        (1 << 64) - 1,
        1 << 64,
        True,
        1.5,
        "",
        "0x0",
        "0X1f",
        "0x" + "f" * 16,
        "0x" + "f" * 17,
        "12",
        "0x1\n",
        "0xg",
        [],
        {},
        "ok",
        "page_fault",
        "general_protection",
        "crash",
    ]
    keys = ["outcome", "error_code", "cr2", "pa", "value", "vector", "detail", "extra"]
    agree = 0
    for _ in range(20000):
        d = {k: rng.choice(pool) for k in rng.sample(keys, rng.randrange(len(keys) + 1))}
        if rng.random() < 0.7:
            d["outcome"] = rng.choice(["ok", "page_fault", "general_protection"])
        assert (check_result(d) is None) == (check(d, "result") is None), d
        agree += check_result(d) is None
    assert 100 < agree < 19900  # both verdicts were exercised


def test_the_validator_agrees_with_the_reference_implementation_of_json_schema():
    """jsonschema (PyPI; optional: the extra `protocol`) as the independent judge: the schema is a
    valid draft 2020-12 schema and both give the same verdict on every line of the tests above."""
    jsonschema = pytest.importorskip("jsonschema")
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    lines = [p.values[0] for p in _GOOD + _BAD]
    import random

    rng = random.Random(2)
    pool = [None, 0, -1, 255, 256, 1 << 64, True, "0x1", "0x" + "f" * 17, "12", [], "ok", "page_fault"]
    keys = ["outcome", "error_code", "cr2", "pa", "value", "vector", "detail"]
    lines += [
        {k: rng.choice(pool) for k in rng.sample(keys, rng.randrange(len(keys) + 1))} for _ in range(3000)
    ]
    for definition, docs in (
        ("result", lines),
        ("capabilities", [_CAPS, _CAPS | {"protocol": 2}, _CAPS | {"vendor": "via"}, {}]),
    ):
        v = jsonschema.Draft202012Validator({**s, "$ref": f"#/$defs/{definition}"})
        for d in docs:
            assert (check(d, definition) is None) == v.is_valid(d), (definition, d)


_CAPS = {
    "protocol": 1,
    "profile": "intel",
    "vendor": "intel",
    "maxphyaddr": 46,
    "gbpages": True,
    "la57": False,
    "pku": False,
    "smep": True,
    "smap": True,
}


def test_capabilities_need_the_protocol_version_and_the_features():
    good = {
        "protocol": 1,
        "profile": "intel",
        "vendor": "intel",
        "maxphyaddr": 46,
        "gbpages": True,
        "la57": False,
        "pku": False,
        "smep": True,
        "smap": True,
    }
    assert check(good, "capabilities") is None
    assert "expected 1" in check(good | {"protocol": 2}, "capabilities")
    assert "'smap' is missing" in check({k: v for k, v in good.items() if k != "smap"}, "capabilities")
    assert "$.maxphyaddr" in check(good | {"maxphyaddr": 64}, "capabilities")
    assert "$.vendor" in check(good | {"vendor": "via"}, "capabilities")


# -- names ------------------------------------------------------------------------------------------------
def test_cmd_names_in_oracle_lists():
    assert oracle_list("cmd:prog --x a,b") == ["cmd:prog --x a,b"]
    assert oracle_list("model, unicorn,cmd:prog") == ["model", "unicorn", "cmd:prog"]
    with pytest.raises(BadInputError, match="names no program"):
        oracle_list("cmd:  ")
    with pytest.raises(BadInputError, match="all cannot be combined"):
        oracle_list("all,cmd:prog")
    with pytest.raises(BadInputError, match="unknown oracle 'nope'"):
        oracle_list("nope,cmd:prog")
    ok, why = availability("cmd:/no/such/emulator --fast")
    assert not ok and "no such program /no/such/emulator" in why
    ok, why = availability("cmd:no-such-emulator-on-path")
    assert not ok and "not found on PATH" in why
    with pytest.raises(OracleUnavailable, match="not found on PATH"):
        get_oracle("cmd:no-such-emulator-on-path")
    ok, why = availability("cmd:prog 'unbalanced")
    assert not ok and "cannot split" in why


# -- the reference adapter ----------------------------------------------------------------------------------
@pytest.mark.unicorn
def test_the_adapter_answers_as_unicorn_does_probe_by_probe():
    """The same batches through the adapter and through the in-process oracle: equal answers and
    equal memory afterwards."""
    _unicorn()
    from harness.matrix import MatrixFeatures
    from harness.random_tables import random_batch
    from harness.differential import differing_qwords
    from x86pt.state import profile_named

    uni = get_oracle("unicorn")
    cmd = get_oracle(ADAPTER_CMD)
    try:
        assert cmd.profile == "unicorn" and cmd.capabilities().maxphyaddr == uni.capabilities().maxphyaddr
        feat = MatrixFeatures.from_caps(uni.capabilities())
        for index in range(3):
            b = random_batch(5, index, feat, profile_named("unicorn"), 64)
            want = uni.run(b.memory, b.state, b.probes)
            got = cmd.run(b.memory, b.state, b.probes)
            assert [(r.outcome, r.error_code, r.cr2, r.pa, r.value) for r in got.results] == [
                (r.outcome, r.error_code, r.cr2, r.pa, r.value) for r in want.results
            ]
            assert not differing_qwords(want.memory_after, got.memory_after)
    finally:
        uni.close()
        cmd.close()


def _summary(text: str) -> tuple[str, str]:
    m = re.search(r"^conform: (\d+) mismatches in (\d+) cases", text, re.M)
    assert m, text
    return m.group(1), m.group(2)


@pytest.mark.unicorn
@pytest.mark.parametrize("serve", ["", " --serve"])
@pytest.mark.parametrize(
    "cases",
    [["--cases", "random", "--limit", "200"], ["--cases", "matrix", "--limit", "1500", "--seed", "4"]],
)
def test_conform_through_the_adapter_gives_unicorns_report(tmp_path, cases, serve):
    _unicorn()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    a = conform("unicorn", *cases, "--no-repro", env=env)
    b = conform(ADAPTER_CMD + serve, *cases, "--no-repro", env=env)
    assert a.returncode == 0 and b.returncode == 0, b.stderr[-2000:]
    assert _summary(a.stdout) == _summary(b.stdout) == ("0", cases[3])
    assert not list(tmp.iterdir()), "case directories left behind"


FLIP = """
import sys
sys.path.insert(0, {examples!r})
import cmd_oracle_adapter as a

def flip(probe, d):
    if d["outcome"] == "page_fault" and not probe.user:
        d["error_code"] ^= 0x2     # W/R: the emulator reports the wrong access kind
    return d

sys.exit(a.main(sys.argv[1:], transform=flip))
"""


def flip_program(tmp_path) -> str:
    p = tmp_path / "flip_adapter.py"
    p.write_text(FLIP.format(examples=os.path.dirname(ADAPTER)))
    return f"cmd:{shlex.quote(sys.executable)} {shlex.quote(str(p))} --oracle model"


def test_raw_images_with_the_state_in_case_json(tmp_path):
    """image_format raw: no ELF notes, the registers from case.json; the model behind the adapter
    agrees with the model, and a flipped bit behind it does not (the raw path carries data)."""
    adapter = f"cmd:{shlex.quote(sys.executable)} {shlex.quote(ADAPTER)} --oracle model --raw"
    r = conform(adapter, "--cases", "random", "--limit", "128", "--no-repro", cwd=tmp_path)
    assert r.returncode == 0 and _summary(r.stdout) == ("0", "128"), r.stdout + r.stderr
    r = conform(
        flip_program(tmp_path) + " --raw", "--cases", "random", "--limit", "128", "--no-repro", cwd=tmp_path
    )
    assert r.returncode == 1 and "#PF error code: model" in r.stdout, r.stdout[-2000:] + r.stderr


def test_a_program_that_flips_an_error_code_bit_is_a_mismatch_with_a_repro(tmp_path):
    r = conform(
        flip_program(tmp_path),
        "--cases",
        "random",
        "--limit",
        "64",
        "--seed",
        "2",
        "--repro-dir",
        str(tmp_path / "repros"),
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "MISMATCH random#2:0:" in r.stdout and "#PF error code: model" in r.stdout
    repros = sorted((tmp_path / "repros").iterdir())
    n = int(_summary(r.stdout)[0])
    assert n > 0 and len(repros) == min(n, 50)  # --max-repros 50
    shown = re.findall(r"repro: x86pt conform --repro (\S+) --oracle 'cmd:", r.stdout)
    assert shown and {os.path.basename(s) for s in shown} <= {p.name for p in repros}


# -- programs that break the protocol -------------------------------------------------------------------------
BROKEN = r"""
import json, os, subprocess, sys, time
mode, verb = sys.argv[1], sys.argv[2]
caps = {"protocol": 1, "name": "broken", "profile": "intel", "vendor": "intel", "maxphyaddr": 46,
        "gbpages": True, "la57": False, "pku": False, "smep": True, "smap": True}
if mode.startswith("serve-"):
    caps["serve"] = True
if verb == "capabilities":
    if mode == "caps-garbage":
        print("emulator v0.1 starting up")
    elif mode == "caps-protocol2":
        print(json.dumps(caps | {"protocol": 2}))
    elif mode == "caps-profile":
        print(json.dumps(caps | {"profile": "bochs-2.7"}))
    elif mode == "caps-crash":
        sys.stderr.write("cannot open /dev/emulator\n")
        sys.exit(4)
    else:
        print(json.dumps(caps))
    sys.exit(0)
if verb == "serve":
    sys.stderr.write("serving\n")
    sys.stderr.flush()
    for line in sys.stdin:
        if mode == "serve-crash":
            sys.stderr.write("emulator died\n")
            sys.exit(5)
        if mode == "serve-hang":
            time.sleep(600)
        if mode == "serve-garbage":
            print("hello", flush=True)
        if mode == "serve-error":
            print(json.dumps({"status": "error", "message": "image too big"}), flush=True)
    sys.exit(0)
case = json.load(open(os.path.join(sys.argv[3], "case.json")))
n = case["probe_count"]
sys.stderr.write("emulator log line\n")
if mode == "crash":
    sys.stderr.write("emulator exploded at rip=0xdead\n")
    sys.exit(3)
if mode == "segv":
    os.kill(os.getpid(), 11)
if mode == "hang":
    child = subprocess.Popen(["sleep", "600"])
    open(os.environ["PIDFILE"], "w").write(str(child.pid))
    sys.stderr.write("waiting for the emulator forever\n")
    sys.stderr.flush()
    time.sleep(600)
with open(case["results"], "w") as f:
    if mode == "garbage":
        f.write("\x00\x01 this is not json\n")
    elif mode == "count":
        f.write('{"outcome": "ok"}\n' * (n - 1))
    elif mode == "schema":
        f.write('{"outcome": "ok"}\n' * (n - 1) + '{"outcome": "page_fault", "error_code": "seven"}\n')
    elif mode == "memory":
        f.write('{"outcome": "ok"}\n' * n)
    elif mode == "nofile":
        os.unlink(case["results"])
"""


def broken_program(tmp_path, mode: str) -> str:
    p = tmp_path / "broken.py"
    p.write_text(BROKEN)
    return f"cmd:{shlex.quote(sys.executable)} {shlex.quote(str(p))} {mode}"


@pytest.mark.parametrize(
    "mode, says",
    [
        ("crash", r"run exited with status 3; stderr: emulator log line \| emulator exploded at rip=0xdead$"),
        ("segv", r"run was killed by signal 11; stderr: emulator log line$"),
        ("garbage", r"results line 1 is not JSON .*; stderr: emulator log line$"),
        ("count", r"answered 19 results for 20 probes; stderr: emulator log line$"),
        ("schema", r"results line 20 violates the protocol schema \(at \$\.error_code: .*\); stderr: "),
        ("nofile", r"run wrote no results file; stderr: emulator log line$"),
        ("caps-garbage", r"capabilities: stdout is not one JSON object"),
        ("caps-protocol2", r"speaks protocol 2; this x86pt speaks protocol 1"),
        ("caps-profile", r"capabilities: unknown profile 'bochs-2.7'"),
        ("caps-crash", r"capabilities exited with status 4; stderr: cannot open /dev/emulator$"),
        (
            "serve-crash",
            r"serve: the program ended before answering \(exit status 5\); stderr: serving \| "
            r"emulator died$",
        ),
        (
            "serve-garbage",
            r"serve: bad reply 'hello' \(at \$: expected object, got 'hello'\); stderr: serving$",
        ),
        ("serve-error", r"serve: image too big; stderr: serving$"),
    ],
)
def test_a_broken_program_is_a_one_line_oracle_error(tmp_path, mode, says):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = conform(
        broken_program(tmp_path, mode),
        "--cases",
        "random",
        "--limit",
        "20",
        "--per-tree",
        "20",
        env=dict(os.environ, TMPDIR=str(tmp)),
        cwd=tmp_path,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("x86pt: error: cmd:"), r.stderr
    assert re.search(says, lines[0]), lines[0]
    assert "MISMATCH" not in r.stdout and "Traceback" not in r.stderr
    assert not list(tmp.iterdir()), "case directories left behind"


def test_a_hanging_server_is_killed(tmp_path):
    env = dict(os.environ, X86PT_CMD_TIMEOUT="2")
    r = conform(
        broken_program(tmp_path, "serve-hang"),
        "--cases",
        "random",
        "--limit",
        "20",
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2
    assert re.search(
        r"serve: run timed out after 2 s \(process group killed; X86PT_CMD_TIMEOUT sets the "
        r"limit\); stderr: serving$",
        r.stderr.strip(),
    ), r.stderr


@pytest.mark.unicorn
def test_close_ends_the_server(tmp_path):
    _unicorn()
    from harness.matrix import MatrixFeatures
    from harness.random_tables import random_batch
    from x86pt.state import profile_named

    cmd = get_oracle(ADAPTER_CMD + " --serve")
    assert cmd.serve
    b = random_batch(1, 0, MatrixFeatures.from_caps(cmd.capabilities()), profile_named("unicorn"), 16)
    cmd.run(b.memory, b.state, b.probes)
    cmd.run(b.memory, b.state, b.probes)
    pid, where = cmd._server.pid, cmd._server_dir
    assert cmd.calls == 2  # capabilities, then one serving process for both batches
    cmd.close()
    assert not os.path.exists(where)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_hanging_program_is_killed_with_its_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    env = dict(os.environ, X86PT_CMD_TIMEOUT="2", PIDFILE=str(pidfile))
    t0 = time.monotonic()
    r = conform(
        broken_program(tmp_path, "hang"),
        "--cases",
        "random",
        "--limit",
        "20",
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and re.search(
        r"run timed out after 2 s \(process group killed; "
        r"X86PT_CMD_TIMEOUT sets the limit\); stderr: emulator log line "
        r"\| waiting for the emulator forever$",
        line,
    ), line
    child = int(pidfile.read_text())
    for _ in range(50):  # the grandchild (sleep 600) was killed with the group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail(f"the program's child {child} outlived the timeout")


def test_a_promised_memory_after_that_is_missing_is_an_oracle_error(tmp_path):
    p = tmp_path / "mem.py"
    p.write_text(BROKEN.replace('caps = {"protocol": 1,', 'caps = {"protocol": 1, "memory_after": True,'))
    cmd = CmdOracle(f"{shlex.quote(sys.executable)} {shlex.quote(str(p))} memory")
    from x86pt.memory.sparse import SparseMemory
    from x86pt.oracle import Probe
    from x86pt.state import PagingState

    with pytest.raises(OracleError, match="promise memory_after, but run wrote no memory-after.elf"):
        cmd.run(SparseMemory(32 << 20), PagingState(cr3=0x200000), [Probe(0x1000)])


def test_a_bad_timeout_setting_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("X86PT_CMD_TIMEOUT", "soon")
    with pytest.raises(BadInputError, match="X86PT_CMD_TIMEOUT='soon'"):
        CmdOracle(broken_program(tmp_path, "crash")[len("cmd:") :])


def test_without_memory_after_the_note_says_ad_is_not_compared(tmp_path):
    cmd = CmdOracle(textwrap.dedent(broken_program(tmp_path, "memory"))[len("cmd:") :])
    assert cmd.profile == "intel" and cmd.capabilities().name == "broken"
    assert any("not compared" in n for n in cmd.capabilities().notes)
