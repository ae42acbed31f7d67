"""`x86pt linux ...`: collect ground truth from a real Linux kernel under QEMU, and report on it.

  x86pt linux fetch --kernel 6.1            download + unpack + build (cached)
  x86pt linux run --kernel 6.1 --workload modules --out DIR [--levels 5] [--kaslr]
  x86pt linux report DIR [--plot FILE.png]

Each takes --json (one JSON object on stdout). Progress is drawn on stderr only when it is a
terminal; the download size is printed before a download starts.
"""

from __future__ import annotations

import argparse
import json
import sys

from harness.linux import KERNELS, WORKLOAD_NAMES


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tty() -> bool:
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_fetch(args) -> int:
    from harness.linux.build import build_helpers, build_module
    from harness.linux.fetch import fetch, plan
    from x86pt.progress import ProgressBar

    out = []
    for k in args.kernel:
        p = plan(k)
        if not p.cached:
            # said before anything is downloaded, whatever the output mode
            _log(f"{k}: downloading {len(p.packages)} packages, {_mb(p.download_bytes)}, into {p.path}")
        bar = ProgressBar(max(p.download_bytes, 1), f"fetch {k}", unit="B") if not p.cached else None
        try:
            t = fetch(k, progress=None if bar is None else (lambda done, total, pkg: bar.update_to(done)))  # noqa: B023 (called in this iteration)
        finally:
            if bar is not None:
                bar.close()
        ko = build_module(t)
        build_helpers(t)
        rec = {
            **p.to_json(),
            "version": t.version,
            "module": ko,
            "vmlinux": t.vmlinux,
            "cache_bytes": _du(t.root),
        }
        out.append(rec)
        if not args.json:
            print(
                f"{k}: {t.release} ({t.version}) in {t.root} ({_mb(rec['cache_bytes'])} cached"
                + (f", {_mb(p.download_bytes)} downloaded" if not p.cached else "")
                + f"); module {ko}"
            )
    if args.json:
        print(json.dumps({"kernels": out}, indent=1, sort_keys=True))
    return 0


def _du(path: str) -> int:
    import os

    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def cmd_run(args) -> int:
    from harness.linux.fetch import plan
    from harness.linux.run import RunConfig, run
    from x86pt.numbers import parse_int
    from x86pt.progress import ProgressBar

    cfg = RunConfig(
        kernel=args.kernel,
        workload=args.workload,
        levels=args.levels,
        kaslr=args.kaslr,
        ram_mb=parse_int(args.ram, "--ram", lo=1024, hi=3584),
        images=args.images,
        info_mem=args.info_mem,
        timeout=float(parse_int(args.timeout, "--timeout", lo=10, hi=7200)),
    )
    try:
        p = plan(cfg.kernel)
        if not p.cached:
            _log(
                f"{cfg.kernel}: first use downloads {len(p.packages)} packages, {_mb(p.download_bytes)}, "
                f"into {p.path}"
            )
    except Exception:  # no apt here: run() uses the cache or says what is missing
        pass
    tty = _tty()
    bar = ProgressBar(1, f"linux {cfg.kernel} {cfg.workload}", unit="step", enabled=tty)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            if bar._bar is not None:
                bar._bar.total = total
        bar.update_to(done)

    def log(msg: str) -> None:
        if not tty:  # progress lines only on a terminal
            return
        if bar._bar is not None:
            bar._bar.write(msg, file=sys.stderr)
        else:
            _log(msg)

    try:
        meta = run(cfg, args.out, log=log, progress=progress)
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"out": args.out, **meta}, indent=1, sort_keys=True))
        return 0
    print(
        f"{args.out}: {meta['kernel_release']} {cfg.levels}-level {cfg.workload}, "
        f"{len(meta['steps'])} checkpoints ({cfg.images} images), deterministic {meta['deterministic_steps']}, "
        f"chain {meta['chain_consistent']}, wall {meta['wall_seconds']} s"
    )
    return 0


def cmd_report(args) -> int:
    from harness.linux.report import report, report_data

    if args.json:
        print(json.dumps(report_data(args.dir, plot=args.plot), indent=1, sort_keys=True))
    else:
        print(report(args.dir, plot=args.plot), end="")
    return 0


EPILOG_FETCH = """examples:
  x86pt linux fetch --kernel 6.1        # 85 MB of Debian packages, once, into ~/.cache/x86pt/linux
  x86pt linux fetch --json              # both kernel lines; sizes and cache paths as JSON
"""
EPILOG_RUN = """examples:
  x86pt linux run --kernel 6.1 --workload modules --out run/
  x86pt linux run --kernel 6.12 --levels 5 --workload bpf --out run5/
  x86pt linux run --workload secretmem --out sm/ --json
"""
EPILOG_REPORT = """examples:
  x86pt linux report run/
  x86pt linux report run/ --json --plot /tmp/frag.png
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "linux",
        help="ground truth from a real Linux kernel under QEMU",
        description="Boot Debian's own kernels under QEMU (TCG, icount), trace "
        "every change_page_attr call, and compare with the CPA model.",
    )
    sub = p.add_subparsers(dest="linux_command", metavar="SUBCOMMAND")
    sub.required = True
    raw = argparse.RawDescriptionHelpFormatter

    f = sub.add_parser(
        "fetch",
        help="download Debian's kernel packages and build the guest pieces",
        description="Download (once) the kernel image, headers, kbuild and busybox-static "
        "packages with apt-get, unpack them into the cache ($X86PT_CACHE/linux, "
        "else ~/.cache/x86pt/linux) and build the ptdump module.",
        epilog=EPILOG_FETCH,
        formatter_class=raw,
    )
    f.add_argument(
        "--kernel",
        action="append",
        choices=KERNELS,
        default=None,
        help="kernel line (repeatable; default: all)",
    )
    f.add_argument("--json", action="store_true", help="print what was fetched as JSON")
    f.set_defaults(
        func=lambda a: cmd_fetch(argparse.Namespace(kernel=a.kernel or list(KERNELS), json=a.json))
    )

    r = sub.add_parser(
        "run",
        help="boot, run a workload deterministically, collect every step",
        description="Boot the kernel with a scripted workload and collect, per step, the "
        "CPA trace, /proc counters, the kernel's ptdump and a page-table image. "
        "The same inputs give the same bytes (icount, one boot).",
        epilog=EPILOG_RUN,
        formatter_class=raw,
    )
    r.add_argument("--kernel", choices=KERNELS, default="6.1", help="kernel line (default 6.1)")
    r.add_argument("--workload", choices=WORKLOAD_NAMES, default="modules", help="what the guest does")
    r.add_argument("--out", required=True, metavar="DIR", help="folder for the run's artefacts")
    r.add_argument("--levels", type=int, choices=(4, 5), default=4, help="paging levels of the guest")
    r.add_argument("--kaslr", action="store_true", help="boot the bzImage with KASLR (default nokaslr)")
    r.add_argument("--ram", default="3072", metavar="MIB", help="guest RAM, 1024-3584 MiB (default 3072)")
    r.add_argument(
        "--images",
        choices=("guest", "all", "pause", "last"),
        default="guest",
        help="guest: one boot, the guest dumps its page tables after every step, paused "
        "once at the end (default; reproducible); all: one boot per checkpoint; "
        "pause: one boot paused after every step; last: image of the last step only",
    )
    r.add_argument("--info-mem", action="store_true", help="time QEMU's `info mem` on the last boot")
    r.add_argument("--timeout", default="900", metavar="S", help="per boot, seconds (default 900)")
    r.add_argument("--json", action="store_true", help="print the run's summary (run.json) as JSON")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser(
        "report",
        help="per step: CPA calls, splits, pages that lost G; a plot",
        description="What the kernel did at each step of a collected run, whether its "
        "trace accounts for its counters, and whether the CPA model's replay "
        "of each step reaches the kernel's state.",
        epilog=EPILOG_REPORT,
        formatter_class=raw,
    )
    rp.add_argument("dir", help="a folder written by `x86pt linux run` (or a fixture)")
    rp.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="write a fragmentation plot of the direct map here (none without it)",
    )
    rp.add_argument("--json", action="store_true", help="the table as JSON")
    rp.set_defaults(func=cmd_report)
