"""`x86pt cpa replay | compare | generate` and the demo section of the CPA model."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

from x86pt.errors import BadInputError
from x86pt.numbers import parse_int

if TYPE_CHECKING:
    from x86pt.cost import Cost
    from x86pt.cpa.layout import Layout
    from x86pt.cpa.ops import CpaModel
    from x86pt.cpa.oracle_probe import OracleCheck
    from x86pt.cpa.trace import Op, ReplayResult
    from x86pt.demo import DemoContext
    from x86pt.progress import ProgressBar

SUMMARY_COLS = (
    ("policy", "policy"),
    ("kernel", "kernel"),
    ("ops", "ops"),
    ("DirectMap4k", "4k kB"),
    ("DirectMap2M", "2M kB"),
    ("DirectMap1G", "1G kB"),
    ("split_2m", "spl2M"),
    ("split_1g", "spl1G"),
    ("collapse_2m", "col2M"),
    ("merge_2m", "mrg2M"),
    ("merge_1g", "mrg1G"),
    ("tables", "tables"),
    ("tables_allocated", "t.alloc"),
    ("tables_freed", "t.freed"),
    ("flush_all", "flushall"),
    ("invlpg_pages", "invlpg"),
    ("ops_per_s", "ops/s"),
)


def render_table(summaries: list[dict[str, Any]]) -> str:
    rows = [[h for _, h in SUMMARY_COLS]]
    for s in summaries:
        rows.append(["-" if s.get(k) is None else str(s.get(k)) for k, _ in SUMMARY_COLS])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [" ".join(c.rjust(w[i]) if i > 1 else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(out)


# Points of `--cost` over time (docs/cost.md: one estimate costs about 0.4x a 100k-op replay).
COST_POINTS = 8


class Progress:
    """The replay's progress callback on the project's one bar (x86pt.progress): drawn on a TTY
    only, never past its total."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.bar: ProgressBar | None = None

    def __call__(self, i: int, n: int) -> None:
        if not self.enabled or not n:
            return
        if self.bar is None:
            from x86pt.progress import ProgressBar

            self.bar = ProgressBar(n, self.label, unit="ops")
        self.bar.update_to(i)
        if i >= n:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _model_factory(args: argparse.Namespace, policy: str) -> tuple[Callable[[], CpaModel], Layout]:
    from x86pt.cpa.layout import layout_named
    from x86pt.cpa.trace import new_model

    layout = layout_named(args.layout)
    if args.image:
        from x86pt.image import open_image
        from x86pt.cliargs import image_options

        img = open_image(args.image, **image_options(args))

        def make() -> CpaModel:
            return new_model(layout, args.kernel, policy, img)

        return make, layout
    return (lambda: new_model(layout, args.kernel, policy)), layout


def _oracle_check(args: argparse.Namespace, n_ops: int, minimising: bool = False) -> OracleCheck | None:
    """The OracleCheck of --oracle (None without it): sampled steps by --oracle-every N or
    --oracle-sample K (default 8) with --oracle-seed; while minimising, every op is probed."""
    names = getattr(args, "oracle", None)
    if not names:
        return None
    from x86pt.cpa.oracle_probe import OracleCheck, sampled_steps
    from x86pt.registry import oracle_list

    want = oracle_list(names)
    cap = parse_int(args.oracle_cap, "--oracle-cap", lo=1, hi=1 << 20)
    quiet = args.quiet or args.json
    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))
    if minimising:
        return OracleCheck(want, every=1, cap=cap, log=lambda s: None)
    if args.oracle_every is not None:
        every = parse_int(args.oracle_every, "--oracle-every", lo=1, hi=1 << 40)
        return OracleCheck(want, every=every, cap=cap, log=log)
    k = parse_int(
        args.oracle_sample if args.oracle_sample is not None else "8", "--oracle-sample", lo=0, hi=1 << 40
    )
    seed = parse_int(args.oracle_seed, "--oracle-seed")
    return OracleCheck(want, steps=sampled_steps(n_ops, k, seed), cap=cap, log=log)


def _run(args: argparse.Namespace, policy: str, ops: list[Op], dump: bool) -> tuple[ReplayResult, CpaModel]:
    oc = _oracle_check(args, len(ops)) if args.validate else None
    try:
        return _run_checked(args, policy, ops, dump, oc)
    finally:
        if oc is not None:
            oc.close()


def _run_checked(
    args: argparse.Namespace, policy: str, ops: list[Op], dump: bool, oc: OracleCheck | None
) -> tuple[ReplayResult, CpaModel]:
    from x86pt.cpa.trace import replay

    make, layout = _model_factory(args, policy)
    m = make()
    checks = args.checks
    if oc is not None:
        checks = checks if "e" in checks else checks + "e"
    prog = Progress(f"{policy:>12}", not args.quiet and not args.json)
    on_dump: Callable[[CpaModel, int], None] | None = None
    dump_idx = None
    if dump and args.dump_at is not None:
        dump_idx = args.dump_at - 1  # --dump-at N: after the first N ops (1-based)

        def on_dump(model: CpaModel, idx: int) -> None:
            from x86pt.memory import write_image

            path = args.dump_out
            write_image(
                model.export(), model.paging_state(), path, None, inputs=[args.trace, args.image, args.layout]
            )
            if not args.json:
                print(f"image after {idx + 1} ops written to {path}", file=sys.stderr)

    cost_points: list[tuple[int, Cost]] = []
    checkpoints: frozenset[int] = frozenset()
    on_checkpoint: Callable[[CpaModel, int], None] | None = None
    if getattr(args, "cost", None):
        # the cost over time: a few evenly spaced points (each costs about one estimate)
        from x86pt.cost import model_cost

        n = len(ops)
        checkpoints = frozenset(max(1, round(n * (i + 1) / COST_POINTS)) for i in range(COST_POINTS))

        def on_checkpoint(model: CpaModel, done: int) -> None:
            cost_points.append((done, model_cost(model, args, ops[:done])))

    r = replay(
        m,
        ops,
        validate=args.validate,
        checks=checks,
        progress=prog,
        dump_at=dump_idx,
        on_dump=on_dump,
        checkpoints=checkpoints,
        on_checkpoint=on_checkpoint,
        oracle_check=oc,
    )
    r.cost_series = cost_points
    if oc is not None:
        r.notes = r.notes + tuple(oc.notes) + tuple(oc.summary())
    if r.violation is not None and args.validate:
        from x86pt.cpa.trace import minimise, write_trace

        mini_oc = _oracle_check(args, len(ops), True) if r.violation.invariant == "e" else None
        path = _repro_path(args, policy)
        if path is None:
            # nothing is written unless asked: minimising costs time and leaves a file
            r.notes = r.notes + ("--repro PATH would save a minimal reproducer of this violation",)
            if mini_oc is not None:
                mini_oc.close()
            return r, m
        try:
            mini = minimise(
                make, ops, r.violation, checks, budget_s=args.minimise_seconds, oracle_check=mini_oc
            )
        finally:
            if mini_oc is not None:
                mini_oc.close()
        write_trace(
            path,
            mini,
            [
                f"minimal trace for: {r.violation}",
                f"replay: x86pt cpa replay {path} --policy {policy} --kernel "
                f"{args.kernel} --layout {args.layout} --validate"
                + (f" --oracle {args.oracle} --oracle-every 1" if r.violation.invariant == "e" else ""),
            ],
        )
        r.notes = r.notes + (f"minimal reproducer ({len(mini)} ops) written to {path}",)
    return r, m


def _check_outputs(args: argparse.Namespace, *outputs: str | None) -> None:
    """Refuse, before any work, an output that is one of the inputs (trace, image, layout file),
    a directory or a special file (the one output writer's rules: x86pt.memory.atomic)."""
    from x86pt.memory.atomic import check_output

    inputs = [getattr(args, k, None) for k in ("trace", "image", "layout")]
    for out in outputs:
        if out:
            check_output(out, inputs)


def _repro_path(args: argparse.Namespace, policy: str) -> str | None:
    """Where --repro asked the minimal trace of `policy` to go (None: nowhere). With several
    policies (compare) the policy name goes before the extension: w.trace -> w-ideal.trace."""
    path: str | None = args.repro
    if not path:
        return None
    if len(getattr(args, "policy_list", ())) > 1:
        stem, ext = os.path.splitext(path)
        return f"{stem}-{policy}{ext}"
    return path


def _check_run_args(args: argparse.Namespace, n_ops: int) -> None:
    """One-line refusals (exit 2) of option values the replay cannot honour."""
    import math

    checks = args.checks
    if not checks or any(c not in "abcde" for c in checks):
        raise BadInputError(f"--checks {checks!r}: give a subset of the invariants abcde (e.g. abcd)")
    ms = args.minimise_seconds
    if not math.isfinite(ms) or ms < 0:
        raise BadInputError(f"--minimise-seconds {ms}: give a finite number of seconds >= 0")
    if args.dump_at is not None:
        if not 1 <= args.dump_at <= n_ops:
            raise BadInputError(
                f"--dump-at {args.dump_at}: the trace has {n_ops} ops; give N in "
                f"1..{n_ops} (the image after the first N ops)"
            )
        if not args.dump_out:
            raise BadInputError("--dump-at needs --dump-out PATH (where the image goes)")
    if args.oracle is not None:
        from x86pt.registry import all_oracles, oracle_list

        runnable = all_oracles()
        bad = [n for n in oracle_list(args.oracle) if n not in runnable]
        if bad:
            raise BadInputError(
                f"--oracle {args.oracle!r}: {bad[0]!r} does not run probes "
                f"(one of {', '.join(runnable)}, all)"
            )
        if not args.validate:
            raise BadInputError(
                "--oracle needs --validate (the oracles check invariant (e) of the validation)"
            )


def cmd_replay(args: argparse.Namespace) -> int:
    from x86pt.cpa.trace import read_trace

    _check_outputs(args, args.dump_out, args.plot, args.repro)
    ops = read_trace(args.trace)
    _check_run_args(args, len(ops))
    args.policy_list = [args.policy]
    if args.tlb:
        return _run_tlb(args, ops)
    if args.cpus is not None or args.tlb_assume is not None or args.tlb_flushes is not None:
        raise BadInputError("--cpus, --tlb-assume and --tlb-flushes need --tlb")
    r, m = _run(args, args.policy, ops, True)
    return _report(args, [r], m)


def _run_tlb(args: argparse.Namespace, ops: list[Op]) -> int:
    """`cpa replay --tlb`: the TLB model of --cpus CPUs alongside the replay; exit 1 when a
    dangerous window is open at the end of an API call or of the trace."""
    from x86pt.cpa.tlbreplay import render_text, replay_tlb

    if args.validate or args.oracle or args.dump_at is not None or args.plot or args.repro:
        raise BadInputError("--tlb runs alone: leave out --validate, --oracle, --dump-at, --plot, --repro")
    ncpus = parse_int(args.cpus if args.cpus is not None else "2", "--cpus", lo=1, hi=64)
    assume = args.tlb_assume or "speculate"
    flushes = args.tlb_flushes or "model"
    if assume not in ("speculate", "touch"):
        raise BadInputError(f"--tlb-assume {assume!r}: speculate or touch")
    if flushes not in ("model", "trace"):
        raise BadInputError(f"--tlb-flushes {flushes!r}: model or trace")
    make, _ = _model_factory(args, args.policy)
    res = replay_tlb(make(), ops, ncpus=ncpus, assume=assume, flushes=flushes)
    if args.json:
        from x86pt.cli import emit_json

        emit_json(res.to_json())
    elif not args.quiet:
        print(render_text(res))
    return 1 if res.failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from x86pt.cpa.merge import POLICIES
    from x86pt.cpa.trace import read_trace

    _check_outputs(args, args.dump_out, args.plot, args.repro)
    ops = read_trace(args.trace)
    pols = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not pols:
        raise BadInputError(f"--policies {args.policies!r}: name at least one of {', '.join(POLICIES)}")
    for p in pols:
        if p not in POLICIES:
            raise BadInputError(f"unknown policy {p!r} (one of {', '.join(POLICIES)})")
    _check_run_args(args, len(ops))
    args.policy_list = pols
    results: list[ReplayResult] = []
    m: CpaModel | None = None
    for p in pols:
        r, m = _run(args, p, ops, False)
        if args.cost:
            from x86pt.cost import model_cost

            series = getattr(r, "cost_series", [])
            r.cost = series[-1][1] if series and series[-1][0] == r.ops else model_cost(m, args, ops[: r.ops])
        results.append(r)
    return _report(args, results, m)


def _report(args: argparse.Namespace, results: list[ReplayResult], m: CpaModel | None) -> int:
    from x86pt.cli import emit_json

    plot = getattr(args, "plot", None)
    if plot:
        from x86pt.cpa.plot import plot_fragmentation

        plot_fragmentation(results, plot, f"{os.path.basename(args.trace)} on {args.layout}")
    if args.json:
        for r in results:
            cost = getattr(r, "cost", None)
            series = getattr(r, "cost_series", None)
            emit_json(
                {
                    **r.summary(),
                    "notes": list(r.notes),
                    "plot": plot,
                    **({"cost": cost.to_json()} if cost else {}),
                    **(
                        {"cost_series": [{"ops": k, **c.to_json()} for k, c in series]}
                        if cost and series
                        else {}
                    ),
                }
            )
    else:
        print(render_table([r.summary() for r in results]))
        if any(getattr(r, "cost", None) for r in results):
            from x86pt.cost import Cost, render_costs

            # compare --cost gave every result its Cost (x86pt.cost.model_cost)
            print(render_costs([(r.policy, r.cost) for r in results if isinstance(r.cost, Cost)]))
        for r in results:
            for n in r.notes:
                print(f"note ({r.policy}): {n}")
            if r.violation:
                print(f"VIOLATION ({r.policy}): {r.violation}")
        if len(results) == 1 and m is not None:
            print("/proc/meminfo:\n" + m.counters.meminfo_text(m.layout.gbpages).rstrip())
            print("x86/cpa_stats:\n" + m.counters.cpa_stats().rstrip())
        if plot:
            print(f"plot written to {plot}")
    return 1 if any(r.violation for r in results) else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from x86pt.cpa.layout import layout_named
    from x86pt.cpa.trace import write_trace
    from x86pt.cpa.workload import generate

    _check_outputs(args, args.output)
    layout = layout_named(args.layout)
    n = parse_int(args.ops, "--ops", lo=1, hi=100_000_000)
    seed = parse_int(args.seed, "--seed")
    ops = generate(layout, args.kernel, args.workload, n, seed)
    write_trace(
        args.output,
        ops,
        [
            f"x86pt cpa generate {args.workload} --ops {n} --seed {seed} "
            f"--layout {args.layout} --kernel {args.kernel}"
        ],
    )
    if args.json:
        from collections import Counter
        from x86pt.cli import emit_json

        emit_json(
            {
                "output": args.output,
                "workload": args.workload,
                "ops": len(ops),
                "seed": seed,
                "kernel": args.kernel,
                "layout": args.layout,
                "op_counts": dict(sorted(Counter(op[0] for op in ops).items())),
            }
        )
    elif not args.quiet:
        print(f"wrote {len(ops)} ops to {args.output}")
    return 0


def _common(p: argparse.ArgumentParser, policy_arg: bool) -> None:
    p.add_argument("trace")
    if policy_arg:
        p.add_argument("--policy", default="none", help="none, upstream, nr-same-prot, ideal")
    p.add_argument("--kernel", default="6.15", help="kernel version rules: 6.1, 6.6, 6.15, 6.18")
    p.add_argument(
        "--layout",
        default="server-64g",
        help="laptop-4g, server-64g, server-64g-nogb, server-1t, demo or FILE.json",
    )
    p.add_argument("--image", default=None, help="start from this image's kernel tables (ELF core or raw)")
    p.add_argument("--validate", action="store_true", help="check invariants (a)-(d) after every op")
    p.add_argument("--checks", default="abcd", help="which invariants to check (subset of abcde)")
    p.add_argument(
        "--oracle",
        default=None,
        metavar="NAME[,NAME]",
        help="with --validate: probe sampled steps on these oracles (unicorn, qemu, kvm, all): invariant (e)",
    )
    p.add_argument("--oracle-every", default=None, metavar="N", help="probe every N-th op")
    p.add_argument(
        "--oracle-sample", default=None, metavar="K", help="probe K ops chosen by --oracle-seed (default 8)"
    )
    p.add_argument("--oracle-seed", default="1", metavar="S")
    p.add_argument(
        "--oracle-cap",
        default="512",
        metavar="N",
        help="at most N pages probed per step, sampled evenly (default 512)",
    )
    p.add_argument(
        "--repro",
        default=None,
        metavar="PATH",
        help="on a violation, minimise the trace and write it here (compare: the "
        "policy name goes before the extension); without it nothing is written",
    )
    p.add_argument(
        "--minimise-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="time budget of the minimisation behind --repro (default 30)",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="fragmentation plot")
    p.add_argument(
        "--dump-at",
        type=int,
        default=None,
        metavar="N",
        help="write the image after the first N ops (1..op count; needs --dump-out)",
    )
    p.add_argument("--dump-out", default=None, metavar="PATH", help="where --dump-at writes the image")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    from x86pt.cliargs import add_state_args

    add_state_args(p)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], only: str | None = None
) -> None:  # one command: `only` changes nothing
    c = subparsers.add_parser("cpa", help="the Linux CPA / direct-map model: replay, compare, generate")
    sub = c.add_subparsers(dest="cpa_command", metavar="CPA_COMMAND")
    sub.required = True
    r = sub.add_parser("replay", help="replay a trace under one merge policy")
    _common(r, True)
    r.add_argument(
        "--tlb",
        action="store_true",
        help="model the CPUs' TLBs: report where a CPU may still use a translation the "
        "tables no longer give, and for how long (exit 1: a dangerous window at "
        "the end of a call)",
    )
    r.add_argument("--cpus", default=None, metavar="N", help="with --tlb: CPUs modelled (default 2)")
    r.add_argument(
        "--tlb-assume",
        default=None,
        metavar="speculate|touch",
        help="with --tlb: every CPU may cache what an op changes (speculate, default) "
        "or only what the trace's touch/speculate ops fill",
    )
    r.add_argument(
        "--tlb-flushes",
        default=None,
        metavar="model|trace",
        help="with --tlb: the CPA model's own flushes (model, default) or only the "
        "trace's flush ops (trace: a recorded kernel trace)",
    )
    r.set_defaults(func=cmd_replay)
    cp = sub.add_parser("compare", help="replay a trace under several policies side by side")
    _common(cp, False)
    cp.add_argument("--policies", default="none,upstream,nr-same-prot,ideal")
    from x86pt.cliargs import add_cost_args

    add_cost_args(cp)
    cp.set_defaults(func=cmd_compare)
    g = sub.add_parser("generate", help="generate a workload trace (docs/cpa.md §10 sequences)")
    g.add_argument(
        "workload", help="mixed, mixed-rox, modules, modules-rox, bpf, bpf-nopack, kfence, secretmem, hotplug"
    )
    g.add_argument("-o", "--output", required=True)
    g.add_argument("--ops", default="10000")
    g.add_argument("--seed", default="1")
    g.add_argument("--kernel", default="6.15")
    g.add_argument("--layout", default="server-64g")
    g.add_argument("--quiet", action="store_true")
    g.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: output path, op count and the count of each op kind",
    )
    g.set_defaults(func=cmd_generate)


def demo_section(ctx: DemoContext) -> None:
    """Replay a short generated workload on the demo's embedded image under two policies."""
    from x86pt.cpa.importer import model_from_image
    from x86pt.cpa.layout import demo_layout
    from x86pt.cpa.plot import plot_fragmentation
    from x86pt.cpa.trace import replay, write_trace
    from x86pt.cpa.workload import generate

    ctx.heading("CPA model (x86pt cpa compare TRACE --policies none,upstream --kernel 6.15)")
    layout = demo_layout()
    ops = generate(layout, "6.15", "mixed-rox", 2000, 7)
    trace = os.path.join(ctx.out_dir, "cpa-demo.trace")
    write_trace(trace, ops, ["x86pt demo: mixed-rox workload, 2000 ops, seed 7"])
    results: list[ReplayResult] = []
    for pol in ("none", "upstream"):
        m = model_from_image((ctx.memory, ctx.state), layout, "6.15", pol)
        results.append(replay(m, ops, validate=True))
    for r in results:
        if r.violation is not None:
            ctx.fail("cpa", f"{r.policy}: validator: {r.violation}")
    png = os.path.join(ctx.out_dir, "cpa-demo.png")
    plot_fragmentation(results, png, "x86pt demo: mixed-rox workload")
    if ctx.json:
        from x86pt.cli import emit_json

        for r in results:
            emit_json({"section": "cpa", **r.summary(), "plot": png, "trace": trace})
        _tlb_demo_section(ctx)
        return
    print(render_table([r.summary() for r in results]))
    for r in results:
        print(
            f"{r.policy}: validator {'held' if r.violation is None else 'FAILED: ' + str(r.violation)}"
            f" ({r.pages_checked} page checks)"
        )
    print(f"trace: {trace}\nplot written to {png}")
    _tlb_demo_section(ctx)


def _tlb_demo_section(ctx: DemoContext) -> None:
    """A set_memory_ro whose flush is left out of a recorded trace: the TLB model reports the
    page still writable on both CPUs at the end of the call (dangerous), and with the flush in
    place the window closes at the flush op."""
    from x86pt.cpa.importer import model_from_image
    from x86pt.cpa.layout import demo_layout
    from x86pt.cpa.tlbreplay import render_text, replay_tlb
    from x86pt.cpa.trace import parse_trace

    ctx.heading("TLB model (x86pt cpa replay TRACE --tlb --tlb-flushes trace)")
    layout = demo_layout()
    va = layout.page_offset + 0x12345000  # direct map, inside a 2M page
    lines = {
        "with-flush": [f"set_memory_ro {va:#x} 1", f"flush_tlb_kernel_range {va:#x} {va + 0x1000:#x}"],
        "flush-removed": [f"set_memory_ro {va:#x} 1"],
    }
    for name, text in lines.items():
        path = os.path.join(ctx.out_dir, f"tlb-{name}.trace")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                f"# x86pt demo: set_memory_ro of one direct-map page, {name.replace('-', ' ')}\n"
                + "\n".join(text)
                + "\n"
            )
        m = model_from_image((ctx.memory, ctx.state), layout, "6.15", "none")
        res = replay_tlb(m, parse_trace(text), ncpus=2, flushes="trace")
        # SDM Vol. 3A §4.10.4.1: without an invalidation both CPUs may keep the writable 2M entry;
        # the flush (INVLPG of the page on every CPU) removes it.
        got = sorted((w.cpu, w.start, w.end, w.kind) for f in res.findings for w in f.windows)
        want = [] if name == "with-flush" else [(0, va, va + 0x1000, "rw"), (1, va, va + 0x1000, "rw")]
        if got != want or res.failed != (name == "flush-removed"):
            ctx.fail("tlb", f"{name}: dangerous windows {got}, expected {want}")
        if ctx.json:
            from x86pt.cli import emit_json

            emit_json({"section": "tlb", "trace": path, "case": name, **res.to_json()})
        else:
            print(f"-- {name}: {path}")
            print(render_text(res))
            if name == "flush-removed" and got == want:
                print("   (as it should: the trace left the flush out; the demo's verdict holds)")
