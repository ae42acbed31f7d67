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

One QEMU at a time; each is its own process group, and its RAM file and sockets are removed
whatever happens: the context manager and atexit on errors, SIGTERM turned into SystemExit while a
run is in progress, and for a SIGKILL of the host process, QEMU's parent-death signal (SIGKILL) plus
a RAM file unlinked as soon as QEMU has created it (kept open by the host until the capture).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from harness.linux.btf import struct_members
from harness.linux.build import build_helpers, build_module
from harness.linux.collect import (
    BootText,
    Capture,
    capture,
    capture_from_dump,
    decode_trace,
    dump_json,
    layout_of,
    parse_counters,
    parse_kallsyms,
    parse_output,
    parse_registers,
    trace_summary,
    trace_text,
    write_capture,
)
from harness.linux.fetch import KernelTree, fetch
from harness.linux.initramfs import Workload, build_initramfs, steps_archive, workload_named
from harness.qemu.process import QEMU_BINARY, QemuProcess, qemu_binary, qemu_release, read_stderr
from harness.qemu.qmp import Qmp
from x86pt.errors import BadInputError, OracleError, OracleUnavailable
from x86pt.memory.atomic import write_bytes_atomic, write_text_atomic
from x86pt.memory.raw import RawFile

QEMU = QEMU_BINARY
ICOUNT = "shift=0,sleep=off,align=off"
RTC = "base=2024-01-01T00:00:00,clock=vm"


def qemu_version(binary: str | None = None) -> str:
    return qemu_release(binary) if binary or qemu_binary() else ""


IMAGE_MODES = ("guest", "all", "pause", "last")


@dataclass(frozen=True)
class RunConfig:
    kernel: str = "6.1"
    workload: str = "modules"
    levels: int = 4  # 4: -cpu max,la57=off; 5: -cpu max (LA57)
    kaslr: bool = False  # True boots the bzImage (the decompressor does the KASLR;
    # it also switches to 5-level, so levels=5 boots it too)
    ram_mb: int = 3072  # >= 3G so GiB 1 is all RAM and gets a 1G leaf (docs/oracles.md §7)
    images: str = "guest"  # guest: one boot, the guest dumps its tables at each step
    # (reproducible); all: one boot per checkpoint; pause: one
    # boot, paused at each checkpoint; last: last image only
    info_mem: bool = False  # time HMP `info mem` on the last boot (4-level only prints)
    timeout: float = 900.0  # per boot
    seed: int = 1

    def check(self) -> None:
        if self.levels not in (4, 5):
            raise BadInputError("--levels must be 4 or 5")
        if self.images not in IMAGE_MODES:
            raise BadInputError(f"--images must be one of {', '.join(IMAGE_MODES)}")
        if not 1024 <= self.ram_mb <= 3584:
            # above 3.5G the pc machine splits RAM around the PCI hole; the RAM file would no
            # longer be "file offset = physical address"
            raise BadInputError("--ram must be between 1024 and 3584 MiB")


# -- the kernel command line ------------------------------------------------------------------------
def kprobe_cmdline(vmlinux: str) -> list[str]:
    """Boot-time probes on __change_page_attr_set_clr (entry and return) with the cpa_data offsets
    of this kernel (from its BTF) and direct_pages_count[PG_LEVEL_4K..1G].
    Spaces in probe definitions become commas on the command line; `;` separates probes."""
    m = struct_members(vmlinux, "cpa_data")
    for need in ("vaddr", "mask_set", "mask_clr", "numpages", "flags", "force_split"):
        if need not in m:
            raise OracleUnavailable(f"struct cpa_data has no {need} in this kernel")
    counts = "d4k=@direct_pages_count+8:u64,d2m=@direct_pages_count+16:u64,d1g=@direct_pages_count+24:u64"
    entry = ",".join(
        [
            "p:cpa/cpasc",
            "__change_page_attr_set_clr",
            f"vaddr=+0(+{m['vaddr'].byte_offset}(%di)):x64",
            f"numpages=+{m['numpages'].byte_offset}(%di):u64",
            f"set=+{m['mask_set'].byte_offset}(%di):x64",
            f"clr=+{m['mask_clr'].byte_offset}(%di):x64",
            f"flags=+{m['flags'].byte_offset}(%di):x32",
            # force_split is a 1-bit field; fetch its byte and shift it down to bit 0
            f"bits=+{m['force_split'].byte_offset}(%di):b1@{m['force_split'].bit_offset % 8}/8",
            "primary=%si:u32",
            counts,
        ]
    )
    ret = ",".join(["r:cpa/cpasc_ret", "__change_page_attr_set_clr", "ret=$retval:s32", counts])
    # any trace_event= grows the ring buffer at boot; without it few boot-time lines survive
    return [f"kprobe_event={entry};{ret}", "trace_event=cpa:cpasc,cpa:cpasc_ret", "trace_buf_size=32M"]


def kernel_cmdline(tree: KernelTree, cfg: RunConfig, wl: Workload) -> str:
    """The same for every boot of a run (see initramfs.steps_archive)."""
    words = ["console=ttyS0", "panic=-1", "rdinit=/init"]
    if not cfg.kaslr:
        words.append("nokaslr")
    words += list(wl.cmdline)
    words += kprobe_cmdline(tree.vmlinux)
    return " ".join(words)


# -- one boot -------------------------------------------------------------------------------------------
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


class Guest:
    """One QEMU process, started paused-free (the workload runs on its own), cleaned up always:
    its process group killed and its scratch directory (QMP socket, RAM file) removed
    (harness/qemu/process.py)."""

    def __init__(
        self, binary: str, kernel: str, initrd: str, append: str, cfg: RunConfig, workdir: str
    ) -> None:
        self.workdir = workdir
        self.out = os.path.join(workdir, "ttyS1.txt")
        self.console = os.path.join(workdir, "console.log")
        self.qemu: QemuProcess | None = None
        self.qmp: Qmp | None = None
        self.ram_fd: int | None = None
        self.binary, self.kernel, self.initrd, self.append, self.cfg = binary, kernel, initrd, append, cfg
        self.ram = ""

    def _args(self, qemu: QemuProcess) -> list[str]:
        cfg = self.cfg
        self.ram = qemu.path("ram")
        cpu = "max" if cfg.levels == 5 else "max,la57=off"
        return [
            self.binary,
            "-machine",
            "pc,memory-backend=ram0",
            "-m",
            f"{cfg.ram_mb}M",
            "-object",
            f"memory-backend-file,id=ram0,size={cfg.ram_mb}M,mem-path={self.ram},share=on",
            "-cpu",
            cpu,
            "-smp",
            "1",
            "-accel",
            "tcg",
            "-icount",
            ICOUNT,
            "-seed",
            str(cfg.seed),
            "-rtc",
            RTC,
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            self.kernel,
            "-initrd",
            self.initrd,
            "-append",
            self.append,
            "-serial",
            f"file:{self.console}",
            "-chardev",
            f"file,id=out,path={self.out}",
            "-serial",
            "chardev:out",
            "-device",
            "pvpanic",
            "-action",
            "panic=pause",
            "-qmp",
            f"unix:{qemu.path('qmp.sock')},server=on,wait=off",
        ]

    def __enter__(self) -> "Guest":
        self.qemu = QemuProcess()
        try:
            self.qemu.start(self._args(self.qemu))
        except BaseException:
            self.close()
            raise
        return self

    def _hold_ram(self) -> None:
        """Open the RAM file once QEMU has made it and unlink its name: it then goes away with the
        last of QEMU and us, however either ends."""
        if self.ram_fd is None and os.path.exists(self.ram):
            self.ram_fd = os.open(self.ram, os.O_RDONLY | os.O_CLOEXEC)
            os.unlink(self.ram)

    @property
    def ram_path(self) -> str:
        self._hold_ram()
        return f"/proc/self/fd/{self.ram_fd}" if self.ram_fd is not None else self.ram

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_pause(self, k: int, deadline: float, on_poll: Callable[[str], None] | None = None) -> str:
        """Wait until the guest printed `@@PAUSE k` and QEMU paused on its pvpanic. Until then the
        host only reads the output file: talking to QEMU while the guest runs perturbs icount."""
        marker = f"@@PAUSE {k}\n"
        while True:
            self._hold_ram()
            text = _read_text(self.out)
            if on_poll is not None:
                on_poll(text)
            if text.startswith(marker) or "\n" + marker in text:
                break
            if not self.qemu.alive:
                raise OracleError(
                    f"QEMU exited ({self.qemu.proc.returncode}) before checkpoint {k}: "
                    + _last_text_line(read_stderr(self.qemu.stderr), self.console)
                )
            if time.monotonic() > deadline:
                raise OracleError(f"guest did not reach checkpoint {k} in time: " + _last_line(self.console))
            time.sleep(0.1)
        if self.qmp is None:
            self.qmp = Qmp.connect_path(
                self.qemu.path("qmp.sock"), proc=self.qemu.proc, stderr=self.qemu.stderr, timeout=30.0
            )
        while True:
            st = self.qmp.command("query-status")
            if isinstance(st, dict) and st.get("status") in ("guest-panicked", "paused"):
                return _read_text(self.out)
            if time.monotonic() > deadline:
                raise OracleError(f"guest printed @@PAUSE {k} but never paused (pvpanic)")
            time.sleep(0.05)

    def resume(self) -> None:
        self.qmp.command("cont")

    def close(self) -> None:
        """Ask QEMU to quit when we talk to it (it then ends on its own, within 5 s), else or
        after that kill its process group; then drop the RAM file and the scratch directory."""
        if self.qmp is not None and self.qemu is not None and self.qemu.alive:
            with contextlib.suppress(OracleError):
                self.qmp.command("quit", timeout=5.0)
                with contextlib.suppress(OracleError):
                    self.qemu.wait(5.0)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.qemu is not None:
            self.qemu.close()
            self.qemu = None
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None


@contextlib.contextmanager
def _sigterm_exits():
    """While a run is in progress, SIGTERM raises SystemExit so the context managers clean up
    (the default action would end the process with QEMU and its files left behind)."""
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _last_line(*paths: str) -> str:
    return _last_text_line(*(_read_text(p) for p in paths))


def _last_text_line(*texts: str) -> str:
    """The last non-empty line of the first text that has one (QEMU's stderr, then the console)."""
    for text in texts:
        lines = [l for l in text.splitlines() if l.strip()]
        if lines:
            return lines[-1].strip()[:200]
    return "(no output)"


# -- preparation and the whole run ------------------------------------------------------------------
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
                _read_text(g.console),
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


def _step_fingerprint(s) -> str:
    return json.dumps({k: s.sections.get(k, []) for k in ("MEMINFO", "VMSTAT", "TRACE", "PTDUMP", "TABLES")})


def write_step(
    out_dir: str,
    s,
    title: str,
    cap=None,
    regs: dict[str, int] | None = None,
    boot_seconds: float | None = None,
) -> dict:
    """Write one step's artefacts into out_dir/step-NN and return its summary."""
    d = os.path.join(out_dir, f"step-{s.number:02d}")
    os.makedirs(d, exist_ok=True)
    counters = parse_counters(s.sections.get("MEMINFO", []), s.sections.get("VMSTAT", []))
    dec = decode_trace(s.sections.get("TRACE", []))
    ptdump = "\n".join(s.sections.get("PTDUMP", [])) + "\n"
    write_text_atomic(os.path.join(d, "counters.json"), dump_json(counters))
    write_text_atomic(os.path.join(d, "ptdump.txt"), ptdump)
    write_text_atomic(os.path.join(d, "cpa.trace"), trace_text(dec, f"step {s.number}: {s.name} ({title})"))
    write_text_atomic(
        os.path.join(d, "calls.jsonl"),
        "".join(json.dumps(c.to_json(), sort_keys=True) + "\n" for c in dec.calls),
    )
    write_text_atomic(os.path.join(d, "trace.raw"), "\n".join(s.sections.get("TRACE", [])) + "\n")
    summary = {
        "step": s.number,
        "name": s.name,
        "rc": s.rc,
        "log": s.log,
        "counters": counters,
        "uptime": (s.sections.get("UPTIME") or [""])[0],
        "trace": trace_summary(dec),
        "ptdump_lines": ptdump.count("\n"),
    }
    if cap is not None:
        write_capture(os.path.join(d, "tables.elf"), cap)
        summary["image"] = {
            "file": "tables.elf",
            **cap.layout,
            "cr0": hex(regs["cr0"]),
            "cr4": hex(regs["cr4"]),
            "efer": hex(regs["efer"]),
        }
        if boot_seconds is not None:
            summary["image"]["boot_seconds"] = round(boot_seconds, 2)
    write_text_atomic(os.path.join(d, "step.json"), dump_json(summary))
    return summary


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
    with _sigterm_exits():
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
                f"{k + 1}; console: {_last_line_text(b.console)}"
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
            same += _step_fingerprint(src) == _step_fingerprint(st)
            if k and _step_fingerprint(own.text.steps[k - 1]) == _step_fingerprint(
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


def compare_captures(a: Capture, b: Capture) -> str:
    """ "same" when two captures hold the same table pages with the same bytes and root; else
    what differs (the guest's dump of the last step against the RAM read at the pause after it)."""
    if a.state.cr3 != b.state.cr3:
        return f"root {a.state.cr3:#x} vs {b.state.cr3:#x}"
    pa, pb = a.memory.pages, b.memory.pages
    only = sorted(set(pa) ^ set(pb))
    diff = sorted(k for k in set(pa) & set(pb) if bytes(pa[k]) != bytes(pb[k]))
    if not only and not diff:
        return "same"
    return f"{len(only)} table pages in one only, {len(diff)} differ" + (
        f" (first {(only or diff)[0] << 12:#x})" if only or diff else ""
    )


def _last_line_text(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1][:200] if lines else "(empty)"


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
