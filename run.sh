#!/usr/bin/env bash
# x86pt's one entry point for a fresh machine (Python 3.11 + pip, nothing else of ours):
#   bash run.sh          set up (.venv, the package and its PyPI dependencies, QEMU when root)
#                        and run the main job on the embedded example: `x86pt demo`
#   bash run.sh test     set up, then run the whole test suite (what .ci/run calls)
#   bash run.sh setup    set up only
# SPDX-License-Identifier: GPL-2.0-or-later
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="${X86PT_VENV:-$here/.venv}"
py="${PYTHON:-python3}"

setup() {
    if [ ! -x "$venv/bin/python" ]; then
        echo "run.sh: creating $venv" >&2
        "$py" -m venv "$venv"
    fi
    # Install (or refresh) x86pt with its test extras; quiet unless it fails.
    stamp="$venv/.x86pt-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        # pip's output goes to a log; its tail is shown when it fails.
        plog="$venv/install-pip.log"
        echo "run.sh: installing x86pt and its dependencies into $venv (log: $plog)" >&2
        if ! { "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip &&
               "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"; } \
               >"$plog" 2>&1; then
            tail -n 30 "$plog" >&2
            echo "run.sh: pip install failed (full log: $plog)" >&2
            exit 1
        fi
        touch "$stamp"
    fi
    # QEMU is an oracle of the rig (Debian's qemu-system-x86); installed when we may.
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        if [ "$(id -u)" = "0" ]; then
            # apt's output goes to a log; one line here, and the log's tail when it fails.
            log="$venv/install-qemu.log"
            echo "run.sh: installing QEMU (Debian's qemu-system-x86; log: $log)" >&2
            if ! sh tools/install_qemu.sh >"$log" 2>&1; then
                tail -n 20 "$log" >&2
                echo "run.sh: QEMU could not be installed; QEMU tests will skip" >&2
            fi
        else
            echo "run.sh: qemu-system-x86_64 missing (run as root to install it); QEMU tests will skip" >&2
        fi
    fi
    # Bochs is the rig's fourth oracle (Debian's bochs 2.7, headless); installed when we may.
    if ! command -v bochs >/dev/null 2>&1; then
        if [ "$(id -u)" = "0" ]; then
            log="$venv/install-bochs.log"
            echo "run.sh: installing Bochs (Debian's bochs; log: $log)" >&2
            sh tools/install_bochs.sh >"$log" 2>&1 || { tail -n 20 "$log" >&2; echo "run.sh: Bochs could not be installed; Bochs tests will skip" >&2; }
        else
            echo "run.sh: bochs missing (run as root to install it); Bochs tests will skip" >&2
        fi
    fi
}

oracles_here() {
    # The oracles this machine has: unicorn always (PyPI), qemu and bochs when installed, kvm when /dev/kvm opens.
    local list="unicorn"
    command -v qemu-system-x86_64 >/dev/null 2>&1 && list="$list,qemu"
    command -v bochs >/dev/null 2>&1 && list="$list,bochs"
    if "$venv/bin/python" - <<'PY' 2>/dev/null
import fcntl, os, sys
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
try:
    sys.exit(0 if fcntl.ioctl(fd, 0xAE00) == 12 else 1)
finally:
    os.close(fd)
PY
    then list="$list,kvm"; fi
    # linux: QEMU, gcc/make/dpkg-deb, and Debian's 6.1 kernel in the cache or downloadable (apt
    # knows it and the package registry answers one HEAD request; 5 s timeout, nothing fetched).
    if [ "${list#*qemu}" != "$list" ] && "$venv/bin/python" -c '
import sys
from harness.linux.run import available
sys.exit(0 if available("6.1")[0] else 1)' 2>/dev/null
    then list="$list,linux"; fi
    echo "$list"
}

case "${1:-demo}" in
    setup)
        setup ;;
    demo)
        setup
        shift || true
        exec "$venv/bin/python" -m x86pt demo "$@" ;;
    test)
        setup
        shift || true
        if [ "${CI:-}" = "true" ] && [ -z "${X86PT_REQUIRE_ORACLES:-}" ]; then
            export X86PT_REQUIRE_ORACLES="$(oracles_here)"
        fi
        echo "run.sh: X86PT_REQUIRE_ORACLES=${X86PT_REQUIRE_ORACLES:-}" >&2
        exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" ;;
    *)
        echo "usage: bash run.sh [demo|test|setup] [args...]" >&2
        exit 2 ;;
esac
