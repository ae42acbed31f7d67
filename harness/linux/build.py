"""Build the guest-side pieces with the machine's gcc: the ptdump module and the static helpers.

The ptdump module is ours: the stock Debian kernels have CONFIG_PTDUMP_DEBUGFS unset, but the
x86 dumper `ptdump_walk_pgd_level_debugfs(seq_file, mm, user)` is exported (GPL), so a module
that makes one debugfs file calling it with `init_mm` (address given as a parameter, from
/proc/kallsyms: init_mm itself is not exported) brings the kernel's own text back. The kernel's text format is the ground truth for `x86pt dump
--format ptdump`; nothing of the dumper is reimplemented here.

The module's second file, `tables`, is the in-guest image dumper: it copies every table page
reachable from init_mm's PGD (present non-leaf entries; a PS entry at PMD/PUD level is a leaf,
SDM 4.5) as text, each page as runs of entries that step by a constant (a direct-map PTE page is
one run). Reading it costs no pause: pausing QEMU mid-run perturbs icount (QEMU 7.2 warps the
virtual clock while stopping), so a run that pauses only once, after its last step, is
reproducible boot after boot and still has an image of every step.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from harness.linux.fetch import KernelTree
from x86pt.errors import OracleUnavailable
from x86pt.memory.atomic import write_text_atomic

PTDUMP_MODULE = "x86pt_ptdump"
DEBUGFS_FILE = "/sys/kernel/debug/x86pt/kernel"
TABLES_FILE = "/sys/kernel/debug/x86pt/tables"

MODULE_C = r"""// SPDX-License-Identifier: GPL-2.0-or-later
/* x86pt: the kernel's own page-table dump of init_mm at <debugfs>/x86pt/kernel. */
#include <linux/module.h>
#include <linux/debugfs.h>
#include <linux/seq_file.h>
#include <linux/mm.h>
#include <asm/special_insns.h>

static unsigned long init_mm_addr;
module_param(init_mm_addr, ulong, 0400);
MODULE_PARM_DESC(init_mm_addr, "address of init_mm (from /proc/kallsyms)");

static struct dentry *x86pt_dir;

static int x86pt_kernel_show(struct seq_file *m, void *unused)
{
	ptdump_walk_pgd_level_debugfs(m, (struct mm_struct *)init_mm_addr, false);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(x86pt_kernel);

/* <debugfs>/x86pt/tables: "T <pa> <level>" per table page, then "<index> <count> <entry>
 * <stride>" per run of non-zero entries where entry[index + k] = entry + k * stride. */
#define X86PT_MAX_TABLES 4096
#define X86PT_ADDR_MASK 0x000ffffffffff000ULL
static unsigned long x86pt_seen[X86PT_MAX_TABLES];
static int x86pt_nseen, x86pt_overflow;

static bool x86pt_mark(unsigned long pa)
{
	int i;

	for (i = 0; i < x86pt_nseen; i++)
		if (x86pt_seen[i] == pa)
			return false;
	if (x86pt_nseen == X86PT_MAX_TABLES) {
		x86pt_overflow = 1;
		return false;
	}
	x86pt_seen[x86pt_nseen++] = pa;
	return true;
}

static void x86pt_table(struct seq_file *m, unsigned long pa, int level)
{
	const u64 *t = (const u64 *)__va(pa);
	int i, j;

	if (!x86pt_mark(pa))
		return;
	seq_printf(m, "T %lx %d\n", pa, level);
	for (i = 0; i < 512; i = j) {
		u64 e = t[i], stride = 0;

		j = i + 1;
		if (!e)
			continue;
		if (j < 512 && t[j]) {
			stride = t[j] - e;
			while (j < 512 && t[j] && t[j] == e + (u64)(j - i) * stride)
				j++;
		}
		seq_printf(m, "%x %x %llx %llx\n", i, j - i, e, stride);
	}
	if (level == 1)
		return;
	for (i = 0; i < 512; i++) {
		u64 e = t[i];

		/* a PS entry in a PDPTE or PDE maps a page (SDM 4.5): not a table */
		if (!(e & 1) || ((level == 2 || level == 3) && (e & 0x80)))
			continue;
		x86pt_table(m, (unsigned long)(e & X86PT_ADDR_MASK), level - 1);
	}
}

static int x86pt_tables_show(struct seq_file *m, void *unused)
{
	struct mm_struct *mm = (struct mm_struct *)init_mm_addr;
	int levels = (native_read_cr4() & X86_CR4_LA57) ? 5 : 4;

	/* seq_file calls this again with a larger buffer when the text does not fit */
	x86pt_nseen = 0;
	x86pt_overflow = 0;
	preempt_disable();
	x86pt_table(m, (unsigned long)__pa(mm->pgd), levels);
	preempt_enable();
	seq_printf(m, "E %d %d\n", x86pt_nseen, x86pt_overflow);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(x86pt_tables);

static int __init x86pt_ptdump_init(void)
{
	if (!init_mm_addr)
		return -EINVAL;
	x86pt_dir = debugfs_create_dir("x86pt", NULL);
	debugfs_create_file("kernel", 0400, x86pt_dir, NULL, &x86pt_kernel_fops);
	debugfs_create_file("tables", 0400, x86pt_dir, NULL, &x86pt_tables_fops);
	return 0;
}

static void __exit x86pt_ptdump_exit(void)
{
	debugfs_remove_recursive(x86pt_dir);
}

module_init(x86pt_ptdump_init);
module_exit(x86pt_ptdump_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("x86pt: init_mm page-table dump for ground-truth collection");
"""

# memfd_secret(2) has no libc wrapper in bookworm's glibc: syscall 447 on x86-64.
SECRETMEM_C = r"""// SPDX-License-Identifier: GPL-2.0-or-later
/* secretmem N [hold]: map N pages of memfd_secret memory and touch each one, which takes them
 * out of the direct map; without "hold" exit (pages return to the direct map), with "hold"
 * print "held" and wait for SIGTERM. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1, page = sysconf(_SC_PAGESIZE), i;
	int fd = syscall(447, 0);
	char *p;

	if (fd < 0) { perror("memfd_secret"); return 1; }
	if (ftruncate(fd, n * page)) { perror("ftruncate"); return 1; }
	p = mmap(NULL, n * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) { perror("mmap"); return 1; }
	for (i = 0; i < n; i++)
		p[i * page] = 1;
	printf("secretmem: %ld pages touched\n", n);
	fflush(stdout);
	if (argc > 2 && !strcmp(argv[2], "hold")) {
		sigset_t s;
		int sig;
		sigemptyset(&s);
		sigaddset(&s, SIGTERM);
		sigprocmask(SIG_BLOCK, &s, NULL);
		printf("held\n");
		fflush(stdout);
		sigwait(&s, &sig);
	}
	return 0;
}
"""

# After the last step the guest asks QEMU to pause (pvpanic, -action panic=pause) so the host can
# read the page tables out of the RAM file while nothing runs.
PVPANIC_C = r"""// SPDX-License-Identifier: GPL-2.0-or-later
/* pvpanic: write PVPANIC_PANICKED (1) to the ISA pvpanic port 0x505. */
#include <stdio.h>
#include <sys/io.h>

int main(void)
{
	if (ioperm(0x505, 1, 1)) { perror("ioperm"); return 1; }
	outb(1, 0x505);
	return 0;
}
"""


def _run(cmd: list[str], cwd: str) -> None:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise OracleUnavailable(f"{cmd[0]} not found (gcc and make are needed)") from None
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise OracleUnavailable(f"{' '.join(cmd[:3])} failed: {tail}")


def build_module(tree: KernelTree) -> str:
    """Build the ptdump module against `tree`'s headers; return the .ko path (cached)."""
    out = os.path.join(tree.root, "build", "ptdump")
    ko = os.path.join(out, PTDUMP_MODULE + ".ko")
    src = os.path.join(out, PTDUMP_MODULE + ".c")
    if os.path.exists(ko) and _same(src, MODULE_C):
        return ko
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    write_text_atomic(src, MODULE_C)
    write_text_atomic(os.path.join(out, "Kbuild"), f"obj-m := {PTDUMP_MODULE}.o\n")
    # no pahole on the host: skip the BTF-for-modules step (the guest loads modules without it)
    _run(["make", "-s", "-C", tree.headers, f"M={out}", "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"], cwd=out)
    if not os.path.exists(ko):
        raise OracleUnavailable(f"module build left no {ko}")
    return ko


def build_helpers(tree: KernelTree) -> dict[str, str]:
    """Static helpers for the initramfs: secretmem and pvpanic. Returns name -> binary path."""
    out = os.path.join(tree.root, "build", "helpers")
    os.makedirs(out, exist_ok=True)
    bins = {}
    for name, code in (("secretmem", SECRETMEM_C), ("pvpanic", PVPANIC_C)):
        src = os.path.join(out, name + ".c")
        exe = os.path.join(out, name)
        if not (os.path.exists(exe) and _same(src, code)):
            write_text_atomic(src, code)
            _run(["gcc", "-O2", "-static", "-o", exe, src], cwd=out)
        bins[name] = exe
    return bins


def _same(path: str, text: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read() == text
    except OSError:
        return False
