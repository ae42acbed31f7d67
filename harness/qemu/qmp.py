"""The project's one QMP client: a blocking front for `qemu.qmp.QMPClient` (PyPI `qemu-qmp`, the
QEMU project's maintained library), with bounded waits and one-line OracleErrors (docs/oracles.md
§5.1 has the measurements behind the choice).

    qmp = Qmp.connect_path(path, proc=proc, stderr=log, timeout=30)
    qmp.command("query-status")                  # {'status': 'paused', ...}
    qmp.hmp("info mem")                          # human-monitor-command, the text
    qmp.pipeline([("human-monitor-command", {"command-line": "gva2gpa 0x1000"}), ...])
    qmp.close()

Each client runs its own asyncio event loop, never installed as the thread's loop, and drives it
only inside a call, so callers stay synchronous and any thread may own a client (one at a time).
What can go wrong, and what the caller sees (always OracleError, one line):
* QEMU exits before or while we talk to it: "QMP <cmd>: QEMU exited with status N: <its message>";
* a command fails: "QMP <cmd>: <ErrorClass>: <QEMU's description>" (the session stays usable);
* no answer in time: "QMP <cmd>: no answer within T s" (the session is closed: a late reply
  could otherwise be taken for the next command's);
* not a QMP server, or the greeting or capability negotiation fails: "QMP: cannot connect: ...".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import time
from typing import IO, Any, Awaitable, Iterable, TypeVar

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from harness.qemu.process import connect_unix, exit_message
from x86pt.errors import BadInputError, OracleError

_T = TypeVar("_T")
# The library logs through 'qemu.qmp'; without a handler of ours Python's last-resort handler
# would print its warnings (e.g. a dropped late reply) on stderr, next to our one-line errors.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
# asyncio's stream limit: the longest message we accept. `info tlb` of a 64 GiB image in 4K pages
# is about 760 MB of text (tools/bench_dump.py); qemu.qmp's default is 10 MB.
MAX_MESSAGE = 1 << 32


class _Client(QMPClient):
    # QMPClient's message hooks log every message as `str(msg)`, which pretty-prints it as JSON
    # before the logger decides to drop it: an extra copy and ~3 ms per MB of reply. Format it only
    # when debug logging is on.
    def _cb_outbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Qmp:
    """A negotiated QMP session over a connected unix socket. `proc` and `stderr` (QEMU's process
    and its output file), when given, turn a lost connection into QEMU's exit status and message."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = 30.0,
        proc: subprocess.Popen | None = None,
        stderr: IO[bytes] | None = None,
    ) -> None:
        self.timeout = timeout
        self.proc = proc
        self.stderr = stderr
        self._loop: asyncio.AbstractEventLoop | None = asyncio.new_event_loop()
        self._client: _Client | None = _Client("x86pt", readbuflen=MAX_MESSAGE)
        try:
            self._run(self._client.connect(sock), timeout, "connect")
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            self.close()
            raise

    @classmethod
    def connect_path(
        cls,
        path: str,
        *,
        timeout: float = 30.0,
        proc: subprocess.Popen | None = None,
        stderr: IO[bytes] | None = None,
    ) -> "Qmp":
        """Connect to the socket at `path` as soon as QEMU has created it (fails at once if `proc`
        exits first; else after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        if proc is not None:
            sock = connect_unix(path, proc, deadline, "QMP", stderr)
        else:
            sock = _connect_until(path, deadline)
        return cls(sock, timeout=max(1.0, deadline - time.monotonic()), proc=proc, stderr=stderr)

    # -- the session -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._client is None

    @property
    def greeting(self) -> dict:
        if self._client is None or self._client.greeting is None:
            return {}
        return {
            "QMP": {
                "version": dict(self._client.greeting.QMP.version),
                "capabilities": list(self._client.greeting.QMP.capabilities),
            }
        }

    @property
    def version(self) -> str:
        """'QEMU 7.2.22 (Debian ...)' from the greeting."""
        v = self.greeting.get("QMP", {}).get("version", {})
        q = v.get("qemu", {})
        pkg = str(v.get("package", "")).strip()
        num = f"{q.get('major', '?')}.{q.get('minor', '?')}.{q.get('micro', '?')}"
        return f"QEMU {num}" + (f" {pkg}" if pkg else "")

    def command(self, name: str, arguments: dict | None = None, timeout: float | None = None) -> Any:
        """Execute one QMP command and return its 'return' value."""
        client = self._need(name)
        return self._run(client.execute(name, arguments), timeout, name)

    def pipeline(self, commands: Iterable[tuple[str, dict | None]], timeout: float | None = None) -> list:
        """Send every command without waiting for the replies in between (QEMU answers them in
        order); their return values in order. `timeout` bounds the whole batch."""
        client = self._need("pipeline")
        cmds = list(commands)
        if not cmds:
            return []

        async def batch() -> list:
            out = await asyncio.gather(*(client.execute(n, a) for n, a in cmds), return_exceptions=True)
            for r in out:
                if isinstance(r, BaseException):
                    raise r
            return out

        return self._run(batch(), timeout, cmds[0][0])

    def hmp(self, line: str, timeout: float | None = None) -> str:
        """A human-monitor command; its text output."""
        if "\n" in line:
            raise BadInputError("one HMP command per call")
        out = self.command("human-monitor-command", {"command-line": line}, timeout)
        return out if isinstance(out, str) else str(out)

    def close(self) -> None:
        """Disconnect and drop the event loop. Safe to call twice and after any error."""
        client, self._client = self._client, None
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            if client is not None and client.runstate != Runstate.IDLE and not loop.is_running():
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.wait_for(client.disconnect(), 5))
        finally:
            if not loop.is_running():
                loop.close()

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------
    def _need(self, what: str) -> _Client:
        if self._client is None:
            raise OracleError(
                f"QMP {what}: the session is closed"
                + (
                    f" ({exit_message(self.proc, self.stderr)})"
                    if self.proc is not None and self.proc.poll() is not None
                    else ""
                )
            )
        return self._client

    def _gone(self, e: BaseException) -> str:
        """Why the connection ended, in one line: QEMU's exit if it exited (waiting a moment for
        the process to be reaped after it closed the socket), else the library's reason."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1.0)
            if self.proc.poll() is not None:
                return exit_message(self.proc, self.stderr)
        if isinstance(e, (ExecInterruptedError, EOFError, ConnectionError)):
            return "QEMU closed the connection"
        return _first_line(e)

    def _run(self, aw: Awaitable[_T], timeout: float | None, what: str) -> _T:
        loop = self._loop
        if loop is None:
            raise OracleError(f"QMP {what}: the session is closed")
        limit = self.timeout if timeout is None else timeout
        try:
            result = loop.run_until_complete(asyncio.wait_for(aw, limit))
        except ExecuteError as e:
            raise OracleError(f"QMP {what}: {e.error_class}: {_first_line(e)}") from None
        except TimeoutError:
            self.close()
            raise OracleError(f"QMP {what}: no answer within {limit:g} s") from None
        except (QMPError, OSError, EOFError) as e:
            why = self._gone(e)
            self.close()
            prefix = "QMP: cannot connect: " if what == "connect" else f"QMP {what}: "
            raise OracleError(prefix + why) from None
        client = self._client
        if client is not None:
            client.events.clear()  # asynchronous events (STOP, RESUME, ...): nobody reads them
        return result


def _connect_until(path: str, deadline: float) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
        if time.monotonic() > deadline:
            raise OracleError(f"QMP: cannot connect to {path}")
        time.sleep(0.02)
