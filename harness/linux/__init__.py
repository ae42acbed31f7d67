"""Ground truth from a real Linux kernel: fetch Debian's kernel packages,
build the guest pieces, boot under QEMU TCG deterministically, collect per step the CPA trace,
counters, the kernel's ptdump text, the layout and a page-table image.

Nothing of the kernel is kept in the repository; it all lives in the cache directory
(`cache_dir()`: $X86PT_CACHE/linux, else ~/.cache/x86pt/linux).
"""

from __future__ import annotations

import os

KERNELS = ("6.1", "6.12")
# The guest workloads by name (harness/linux/initramfs.py: WORKLOADS holds them; this list lets the
# command line offer them without importing that module: tests/test_linux_cli.py checks both agree).
WORKLOAD_NAMES = ("boot", "bpf", "modules", "secretmem", "secretmem1g")


def cache_dir() -> str:
    """Where packages, unpacked trees and builds live (outside the repository)."""
    base = os.environ.get("X86PT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "x86pt")
    return os.path.join(base, "linux")
