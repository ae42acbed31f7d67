"""README as a test: every command in README.md's ```sh blocks runs as printed, in order, in one
empty temporary folder (the inputs are what earlier commands write, or the build spec the README
prints), with the venv's x86pt on PATH. A command must exit 0 and print no failure.

`bash run.sh test` is the command that runs this file, so it is not run again here. Commands that
need an oracle or a real kernel skip (or fail, under X86PT_REQUIRE_ORACLES) like the oracle tests.
"""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, need_oracle

README = os.path.join(ROOT, "README.md")
FAILURE_WORDS = re.compile(r"Traceback|FAILED|VIOLATION|internal error|x86pt: error")


def _blocks(lang: str) -> list[str]:
    text = open(README, encoding="utf-8").read()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands() -> list[str]:
    cmds = []
    for block in _blocks("sh"):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def _strip_comment(cmd: str) -> str:
    """The command without its trailing `# comment` (a '#' after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or cmd[i - 1].isspace()):
            return cmd[:i].rstrip()
    return cmd.rstrip()


def _expected_exit(line: str) -> int:
    """A README command whose comment says `exits N` must exit N; every other one 0."""
    m = re.search(r"#.*\bexits (\d+)", line)
    return int(m.group(1)) if m else 0


def _needs(cmd: str) -> list[str]:
    """Oracles a command needs, from what it names."""
    need = []
    if re.search(r"\blinux (run|report)\b", cmd):
        need.append("linux")
    m = re.search(r"--(?:x86pt-)?oracle (\S+)", cmd)
    if m and "cmd:" in m.group(1):
        need.append("unicorn")  # the example adapter wraps unicorn
    elif m:
        from x86pt.registry import all_oracles

        names = m.group(1).split(",")
        need += list(all_oracles()) if names == ["all"] else names
    if "bench_dump.py" in cmd:
        need.append("qemu")
    if "bench_core.py" in cmd or "bench_conform.py" in cmd:
        need.append("unicorn")
    return need


def _available(name: str) -> tuple[bool, str]:
    if name == "linux":
        from harness.linux.run import available

        return available("6.1")
    from x86pt.registry import availability

    return availability(name)


COMMANDS = readme_commands()


def test_readme_has_the_front_door_commands():
    firsts = [_strip_comment(c) for c in COMMANDS]
    assert "bash run.sh" in firsts and "bash run.sh test" in firsts
    assert any(c.startswith("x86pt demo") for c in firsts)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    toml = [b for b in _blocks("toml")]
    assert len(toml) == 1, "the README prints one build spec"
    (d / "spec.toml").write_text(toml[0], encoding="utf-8")
    # The commands the README runs "from a clone" name the example adapter by its relative path.
    (d / "examples").symlink_to(os.path.join(ROOT, "examples"), target_is_directory=True)
    return d


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[_strip_comment(c)[:60] for c in COMMANDS])
def test_readme_command(index, workdir):
    cmd = _strip_comment(COMMANDS[index])
    if cmd == "bash run.sh test":
        pytest.skip("this is the command that runs the tests")
    for name in _needs(cmd):
        ok, why = _available(name)
        need_oracle(name, ok, why)
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["TMPDIR"] = str(workdir)
    env.pop("PYTHONPATH", None)
    shell_cmd = cmd
    if cmd.startswith("bash run.sh") or cmd.startswith(".venv/bin/python "):
        # Repository-relative commands run from the repository, with this venv's interpreter.
        shell_cmd = cmd.replace(".venv/bin/python ", shlex.quote(sys.executable) + " ", 1)
        cwd = ROOT
        env["X86PT_VENV"] = os.path.dirname(bindir)
    else:
        cwd = workdir
    before = set(os.listdir(ROOT))
    r = subprocess.run(
        ["bash", "-c", shell_cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    out = r.stdout + r.stderr
    want = _expected_exit(COMMANDS[index])
    assert r.returncode == want, f"{cmd}: exit {r.returncode}, the README says {want}\n{out[-4000:]}"
    bad = FAILURE_WORDS.search(out)
    if want == 0:
        assert bad is None, f"{cmd}: printed {bad.group(0)!r}\n{out[-4000:]}"
    assert "Traceback" not in out and "internal error" not in out, out[-4000:]
    assert set(os.listdir(ROOT)) - before == set(), f"{cmd}: wrote into the repository"
