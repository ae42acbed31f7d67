# SPDX-License-Identifier: GPL-2.0-or-later
"""What one `x86pt linux run` is: its configuration (RunConfig) and the kernel command line it
implies, with the boot-time kprobes on __change_page_attr_set_clr placed from the kernel's BTF.
Every boot of a run uses the same command line (see initramfs.steps_archive)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.linux.btf import struct_members
from harness.linux.fetch import KernelTree
from harness.linux.initramfs import Workload
from x86pt.errors import BadInputError, OracleUnavailable

ICOUNT = "shift=0,sleep=off,align=off"
RTC = "base=2024-01-01T00:00:00,clock=vm"

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
