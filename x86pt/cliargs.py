"""Argument groups several commands share. Nothing heavy is imported here: building the whole
argument tree (`x86pt --help`) must not load numpy, construct or the scanner."""

# SPDX-License-Identifier: GPL-2.0-or-later
from __future__ import annotations

import argparse


def add_state_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("paging state (default: from the ELF core's notes)")
    for reg in ("cr0", "cr3", "cr4", "efer", "pkru", "pkrs"):
        g.add_argument(f"--{reg}", metavar="N", help=f"{reg.upper()} (decimal or 0x-hex)")
    g.add_argument("--maxphyaddr", metavar="M", help="MAXPHYADDR (default: the profile's)")
    g.add_argument("--profile", default=None, help="intel (default), amd, qemu, unicorn or kvm")
    g.add_argument(
        "--image-format",
        dest="image_format",
        choices=("elf", "lime", "raw"),
        help="image format (default: detected from the first bytes)",
    )


def image_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The add_state_args options of a parsed command line as x86pt.image.open_image keywords."""
    keys = ("image_format", "cr0", "cr3", "cr4", "efer", "pkru", "pkrs", "maxphyaddr", "profile")
    return {k: getattr(args, k, None) for k in keys}


def add_cost_args(p: argparse.ArgumentParser) -> None:
    """--cost PATTERN and its knobs, for a command that has a direct map to price."""
    p.add_argument(
        "--cost",
        default=None,
        metavar="PATTERN",
        help="dTLB reach and page-walk cost for an access pattern: uniform, hot:N (N GiB "
        "of random 2M regions), trace:FILE (physical addresses), workload (cpa only)",
    )
    p.add_argument(
        "--tlb-geometry",
        default="skylake",
        metavar="GEOM",
        help="TLB sizes for --cost: skylake (Intel opt. manual 248966-045 Table 2-15) or "
        "qemu, then overrides, e.g. skylake,stlb=2048/16,pde=32 (docs/cost.md)",
    )
    p.add_argument(
        "--cost-mode",
        default="analytic",
        choices=("analytic", "simulated"),
        help="--cost estimate: analytic (steady state, fully associative LRU) or simulated",
    )
    p.add_argument("--cost-seed", default=1, type=int, metavar="S", help="seed of hot:N and the simulation")
