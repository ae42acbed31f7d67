/*
 * x86pt probe guest (docs/oracles.md §3).  SPDX-License-Identifier: GPL-2.0-or-later
 *
 * A 64-bit blob linked at 0xffffffff80100000 (guest-physical 0x100000, reached through the
 * harness slot PML4[511] / PML5[511]).  It is entered in 64-bit mode at its first byte with any
 * CR3 that maps the harness, switches to the test CR3/CR0/CR4/EFER/PKRU from the params block,
 * runs the probe array at CPL0 or CPL3 and records one result per probe.  The layout constants
 * must match harness/guest/__init__.py (tests/test_guest.py checks the symbols).
 */
	.set KBASE,        0xffffffff80000000
	.set PARAMS,       KBASE + 0x108000
	.set IDT,          KBASE + 0x109000
	.set KSTACK_TOP,   KBASE + 0x10b000	/* main loop stack */
	.set XSTACK_TOP,   KBASE + 0x10c000	/* TSS.RSP0: exceptions from CPL3 */
	.set USTUB,        KBASE + 0x10e000
	.set USTACK_TOP,   KBASE + 0x110000
	.set PROBES,       KBASE + 0x110000
	.set RESULTS,      KBASE + 0x150000

	/* params block (u64 each) */
	.set P_CR3,        0x00
	.set P_CR0,        0x08
	.set P_CR4,        0x10
	.set P_EFER,       0x18
	.set P_N,          0x20
	.set P_IDX,        0x28
	.set P_SAVED_RSP,  0x30
	.set P_CUR,        0x38
	.set P_STATUS,     0x40
	.set P_PKRU,       0x48
	.set P_FLAGS,      0x50
	.set P_PHASE,      0x58
	.set P_SETUP_REC,  0x80		/* 4 x u64: vector, error code, cr2, rip of a setup fault */

	.set F_WRPKRU,     0x1

	.set PR_KIND,      0x3		/* 0 read, 1 write, 2 fetch, 3 implicit read */
	.set K_IMPLICIT,   0x3
	.set PR_USER,      0x100
	.set PR_AC,        0x200
	.set PR_NOINVLPG,  0x400

	.set KCS, 0x08
	.set KDS, 0x10
	.set UDS, 0x1b
	.set UCS, 0x23
	.set TSS_SEL, 0x28
	.set LDT_SEL, 0x38
	/* LDT entry 0 with TI=1: RPL 0 for CPL0 probes, RPL 3 for CPL3 probes. */
	.set IMPL_SEL_K, 0x4
	.set IMPL_SEL_U, 0x7

	.set STATUS_DONE,  0x600d
	.set STATUS_SETUP, 0x0bad
	/* No #PF can report a non-canonical CR2, so this marks "CR2 not written". */
	.set CR2_SENTINEL, 0x8badf00d8badf00d
	.set EFLAGS_AC,    0x40000
	.set MSR_EFER,     0xc0000080

	.code64
	.text
	.globl _start
_start:
	cli
	movabs	$KSTACK_TOP, %rsp
	movabs	$PARAMS, %rbp
	lgdt	gdt_desc(%rip)
	/* Reload CS from our GDT: a far return is the 64-bit way. */
	pushq	$KCS
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	movl	$KDS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	/* 64-bit TSS descriptor at GDT+0x28 (SDM §8.2.3).  Type 0x89 also clears the busy bit a
	 * previous entry left, or ltr would #GP when the same vCPU runs again (docs/oracles.md §3). */
	leaq	tss(%rip), %rax
	leaq	gdt(%rip), %rdi
	movw	%ax, TSS_SEL+2(%rdi)
	shrq	$16, %rax
	movb	%al, TSS_SEL+4(%rdi)
	movb	$0x89, TSS_SEL+5(%rdi)
	movb	%ah, TSS_SEL+7(%rdi)
	shrq	$16, %rax
	movl	%eax, TSS_SEL+8(%rdi)
	movabs	$XSTACK_TOP, %rax
	movq	%rax, tss+4(%rip)
	movw	$TSS_SEL, %ax
	ltr	%ax

	/* IDT: vectors 0-31 -> 16-byte stubs, 64-bit interrupt gates, DPL 0, IST 0. */
	leaq	isr_table(%rip), %rsi
	movabs	$IDT, %rdi
	xorl	%ecx, %ecx
2:	movq	%rsi, %rax
	movw	%ax, 0(%rdi)
	movw	$KCS, 2(%rdi)
	movw	$0x8e00, 4(%rdi)
	shrq	$16, %rax
	movw	%ax, 6(%rdi)
	shrq	$16, %rax
	movl	%eax, 8(%rdi)
	movl	$0, 12(%rdi)
	addq	$16, %rsi
	addq	$16, %rdi
	incl	%ecx
	cmpl	$32, %ecx
	jb	2b
	lidt	idt_desc(%rip)

	/* Test registers.  EFER first (NXE may change what the boot tables mean: they have no XD
	 * bits), CR4 before CR3 (PCIDE is never set), CR0 last (WP). */
	movl	P_EFER(%rbp), %eax
	movl	P_EFER+4(%rbp), %edx
	movl	$MSR_EFER, %ecx
	wrmsr
	movq	P_CR4(%rbp), %rax
	movq	%rax, %cr4
	movq	P_CR3(%rbp), %rax
	movq	%rax, %cr3
	movq	P_CR0(%rbp), %rax
	movq	%rax, %cr0
	testq	$F_WRPKRU, P_FLAGS(%rbp)
	jz	3f
	movl	P_PKRU(%rbp), %eax
	xorl	%ecx, %ecx
	xorl	%edx, %edx
	wrpkru
3:	movq	$1, P_PHASE(%rbp)

next_probe:
	movq	P_IDX(%rbp), %rcx
	cmpq	P_N(%rbp), %rcx
	jae	all_done
	shlq	$5, %rcx
	movabs	$PROBES, %rsi
	addq	%rcx, %rsi
	movabs	$RESULTS, %rdi
	addq	%rcx, %rdi
	movq	%rdi, P_CUR(%rbp)
	movq	0(%rsi), %rbx		/* va */
	movq	8(%rsi), %r12		/* flags */
	movq	16(%rsi), %rdx		/* value a write stores */
	movabs	$CR2_SENTINEL, %rax
	movq	%rax, %cr2
	/* An implicit probe reads "LDT entry 0", so the LDT's base is the probe's VA: the
	 * descriptor load by `mov %eax, %es` is then an implicit supervisor-mode read of the
	 * probe's qword (SDM Vol. 3A §4.6: GDT/LDT accesses to load a segment descriptor), at CPL0
	 * or CPL3.  LLDT itself reads our GDT, a supervisor page. */
	movl	%r12d, %ecx
	andl	$PR_KIND, %ecx
	cmpl	$K_IMPLICIT, %ecx
	jne	9f
	leaq	gdt(%rip), %rdi
	movq	%rbx, %rax
	movw	%ax, LDT_SEL+2(%rdi)
	shrq	$16, %rax
	movb	%al, LDT_SEL+4(%rdi)
	movb	%ah, LDT_SEL+7(%rdi)
	shrq	$16, %rax
	movl	%eax, LDT_SEL+8(%rdi)
	movw	$LDT_SEL, %ax
	lldt	%ax
9:	testl	$PR_NOINVLPG, %r12d
	jnz	4f
	invlpg	(%rbx)
4:	movq	%rsp, P_SAVED_RSP(%rbp)
	xorl	%eax, %eax
	testl	$PR_USER, %r12d
	jnz	user_probe
	/* SMAP override: set AC through popfq, because kvm_pvm cannot emulate stac (§8 pitfall 2). */
	testl	$PR_AC, %r12d
	jz	5f
	pushfq
	orl	$EFLAGS_AC, (%rsp)
	popfq
5:	movl	%r12d, %ecx
	andl	$PR_KIND, %ecx
	cmpl	$1, %ecx
	je	k_write
	cmpl	$2, %ecx
	je	k_fetch
	cmpl	$K_IMPLICIT, %ecx
	je	k_implicit
	.globl k_read_insn
k_read_insn:
	movq	(%rbx), %rax
	jmp	probe_ok
	.globl k_write_insn
k_write:
k_write_insn:
	movq	%rdx, (%rbx)
	jmp	probe_ok
	.globl k_fetch_insn
k_fetch:
k_fetch_insn:
	call	*%rbx
	jmp	probe_ok
	/* The frames hold no valid descriptor (access byte 0: a system type), so a descriptor read
	 * that does not fault ends in #GP(selector) (SDM Vol. 2B MOV: "segment is not a data or
	 * readable code segment"): the host side takes that as "the read went through". */
k_implicit:
	movl	$IMPL_SEL_K, %eax
	.globl k_implicit_insn
k_implicit_insn:
	mov	%eax, %es
probe_ok:
	testl	$PR_AC, %r12d
	jz	6f
	pushq	$2
	popfq
6:	movq	P_CUR(%rbp), %rdi
	movq	$0xff, 0(%rdi)
	movq	$0, 8(%rdi)
	movq	$0, 16(%rdi)
	movq	%rax, 24(%rdi)
	incq	P_IDX(%rbp)
	jmp	next_probe

user_probe:
	/* iretq to the user stub for this kind; it ends in ud2 (int from CPL3 is #UD under
	 * kvm_pvm, §8 pitfall 1), and the #UD handler takes that as "access done". */
	movl	%r12d, %ecx
	andl	$PR_KIND, %ecx
	shll	$4, %ecx
	movabs	$USTUB, %rax
	addq	%rcx, %rax
	pushq	$UDS
	movabs	$USTACK_TOP, %rcx
	pushq	%rcx
	movl	%r12d, %ecx
	andl	$PR_AC, %ecx
	shll	$9, %ecx		/* PR_AC (bit 9) -> EFLAGS.AC (bit 18) */
	orl	$2, %ecx
	pushq	%rcx
	pushq	$UCS
	pushq	%rax
	xorl	%eax, %eax
	iretq

all_done:
	movq	$STATUS_DONE, P_STATUS(%rbp)
	movb	$0x10, %al		/* isa-debug-exit: QEMU exits with (0x10 << 1) | 1 = 33 */
finish:
	outb	%al, $0xf4
	hlt
	jmp	finish

	/* Stack on entry: vector, error code, rip, cs, rflags, rsp, ss. */
isr_common:
	movabs	$PARAMS, %rbp
	movq	%cr2, %r8
	movq	0(%rsp), %r9
	movq	8(%rsp), %r10
	movq	16(%rsp), %r11
	cmpq	$1, P_PHASE(%rbp)
	jne	setup_fault
	movq	P_CUR(%rbp), %rdi
	cmpq	$6, %r9
	jne	7f
	movabs	$USTUB, %rcx
	movq	%r11, %rdx
	subq	%rcx, %rdx
	cmpq	$0x1000, %rdx
	jae	7f
	movq	$0xff, 0(%rdi)
	movq	$0, 8(%rdi)
	movq	$0, 16(%rdi)
	movq	%rax, 24(%rdi)
	jmp	8f
7:	movq	%r9, 0(%rdi)
	movq	%r10, 8(%rdi)
	movq	%r8, 16(%rdi)
	movq	%r11, 24(%rdi)
8:	incq	P_IDX(%rbp)
	movq	P_SAVED_RSP(%rbp), %rsp
	pushq	$2			/* IF=0, AC=0 */
	popfq
	jmp	next_probe

setup_fault:
	movq	%r9, P_SETUP_REC+0(%rbp)
	movq	%r10, P_SETUP_REC+8(%rbp)
	movq	%r8, P_SETUP_REC+16(%rbp)
	movq	%r11, P_SETUP_REC+24(%rbp)
	movq	$STATUS_SETUP, P_STATUS(%rbp)
	movb	$0x11, %al
	jmp	finish

	/* Vectors with a CPU-pushed error code: 8, 10-14, 17, 21, 29, 30 (SDM Table 6-1). */
	.macro	isr v
	.balign	16, 0x90
	.if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
	pushq	$\v
	.else
	pushq	$0
	pushq	$\v
	.endif
	jmp	isr_common
	.endm

	.balign	16, 0x90
	.globl isr_table
isr_table:
	.irp	v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	isr	\v
	.endr

	.balign	8, 0xcc		/* int3, never zeros, between code and data (§8 pitfall 4) */
gdt:
	.quad	0
	.quad	0x00af9b000000ffff	/* 0x08 KCS: 64-bit code, DPL 0 */
	.quad	0x00cf93000000ffff	/* 0x10 KDS */
	.quad	0x00cff3000000ffff	/* 0x18 UDS (DPL 3), selector 0x1b */
	.quad	0x00affb000000ffff	/* 0x20 UCS: 64-bit code, DPL 3, selector 0x23 */
	.quad	0x0000890000000067	/* 0x28 TSS, base filled in at run time */
	.quad	0
	.quad	0x0000820000000007	/* 0x38 LDT (type 2), limit 7: base = an implicit probe's VA */
	.quad	0
gdt_end:
	.balign	8, 0
	.word	0, 0, 0
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt
	.word	0, 0, 0
idt_desc:
	.word	32 * 16 - 1
	.quad	IDT
	.balign	16, 0
tss:
	.fill	0x66, 1, 0
	.word	0x68			/* I/O map base = limit + 1: no I/O bitmap */
tss_end:

	/* User stubs: one per access kind at 16-byte steps, on a U=1 read-only page. */
	.section .ustub, "ax"
	.globl ustub_read
ustub_read:
	movq	(%rbx), %rax
	ud2
	.balign	16, 0x90
ustub_write:
	movq	%rdx, (%rbx)
	ud2
	.balign	16, 0x90
ustub_fetch:
	call	*%rbx
	ud2
	.balign	16, 0x90
ustub_implicit:
	movl	$IMPL_SEL_U, %eax
	mov	%eax, %es
	ud2
