"""`x86pt linux ...`: collect ground truth from a real Linux kernel under QEMU, and report on it.

  x86pt linux fetch --kernel 6.1            download + unpack + build (cached)
  x86pt linux run --kernel 6.1 --workload modules --out DIR [--levels 5] [--kaslr]
  x86pt linux report DIR [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import sys

from harness.linux import KERNELS


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_fetch(args) -> int:
    from harness.linux.build import build_helpers, build_module
    from harness.linux.fetch import fetch
    for k in args.kernel:
        t = fetch(k)
        ko = build_module(t)
        build_helpers(t)
        print(f"{k}: {t.release} ({t.version}) in {t.root}; module {ko}")
    return 0


def cmd_run(args) -> int:
    from harness.linux.run import RunConfig, run
    from x86pt.numbers import parse_int
    cfg = RunConfig(kernel=args.kernel, workload=args.workload, levels=args.levels, kaslr=args.kaslr,
                    ram_mb=parse_int(args.ram, "--ram", lo=1024, hi=3584), images=args.images,
                    info_mem=args.info_mem,
                    timeout=float(parse_int(args.timeout, "--timeout", lo=10, hi=7200)))
    meta = run(cfg, args.out, log=_log)
    print(f"{args.out}: {meta['kernel_release']} {cfg.levels}-level {cfg.workload}, "
          f"{len(meta['steps'])} checkpoints, deterministic {meta['deterministic_steps']}, "
          f"chain {meta['chain_consistent']}, "
          f"wall {meta['wall_seconds']} s")
    return 0


def cmd_report(args) -> int:
    from harness.linux.report import report
    print(report(args.dir, plot=args.plot), end="")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("linux", help="ground truth from a real Linux kernel under QEMU")
    sub = p.add_subparsers(dest="linux_command", metavar="SUBCOMMAND")
    sub.required = True

    f = sub.add_parser("fetch", help="download Debian's kernel packages and build the guest pieces")
    f.add_argument("--kernel", action="append", choices=KERNELS, default=None)
    f.set_defaults(func=lambda a: cmd_fetch(argparse.Namespace(kernel=a.kernel or list(KERNELS))))

    from harness.linux.initramfs import WORKLOADS
    r = sub.add_parser("run", help="boot, run a workload deterministically, collect every step")
    r.add_argument("--kernel", choices=KERNELS, default="6.1")
    r.add_argument("--workload", choices=sorted(WORKLOADS), default="modules")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--levels", type=int, choices=(4, 5), default=4, help="paging levels of the guest")
    r.add_argument("--kaslr", action="store_true", help="boot the bzImage with KASLR (default nokaslr)")
    r.add_argument("--ram", default="3072", metavar="MIB")
    r.add_argument("--images", choices=("guest", "all", "pause", "last"), default="guest",
                   help="guest: one boot, the guest dumps its page tables after every step, paused "
                        "once at the end (default; reproducible); all: one boot per checkpoint; "
                        "pause: one boot paused after every step; last: image of the last step only")
    r.add_argument("--info-mem", action="store_true", help="time QEMU's `info mem` on the last boot")
    r.add_argument("--timeout", default="900", metavar="S", help="per boot")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="per step: CPA calls, splits, pages that lost G; a plot")
    rp.add_argument("dir")
    rp.add_argument("--plot", default=None, metavar="FILE.png",
                    help="fragmentation plot (default DIR/fragmentation.png)")
    rp.set_defaults(func=cmd_report)
