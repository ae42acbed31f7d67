# Sourced by tools/install_qemu.sh and tools/install_bochs.sh (not run on its own): install
# Debian packages with --no-install-recommends, as root, waiting for the dpkg lock (other
# engineers may run apt at the same time) instead of failing.
# SPDX-License-Identifier: GPL-2.0-or-later

# apt_install TAG WHAT PACKAGE...: TAG prefixes every message, WHAT names what is missing.
# Returns 0 when apt-get installed the packages, 1 otherwise (the reason on stderr).
apt_install() {
    tag=$1
    what=$2
    shift 2
    if [ "$(id -u)" != "0" ]; then
        echo "$tag: $what is missing and we are not root; run as root:" >&2
        echo "  apt-get update && apt-get install -y --no-install-recommends $*" >&2
        return 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$tag: $what is missing and apt-get is not available" >&2
        return 1
    fi
    echo "$tag: running apt-get update"
    if ! apt-get -o DPkg::Lock::Timeout=300 update -qq; then
        echo "$tag: apt-get update failed" >&2
        return 1
    fi
    echo "$tag: installing $* (--no-install-recommends)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
            --no-install-recommends "$@"; then
        echo "$tag: apt-get install $* failed" >&2
        return 1
    fi
    return 0
}
