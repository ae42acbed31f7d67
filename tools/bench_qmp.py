#!/usr/bin/env python3
"""What the QMP client costs (docs/oracles.md §5.1): harness/qemu/qmp.py (on `qemu.qmp`) next to
the floor, a bare blocking socket that writes one JSON command and reads to the newline of its
answer (what the project's former hand-written client did, less its id and event checks).

Both talk to the same paused QEMU (QemuMonitor on a small 4-level image, a second `-qmp` socket for
the bare one), in alternating rounds, and report medians:
  * `import qemu.qmp` in a fresh interpreter (it brings asyncio), against `import socket, json`;
  * connect + greeting + qmp_capabilities (median of 20);
  * `query-status` and `human-monitor-command info mem` round trips;
  * `gva2gpa` of 512 addresses one at a time and pipelined (QemuMonitor.gva2gpa_many), best of 5;
  * with --tlb-gib N: `info tlb` of an image with N GiB mapped in 4K pages (about 24 MB of text per
    GiB: the size of reply the bare reader and asyncio's stream reader must both take).

    python3 tools/bench_qmp.py [--rounds 2000] [--tlb-gib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class BareQmp:
    """The floor: blocking socket, one JSON line out, read to the answer's newline."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()
        self._line()  # greeting
        self.command("qmp_capabilities")

    def _line(self) -> dict:
        scanned = 0
        while True:
            nl = self.buf.find(b"\n", scanned)
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return json.loads(line)
            scanned = len(self.buf)
            data = self.sock.recv(1 << 20)
            if not data:
                raise SystemExit("QEMU closed the bare QMP socket")
            self.buf += data

    def command(self, name: str, arguments: dict | None = None):
        msg: dict = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._line()
            if "event" not in reply:
                if "error" in reply:
                    raise SystemExit(f"QMP {name}: {reply['error']}")
                return reply["return"]

    def close(self) -> None:
        self.sock.close()


def median_us(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def import_ms(stmt: str, n: int = 5) -> float:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(n)
    ]
    return statistics.median(runs) * 1e3


def image(tlb_gib: int):
    from x86pt.build import Builder

    b = Builder(levels=4, maxphyaddr=40, vendor="amd", table_base=0x200000)
    b.map(0x400000, 0x600000, 0x1000, flags="rw us a")
    b.map(0xFFFF800000000000, 0x40000000, 1 << 30, 1 << 30, flags="rw")
    if tlb_gib:
        b.map(0xFFFF888000000000, 0, tlb_gib << 30, 0x1000, flags="rw")
    return b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000, help="round trips per measurement")
    ap.add_argument("--tlb-gib", type=int, default=0, help="also time `info tlb` of N GiB in 4K pages")
    args = ap.parse_args(argv)
    from harness.qemu.monitor import QemuMonitor
    from harness.qemu.process import scratch_dir
    from harness.qemu.qmp import Qmp

    r: dict[str, float] = {
        "import_qmp_ms": import_ms("import qemu.qmp"),
        "import_socket_json_ms": import_ms("import socket, json"),
    }
    b = image(args.tlb_gib)
    side = scratch_dir()
    bare_path = os.path.join(side, "bare.sock")
    try:
        with QemuMonitor(
            b.memory,
            b.state(profile="qemu"),
            timeout=600,
            extra_args=["-qmp", f"unix:{bare_path},server=on,wait=off"],
        ) as mon:
            r["qemu"] = mon.version
            bare_c, lib_c = [], []
            for _ in range(20):  # QEMU takes one client per socket at a time: alternate
                t = time.perf_counter()
                BareQmp(bare_path).close()
                bare_c.append(time.perf_counter() - t)
                t = time.perf_counter()
                Qmp.connect_path(bare_path, timeout=20).close()
                lib_c.append(time.perf_counter() - t)
            r["bare_connect_us"] = statistics.median(bare_c) * 1e6
            r["qmp_connect_us"] = statistics.median(lib_c) * 1e6
            bare = BareQmp(bare_path)
            n = args.rounds
            info_mem = {"command-line": "info mem"}
            va = 0xFFFF800012345678
            for _ in range(2):  # alternate rounds; keep the second (warm) pair
                r["bare_query_status_us"] = median_us(lambda: bare.command("query-status"), n)
                r["qmp_query_status_us"] = median_us(lambda: mon.qmp.command("query-status"), n)
                r["bare_info_mem_us"] = median_us(lambda: bare.command("human-monitor-command", info_mem), n)
                r["qmp_info_mem_us"] = median_us(
                    lambda: mon.qmp.command("human-monitor-command", info_mem), n
                )
                r["bare_gva2gpa_us"] = median_us(
                    lambda: bare.command("human-monitor-command", {"command-line": f"gva2gpa {va:#x}"}), n
                )
                r["qmp_gva2gpa_us"] = median_us(lambda: mon.gva2gpa(va), n)
            vas = [va + i * 8 for i in range(512)]
            want = [0x52345678 + i * 8 for i in range(512)]
            per = []
            for _ in range(5):
                t = time.perf_counter()
                got = mon.gva2gpa_many(vas)
                per.append((time.perf_counter() - t) / len(vas) * 1e6)
                assert got == want
            r["qmp_gva2gpa_pipelined_us"] = min(per)
            per = []
            for _ in range(5):
                t = time.perf_counter()
                got = [mon.gva2gpa(v) for v in vas]
                per.append((time.perf_counter() - t) / len(vas) * 1e6)
                assert got == want
            r["qmp_gva2gpa_sequential_us"] = min(per)
            if args.tlb_gib:
                t = time.perf_counter()
                a = bare.command("human-monitor-command", {"command-line": "info tlb"})
                r["bare_info_tlb_s"] = time.perf_counter() - t
                t = time.perf_counter()
                c = mon.qmp.hmp("info tlb", timeout=600)
                r["qmp_info_tlb_s"] = time.perf_counter() - t
                r["info_tlb_mb"] = len(c) / 1e6
                assert a == c
            bare.close()
    finally:
        shutil.rmtree(side, ignore_errors=True)
    print(
        f"{r.pop('qemu')}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        f"medians of {args.rounds}"
    )
    print(
        f"  import             qemu.qmp {r['import_qmp_ms']:6.1f} ms   socket+json {r['import_socket_json_ms']:6.1f} ms"
    )
    for key, label in (
        ("connect", "connect+negotiate"),
        ("query_status", "query-status"),
        ("info_mem", "HMP info mem"),
        ("gva2gpa", "HMP gva2gpa"),
    ):
        q, s = r[f"qmp_{key}_us"], r[f"bare_{key}_us"]
        print(f"  {label:<18} qemu.qmp {q:8.0f} us   bare socket {s:8.0f} us   ratio {q / s:.2f}")
    print(
        f"  gva2gpa of 512 addresses (best of 5): one at a time {r['qmp_gva2gpa_sequential_us']:.0f} us, "
        f"pipelined (gva2gpa_many) {r['qmp_gva2gpa_pipelined_us']:.0f} us per address"
    )
    if "qmp_info_tlb_s" in r:
        print(
            f"  info tlb ({r['info_tlb_mb']:.1f} MB)  qemu.qmp {r['qmp_info_tlb_s']:.2f} s   "
            f"bare socket {r['bare_info_tlb_s']:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
