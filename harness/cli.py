"""`x86pt conform`: run the x86pt model and an oracle (unicorn, QEMU, KVM) on the same cases — the
access matrix (kvm-unit-tests access.c class, harness.matrix) or random page tables — and report
every mismatch. The last line is `conform: M mismatches in N cases (ORACLE...)`; the exit status
is 0 only when M is 0 (2 on bad input or an oracle that cannot run, 130 after Ctrl-C, which
stops after the batch in flight and prints what was done).

    x86pt conform --oracle unicorn                          # a seeded sample of 20,000 matrix cases
    x86pt conform --oracle unicorn --full                   # the full classic matrix (19.2M cases)
    x86pt conform --oracle all --sample 3000 --seed 1       # a seeded sample, every oracle here
    x86pt conform --oracle qemu --cases random --limit 500
    x86pt conform --oracle kvm --shard 2/8 --progress
    x86pt conform --repro x86pt-repros/unicorn-matrix-123.json --oracle unicorn
    x86pt conform --oracle unicorn --full --jobs 2                  # in 2 local processes
    x86pt conform --oracle unicorn --full --executor dask://10.0.0.5:8786
    x86pt conform --oracle unicorn --shard 1/4 --json-report s1.json   # ... one per shard, then
    x86pt conform merge s1.json s2.json s3.json s4.json -o all.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from x86pt.errors import BadInputError, OracleUnavailable
from x86pt.numbers import parse_int

# What `conform` runs on the matrix when no size is given: a seeded sample, seconds per oracle.
DEFAULT_SAMPLE = 20_000


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise BadInputError(f"bad --shard {text!r} (expected I/N, 1 <= I <= N)")
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= i <= n:
        raise BadInputError(f"bad --shard {text!r} (expected I/N, 1 <= I <= N)")
    return i, n


def _oracle_list(name: str) -> list[str]:
    from x86pt.registry import oracle_list

    return oracle_list(name)


def _open_oracle(name: str, profile: str | None):
    from x86pt.registry import get_oracle

    if name == "model":
        return get_oracle("model", profile=profile or "intel")
    return get_oracle(name)


def _nest(units: int, parts) -> tuple[int, int]:
    """The unit range [lo, hi) of nested parts (i, n), 1-based: each the i-th of n equal parts of
    the range before it."""
    lo, hi = 0, units
    for i, n in parts:
        w = hi - lo
        lo, hi = lo + (i - 1) * w // n, lo + i * w // n
    return lo, hi


def _span(rng: tuple[int, int], span) -> tuple[int, int]:
    lo, hi = rng
    if span is None:
        return lo, hi
    a, b = span
    return min(hi, lo + a), min(hi, lo + b)


def make_source(args, oracle, caps, span=None):
    """The case source for one oracle: its feature set decides the matrix (docs/paging.md §11.2:
    invalid bits). The run's selection (--full, --limit, --sample; the random trees) is cut by
    --shard I/N (the I-th of N equal parts), and an executor's part takes the units [a, b) of
    that (`span`), so shards and parts together are exactly the unsharded run
    (docs/conformance-sweeps.md §1)."""
    from harness.matrix import MatrixFeatures, matrix_for, select
    from harness.matrix_pack import MatrixSource, probe_cap
    from x86pt.state import as_profile

    feat = MatrixFeatures.from_caps(caps)
    profile = as_profile(getattr(oracle, "profile", "intel"))
    batch = args.batch
    parts = [args.shard] if args.shard else []
    if args.cases == "random":
        from harness.random_tables import RandomSource

        total = args.limit if args.limit is not None else (args.sample or 2000)
        per = args.per_tree
        lo, hi = _span(_nest(-(-total // per), parts), span)
        first, total = lo, max(0, min(total, hi * per) - lo * per)
        return RandomSource(feat, profile, seed=args.seed, cases=total, per_batch=per, first_batch=first)
    m = matrix_for(feat, extended=args.extended)
    idx, start, stop = select(m.size, limit=args.limit, sample=args.sample, seed=args.seed)
    lo, hi = _span(_nest(len(idx) if idx is not None else stop - start, parts), span)
    if idx is not None:
        idx = idx[lo:hi]
    else:
        start, stop = start + lo, start + hi
    return MatrixSource(
        m,
        profile,
        indices=idx,
        start=start,
        stop=stop,
        batch_cases=batch or _default_batch(oracle),
        batch_probes=None if batch else probe_cap(oracle),
        name="xmatrix" if args.extended else "matrix",
    )


def selection_units(args, src) -> tuple[int, int]:
    """How many units (matrix cases, or random trees) `src` holds, and the alignment of an
    executor's parts in units: a matrix part starts on a chunk of the source (the cases it groups
    into batches), so every case is built in the same batch as in one local run."""
    if args.cases == "random":
        return -(-src.total // args.per_tree), 1
    return src.total, src.chunk


def _default_batch(oracle) -> int:
    # The probe guest holds 8192 probes (docs/oracles.md §3.1); a case has at most 2.
    cap = getattr(oracle, "max_probes", None)
    if isinstance(cap, int) and cap > 1:
        return max(1, cap // 2)
    return 4096


def cmd_conform(args) -> int:
    from harness.differential import load_repro, replay
    from x86pt.cli import emit_json

    if getattr(args, "conform_cmd", None) == "merge":
        return cmd_merge(args)
    args.shard = _shard(args.shard) if args.shard else None
    for opt in ("limit", "sample", "batch"):
        v = getattr(args, opt)
        if v is not None:
            setattr(args, opt, parse_int(v, f"--{opt}", lo=1, hi=1 << 40))
    args.seed = parse_int(args.seed, "--seed")
    args.per_tree = parse_int(args.per_tree, "--per-tree", lo=1, hi=8192)
    args.jobs = parse_int(args.jobs, "--jobs", lo=1, hi=1024)
    names = _oracle_list(args.oracle)
    explicit = args.oracle != "all"
    if not args.no_repro and os.path.exists(args.repro_dir) and not os.path.isdir(args.repro_dir):
        raise BadInputError(f"--repro-dir {args.repro_dir}: exists and is not a directory")
    if args.json_report and os.path.isdir(args.json_report):
        raise BadInputError(f"--json-report {args.json_report}: is a directory")

    if args.repro:
        try:
            repro = load_repro(args.repro)
        except RecursionError:
            raise BadInputError(f"repro {args.repro} is not JSON: nested too deeply") from None
        except ValueError as e:  # an integer longer than Python's digit limit
            raise BadInputError(f"repro {args.repro} is not JSON: {str(e).split(':')[0]}") from None
        if not isinstance(repro, dict) or not isinstance(repro.get("state", {}), dict):
            raise BadInputError(
                f"repro {args.repro}: not an x86pt conform repro file (a JSON "
                "object with x86pt_repro, state, entries and probes)"
            )
        name = names[0] if args.oracle != "all" else repro.get("oracle", "unicorn")
        oracle = _open_oracle(name, args.profile or (repro.get("state") or {}).get("profile"))
        try:
            batch, results, mms = replay(oracle, repro)
        finally:
            oracle.close()
        for mm in mms:
            emit_json(mm.to_json()) if args.json else print(mm.render())
        if not args.json and not mms:
            from x86pt.describe import render_result

            for p, r in zip(batch.probes, results):
                print(
                    f"{p.access} {'user' if p.user else 'supervisor'}: "
                    + render_result(r, steps=True).replace("\n", "\n  ")
                )
        line = f"conform: {len(mms)} mismatches in 1 cases ({name})"
        if args.json:
            emit_json({"type": "summary", "oracle": name, "cases": 1, "mismatches": len(mms)})
        print(line)
        return 0 if not mms else 1

    if (
        args.cases == "matrix"
        and not args.full
        and args.limit is None
        and args.sample is None
        and args.shard is None
    ):
        args.sample = DEFAULT_SAMPLE
        if not args.json:
            print(
                f"conform: a seeded sample of {DEFAULT_SAMPLE:,} matrix cases (--seed "
                f"{args.seed}); --full runs every case (19.2M classic, 155M extended)",
                file=sys.stderr,
            )
    from harness.executors import MAX_CARRIED, open_executor
    from harness.reports import Reporter, run_config
    from x86pt.progress import Interrupt

    rep = Reporter(
        args,
        run_config(args),
        (args.shard[1], [args.shard[0]]) if args.shard else (1, [1]),
        keep=bool(args.json_report),
        max_kept=MAX_CARRIED,
    )
    interrupted = False
    executor = open_executor(args.executor, args.jobs)
    try:
        if executor is not None:
            rep.extra = {"executor": executor.name, "workers": executor.workers}
        with Interrupt() as stop:
            for name in names:
                if stop.requested:
                    break
                run = _run_here if executor is None else _run_on
                try:
                    done = run(executor, args, name, stop, rep)
                except OracleUnavailable as e:
                    if explicit:
                        raise
                    rep.skip(name, str(e))
                    continue
                interrupted = interrupted or done
            interrupted = interrupted or stop.requested
    finally:
        if executor is not None:
            executor.close()
    if not rep.ran and not interrupted:
        raise OracleUnavailable("no oracle could run here (" + ", ".join(names) + ")")
    return rep.finish(interrupted, args.json_report)


def _run_here(_executor, args, name, stop, rep) -> bool:
    """One oracle in this process (--jobs 1, the default): mismatches are reported as they come."""
    from harness.differential import run_conformance
    from harness.executors import mismatch_record
    from x86pt.progress import ProgressBar

    oracle = _open_oracle(name, args.profile)
    try:
        caps = oracle.capabilities()
        src = make_source(args, oracle, caps)
        prog = ProgressBar(src.total, name, unit="cases", enabled=True if args.progress else None)
        try:
            summ = run_conformance(
                oracle,
                src,
                on_mismatch=lambda mm: rep.mismatch(mismatch_record(mm), prog.write),
                progress=prog,
                interrupt=stop,
            )
        finally:
            prog.close()
    finally:
        oracle.close()
    rep.oracle_done(summ.to_json(), caps.to_json())
    return summ.interrupted


def _run_on(executor, args, name, stop, rep) -> bool:
    """One oracle on an executor: the selection in parts, reported in part order (so the output
    is the same whichever part finishes first)."""
    import time
    from harness.executors import part_spec, plan, run_part, split
    from harness.reports import combine_summaries
    from x86pt.progress import ProgressBar

    t0 = time.perf_counter()
    pl = executor.call(plan, part_spec(args, name))
    specs = [
        part_spec(args, name, sp) for sp in split(pl["units"], pl["align"], executor.workers, args.cases)
    ]
    n = len(specs)
    prog = ProgressBar(pl["cases"], name, unit="cases", enabled=True if args.progress else None)
    results: dict[int, dict] = {}
    emitted = 0
    done_cases = done_mm = 0

    def emit(i: int) -> None:
        for rec in results[i]["mismatches"]:
            rep.mismatch(rec, prog.write)
        rep.dropped(results[i].get("dropped", 0))

    try:
        for i, res in executor.run(run_part, specs, stop):
            results[i] = res
            done_cases += res["summary"]["cases"]
            done_mm += res["summary"]["mismatches"]
            prog.update_to(done_cases, mismatches=done_mm)
            while emitted in results:
                emit(emitted)
                emitted += 1
    finally:
        prog.close()
    for i in sorted(results):  # after Ctrl-C: what finished behind a missing part
        if i >= emitted:
            emit(i)
    parts = [results[i]["summary"] for i in sorted(results)]
    summary = combine_summaries(name, parts, time.perf_counter() - t0)
    interrupted = len(results) < n or bool(summary.get("interrupted"))
    if interrupted:
        summary["interrupted"] = True
    caps = results[min(results)]["capabilities"] if results else pl["capabilities"]
    rep.oracle_done(summary, caps, {"executor": executor.name, "workers": executor.workers, "parts": n})
    return interrupted


def cmd_merge(args) -> int:
    """`x86pt conform merge REPORT...`: shard reports of one run joined into the run's report."""
    from harness.reports import Reporter, load_report, merge_reports

    if not args.no_repro and os.path.exists(args.repro_dir) and not os.path.isdir(args.repro_dir):
        raise BadInputError(f"--repro-dir {args.repro_dir}: exists and is not a directory")
    if args.output:
        from x86pt.memory.atomic import check_output

        check_output(args.output, args.reports)  # not over a report it reads, nor a directory
    merged = merge_reports([(p, load_report(p)) for p in args.reports])
    count = merged["count"]
    rep = Reporter(args, merged["config"], (count, list(range(1, count + 1))), keep=bool(args.output))
    rep.extra = {"merged_from": len(args.reports)}
    for s in merged["skipped"]:
        if s not in rep.skipped:
            rep.skipped.append(s)
    for o in merged["oracles"]:
        for rec in o["mismatches"]:
            rep.mismatch(rec)
        rep.dropped(o["dropped"])
        rep.oracle_done(o["summary"], o["capabilities"])
    return rep.finish(False, args.output, inputs=args.reports)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "conform",
        help="differential conformance: the x86pt model vs unicorn/QEMU/KVM",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--oracle",
        default="unicorn",
        help="unicorn, qemu, kvm, model, a comma list, or all (default unicorn)",
    )
    p.add_argument("--profile", default=None, help="profile for --oracle model (default intel)")
    p.add_argument("--cases", choices=("matrix", "random"), default="matrix")
    p.add_argument(
        "--extended",
        action="store_true",
        help="matrix plus SMEP, SMAP+AC, 1G leaves, PML4E PS/bit 8, LA57, non-canonical",
    )
    p.add_argument("--seed", default="0")
    p.add_argument("--shard", default=None, metavar="I/N", help="run the I-th of N equal parts (1-based)")
    p.add_argument("--limit", default=None, metavar="N", help="at most N cases")
    p.add_argument("--sample", default=None, metavar="N", help="a seeded random sample of N matrix cases")
    p.add_argument(
        "--full",
        action="store_true",
        help="every matrix case (19.2M classic, 155M extended); without it, and without "
        f"--limit/--sample/--shard, a seeded sample of {DEFAULT_SAMPLE:,}",
    )
    p.add_argument("--batch", default=None, metavar="N", help="matrix cases per oracle batch")
    p.add_argument("--per-tree", default="64", metavar="N", help="random cases per random tree")
    p.add_argument("--json", action="store_true", help="one JSON record per mismatch, then summaries")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr even without a TTY")
    p.add_argument("--repro", default=None, metavar="FILE", help="replay one repro file")
    p.add_argument(
        "--repro-dir", default="x86pt-repros", help="where repro files go (default ./x86pt-repros)"
    )
    p.add_argument("--no-repro", action="store_true", help="write no repro files")
    p.add_argument("--max-repros", type=int, default=50, help="write at most N repro files")
    p.add_argument("--max-report", type=int, default=20, help="print at most N mismatch reports")
    p.add_argument(
        "--jobs",
        default="1",
        metavar="N",
        help="run the selection in parts on N local processes (default 1: this process)",
    )
    p.add_argument(
        "--executor",
        default="local",
        metavar="local|dask://HOST:PORT",
        help="where the parts run: local processes (--jobs) or a Dask distributed scheduler "
        "(extra x86pt[dask]; docs/conformance-sweeps.md)",
    )
    p.add_argument(
        "--json-report",
        default=None,
        metavar="FILE",
        help="write the run's report (summaries, mismatches with their repros) as JSON, "
        "for `x86pt conform merge`",
    )
    p.set_defaults(func=cmd_conform)
    sub = p.add_subparsers(dest="conform_cmd", metavar="merge", title="subcommand")
    m = sub.add_parser(
        "merge",
        help="join the --json-report files of the shards of one run",
        description="Join the --json-report files written by the shards of one run "
        "(--shard I/N each) into the run's report: it prints what one run "
        "would, writes the repro files, and with -o the joined report. "
        "Reports of different runs, and missing or duplicate shards, "
        "are refused.",
        epilog="examples:\n"
        "  x86pt conform merge shard-1.json shard-2.json -o conform.json\n"
        "  x86pt conform merge shard-*.json --json --no-repro\n"
        "  x86pt conform merge conform.json --max-report 100 --repro-dir repros",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "reports",
        nargs="+",
        metavar="REPORT",
        help="--json-report files of the shards of one run (any order)",
    )
    m.add_argument("-o", "--output", default=None, metavar="FILE", help="write the joined report here")
    m.add_argument("--json", action="store_true", help="one JSON record per mismatch, then summaries")
    m.add_argument(
        "--repro-dir", default="x86pt-repros", help="where repro files go (default ./x86pt-repros)"
    )
    m.add_argument("--no-repro", action="store_true", help="write no repro files")
    m.add_argument("--max-repros", type=int, default=50, help="write at most N repro files")
    m.add_argument("--max-report", type=int, default=20, help="print at most N mismatch reports")
    m.set_defaults(func=cmd_conform, conform_cmd="merge")
