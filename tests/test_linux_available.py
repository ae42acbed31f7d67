# SPDX-License-Identifier: GPL-2.0-or-later
"""When may the `linux` tests run? With the kernel in the cache (no network needed), or with the
Debian registry reachable; otherwise `available` says why (the skip reason, or the failure under
X86PT_REQUIRE_ORACLES=linux). No download and no boot here."""

from __future__ import annotations

import json
import shutil

import pytest

import harness.linux.fetch as fetch_mod
from harness.linux.run import available

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-system-x86_64", "gcc", "make", "dpkg-deb")),
    reason="QEMU, gcc, make or dpkg-deb missing",
)


def _offline(monkeypatch):
    def no_apt(*a, **k):
        raise fetch_mod.OracleUnavailable("apt-cache failed: Temporary failure resolving 'deb.debian.org'")

    monkeypatch.setattr(fetch_mod, "resolve", no_apt)
    monkeypatch.setattr(fetch_mod, "registry_reachable", lambda *a, **k: (False, "registry unreachable"))


def test_no_network_no_cache_says_why(tmp_path, monkeypatch):
    _offline(monkeypatch)
    ok, why = available("6.1", root=str(tmp_path))
    assert not ok and "not cached" in why and "deb.debian.org" in why


def test_cached_kernel_needs_no_network(tmp_path, monkeypatch):
    _offline(monkeypatch)
    rel = tmp_path / "6.1.0-99-amd64"
    rel.mkdir()
    (rel / "vmlinux").write_bytes(b"\x7fELF")
    tree = {k: str(rel / k) for k in ("root", "bzimage", "config", "modules", "headers", "busybox")}
    tree.update(line="6.1", release="6.1.0-99-amd64", version="6.1.0-1", vmlinux=str(rel / "vmlinux"))
    (rel / "fetched.json").write_text(json.dumps(tree))
    assert available("6.1", root=str(tmp_path)) == (True, "")
    assert fetch_mod.fetch("6.1", root=str(tmp_path)).release == "6.1.0-99-amd64"
    assert not available("6.12", root=str(tmp_path))[0]


def test_the_cli_offers_every_guest_workload():
    """harness.linux.WORKLOAD_NAMES (what `x86pt linux run --workload` offers without importing
    the initramfs builder) names exactly the workloads the builder has."""
    from harness.linux import WORKLOAD_NAMES
    from harness.linux.initramfs import WORKLOADS

    assert tuple(sorted(WORKLOADS)) == WORKLOAD_NAMES
