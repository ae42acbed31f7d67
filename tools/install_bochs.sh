#!/bin/sh
# Install Bochs (the "bochs" oracle of the x86pt rig), if it is missing; idempotent.
# docs/oracles.md "Bochs": Debian 12 ships Bochs 2.7. The rig needs four packages, installed
# with --no-install-recommends:
#   bochs       the emulator (with the built-in debugger the oracle drives through -rc)
#   bochsbios   Bochs' BIOS package (the emulator depends on it; the rig boots its own ROM)
#   bochs-term  the "term" display library: Debian's build has no "nogui" library
#   vgabios     the VGA ROM Bochs refuses to start without (/usr/share/vgabios/vgabios-stdvga.bin)
# Prints the installed version. Exit 0 when Bochs is usable afterwards, non-zero otherwise.
# SPDX-License-Identifier: GPL-2.0-or-later
set -u
. "$(dirname "$0")/apt_install.sh"
PKGS="bochs bochsbios bochs-term vgabios"
VGAROM=/usr/share/vgabios/vgabios-stdvga.bin

version() {
    # Bochs has no --version; its banner names the version (e.g. "Bochs x86 Emulator 2.7").
    if command -v dpkg-query >/dev/null 2>&1; then
        dpkg-query -W -f='bochs ${Version}\n' bochs 2>/dev/null && return 0
    fi
    echo "bochs (version unknown)"
}

have_all() {
    command -v bochs >/dev/null 2>&1 || return 1
    [ -f "$VGAROM" ] || return 1
    if command -v dpkg-query >/dev/null 2>&1; then
        for p in $PKGS; do
            dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
        done
    fi
    return 0
}

if have_all; then
    echo "install_bochs: already installed: $(version)"
    exit 0
fi

# shellcheck disable=SC2086
apt_install install_bochs Bochs $PKGS || exit 1

if have_all; then
    echo "install_bochs: installed: $(version)"
    exit 0
fi
echo "install_bochs: Bochs still incomplete after the install (bochs on PATH, $VGAROM)" >&2
exit 1
