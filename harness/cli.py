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
    from x86pt.oracle import oracle_list
    return oracle_list(name)


def _open_oracle(name: str, profile: str | None):
    from x86pt.oracle import get_oracle
    if name == "model":
        return get_oracle("model", profile=profile or "intel")
    return get_oracle(name)


def make_source(args, oracle, caps):
    """The case source for one oracle: its feature set decides the matrix (docs/paging.md §11.2: invalid bits)."""
    from harness.matrix import MatrixFeatures, MatrixSource, matrix_for, select
    from x86pt.state import as_profile
    feat = MatrixFeatures.from_caps(caps)
    profile = as_profile(getattr(oracle, "profile", "intel"))
    batch = args.batch
    if args.cases == "random":
        from harness.random_tables import RandomSource
        total = args.limit if args.limit is not None else (args.sample or 2000)
        first = 0
        if args.shard:
            i, n = args.shard
            per = args.per_tree
            nb = -(-total // per)
            lo, hi = (i - 1) * nb // n, i * nb // n
            first, total = lo, max(0, min(total, hi * per) - lo * per)
        return RandomSource(feat, profile, seed=args.seed, cases=total, per_batch=args.per_tree,
                            first_batch=first)
    m = matrix_for(feat, extended=args.extended)
    idx, start, stop = select(m.size, shard=args.shard, limit=args.limit, sample=args.sample,
                              seed=args.seed)
    return MatrixSource(m, profile, indices=idx, start=start, stop=stop,
                        batch_cases=batch or _default_batch(oracle),
                        name="xmatrix" if args.extended else "matrix")


def _default_batch(oracle) -> int:
    # The probe guest holds 8192 probes (docs/oracles.md §3.1); a case has at most 2.
    cap = getattr(oracle, "max_probes", None)
    if isinstance(cap, int) and cap > 1:
        return max(1, cap // 2)
    return 4096


def _repro_path(args, mm) -> str | None:
    if args.no_repro:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{mm.oracle}-{mm.case.label}")
    return os.path.join(args.repro_dir, safe + ".json")


def cmd_conform(args) -> int:
    from harness.differential import load_repro, replay, run_conformance
    from x86pt.progress import Interrupt, ProgressBar
    from x86pt.cli import emit_json
    from x86pt.memory.atomic import write_text_atomic
    import json

    args.shard = _shard(args.shard) if args.shard else None
    for opt in ("limit", "sample", "batch"):
        v = getattr(args, opt)
        if v is not None:
            setattr(args, opt, parse_int(v, f"--{opt}", lo=1, hi=1 << 40))
    args.seed = parse_int(args.seed, "--seed")
    args.per_tree = parse_int(args.per_tree, "--per-tree", lo=1, hi=8192)
    names = _oracle_list(args.oracle)
    explicit = args.oracle != "all"
    if not args.no_repro and os.path.exists(args.repro_dir) and not os.path.isdir(args.repro_dir):
        raise BadInputError(f"--repro-dir {args.repro_dir}: exists and is not a directory")

    if args.repro:
        try:
            repro = load_repro(args.repro)
        except RecursionError:
            raise BadInputError(f"repro {args.repro} is not JSON: nested too deeply") from None
        except ValueError as e:       # an integer longer than Python's digit limit
            raise BadInputError(f"repro {args.repro} is not JSON: {str(e).split(':')[0]}") from None
        if not isinstance(repro, dict) or not isinstance(repro.get("state", {}), dict):
            raise BadInputError(f"repro {args.repro}: not an x86pt conform repro file (a JSON "
                                "object with x86pt_repro, state, entries and probes)")
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
                print(f"{p.access} {'user' if p.user else 'supervisor'}: " +
                      render_result(r, steps=True).replace("\n", "\n  "))
        line = f"conform: {len(mms)} mismatches in 1 cases ({name})"
        if args.json:
            emit_json({"type": "summary", "oracle": name, "cases": 1, "mismatches": len(mms)})
        print(line)
        return 0 if not mms else 1

    if (args.cases == "matrix" and not args.full and args.limit is None and args.sample is None
            and args.shard is None):
        args.sample = DEFAULT_SAMPLE
        if not args.json:
            print(f"conform: a seeded sample of {DEFAULT_SAMPLE:,} matrix cases (--seed "
                  f"{args.seed}); --full runs every case (19.2M classic, 155M extended)",
                  file=sys.stderr)
    total_cases = total_mm = 0
    ran: list[str] = []
    reported = 0
    interrupted = False
    with Interrupt() as stop:
        for name in names:
            if stop.requested:
                break
            try:
                oracle = _open_oracle(name, args.profile)
            except OracleUnavailable as e:
                if explicit:
                    raise
                print(f"conform: skipping {name}: {e}", file=sys.stderr)
                continue
            try:
                caps = oracle.capabilities()
                src = make_source(args, oracle, caps)
                prog = ProgressBar(src.total, name, unit="cases", enabled=True if args.progress else None)

                def on_mm(mm, _prog=prog):
                    nonlocal reported
                    path = _repro_path(args, mm) if reported < args.max_repros else None
                    if path:
                        os.makedirs(args.repro_dir, exist_ok=True)
                        mm.repro["file"] = path
                        write_text_atomic(path, json.dumps(mm.repro, indent=1) + "\n")
                    reported += 1
                    if args.json:
                        emit_json(mm.to_json())
                    elif reported <= args.max_report:
                        _prog.write(mm.render())
                try:
                    summ = run_conformance(oracle, src, on_mismatch=on_mm, progress=prog,
                                           interrupt=stop)
                finally:
                    prog.close()
            finally:
                oracle.close()
            interrupted = interrupted or summ.interrupted
            ran.append(name)
            total_cases += summ.cases
            total_mm += summ.mismatches
            if args.json:
                emit_json(summ.to_json() | {"capabilities": caps.to_json()})
            else:
                j = summ.to_json()
                print(f"{name}: {summ.cases} cases ({summ.probes} probes), {summ.mismatches} mismatches, "
                      f"{summ.seconds:.1f} s; oracle {j['oracle_cases_per_s']} cases/s, "
                      f"model {j['model_cases_per_s']} cases/s"
                      + (" (interrupted)" if summ.interrupted else ""))
        interrupted = interrupted or stop.requested
    if not ran and not interrupted:
        raise OracleUnavailable("no oracle could run here (" + ", ".join(names) + ")")
    if total_mm > args.max_report and not args.json:
        print(f"({total_mm - args.max_report} more mismatches not shown; --max-report N)")
    line = f"conform: {total_mm} mismatches in {total_cases} cases ({', '.join(ran)})"
    if interrupted:
        print(line + ", interrupted", flush=True)
        return 130
    print(line, flush=True)
    return 0 if total_mm == 0 else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "conform", help="differential conformance: the x86pt model vs unicorn/QEMU/KVM",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oracle", default="unicorn",
                   help="unicorn, qemu, kvm, model, a comma list, or all (default unicorn)")
    p.add_argument("--profile", default=None, help="profile for --oracle model (default intel)")
    p.add_argument("--cases", choices=("matrix", "random"), default="matrix")
    p.add_argument("--extended", action="store_true",
                   help="matrix plus SMEP, SMAP+AC, 1G leaves, PML4E PS/bit 8, LA57, non-canonical")
    p.add_argument("--seed", default="0")
    p.add_argument("--shard", default=None, metavar="I/N", help="run the I-th of N equal parts (1-based)")
    p.add_argument("--limit", default=None, metavar="N", help="at most N cases")
    p.add_argument("--sample", default=None, metavar="N", help="a seeded random sample of N matrix cases")
    p.add_argument("--full", action="store_true",
                   help="every matrix case (19.2M classic, 155M extended); without it, and without "
                        f"--limit/--sample/--shard, a seeded sample of {DEFAULT_SAMPLE:,}")
    p.add_argument("--batch", default=None, metavar="N", help="matrix cases per oracle batch")
    p.add_argument("--per-tree", default="64", metavar="N", help="random cases per random tree")
    p.add_argument("--json", action="store_true", help="one JSON record per mismatch, then summaries")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr even without a TTY")
    p.add_argument("--repro", default=None, metavar="FILE", help="replay one repro file")
    p.add_argument("--repro-dir", default="x86pt-repros", help="where repro files go (default ./x86pt-repros)")
    p.add_argument("--no-repro", action="store_true", help="write no repro files")
    p.add_argument("--max-repros", type=int, default=50, help="write at most N repro files")
    p.add_argument("--max-report", type=int, default=20, help="print at most N mismatch reports")
    p.set_defaults(func=cmd_conform)
