# SPDX-License-Identifier: GPL-2.0-or-later
"""Boot the Debian kernel under QEMU TCG and run a workload deterministically:

* icount (`-icount shift=0,sleep=off,align=off`), `-seed`, `-rtc clock=vm`: the same inputs give
  the same guest, byte for byte, as long as the host never talks to it while it runs;
* the workload is scripted in the initramfs and writes to a file chardev (never blocks);
* images="guest" (the default): one boot runs every step; after each step the guest prints its
  counters, CPA trace, the kernel's ptdump and a dump of its own page tables (our module's
  debugfs `tables`), and only after the last step asks QEMU to pause (pvpanic), when the host
  reads the tables from the shared RAM file and checks that they equal the guest's last dump.
  Measured: 3 runs each of modules/bpf/secretmem on 6.1 and 6.12, 4- and 5-level, identical in
  every artefact (tools/linux_determinism.py).

Why not the other ways (kept as --images for comparison):
* "pause" (pause after every step): pausing and resuming perturbs icount (QEMU 7.2 warps the
  virtual clock to the next timer deadline while the vCPU stops), so later steps depend on host
  timing; image k-1 and trace k still belong to one history.
* "all" (boot k runs steps 1..k and pauses once): each boot is reproducible, but boots given a
  different step count are not the same guest. Measured on 6.1 modules: the boots with n=3, 4, 5
  agree on step 3 and n=6 does not (its step 3 starts 7 us of guest time earlier and step 5
  places module pages elsewhere), while n=5 twice and n=6 three times repeat exactly. The count
  is the only input that differs, so "deterministic 5/7, chain 5/6" is the input, not noise.
  Steps whose boots disagree are counted in run.json and the report's model column shows "no"
  where image k-1 and trace k come from different histories.

The pieces: config.py (RunConfig, the kernel command line), boot.py (prepare, one boot),
machine.py (the QEMU process), artefacts.py (what a step writes); this module puts them together
and keeps their names importable from here.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from typing import Callable

from harness.linux.artefacts import compare_captures, step_fingerprint, write_step
from harness.linux.boot import QEMU, BootResult, Prepared, boot, prepare, qemu_version
from harness.linux.collect import layout_of
from harness.linux.image import capture_from_dump
from harness.linux.runfolder import dump_json
from harness.linux.config import ICOUNT, IMAGE_MODES, RTC, RunConfig, kernel_cmdline, kprobe_cmdline
from harness.linux.machine import Guest, last_text_line, sigterm_exits
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.atomic import write_text_atomic

__all__ = [
    "ICOUNT",
    "IMAGE_MODES",
    "QEMU",
    "RTC",
    "BootResult",
    "Guest",
    "Prepared",
    "RunConfig",
    "available",
    "boot",
    "compare_captures",
    "guest_pieces_digest",
    "kernel_cmdline",
    "kprobe_cmdline",
    "prepare",
    "qemu_version",
    "run",
    "write_step",
]


def run(
    cfg: RunConfig,
    out_dir: str,
    log: Callable[[str], None] = lambda m: None,
    root: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The whole collection: prepare, boot(s), artefacts per step in out_dir.

    images="all": one boot per checkpoint k (steps 1..k, pause once at the end); step k's texts
    and image come from boot k. `chain` counts the k whose boot k recorded step k-1 exactly as
    boot k-1 did (so image k-1 and trace k belong to one history).
    images="pause": one boot that pauses after every step (self-consistent by construction; the
    pause may move later steps away from an unpaused run's).
    images="last": one boot, an image of the last step only."""
    with sigterm_exits():
        return _run(cfg, out_dir, log, root, progress)


def _run(
    cfg: RunConfig,
    out_dir: str,
    log: Callable[[str], None],
    root: str | None,
    progress: Callable[[int, int], None] | None,
) -> dict:
    t_all = time.monotonic()
    prep = prepare(cfg, root)
    t_prep = time.monotonic() - t_all
    n = len(prep.workload.steps)
    os.makedirs(os.path.join(out_dir, "boots"), exist_ok=True)
    boots: dict[int, BootResult] = {}
    ks = list(range(n + 1)) if cfg.images == "all" else [n]
    total = sum(k + 1 for k in ks)  # step records the boots will write
    before = 0
    for k in ks:
        log(
            f"boot {k}/{n}: {cfg.kernel} {cfg.levels}-level {'kaslr' if cfg.kaslr else 'nokaslr'} "
            f"{cfg.workload} steps 1..{k}" + (", pause after each" if cfg.images == "pause" else "")
        )
        b = boot(
            prep,
            cfg,
            k,
            pause_every=cfg.images == "pause",
            info_mem=cfg.info_mem and k == n,
            on_step=None if progress is None else (lambda done, b0=before: progress(b0 + done, total)),
        )
        before += k + 1
        boots[k] = b
        write_text_atomic(os.path.join(out_dir, "boots", f"boot-{k:02d}.txt"), b.raw_output)
        if len(b.text.steps) != k + 1:
            raise OracleError(
                f"boot {k}: the guest wrote {len(b.text.steps)} step records, expected "
                f"{k + 1}; console: {last_text_line(b.console)}"
            )
        bad = [st.number for st in b.text.steps if st.number and st.rc != 0]
        if bad:
            raise OracleError(
                f"boot {k}: step {bad[0]} failed in the guest: {' | '.join(b.text.steps[bad[0]].log)[:200]}"
            )
        log(
            f"  {b.seconds:.1f} s, capture {b.capture_seconds:.2f} s, "
            f"{b.capture.layout['table_pages'] if b.capture else 0} table pages"
        )
    final = boots[n]
    title = f"{(final.text.header.get('UNAME') or ['?'])[0]} {cfg.levels}-level {'kaslr' if cfg.kaslr else 'nokaslr'}"
    steps_out = []
    same = chain = 0
    image_check = None
    if cfg.images == "guest":
        dumps = {
            st.number: capture_from_dump(st.sections.get("TABLES", []), final.regs, final.capture.layout)
            for st in final.text.steps
        }
        image_check = compare_captures(dumps[n], final.capture)
    for st in final.text.steps:
        k = st.number
        if cfg.images == "guest":
            steps_out.append(write_step(out_dir, st, title, dumps[k], final.regs))
        elif cfg.images == "all":
            own = boots[k]
            src = own.text.steps[k]
            same += step_fingerprint(src) == step_fingerprint(st)
            if k and step_fingerprint(own.text.steps[k - 1]) == step_fingerprint(
                boots[k - 1].text.steps[k - 1]
            ):
                chain += 1
            steps_out.append(write_step(out_dir, src, title, own.capture, own.regs, own.seconds))
        else:
            steps_out.append(write_step(out_dir, st, title, final.captures.get(k), final.all_regs.get(k)))
    layout = layout_of(final.text)
    if final.capture is not None:
        layout.update({k: v for k, v in final.capture.layout.items() if k not in ("table_pages",)})
    write_text_atomic(os.path.join(out_dir, "layout.json"), dump_json(layout))
    write_text_atomic(os.path.join(out_dir, "console.log"), final.console)
    meta = {
        "config": asdict(cfg),
        "kernel_release": prep.tree.release,
        "kernel_package_version": prep.tree.version,
        "kernel_packages": f"linux-image-{prep.tree.release} {prep.tree.version} (Debian)",
        "qemu_version": prep.qemu_version,
        "workload": prep.workload.name,
        "workload_doc": prep.workload.doc,
        "steps": [{"step": x["step"], "name": x["name"]} for x in steps_out],
        "cmdline": kernel_cmdline(prep.tree, cfg, prep.workload),
        "guest_digest": guest_pieces_digest(prep, cfg),
        "boots": {str(k): round(b.seconds, 2) for k, b in boots.items()},
        "prepare_seconds": round(t_prep, 2),
        "wall_seconds": round(time.monotonic() - t_all, 2),
        "source": "Debian kernel booted under QEMU TCG with icount; collected by x86pt linux run",
    }
    if cfg.images == "all":
        meta["deterministic_steps"] = f"{same}/{n + 1}"
        meta["chain_consistent"] = f"{chain}/{n}"
    elif cfg.images == "guest":
        # one boot, never paused before its last step: every image belongs to one history, and
        # the whole run repeats byte for byte (tools/linux_determinism.py measures it)
        meta["deterministic_steps"] = "n/a (one boot)"
        meta["chain_consistent"] = f"{n}/{n}"
        meta["image_check"] = image_check
        if image_check != "same":
            raise OracleError(
                f"the guest's table dump of step {n} differs from the page tables in its RAM: {image_check}"
            )
    else:
        meta["deterministic_steps"] = "n/a (one boot)"
        meta["chain_consistent"] = f"{n}/{n}" if cfg.images == "pause" else "n/a (one image)"
    if final.info_mem_seconds is not None:
        # QEMU's own `info mem` of the paused guest, for the same moment as the last image
        write_text_atomic(os.path.join(out_dir, f"step-{n:02d}", "qemu-info-mem.txt"), final.info_mem_text)
        meta["info_mem_seconds"] = round(final.info_mem_seconds, 2)
        meta["info_mem_lines"] = final.info_mem_lines
    write_text_atomic(os.path.join(out_dir, "run.json"), dump_json(meta))
    return meta


def guest_pieces_digest(prep: Prepared, cfg: RunConfig) -> str:
    """What besides kernel and QEMU decides a run's bytes: the module and helper sources, /init,
    the workload and the command line (a byte compare of two runs needs all of it equal)."""
    from harness.linux import build, initramfs
    from harness.linux.compare import guest_digest

    parts = [
        build.MODULE_C,
        build.SECRETMEM_C,
        build.PVPANIC_C,
        initramfs.INIT,
        initramfs.HELPERS_SH,
        initramfs.RELEASE_SH,
        repr(prep.workload),
        kernel_cmdline(prep.tree, cfg, prep.workload),
        repr((cfg.ram_mb, cfg.seed, cfg.images, ICOUNT, RTC)),
    ]
    return guest_digest([p.encode() for p in parts])


def available(kernel: str = "6.1", root: str | None = None) -> tuple[bool, str]:
    """Can this machine collect from a real kernel? QEMU, dpkg-deb, gcc and make, and the kernel
    either in the cache or downloadable (apt knows it and Debian's package registry answers one
    HEAD request). Nothing is downloaded here."""
    for tool in (QEMU, "dpkg-deb", "gcc", "make"):
        if not shutil.which(tool):
            return False, f"{tool} not found"
    from harness.linux.fetch import cached_tree, registry_reachable, resolve

    if cached_tree(kernel, root) is not None:
        return True, ""
    for tool in ("apt-get", "apt-cache"):
        if not shutil.which(tool):
            return False, f"kernel {kernel} not cached and {tool} not found"
    try:
        resolve(kernel)
    except (OracleUnavailable, BadInputError) as e:
        return False, f"kernel {kernel} not cached: {e}"
    ok, why = registry_reachable()
    return (True, "") if ok else (False, f"kernel {kernel} not cached and {why}")
