"""Throughput of the unicorn oracle (harness/oracles/unicorn_oracle.py) in probes per second, for
batches with no faults, all faults and half faults, at CPL0 and CPL3, with two peers measured in
the same run: the x86pt model's scalar walk over the same probes, and the naive use of the oracle
(one probe per run(), i.e. a fresh engine per probe).

    python3 tools/bench_unicorn.py [--n 4000] [--repeat 5]

Each figure is the median CPU time (time.process_time) of --repeat runs; run() time includes engine set-up, image copy, code
generation and reading the image back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x86pt.oracle import RIG_IMAGE_BASE, Probe, tag_value  # noqa: E402
from harness.oracles.unicorn_oracle import UnicornOracle, available  # noqa: E402
from x86pt.build import Builder  # noqa: E402
from x86pt.state import CR4_PAE, CR4_SMAP  # noqa: E402
from x86pt.walk import Access, walk  # noqa: E402

VA0 = 0x10000000
FRAMES = 64


def build(n: int):
    """n mapped 4K pages (user RW, aliased onto FRAMES tagged frames) followed by n holes."""
    b = Builder(maxphyaddr=40, table_base=RIG_IMAGE_BASE)
    for f in range(FRAMES):
        pa = 0x1000000 + f * 0x1000
        b.memory.write(pa, b"".join(tag_value(pa + 8 * q).to_bytes(8, "little") for q in range(512)))
    for i in range(n):
        b.map(VA0 + i * 0x1000, 0x1000000 + (i % FRAMES) * 0x1000, 0x1000, 0x1000, "rw us")
    for i in range(n):  # make sure the holes' page tables exist
        b.entry_address(VA0 + (n + i) * 0x1000, 1)
    return b, b.state(cr4=CR4_PAE | CR4_SMAP, profile="unicorn")  # CPL0 probes run with AC=1


def probes_for(n: int, fault_every: int | None, user: bool) -> list[Probe]:
    out = []
    for i in range(n):
        fault = fault_every is not None and i % fault_every == 0
        page = n + i if fault else i
        access = ("read", "write", "read", "fetch")[i % 4]
        out.append(Probe(VA0 + page * 0x1000, access, user=user, ac=not user, wvalue=0xC3))
    return out


def median_time(fn, repeat: int) -> float:
    """Median CPU time of this process (all threads): other engineers share the two cores, and
    wall time swings with their load; CPU time measures our own work."""
    ts = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="probes per batch")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    ok, why = available()
    if not ok:
        print(f"unicorn not available: {why}", file=sys.stderr)
        return 2
    n = args.n
    b, state = build(n)
    oracle = UnicornOracle()
    print(f"unicorn oracle, batches of {n} probes (reads/writes/fetches mixed), median of {args.repeat}")
    print(f"{'case':<26}{'oracle p/s':>12}{'model p/s':>12}{'oracle/model':>14}")
    rates = {}
    for label, every, user in (
        ("no fault, CPL0", None, False),
        ("all fault, CPL0", 1, False),
        ("50% fault, CPL0", 2, False),
        ("no fault, CPL3", None, True),
        ("all fault, CPL3", 1, True),
        ("50% fault, CPL3", 2, True),
    ):
        probes = probes_for(n, every, user)
        res = oracle.run(b.memory, state, probes).results
        faults = sum(r.outcome != "ok" for r in res)
        want = 0 if every is None else (n + every - 1) // every
        if faults != want:
            print(f"{label}: expected {want} faults, got {faults}", file=sys.stderr)
            return 1
        t_o = median_time(lambda: oracle.run(b.memory, state, probes), args.repeat)  # noqa: B023 (called in this iteration)
        acc = [Access(p.access, p.user, p.ac) for p in probes]
        t_m = median_time(
            lambda: [walk(state, b.memory, p.va, a) for p, a in zip(probes, acc)],  # noqa: B023 (called in this iteration)
            args.repeat,
        )
        rates[label] = n / t_o
        print(f"{label:<26}{n / t_o:>12,.0f}{n / t_m:>12,.0f}{t_m / t_o:>14.2f}")
    few = probes_for(200, 2, False)
    t_one = median_time(lambda: [oracle.run(b.memory, state, [p]) for p in few], 3)
    t_batch = median_time(lambda: oracle.run(b.memory, state, few), 3)
    print(
        f"one probe per run() (fresh engine each): {200 / t_one:,.0f} p/s; the same 200 probes in "
        f"one batch: {200 / t_batch:,.0f} p/s (batch/per-probe = {t_one / t_batch:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
