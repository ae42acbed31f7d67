"""Where `x86pt conform` runs the parts of a run when it does not run in one process: in N local
processes (`--jobs N`; `--jobs 1`, the default, is no executor at all) or as tasks of a Dask
distributed cluster (`--executor dask://HOST:PORT`, extra `x86pt[dask]`).

A run's case selection (the matrix sample, limit or shard; the random trees) is cut into parts on
MatrixSource chunk boundaries, so each case is built in the batch one process would build it in
(docs/conformance-sweeps.md §1, §2). A part is a plain dict (`part_spec`); `run_part` opens the oracle
in the worker, runs the part and returns a plain dict: the summary, the oracle's capabilities and
every mismatch as a record (`mismatch_record`: its JSON, its text and its repro, so the parent
writes the repro file where a local run would). Nothing but dicts, lists, strings and numbers
crosses a process or the network.

An executor has three calls: `call(fn, arg)` runs one task and returns its result; `run(fn, args,
stop)` runs many and yields (index, result) as they finish, cancelling what has not started once
`stop.requested` is set; `close()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Callable, Iterator, Protocol, Sequence

from harness.reports import selection
from x86pt.errors import BadInputError, OracleError

# At most this many mismatch records come back from one part (the rest are counted only): an
# oracle that disagrees with everything must not fill the parent's memory.
MAX_CARRIED = 10_000
# A random part has at least this many trees unless the whole selection is smaller; a matrix part
# is at least one chunk of MatrixSource (65,536 cases). With W workers a run has at most
# PARTS_PER_WORKER * W parts.
MIN_PART_TREES = 16
PARTS_PER_WORKER = 4
# Seconds to wait for a Dask scheduler before `--executor dask://` gives up.
DASK_CONNECT_TIMEOUT = 10.0


# -- what a part is -----------------------------------------------------------------------------------
def part_spec(args: argparse.Namespace, oracle: str, span: tuple[int, int] | None = None) -> dict:
    """The picklable description of one part: the run's selection options, one oracle, and the
    units [a, b) of the run's selection (inside its own --shard) the part runs."""
    return {
        "oracle": oracle,
        **selection(args),
        "batch": args.batch,
        "per_tree": args.per_tree,
        "shard": list(args.shard) if args.shard else None,
        "span": list(span) if span is not None else None,
    }


def _namespace(spec: dict) -> argparse.Namespace:
    ns = argparse.Namespace(**{k: v for k, v in spec.items() if k not in ("oracle", "span")})
    ns.shard = tuple(spec["shard"]) if spec.get("shard") else None
    return ns


def mismatch_record(mm) -> dict:
    """A Mismatch as plain data: its JSON and its text without a repro file, and its repro."""
    bare = {k: v for k, v in mm.repro.items() if k != "file"}
    m = dataclasses.replace(mm, repro=bare)
    return {"case": mm.case.label, "json": m.to_json(), "text": m.render(), "repro": bare}


def plan(spec: dict) -> dict:
    """Open the oracle once: its capabilities and the size of the run's selection."""
    from harness.cli import _open_oracle, make_source, selection_units

    oracle = _open_oracle(spec["oracle"], spec["profile"])
    try:
        caps = oracle.capabilities()
        ns = _namespace(spec)
        src = make_source(ns, oracle, caps)
        units, align = selection_units(ns, src)
        return {"capabilities": caps.to_json(), "cases": src.total, "units": units, "align": align}
    finally:
        oracle.close()


class _EventStop:
    """`requested` from a multiprocessing Event the parent sets on Ctrl-C."""

    def __init__(self, event) -> None:
        self.event = event

    @property
    def requested(self) -> bool:
        return self.event is not None and self.event.is_set()


_WORKER_STOP: Any = None


def run_part(spec: dict) -> dict:
    """Run one part in this process: open the oracle, run, close. Returns the part's report."""
    from harness.cli import _open_oracle, make_source
    from harness.differential import run_conformance

    oracle = _open_oracle(spec["oracle"], spec["profile"])
    records: list[dict] = []
    dropped = 0

    def on_mm(mm) -> None:
        nonlocal dropped
        if len(records) < MAX_CARRIED:
            records.append(mismatch_record(mm))
        else:
            dropped += 1

    try:
        caps = oracle.capabilities()
        span = tuple(spec["span"]) if spec.get("span") is not None else None
        src = make_source(_namespace(spec), oracle, caps, span=span)
        summ = run_conformance(oracle, src, on_mismatch=on_mm, interrupt=_WORKER_STOP)
    finally:
        oracle.close()
    return {
        "oracle": spec["oracle"],
        "span": spec["span"],
        "summary": summ.to_json(),
        "capabilities": caps.to_json(),
        "mismatches": records,
        "dropped": dropped,
    }


def split(units: int, align: int, workers: int, cases: str) -> list[tuple[int, int]]:
    """The spans [a, b) a selection of `units` is cut into for `workers` workers: starts on
    multiples of `align`, at most PARTS_PER_WORKER per worker, none (but the only one) smaller
    than MIN_PART_TREES trees of a random run."""
    blocks = -(-units // max(1, align))
    most = PARTS_PER_WORKER * max(1, workers)
    if cases == "random":
        most = min(most, max(1, blocks // MIN_PART_TREES))
    n = max(1, min(most, blocks))
    cuts = [min(units, (k * blocks // n) * align) for k in range(n + 1)]
    cuts[-1] = units
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, 0)]


# -- executors ----------------------------------------------------------------------------------------------
class Executor(Protocol):
    name: str
    workers: int

    def call(self, fn: Callable[[dict], dict], arg: dict) -> dict: ...

    def run(self, fn: Callable[[dict], dict], args: Sequence[dict], stop) -> Iterator[tuple[int, dict]]: ...

    def close(self) -> None: ...


def _init_local_worker(event) -> None:
    import signal

    global _WORKER_STOP
    # Ctrl-C reaches every process of the terminal's group: the parent sets `event`, the
    # workers stop after the batch in flight, as a local run does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_STOP = _EventStop(event)


class LocalProcesses:
    """`--jobs N`: N worker processes on this machine (spawned: no state inherited)."""

    def __init__(self, jobs: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.name = f"local:{jobs}"
        self.workers = jobs
        ctx = mp.get_context("spawn")
        self._event = ctx.Event()
        self._pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_init_local_worker, initargs=(self._event,)
        )

    def call(self, fn, arg):
        return fn(arg)  # the plan runs here: one oracle open, as a local run does

    def run(self, fn, args, stop):
        from concurrent.futures import FIRST_COMPLETED, wait

        futs = {self._pool.submit(fn, a): i for i, a in enumerate(args)}
        pending = set(futs)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for f in done:
                if f.cancelled():
                    continue
                yield futs[f], _result(f.result)
            if stop is not None and stop.requested and not self._event.is_set():
                self._event.set()
                for f in pending:
                    f.cancel()

    def close(self) -> None:
        self._event.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """`--executor dask://HOST:PORT`: parts are tasks of a Dask distributed cluster. The workers
    need x86pt (with the oracle's own needs) installed; each task opens its oracle in the worker."""

    def __init__(self, address: str) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise BadInputError("--executor dask:// needs Dask: pip install 'x86pt[dask]'") from None
        self.name = f"dask://{address}"
        try:
            self._client = Client(f"tcp://{address}", timeout=DASK_CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadInputError(f"cannot reach the Dask scheduler at {address}: {why}") from None
        info = self._client.scheduler_info()
        self.workers = sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values())
        if self.workers == 0:
            self.close()
            raise BadInputError(f"the Dask scheduler at {address} has no workers")

    def call(self, fn, arg):
        fut = self._client.submit(fn, arg, pure=False)
        return _result(fut.result)

    def run(self, fn, args, stop):
        import time

        futs = [self._client.submit(fn, a, pure=False) for a in args]
        pending = dict(enumerate(futs))
        while pending:
            done = [i for i, f in pending.items() if f.done()]
            if not done:
                if stop is not None and stop.requested:
                    # Tasks already running finish on their workers; their results are dropped.
                    self._client.cancel(list(pending.values()))
                    return
                time.sleep(0.05)
                continue
            for i in done:
                f = pending.pop(i)
                if f.status != "cancelled":
                    yield i, _result(f.result)

    def close(self) -> None:
        try:
            self._client.close(timeout=5)
        except Exception:  # an already lost scheduler: nothing more to release
            pass


def _result(get: Callable[[], dict]) -> dict:
    """A task's result; an exception in the worker becomes one oracle error line (an
    X86ptError keeps its message)."""
    from x86pt.errors import X86ptError

    try:
        return get()
    except X86ptError:
        raise
    except Exception as e:
        raise OracleError(f"a conform task failed in its worker: {type(e).__name__}: {e}") from None


_DASK = re.compile(r"dask://([^/\s:]+|\[[0-9a-fA-F:]+\]):(\d{1,5})/?")


def open_executor(text: str | None, jobs: int) -> Executor | None:
    """None (run in this process) for `local` with one job; LocalProcesses for `local` with
    more; DaskExecutor for dask://HOST:PORT."""
    text = (text or "local").strip()
    if text == "local":
        return LocalProcesses(jobs) if jobs > 1 else None
    m = _DASK.fullmatch(text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise BadInputError(f"bad --executor {text!r} (expected local or dask://HOST:PORT)")
    return DaskExecutor(f"{m.group(1)}:{m.group(2)}")
