#!/bin/sh
# Rebuild the probe guest's flat binaries from harness.S (GNU as/ld/objcopy).
# Usage: build.sh [OUTDIR]   (default: this directory).  SPDX-License-Identifier: GPL-2.0-or-later
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
as --64 -o "$tmp/harness.o" "$here/harness.S"
ld -nostdlib -static --build-id=none -z noexecstack -T "$here/link.ld" -o "$tmp/harness.elf" "$tmp/harness.o"
objcopy -O binary -j .text "$tmp/harness.elf" "$tmp/h_main.bin"
objcopy -O binary -j .ustub "$tmp/harness.elf" "$tmp/h_ustub.bin"
nm -n "$tmp/harness.elf" | awk '$2 ~ /[tTdD]/ {print $1, $3}' > "$tmp/h_main.sym"
mkdir -p "$out"
for f in h_main.bin h_ustub.bin h_main.sym; do
	cp "$tmp/$f" "$out/$f.new" && mv "$out/$f.new" "$out/$f"
done
