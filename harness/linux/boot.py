# SPDX-License-Identifier: GPL-2.0-or-later
"""Prepare a run (fetch the kernel, build the guest pieces, pack the initramfs: all cached but the
initramfs) and boot it once (boot): steps 1..k in one QEMU, the page tables read from its RAM at
the pause after the last step (or after every step)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from harness.linux.build import build_helpers, build_module
from harness.linux.collect import BootText, parse_kallsyms, parse_output, parse_registers
from harness.linux.config import RunConfig, kernel_cmdline
from harness.linux.fetch import KernelTree, fetch
from harness.linux.image import capture
from harness.linux.initramfs import Workload, build_initramfs, steps_archive, workload_named
from harness.linux.machine import Guest, read_text
from harness.qemu.process import QEMU_BINARY, qemu_binary, qemu_release
from x86pt.errors import OracleUnavailable
from x86pt.memory.atomic import write_bytes_atomic
from x86pt.memory.raw import RawFile

QEMU = QEMU_BINARY


def qemu_version(binary: str | None = None) -> str:
    return qemu_release(binary) if binary or qemu_binary() else ""


@dataclass
class BootResult:
    steps: int
    text: BootText
    raw_output: str
    console: str
    regs: dict[str, int]
    seconds: float
    capture_seconds: float = 0.0
    info_mem_seconds: float | None = None
    info_mem_lines: int | None = None
    info_mem_text: str | None = None
    captures: dict = field(default_factory=dict)  # checkpoint -> collect.Capture
    all_regs: dict = field(default_factory=dict)  # checkpoint -> registers

    @property
    def capture(self):
        return self.captures.get(self.steps)


@dataclass(frozen=True)
class Prepared:
    tree: KernelTree
    workload: Workload
    initrd: str
    qemu: str
    qemu_version: str


def prepare(cfg: RunConfig, root: str | None = None) -> Prepared:
    """Fetch, build and pack everything a boot needs (cached; the initramfs is rebuilt)."""
    cfg.check()
    binary = qemu_binary()
    if not binary:
        raise OracleUnavailable(f"{QEMU} not found (apt-get install qemu-system-x86)")
    wl = workload_named(cfg.workload)
    tree = fetch(cfg.kernel, root)
    ko = build_module(tree)
    helpers = build_helpers(tree)
    initrd = os.path.join(tree.root, "build", f"initrd-{wl.name}.gz")
    build_initramfs(
        initrd, busybox=tree.busybox, modules_dir=tree.modules, ptdump_ko=ko, helpers=helpers, workload=wl
    )
    return Prepared(tree, wl, initrd, binary, qemu_version(binary))


def boot(
    prep: Prepared,
    cfg: RunConfig,
    steps: int,
    pause_every: bool = False,
    info_mem: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> BootResult:
    """One deterministic boot running steps 1..`steps`, the page tables captured at the end
    (`pause_every`: also after every earlier step, resuming after each capture)."""
    # 5-level paging is switched on by the decompressor's trampoline: an uncompressed vmlinux
    # entered through PVH stays 4-level even on an LA57 CPU (seen: CR4.LA57 clear), so 5-level
    # runs, like KASLR runs, boot the bzImage.
    kernel = prep.tree.bzimage if cfg.kaslr or cfg.levels == 5 else prep.tree.vmlinux
    append = kernel_cmdline(prep.tree, cfg, prep.workload)
    with tempfile.TemporaryDirectory(prefix="x86pt-linux-") as wd:
        initrd = os.path.join(wd, "initrd")
        with open(prep.initrd, "rb") as f:
            base = f.read()
        # the kernel unpacks concatenated archives; pad the gzip member to a cpio block
        write_bytes_atomic(initrd, base + bytes(-len(base) % 512) + steps_archive(steps, pause_every))
        t0 = time.monotonic()
        deadline = t0 + cfg.timeout
        captures: dict[int, object] = {}
        regs: dict[int, dict[str, int]] = {}
        cap_s = 0.0
        with Guest(prep.qemu, kernel, initrd, append, cfg, wd) as g:
            for k in range(steps + 1) if pause_every else (steps,):
                raw = g.wait_pause(
                    k,
                    deadline,
                    None if on_step is None else (lambda text: on_step(text.count("\n@@ENDSTEP "))),
                )
                t1 = time.monotonic()
                regs[k] = parse_registers(g.qmp.hmp("info registers"))
                ks = parse_kallsyms(parse_output(raw).header.get("KALLSYMS", []))
                ram = RawFile(g.ram_path)
                try:
                    captures[k] = capture(ram, regs[k], ks)
                finally:
                    ram.close()
                cap_s += time.monotonic() - t1
                if k < steps:
                    g.resume()
            seconds = time.monotonic() - t0
            res = BootResult(
                steps,
                parse_output(raw),
                raw,
                read_text(g.console),
                regs[steps],
                seconds,
                cap_s,
                captures=captures,
                all_regs=regs,
            )
            if info_mem:
                t1 = time.monotonic()
                out = g.qmp.hmp("info mem", timeout=cfg.timeout)
                res.info_mem_seconds = time.monotonic() - t1
                res.info_mem_lines = len(out.splitlines())
                res.info_mem_text = out
    return res
