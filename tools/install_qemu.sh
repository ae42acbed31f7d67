#!/bin/sh
# Install QEMU (qemu-system-x86_64) for the x86pt oracle rig, if it is missing.
# docs/oracles.md §4.1: qemu-system-x86 is the smallest Debian package that ships
# qemu-system-x86_64; --no-install-recommends keeps it to ~30 packages / ~85 MB.
# Exit 0 when QEMU is present afterwards, non-zero otherwise.
# SPDX-License-Identifier: GPL-2.0-or-later
set -u
# Other engineers may run apt at the same time: wait for the dpkg lock instead of failing.

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "install_qemu: already installed: $(qemu-system-x86_64 --version | head -n 1)"
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "install_qemu: qemu-system-x86_64 is missing and we are not root; run as root:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends qemu-system-x86" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_qemu: qemu-system-x86_64 is missing and apt-get is not available" >&2
    exit 1
fi

echo "install_qemu: running apt-get update"
if ! apt-get -o DPkg::Lock::Timeout=300 update -qq; then
    echo "install_qemu: apt-get update failed" >&2
    exit 1
fi
echo "install_qemu: installing qemu-system-x86 (--no-install-recommends)"
if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends qemu-system-x86; then
    echo "install_qemu: apt-get install qemu-system-x86 failed" >&2
    exit 1
fi

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "install_qemu: installed: $(qemu-system-x86_64 --version | head -n 1)"
    exit 0
fi
echo "install_qemu: qemu-system-x86_64 still missing after the install" >&2
exit 1
