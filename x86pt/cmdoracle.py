# SPDX-License-Identifier: GPL-2.0-or-later
"""The command oracle: an emulator that is not written in Python, run as a program per batch.

`x86pt conform --oracle 'cmd:PROGRAM ARGS'` (and get_oracle("cmd:PROGRAM ARGS")) makes a
CmdOracle. This module runs the program; the protocol's messages (the schema and its validator,
the probe and result codecs, the case directory) are x86pt/cmdprotocol.py. The protocol (version
1, docs/oracle-protocol.md; JSON Schema in docs/oracle-protocol.schema.json, the same file as
x86pt/data/oracle-protocol.schema.json):

* `PROGRAM ARGS capabilities` prints one JSON object on stdout: the protocol version, the x86pt
  profile that models the emulator, and the Capabilities fields (x86pt/oracle.py).
* `PROGRAM ARGS run CASE_DIR`, once per batch: CASE_DIR holds `case.json` (paths, state, RAM
  size), the image (an ELF core with the CPU-state notes, as x86pt.memory.write_image writes it,
  or a raw image when the capabilities ask for it) and the probes as JSONL (docs/formats.md §2.1
  plus `wvalue`). The program writes one result line per probe to the `results` path and, when its
  capabilities say `memory_after`, the image after the run (A/D bits, written data) as an ELF core.
  The environment carries X86PT_PROTOCOL=1 and X86PT_CASE_DIR.
* Serve mode (capabilities say "serve": true): `PROGRAM ARGS serve` runs once for the oracle's
  lifetime instead; x86pt writes each CASE_DIR as a line on its stdin and reads one reply line,
  {"status": "done"} or {"status": "error", "message": ...}, from its stdout.

Everything the program does wrong (not found, a crash, a non-zero exit, a timeout, output that is
not JSON or violates the schema, a wrong number of results) is an OracleError whose one-line
message ends with the tail of the program's stderr; never a mismatch. The program runs in a
process group of its own, which is killed when the call ends (on a timeout, and after a normal
exit too, so nothing it started outlives the batch). Per-call timeout: `timeout=` or the
environment variable X86PT_CMD_TIMEOUT (seconds; default 300).

Without `memory_after` the A/D comparison is switched off for the program: its memory after the
run is taken to be the model's (x86pt.compare.model_run), and a note in its capabilities says so.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Sequence

from x86pt.cmdprotocol import PROTOCOL, _short, check, check_result, result_from_json, write_case
from x86pt.errors import BadInputError, OracleError, OracleUnavailable, X86ptError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import BatchResult, Capabilities, Probe, ProbeResult
from x86pt.state import PagingState

PREFIX = "cmd:"
DEFAULT_TIMEOUT = 300.0
TIMEOUT_ENV = "X86PT_CMD_TIMEOUT"
STDERR_TAIL = 400  # characters of the program's stderr in an error message
MAX_CAPS_BYTES = 1 << 20


# -- the oracle -------------------------------------------------------------------------------------------
def split_command(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise BadInputError(f"{PREFIX}{command}: cannot split the command: {e}") from None
    if not argv:
        raise BadInputError(f"{PREFIX}: no program named (cmd:PROGRAM ARGS)")
    return argv


def program_available(command: str) -> tuple[bool, str]:
    """(True, "") when the command splits and its program is found (PATH, or a path)."""
    try:
        argv = split_command(command)
    except BadInputError as e:
        return False, str(e)
    prog = argv[0]
    if os.sep in prog:
        if not os.path.isfile(prog):
            return False, f"{PREFIX}{command}: no such program {prog}"
        if not os.access(prog, os.X_OK):
            return False, f"{PREFIX}{command}: {prog} is not executable"
        return True, ""
    if shutil.which(prog) is None:
        return False, f"{PREFIX}{command}: program {prog!r} not found on PATH"
    return True, ""


def _timeout_from_env() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        t = float(text)
    except ValueError:
        raise BadInputError(f"{TIMEOUT_ENV}={text!r}: not a number of seconds") from None
    if not t > 0:
        raise BadInputError(f"{TIMEOUT_ENV}={text!r}: must be above 0")
    return t


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * STDERR_TAIL))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = " | ".join(lines)
    return out if len(out) <= STDERR_TAIL else "..." + out[-STDERR_TAIL:]


class CmdOracle:
    """An external program behind the Oracle protocol (x86pt/oracle.py), protocol 1."""

    in_all = False

    def __init__(self, command: str, *, timeout: float | None = None) -> None:
        self.command = command.strip()
        self.argv = split_command(self.command)
        self.name = PREFIX + self.command
        self.timeout = float(timeout) if timeout is not None else _timeout_from_env()
        ok, why = program_available(self.command)
        if not ok:
            raise OracleUnavailable(why)
        self.calls = 0
        caps = self._capabilities()
        self.profile: str = caps["profile"]
        self.max_probes: int | None = caps.get("max_probes")
        self.memory_after: bool = bool(caps.get("memory_after", False))
        self.image_format: str = caps.get("image_format", "elf")
        self.serve: bool = bool(caps.get("serve", False))
        self._server: subprocess.Popen[bytes] | None = None
        self._server_dir: str | None = None
        self._buf = b""
        notes = tuple(caps.get("notes", ()))
        if not self.memory_after:
            notes += ("no memory after the run: A/D bits and written data are not compared",)
        fields = {
            k: caps[k]
            for k in (
                "vendor",
                "maxphyaddr",
                "gbpages",
                "la57",
                "pku",
                "smep",
                "smap",
                "nx",
                "rsvd_sets_p",
                "implicit_cpl0",
                "implicit_cpl3",
                "implicit_note",
                "ram_size",
                "unbacked",
                "version",
            )
            if k in caps
        }
        self._caps = Capabilities(name=caps.get("name") or self.name, notes=notes, **fields)

    @staticmethod
    def available(command: str = "") -> tuple[bool, str]:
        return program_available(command)

    # -- running the program ----------------------------------------------------------------------
    def _call(
        self, args: list[str], work: str, what: str, extra_env: dict[str, str] | None = None
    ) -> tuple[str, str]:
        """Run the program with `args` appended, stdout and stderr into files in `work`; returns
        their paths. OracleError on a failure to start, a timeout or a non-zero exit."""
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        env = dict(os.environ, X86PT_PROTOCOL=str(PROTOCOL), **(extra_env or {}))
        self.calls += 1
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    self.argv + args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    start_new_session=True,
                )
            except OSError as e:
                raise OracleError(f"{self.name}: cannot start {self.argv[0]}: {e.strerror or e}") from None
        status = self._wait(proc)
        if status is None:
            raise OracleError(
                f"{self.name}: {what} timed out after {self.timeout:g} s (process group "
                f"killed; {TIMEOUT_ENV} sets the limit){self._stderr(err_path)}"
            )
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise OracleError(f"{self.name}: {what} {how}{self._stderr(err_path)}")
        return out_path, err_path

    def _wait(self, proc: subprocess.Popen[bytes], timeout: float | None = None) -> int | None:
        """Wait for the program; kill its whole process group when it ends or times out (the
        leader is left a zombie until the group is killed, so its group id cannot be reused)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        pause = 0.0005
        timed_out = False
        info: os.waitid_result | bool | None
        try:
            while True:
                try:
                    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    info = True
                if info is not None:
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        finally:  # also on KeyboardInterrupt: nothing of the program survives the call
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            status = proc.wait()
        return None if timed_out else status

    @staticmethod
    def _stderr(err_path: str) -> str:
        tail = _tail(err_path)
        return f"; stderr: {tail}" if tail else "; stderr empty"

    def _capabilities(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="x86pt-cmd-") as work:
            try:
                out_path, err_path = self._call(["capabilities"], work, "capabilities")
            except OracleError as e:
                raise OracleUnavailable(str(e)) from None
            with open(out_path, "rb") as f:
                raw = f.read(MAX_CAPS_BYTES + 1)
            if len(raw) > MAX_CAPS_BYTES:
                raise OracleUnavailable(
                    f"{self.name}: capabilities: more than {MAX_CAPS_BYTES} bytes "
                    f"on stdout{self._stderr(err_path)}"
                )
            try:
                caps = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise OracleUnavailable(
                    f"{self.name}: capabilities: stdout is not one JSON object "
                    f"({_first_line(e)}){self._stderr(err_path)}"
                ) from None
            if (
                isinstance(caps, dict)
                and caps.get("protocol") != PROTOCOL
                and isinstance(caps.get("protocol"), int)
            ):
                raise OracleUnavailable(
                    f"{self.name}: speaks protocol {caps['protocol']}; this x86pt speaks protocol {PROTOCOL}"
                )
            err = check(caps, "capabilities")
            if err:
                raise OracleUnavailable(
                    f"{self.name}: capabilities violate the protocol schema ({err}){self._stderr(err_path)}"
                )
        from x86pt.state import profile_named

        try:
            profile_named(caps["profile"])
        except BadInputError as e:
            raise OracleUnavailable(f"{self.name}: capabilities: {e}") from None
        out: dict[str, Any] = caps  # a JSON object: the schema check above
        return out

    # -- the Oracle protocol ----------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return self._caps

    def run(self, memory: SparseMemory, state: PagingState, probes: Sequence[Probe]) -> BatchResult:
        t0 = time.perf_counter()
        probes = list(probes)
        with tempfile.TemporaryDirectory(prefix="x86pt-cmd-") as work:
            try:
                case = write_case(work, memory, state, probes, self.image_format)
            except X86ptError as e:
                raise OracleError(f"{self.name}: cannot write the case: {e}") from None
            if self.serve:
                err_path = self._serve_run(work)
            else:
                _, err_path = self._call(["run", work], work, "run", {"X86PT_CASE_DIR": work})
            results = self._read_results(case["results"], len(probes), err_path)
            if self.memory_after:
                after = self._read_memory_after(case["memory_after"], memory.size, err_path)
            else:
                from x86pt.compare import model_run

                after = model_run(memory, state, probes)[1]
        return BatchResult(results, after, time.perf_counter() - t0)

    def _read_results(self, path: str, count: int, err_path: str) -> list[ProbeResult]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise OracleError(f"{self.name}: run wrote no results file{self._stderr(err_path)}") from None
        except OSError as e:
            raise OracleError(f"{self.name}: cannot read its results: {e.strerror}") from None
        out = []
        for n, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise OracleError(
                    f"{self.name}: results line {n} is not JSON ({_first_line(e)}){self._stderr(err_path)}"
                ) from None
            err = check_result(d)
            if err:
                raise OracleError(
                    f"{self.name}: results line {n} violates the protocol schema ({err})"
                    f"{self._stderr(err_path)}"
                )
            out.append(result_from_json(d))
        if len(out) != count:
            raise OracleError(
                f"{self.name}: answered {len(out)} results for {count} probes{self._stderr(err_path)}"
            )
        return out

    def _read_memory_after(self, path: str, size: int, err_path: str) -> SparseMemory:
        from x86pt.memory import open_memory

        if not os.path.exists(path):
            raise OracleError(
                f"{self.name}: its capabilities promise memory_after, but run wrote no "
                f"{os.path.basename(path)}{self._stderr(err_path)}"
            )
        try:
            src = open_memory(path, "elf")
        except X86ptError as e:
            raise OracleError(f"{self.name}: memory after the run: {e}") from None
        mem = SparseMemory(size)
        try:
            for seg in src.segments():
                mem.write(seg.start, src.read(seg.start, seg.size))
        except X86ptError as e:
            raise OracleError(f"{self.name}: memory after the run: {e}") from None
        finally:
            src.close()
        return mem

    # -- serve mode: one process for the oracle's lifetime ----------------------------------------------
    def _serve_run(self, work: str) -> str:
        """Hand CASE_DIR to the serving program (one line on its stdin) and wait for its reply
        line on stdout; returns the path of its stderr file."""
        if self._server is None:
            self._serve_start()
        proc, server_dir = self._server, self._server_dir
        # _serve_start made both, the program's stdin and stdout pipes
        assert proc is not None and server_dir is not None and proc.stdin and proc.stdout
        err_path = os.path.join(server_dir, "stderr")
        try:
            proc.stdin.write(work.encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            status, tail = self._serve_stop(graceful=False)
            raise OracleError(f"{self.name}: serve: the program is gone ({_how(status)}){tail}") from None
        line, why = self._read_line(proc.stdout.fileno(), time.monotonic() + self.timeout)
        if line is None:
            # after an EOF the program is exiting: a moment to collect its exit status
            status, tail = self._serve_stop(graceful=False, wait=0.0 if why == "timeout" else 2.0)
            if why == "timeout":
                raise OracleError(
                    f"{self.name}: serve: run timed out after {self.timeout:g} s (process group "
                    f"killed; {TIMEOUT_ENV} sets the limit){tail}"
                )
            what = "ended" if why == "eof" else why
            raise OracleError(
                f"{self.name}: serve: the program {what} before answering ({_how(status)}){tail}"
            )
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            reply = line.decode("utf-8", "replace")
        err = check(reply, "serve_reply")
        if err or self._buf.strip():
            _, tail = self._serve_stop(graceful=False)
            why = f"({err})" if err else "(more than one reply line)"
            raise OracleError(f"{self.name}: serve: bad reply {_short(reply)} {why}{tail}")
        if reply["status"] == "error":
            raise OracleError(f"{self.name}: serve: {reply.get('message', 'error')}{self._stderr(err_path)}")
        return err_path

    def _serve_start(self) -> None:
        self._server_dir = tempfile.mkdtemp(prefix="x86pt-cmd-serve-")
        self._buf = b""
        env = dict(os.environ, X86PT_PROTOCOL=str(PROTOCOL))
        self.calls += 1
        with open(os.path.join(self._server_dir, "stderr"), "wb") as err:
            try:
                self._server = subprocess.Popen(
                    self.argv + ["serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=env,
                    start_new_session=True,
                )
            except OSError as e:
                self._serve_cleanup()
                raise OracleError(f"{self.name}: cannot start {self.argv[0]}: {e.strerror or e}") from None

    def _read_line(self, fd: int, deadline: float) -> tuple[bytes | None, str]:
        import select

        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, "timeout"
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None, "eof"
            self._buf += chunk
            if len(self._buf) > MAX_CAPS_BYTES:
                return None, "wrote more than 1 MiB"
        line, _, self._buf = self._buf.partition(b"\n")
        return line, ""

    def _serve_stop(self, graceful: bool, wait: float = 0.0) -> tuple[int | None, str]:
        """End the serving program: EOF on its stdin and a few seconds to exit when graceful,
        then its process group is killed. Returns its exit status (None: it had to be killed)
        and the tail of its stderr for a message."""
        proc = self._server
        self._server = None
        status = None
        if proc is not None:
            assert proc.stdin and proc.stdout  # _serve_start opened both pipes
            try:
                proc.stdin.close()
            except OSError:
                pass
            status = self._wait(proc, timeout=5.0 if graceful else wait)
            proc.stdout.close()
        tail = self._stderr(os.path.join(self._server_dir, "stderr")) if self._server_dir else ""
        self._serve_cleanup()
        return status, tail

    def _serve_cleanup(self) -> None:
        if self._server_dir is not None:
            shutil.rmtree(self._server_dir, ignore_errors=True)
            self._server_dir = None

    def close(self) -> None:
        """Ends the serving program, if any; without serve mode nothing persists between runs
        (each call's process group is gone when it returns)."""
        if self._server is not None:
            self._serve_stop(graceful=True)

    def __enter__(self) -> "CmdOracle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _how(status: int | None) -> str:
    if status is None:
        return "killed"
    return f"killed by signal {-status}" if status < 0 else f"exit status {status}"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
