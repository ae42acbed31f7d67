"""The front door's manners: Ctrl-C stops a long run with a partial summary and exit 130 (no
traceback, also with unicorn's callbacks in flight); progress is drawn only on a terminal, so a
redirected stderr gets no carriage-return updates; conform's default run is bounded."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, need_oracle


def _x86pt(*args: str, cwd) -> list[str]:
    return [sys.executable, "-m", "x86pt", *args]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    return env


@pytest.mark.parametrize("oracle", ["model", pytest.param("unicorn", marks=pytest.mark.unicorn)])
def test_ctrl_c_prints_a_partial_summary_and_exits_130(oracle, tmp_path):
    if oracle == "unicorn":
        from x86pt.registry import availability

        ok, why = availability("unicorn")
        need_oracle("unicorn", ok, why)
    p = subprocess.Popen(
        _x86pt("conform", "--oracle", oracle, "--full", "--no-repro", cwd=tmp_path),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3.0)  # start-up, then some batches
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err and "ctypes" not in err, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("conform: 0 mismatches in ") and last.endswith(", interrupted"), last
    done = int(last.split(" in ")[1].split()[0])
    assert 0 < done < 19_169_280  # some cases ran, far fewer than the full matrix


def test_redirected_stderr_gets_no_progress_updates(tmp_path):
    r = subprocess.run(
        _x86pt("conform", "--oracle", "model", "--limit", "3000", cwd=tmp_path),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr, repr(r.stderr[:300])
    r = subprocess.run(
        _x86pt("cpa", "generate", "modules", "--ops", "300", "-o", "t.trace", cwd=tmp_path),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        _x86pt("cpa", "compare", "t.trace", "--policies", "none,upstream", cwd=tmp_path),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr, repr(r.stderr[:300])


def test_progress_is_drawn_on_a_terminal(tmp_path):
    """On a TTY the bar is there, and it never counts past its total."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout/stderr are the pty
        os.chdir(tmp_path)
        os.environ["PYTHONPATH"] = ROOT
        os.execv(
            sys.executable,
            _x86pt("conform", "--oracle", "model", "--limit", "5000", "--no-repro", cwd=tmp_path),
        )
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "5000/5000" in text and "cases/s" in text, text[-500:]
    assert "5001/" not in text and "/5000 [" in text


def test_conform_default_is_a_bounded_sample(tmp_path):
    r = subprocess.run(
        _x86pt("conform", "--oracle", "model", "--no-repro", cwd=tmp_path),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "a seeded sample of 20,000 matrix cases" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == "conform: 0 mismatches in 20000 cases (model)"


def test_repro_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    r = subprocess.run(
        _x86pt("conform", "--oracle", "model", "--limit", "10", "--repro-dir", "afile", cwd=tmp_path),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert (tmp_path / "afile").read_text() == "keep me\n"
