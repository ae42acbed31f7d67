#!/bin/sh
# Install QEMU (qemu-system-x86_64) for the x86pt oracle rig, if it is missing.
# docs/oracles.md §4.1: qemu-system-x86 is the smallest Debian package that ships
# qemu-system-x86_64; --no-install-recommends keeps it to ~30 packages / ~85 MB.
# Exit 0 when QEMU is present afterwards, non-zero otherwise.
# SPDX-License-Identifier: GPL-2.0-or-later
set -u
. "$(dirname "$0")/apt_install.sh"

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "install_qemu: already installed: $(qemu-system-x86_64 --version | head -n 1)"
    exit 0
fi

apt_install install_qemu qemu-system-x86_64 qemu-system-x86 || exit 1

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "install_qemu: installed: $(qemu-system-x86_64 --version | head -n 1)"
    exit 0
fi
echo "install_qemu: qemu-system-x86_64 still missing after the install" >&2
exit 1
