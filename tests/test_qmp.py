"""The QMP client (harness/qemu/qmp.py) and the process it talks to (harness/qemu/process.py):
what a caller sees when QEMU exits early, a command fails, or no answer comes, and that nothing is
left running or on disk afterwards.

Two kinds of peer. `test_offline_*` talk to a scripted server on a socketpair, written from the
QMP specification (QEMU's docs/interop/qmp-spec.rst: the greeting object, `qmp_capabilities`, the
`id` echoed in replies, `error` with `class` and `desc`, events with an `event` member), so every
byte the client receives is known. The others run qemu-system-x86_64 itself (error class
`CommandNotFound` and the exit status come from QEMU, not from us).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time

import pytest

from tests.conftest import need_oracle

from harness.qemu.process import QemuProcess, qemu_binary
from harness.qemu.qmp import Qmp
from x86pt.errors import OracleError

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 3, "minor": 2, "major": 9}, "package": "(test)"},
        "capabilities": [],
    }
}


@pytest.fixture(autouse=True)
def _qemu(request):
    if request.node.name.startswith("test_offline_"):
        return
    need_oracle("qemu", HAVE_QEMU, "qemu-system-x86_64 not installed (tools/install_qemu.sh)")


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text.strip() == text and text, repr(text)
    return text


def qemu_children() -> list[int]:
    """Our child processes that are QEMU (running or zombie), read from /proc."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm.startswith("qemu-system"):
            out.append(int(pid))
    return out


# -- a scripted QMP server ---------------------------------------------------------------------------
class FakeQemu:
    """A QMP server on one end of a socketpair. `script(name, args)` answers each command after
    qmp_capabilities: a dict (sent with the command's id), "silent" (no answer), "close" (hang up),
    or a list of raw messages to send first (events) followed by one of those."""

    def __init__(self, script, greeting: bytes | None = None) -> None:
        self.ours, theirs = socket.socketpair()
        self.client_end = theirs
        self.script = script
        self.greeting = greeting if greeting is not None else json.dumps(GREETING).encode() + b"\r\n"
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, obj) -> None:
        self.ours.sendall(json.dumps(obj).encode() + b"\r\n")

    def _messages(self):
        """Commands as they arrive: a stream of JSON objects, not necessarily one per line."""
        dec, buf = json.JSONDecoder(), ""
        while True:
            data = self.ours.recv(65536)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    def _serve(self) -> None:
        try:
            self.ours.sendall(self.greeting)
            for msg in self._messages():
                name, mid = msg["execute"], msg.get("id")
                self.seen.append(name)
                if name == "qmp_capabilities":
                    self._send({"return": {}, "id": mid})
                    continue
                answer = self.script(name, msg.get("arguments"))
                if isinstance(answer, list):
                    for raw in answer[:-1]:
                        self._send(raw)
                    answer = answer[-1]
                if answer == "close":
                    break
                if answer == "silent":
                    continue
                self._send({**answer, "id": mid})
        except (OSError, ValueError):
            pass
        finally:
            self.ours.close()

    def client(self, timeout: float = 5.0) -> Qmp:
        return Qmp(self.client_end, timeout=timeout)


def test_offline_greeting_and_a_command():
    fake = FakeQemu(lambda name, args: {"return": {"status": "paused", "running": False}})
    with fake.client() as q:
        assert q.version == "QEMU 9.2.3 (test)"
        assert q.command("query-status") == {"status": "paused", "running": False}
    assert fake.seen[:2] == ["qmp_capabilities", "query-status"]


def test_offline_events_are_not_replies():
    stop = {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}
    fake = FakeQemu(lambda name, args: [stop, stop, {"return": "text of " + args["command-line"]}])
    with fake.client() as q:
        assert q.hmp("info mem") == "text of info mem"
        assert q.hmp("info tlb") == "text of info tlb"


def test_offline_command_error_is_one_line_and_the_session_goes_on():
    def script(name, args):
        if name == "no-such-command":
            return {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "The command no-such-command has not been found",
                }
            }
        return {"return": {}}

    fake = FakeQemu(script)
    with fake.client() as q:
        with pytest.raises(OracleError) as e:
            q.command("no-such-command")
        assert one_line(e) == (
            "QMP no-such-command: CommandNotFound: The command no-such-command has not been found"
        )
        assert q.command("cont") == {}


def test_offline_timeout_closes_the_session():
    fake = FakeQemu(lambda name, args: "silent")
    q = fake.client()
    t = time.monotonic()
    with pytest.raises(OracleError) as e:
        q.command("query-status", timeout=0.3)
    assert one_line(e) == "QMP query-status: no answer within 0.3 s"
    assert 0.3 <= time.monotonic() - t < 3
    assert q.closed
    with pytest.raises(OracleError) as e:
        q.command("query-status")
    assert one_line(e) == "QMP query-status: the session is closed"
    q.close()  # twice is fine


def test_offline_peer_hangs_up_mid_command():
    fake = FakeQemu(lambda name, args: "close")
    q = fake.client()
    with pytest.raises(OracleError) as e:
        q.command("query-status")
    assert one_line(e) == "QMP query-status: QEMU closed the connection"
    assert q.closed


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_9.2\r\n", b'{"not": "qmp"}\r\n', b""])
def test_offline_not_a_qmp_server(greeting):
    fake = FakeQemu(lambda name, args: {"return": {}}, greeting=greeting)
    if not greeting:
        fake.ours.shutdown(socket.SHUT_WR)  # hangs up before any greeting
    with pytest.raises(OracleError) as e:
        fake.client(timeout=2.0)
    assert one_line(e).startswith("QMP: cannot connect: ")


def test_offline_pipeline_answers_in_order():
    fake = FakeQemu(lambda name, args: {"return": f"gpa: {int(args['command-line'].split()[1], 16) + 1:x}"})
    with fake.client() as q:
        out = q.pipeline(
            [
                ("human-monitor-command", {"command-line": f"gva2gpa {va:#x}"})
                for va in range(0x1000, 0x1000 + 64)
            ]
        )
    assert out == [f"gpa: {va + 1:x}" for va in range(0x1000, 0x1000 + 64)]


def test_offline_hmp_is_one_command():
    fake = FakeQemu(lambda name, args: {"return": ""})
    with fake.client() as q:
        with pytest.raises(Exception, match="one HMP command"):
            q.hmp("info mem\nquit")


# -- the real QEMU -------------------------------------------------------------------------------
def paused_qemu(extra: tuple[str, ...] = ()) -> QemuProcess:
    qp = QemuProcess()
    qp.start(
        [
            qemu_binary(),
            "-S",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-m",
            "16M",
            "-qmp",
            f"unix:{qp.path('qmp.sock')},server=on,wait=off",
            *extra,
        ]
    )
    return qp


def connect(qp: QemuProcess, timeout: float = 20.0) -> Qmp:
    return Qmp.connect_path(qp.path("qmp.sock"), proc=qp.proc, stderr=qp.stderr, timeout=timeout)


def assert_gone(qp: QemuProcess, pid: int, directory: str) -> None:
    assert qp.proc is None or qp.proc.poll() is not None
    assert not os.path.exists(f"/proc/{pid}"), "QEMU still exists (running or unreaped)"
    assert pid not in qemu_children()
    assert not os.path.exists(directory), "scratch directory left behind"


def test_qemu_exits_before_qmp_is_ready():
    qp = paused_qemu(("-machine", "no-such-machine"))
    pid, directory = qp.proc.pid, qp.dir
    try:
        with pytest.raises(OracleError) as e:
            connect(qp)
        msg = one_line(e)
        assert msg.startswith("QEMU exited with status 1: "), msg
        assert "unsupported machine type" in msg  # QEMU's own reason, passed on
    finally:
        qp.close()
    assert_gone(qp, pid, directory)


def test_qemu_command_error_and_a_working_session():
    with paused_qemu() as qp:
        pid, directory = qp.proc.pid, qp.dir
        with connect(qp) as q:
            assert q.version.startswith("QEMU ")
            with pytest.raises(OracleError) as e:
                q.command("no-such-command")
            assert one_line(e).startswith("QMP no-such-command: CommandNotFound: ")
            with pytest.raises(OracleError) as e:
                q.command("human-monitor-command", {"no-such-argument": 1})
            assert one_line(e).startswith("QMP human-monitor-command: GenericError: ")
            assert q.command("query-status")["status"] == "prelaunch"
            assert "PG disabled" in q.hmp("info mem") or q.hmp("info mem") == ""
    assert_gone(qp, pid, directory)


def test_qemu_that_stops_answering_times_out():
    qp = paused_qemu()
    pid, directory = qp.proc.pid, qp.dir
    try:
        q = connect(qp)
        os.kill(pid, signal.SIGSTOP)  # alive, but deaf
        t = time.monotonic()
        with pytest.raises(OracleError) as e:
            q.command("query-status", timeout=0.5)
        assert one_line(e) == "QMP query-status: no answer within 0.5 s"
        assert time.monotonic() - t < 5
        assert q.closed
    finally:
        qp.close()  # SIGKILL reaches a stopped process
    assert_gone(qp, pid, directory)


def test_qemu_killed_mid_session():
    qp = paused_qemu()
    pid, directory = qp.proc.pid, qp.dir
    try:
        q = connect(qp)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(OracleError) as e:
            q.command("query-status")
        assert one_line(e) == "QMP query-status: QEMU exited with status -9: no message"
    finally:
        qp.close()
    assert_gone(qp, pid, directory)


def test_qemu_quit_then_wait():
    qp = paused_qemu()
    pid, directory = qp.proc.pid, qp.dir
    try:
        q = connect(qp)
        try:
            q.command("quit")
        except OracleError:
            pass  # QEMU may hang up before it answers
        assert qp.wait(10) == 0
        q.close()
    finally:
        qp.close()
    assert_gone(qp, pid, directory)
