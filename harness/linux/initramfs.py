"""The guest's initramfs: static busybox, the modules a workload loads, our ptdump module and
helpers, `/init`, and the workload's step list. Written as a newc cpio (no host cpio needed),
gzip'd, with fixed mtimes so the same inputs give the same bytes.

The workload runs scripted inside the guest (no host interaction while it runs: interactive
driving leaks host timing into an icount run). `/init` writes every
artefact to ttyS1, which the host backs with a file chardev; sections start with `@@`.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import stat
from dataclasses import dataclass

from x86pt.errors import BadInputError, OracleUnavailable


@dataclass(frozen=True)
class Step:
    name: str  # what the report shows, e.g. "insmod crc7"
    command: str  # sh command run inside the guest (one line, no '|')


@dataclass(frozen=True)
class Workload:
    name: str
    steps: tuple[Step, ...]
    modules: tuple[str, ...] = ()  # paths under lib/modules/<release>/kernel, no suffix
    cmdline: tuple[str, ...] = ()  # extra kernel parameters
    doc: str = ""


def _mod_steps(*names: str) -> tuple[Step, ...]:
    out = []
    for n in names:
        base = n.rsplit("/", 1)[-1]
        out += [Step(f"insmod {base}", f"insmod /mods/{base}.ko"), Step(f"rmmod {base}", f"rmmod {base}")]
    return tuple(out)


# Modules whose .modinfo has an empty depends= and that need no hardware.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("boot", (), doc="boot-time CPA only: step 0's trace holds every call from fs_initcall on"),
        Workload(
            "modules",
            _mod_steps("lib/crc7", "lib/bch", "crypto/xor"),
            modules=("lib/crc7", "lib/bch", "crypto/xor"),
            doc="load/unload of dependency-free modules (module_alloc + set_memory_*, vm_reset_perms)",
        ),
        Workload(
            "bpf",
            (
                Step("insmod test_bpf 0..9", "insmod /mods/test_bpf.ko test_range=0,9"),
                Step("rmmod test_bpf", "rmmod test_bpf"),
            ),
            modules=("lib/test_bpf",),
            doc="BPF JIT through test_bpf.ko (a 4.8 MB module)",
        ),
        Workload(
            "secretmem",
            (
                Step("secretmem 64", "secretmem 64"),
                Step("secretmem 64 hold", "secretmem_hold 64"),
                Step("secretmem release", "secretmem_release"),
            ),
            cmdline=("secretmem.enable=1",),
            doc="memfd_secret: pages leave the direct map (set_direct_map_invalid) and return",
        ),
        Workload(
            "secretmem1g",
            (Step("secretmem 250000", "secretmem 250000"),),
            cmdline=("secretmem.enable=1",),
            doc="memfd_secret large enough to split the 1G direct-map page (its ~500k CPA calls "
            "overflow the trace ring buffer: counters and images are exact, the trace is not)",
        ),
    )
}


def workload_named(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise BadInputError(f"unknown workload {name!r} (choose {', '.join(WORKLOADS)})") from None


# The symbols whose addresses describe the layout; kallsyms is readable by root (KALLSYMS_ALL=y).
LAYOUT_SYMBOLS = (
    "init_mm",
    "init_top_pgt",
    "page_offset_base",
    "vmalloc_base",
    "vmemmap_base",
    "phys_base",
    "_text",
    "_stext",
    "_etext",
    "__start_rodata",
    "__end_rodata",
    "_sdata",
    "_edata",
    "__init_begin",
    "__init_end",
    "__bss_start",
    "__bss_stop",
    "_end",
    "__brk_base",
    "_brk_end",
    "__end_rodata_hpage_align",
    "direct_pages_count",
)
# API-level entry points, probed when present (not all exist in every kernel line).
API_PROBES = (
    "set_memory_ro",
    "set_memory_rw",
    "set_memory_x",
    "set_memory_nx",
    "set_memory_np",
    "set_memory_p",
    "set_memory_4k",
    "set_memory_rox",
    "set_memory_global",
    "set_memory_nonglobal",
)
PAGE_PROBES = ("set_direct_map_invalid_noflush", "set_direct_map_default_noflush")
# The kernel's TLB invalidations (arch/x86/mm/tlb.c): flush_tlb_all (splits, collapses, cpa_flush
# over the 33-page ceiling), flush_tlb_kernel_range (vm_reset_perms, lazy vmap purges) and the
# one-page flush (cpa_flush's per-page INVLPG through __cpa_flush_tlb up to v6.17, and the pages
# of a small flush_tlb_kernel_range). Event name and fetch args per function.
TLB_PROBES = (
    ("flush_tlb_all", "tlb_all", ""),
    ("flush_tlb_kernel_range", "tlb_range", "start=%di:x64 end=%si:x64"),
    ("flush_tlb_one_kernel", "tlb_one", "addr=%di:x64"),
)

INIT = r"""#!/bin/busybox sh
# x86pt guest init: run the scripted workload, write every artefact to ttyS1 (a file on the host).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
T=/sys/kernel/tracing
[ -e $T/trace ] || T=/sys/kernel/debug/tracing
stty -F /dev/ttyS1 raw -echo
exec 3>/dev/ttyS1
ulimit -l unlimited
say() { echo "$@" >&3; }

say "@@BEGIN"
say "@@UNAME"; uname -r >&3
say "@@CMDLINE"; cat /proc/cmdline >&3
say "@@CPUFLAGS"; grep -m1 '^flags' /proc/cpuinfo >&3
say "@@IOMEM"; cat /proc/iomem >&3
# one pass over kallsyms: each grep of it costs about a second under TCG
grep -E ' (__SYMBOLS__)$' /proc/kallsyms > /tmp/ksyms
say "@@KALLSYMS"; cat /tmp/ksyms >&3

# Our ptdump module is itself a module load (CPA calls): load it before the baseline.
insmod /mods/x86pt_ptdump.ko init_mm_addr=0x$(grep ' init_mm$' /tmp/ksyms | cut -d' ' -f1) 2>&3
for f in __API__; do
  grep -q " $f\$" /tmp/ksyms && echo "p:cpa/$f $f addr=%di:x64 numpages=%si:s32" >> $T/kprobe_events 2>/dev/null
done
for f in __PAGE__; do
  grep -q " $f\$" /tmp/ksyms && echo "p:cpa/$f $f page=%di:x64" >> $T/kprobe_events 2>/dev/null
done
__TLB__
echo 1 > $T/events/cpa/enable
say "@@PROBES"; cat $T/kprobe_events >&3
sleep 1

collect() {
  say "@@STEP $1 $2"
  say "@@UPTIME"; cut -d' ' -f1 /proc/uptime >&3
  say "@@MEMINFO"; grep DirectMap /proc/meminfo >&3
  say "@@VMSTAT"; grep direct_map /proc/vmstat >&3
  say "@@TRACE"; grep -v '^#' $T/trace >&3; echo > $T/trace
  say "@@PTDUMP"; cat /sys/kernel/debug/x86pt/kernel >&3
  say "@@TABLES"; cat /sys/kernel/debug/x86pt/tables >&3
  say "@@ENDSTEP $1"
}

# /nsteps: "NNNN M": run steps 1..NNNN; M=1 pause after every step (one-boot mode), M=0 pause
# only after the last one (one boot per checkpoint)
read n every < /nsteps
checkpoint() {
  if [ "$every" = 1 ] || [ "$1" -eq "$n" ]; then
    say "@@PAUSE $1"
    sync
    pvpanic >&3 2>&3
  fi
}
collect 0 baseline
checkpoint 0
i=0
while IFS='|' read -r name cmd <&4; do
  i=$((i+1))
  [ $i -gt $n ] && break
  say "@@LOG $i"
  sh -c "$cmd" >&3 2>&3
  say "@@RC $?"
  # module init sections are freed by a kworker after insmod returns
  sleep 0.5
  collect $i "$name"
  checkpoint $i
done 4</steps.txt
say "@@END $n"
while :; do sleep 3600; done
"""

HELPERS_SH = r"""#!/bin/sh
# secretmem_hold N: touch N memfd_secret pages and keep them until secretmem_release
secretmem "$1" hold > /tmp/secretmem.out 2>&1 &
echo $! > /tmp/secretmem.pid
while ! grep -q held /tmp/secretmem.out 2>/dev/null; do sleep 0.05; done
cat /tmp/secretmem.out
"""
RELEASE_SH = r"""#!/bin/sh
kill $(cat /tmp/secretmem.pid)
while [ -d /proc/$(cat /tmp/secretmem.pid) ]; do sleep 0.05; done
echo released
"""


class Cpio:
    """newc ("070701") archive writer: the format the kernel's initramfs unpacker reads."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nm = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0)
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(head + nm + bytes(-(len(head) + len(nm)) % 4))
        self.buf.write(data + bytes(-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + bytes(-len(data) % 512)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OracleUnavailable(f"cannot read {path}: {e.strerror}") from None


def _module_bytes(modules_dir: str, rel: str) -> bytes:
    """A module as plain ELF: 6.12 ships .ko.xz (MODULE_COMPRESS_XZ), 6.1 plain .ko."""
    base = os.path.join(modules_dir, rel)
    if os.path.exists(base + ".ko"):
        return _read(base + ".ko")
    if os.path.exists(base + ".ko.xz"):
        return lzma.decompress(_read(base + ".ko.xz"))
    raise OracleUnavailable(f"module {rel} not in {modules_dir}")


def steps_archive(steps: int, pause_every: bool = False) -> bytes:
    """An uncompressed newc archive holding /nsteps, appended to the initramfs of each boot.

    The number of steps a boot runs is the only input that differs between checkpoint boots, so
    it must not change anything the kernel does before /init reads it: not the command line
    (it is mixed into the entropy pool, which moves page placement), and not compressed bytes
    (the inflate time differs). A fixed-width number in an uncompressed archive costs the same
    instructions to unpack whatever its value."""
    if not 0 <= steps <= 9999:
        raise BadInputError(f"step count {steps} out of range")
    a = Cpio()
    a.file("nsteps", b"%04d %d\n" % (steps, int(pause_every)))
    return a.finish()


def build_initramfs(
    out: str, *, busybox: str, modules_dir: str, ptdump_ko: str, helpers: dict[str, str], workload: Workload
) -> None:
    """Write the gzip'd initramfs for `workload` to `out` (atomically)."""
    a = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "mods"):
        a.dir(d)
    a.chardev("dev/console", 5, 1)
    a.file("bin/busybox", _read(busybox), 0o755)
    for name, path in helpers.items():
        a.file(f"bin/{name}", _read(path), 0o755)
    a.file("bin/secretmem_hold", HELPERS_SH.encode(), 0o755)
    a.file("bin/secretmem_release", RELEASE_SH.encode(), 0o755)
    a.file("mods/x86pt_ptdump.ko", _read(ptdump_ko))
    for rel in workload.modules:
        a.file(f"mods/{rel.rsplit('/', 1)[-1]}.ko", _module_bytes(modules_dir, rel))
    tlb = "\n".join(
        f'grep -q " {f}\\$" /tmp/ksyms && echo "p:cpa/{ev} {f} {args}" >> $T/kprobe_events 2>/dev/null'
        for f, ev, args in TLB_PROBES
    )
    init = (
        INIT.replace(
            "__SYMBOLS__",
            "|".join(LAYOUT_SYMBOLS + API_PROBES + PAGE_PROBES + tuple(f for f, _, _ in TLB_PROBES)),
        )
        .replace("__TLB__", tlb)
        .replace("__API__", " ".join(API_PROBES))
        .replace("__PAGE__", " ".join(PAGE_PROBES))
    )
    a.file("init", init.encode(), 0o755)
    for s in workload.steps:
        if "|" in s.name or "|" in s.command or "\n" in s.command:
            raise BadInputError(f"workload step {s.name!r}: no '|' or newline allowed")
    a.file("steps.txt", "".join(f"{s.name}|{s.command}\n" for s in workload.steps).encode())
    from x86pt.memory.atomic import write_bytes_atomic  # lazy: start-up time

    write_bytes_atomic(out, gzip.compress(a.finish(), compresslevel=1, mtime=0))
