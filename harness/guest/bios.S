/*
 * x86pt QEMU reset trampoline: a 64 KiB -bios image that takes the CPU from the reset state to
 * the probe guest in 64-bit mode (docs/oracles.md §4).  SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The ROM is mapped at 0xffff0000-0xffffffff.  After reset CS.base is 0xffff0000 and IP 0xfff0,
 * so execution starts 16 bytes below the top of this file.  Steps:
 *   real mode    lgdt (GDT inside this ROM), CR0.PE=1, far jump to 32-bit code
 *   32-bit       CR4 <- boot_cr4 (PAE, and LA57 when the test uses 5-level paging: LA57 can only
 *                change outside IA-32e mode, SDM §4.1.1), CR3 <- boot_cr3 (identity 0-4 GiB, so
 *                this ROM stays mapped while paging turns on, plus the harness slot),
 *                EFER <- boot_efer (LME|NXE), CR0.PG=1 -> IA-32e mode (SDM Vol. 3A,
 *                "Initializing IA-32e Mode"), far jump to a 64-bit code segment
 *   64-bit       jump to the probe guest at 0xffffffff80100000 (GPA 0x100000 via the slot)
 * The boot block is written by harness/guest/prepare_ram at params+0x100 (GPA 0x108100).
 * No stack and no interrupts are used (IF stays 0 from reset; cli anyway).
 *
 * Everything is position-independent with respect to the link address: absolute addresses are
 * ROM_BASE + (label - rom_start), so `as` resolves them and objcopy can take .text directly.
 */
	.set ROM_BASE,      0xffff0000
	.set BOOT_CR3,      0x108100
	.set BOOT_CR4,      0x108108
	.set BOOT_EFER,     0x108110
	.set GUEST_ENTRY,   0xffffffff80100000
	.set MSR_EFER,      0xc0000080
	.set EFER_LMA,      0x400
	.set CR0_PE,        0x1
	.set CR0_PG,        0x80000000
	.set SEL_CODE32,    0x08
	.set SEL_DATA,      0x10
	.set SEL_CODE64,    0x18

	.text
	.code16
rom_start:
	cli
	cld
	/* Operand-size 32 so all 32 bits of the GDT base are loaded (SDM LGDT). */
	lgdtl	%cs:(gdt_desc - rom_start)
	movl	%cr0, %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	$SEL_CODE32, $(ROM_BASE + start32 - rom_start)

	.code32
start32:
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	BOOT_CR4, %eax
	movl	%eax, %cr4
	movl	BOOT_CR3, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	movl	BOOT_EFER, %eax
	movl	BOOT_EFER + 4, %edx
	/* LMA is set by the CPU when PG turns on; do not write it. */
	andl	$~EFER_LMA, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$(CR0_PG | CR0_PE), %eax
	movl	%eax, %cr0
	ljmpl	$SEL_CODE64, $(ROM_BASE + start64 - rom_start)

	.code64
start64:
	movabsq	$GUEST_ENTRY, %rax
	jmpq	*%rax

	.p2align 3, 0xf4
gdt:
	.quad	0
	.quad	0x00cf9b000000ffff	/* 0x08: 32-bit code, flat, accessed (no write into ROM) */
	.quad	0x00cf93000000ffff	/* 0x10: data, flat, accessed */
	.quad	0x00af9b000000ffff	/* 0x18: 64-bit code (L=1) */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	ROM_BASE + gdt - rom_start

	/* Reset vector.  A near jump from IP 0xfff3 to IP 0: real-mode IP arithmetic is modulo
	 * 64 KiB, so the displacement is 0x000d.  Spelled as bytes because as would reject a
	 * displacement of -0xfff3 as out of range for rel16. */
	.org	0xfff0, 0xf4
reset_vector:
	.byte	0xe9
	.word	(0x10000 - (reset_vector + 3 - rom_start)) & 0xffff
	.org	0x10000, 0xf4
