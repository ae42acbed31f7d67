#!/bin/sh
# Rebuild bios.bin (the 64 KiB QEMU -bios trampoline) from bios.S with GNU as + objcopy.
# Usage: build_bios.sh [OUTDIR]   (default: this directory). Prints the size and sha256.
# SPDX-License-Identifier: GPL-2.0-or-later
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
as --64 -o "$tmp/bios.o" "$here/bios.S"
objcopy -O binary -j .text "$tmp/bios.o" "$tmp/bios.bin"
size=$(wc -c < "$tmp/bios.bin")
if [ "$size" -ne 65536 ]; then
	echo "build_bios: bios.bin is $size bytes, not 65536" >&2
	exit 1
fi
mkdir -p "$out"
cp "$tmp/bios.bin" "$out/bios.bin.new" && mv "$out/bios.bin.new" "$out/bios.bin"
echo "build_bios: $out/bios.bin $size bytes sha256 $(sha256sum "$out/bios.bin" | cut -d' ' -f1)"
