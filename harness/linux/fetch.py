"""Fetch Debian's kernel packages by name with `apt-get download` and unpack them in the cache.

Which packages: the 6.1 image is what bookworm's `linux-image-amd64` depends on today; the 6.12
LTS image is what `linux-image-6.12-amd64` (bookworm-security) depends on. The headers package of
the same ABI name pulls in its `-common` package and `linux-kbuild-*`: those three build the
ptdump module. busybox-static gives the initramfs its shell.

The bzImage payload is unpacked to an uncompressed `vmlinux`, because QEMU's PVH entry boots it
about 3 s faster than the bzImage under TCG.
"""

from __future__ import annotations

import glob
import json
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from harness.linux import KERNELS, cache_dir
from x86pt.errors import BadInputError, OracleUnavailable
from x86pt.memory.atomic import write_bytes_atomic, write_text_atomic

# The meta-package whose Depends names the current image of each kernel line.
META_PACKAGE = {"6.1": "linux-image-amd64", "6.12": "linux-image-6.12-amd64"}


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel: everything later steps need, by path."""

    line: str  # "6.1" | "6.12"
    release: str  # uname -r, e.g. 6.1.0-56-amd64
    version: str  # Debian package version, e.g. 6.1.192-2
    root: str  # cache directory of this kernel
    vmlinux: str  # uncompressed ELF for -kernel (PVH)
    bzimage: str
    config: str
    modules: str  # lib/modules/<release>/kernel
    headers: str  # the unpacked linux-headers-<release> tree (Makefile rewritten)
    busybox: str  # static busybox binary

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _run(cmd: list[str], cwd: str | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise OracleUnavailable(f"{cmd[0]} not found (Debian's apt tools are needed)") from None
    except subprocess.TimeoutExpired:
        raise OracleUnavailable(f"{' '.join(cmd[:3])} timed out") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise OracleUnavailable(f"{' '.join(cmd[:4])} failed: {last}")
    return p.stdout


def _depends(package: str) -> list[str]:
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package])
    return [m.group(1) for m in re.finditer(r"^\s*(?:\|)?(?:Pre)?Depends:\s*(\S+)", out, re.M)]


def _version(package: str) -> str:
    out = _run(["apt-cache", "policy", package])
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise OracleUnavailable(f"apt has no candidate for {package} (run apt-get update)")
    return m.group(1)


def resolve(line: str) -> dict[str, str]:
    """Package names for kernel line `line`: image, headers (arch + common), kbuild, busybox."""
    if line not in KERNELS:
        raise BadInputError(f"unknown kernel {line!r} (choose {', '.join(KERNELS)})")
    image = next((d for d in _depends(META_PACKAGE[line]) if d.startswith("linux-image-")), None)
    if image is None:
        raise OracleUnavailable(f"{META_PACKAGE[line]} names no linux-image package (apt-get update?)")
    release = image[len("linux-image-") :]
    headers = f"linux-headers-{release}"
    deps = _depends(headers)
    common = next((d for d in deps if d.startswith("linux-headers-") and d.endswith("-common")), None)
    kbuild = next((d for d in deps if d.startswith("linux-kbuild-")), None)
    if common is None or kbuild is None:
        raise OracleUnavailable(f"{headers}: cannot find its -common and kbuild dependencies")
    return {
        "image": image,
        "headers": headers,
        "common": common,
        "kbuild": kbuild,
        "busybox": "busybox-static",
        "release": release,
    }


def _download(pkgs: list[str], dest: str) -> None:
    missing = [p for p in pkgs if not glob.glob(os.path.join(dest, f"{_deb_prefix(p)}_*.deb"))]
    if missing:
        _run(["apt-get", "download", "-q", *missing], cwd=dest)


def _deb_prefix(pkg: str) -> str:
    # apt-get download writes ':' in epochs as %3a, and keeps the package name as is
    return glob.escape(pkg)


def _deb(dest: str, pkg: str) -> str:
    found = sorted(glob.glob(os.path.join(dest, f"{_deb_prefix(pkg)}_*.deb")))
    if not found:
        raise OracleUnavailable(f"{pkg}: download produced no .deb")
    return found[-1]


def _extract(deb: str, into: str) -> None:
    os.makedirs(into, exist_ok=True)
    _run(["dpkg-deb", "-x", deb, into])


def unpack_vmlinux(bzimage: str, out: str) -> None:
    """Find the compressed payload in a bzImage by its magic and decompress it to an ELF."""
    with open(bzimage, "rb") as f:
        data = f.read()
    # xz is what Debian uses; zstd and gzip are tried too, in case a later build changes it
    for magic, how in ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08\x00", "gzip")):
        start = data.find(magic)
        while start >= 0:
            try:
                elf = _decompress(data[start:], how)
            except Exception:
                elf = b""
            if elf[:4] == b"\x7fELF":
                write_bytes_atomic(out, elf)
                return
            start = data.find(magic, start + 1)
    raise OracleUnavailable(f"{bzimage}: no xz/zstd/gzip payload decompresses to an ELF vmlinux")


def _decompress(blob: bytes, how: str) -> bytes:
    if how == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)
    if how == "gzip":
        import zlib

        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
    p = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, timeout=120)
    return p.stdout


PACKAGE_KEYS = ("image", "headers", "common", "kbuild", "busybox")


@dataclass(frozen=True)
class Plan:
    """What `fetch` of one kernel line will do: the packages, their download size (from apt's
    lists, before anything is downloaded) and where they go."""

    line: str
    release: str
    packages: dict[str, int]  # package -> .deb size in bytes (0: unknown)
    path: str  # the cache directory of this release
    cached: bool  # already downloaded and unpacked: nothing to fetch

    @property
    def download_bytes(self) -> int:
        return 0 if self.cached else sum(self.packages.values())

    def to_json(self) -> dict:
        return {
            "kernel": self.line,
            "release": self.release,
            "packages": self.packages,
            "path": self.path,
            "cached": self.cached,
            "download_bytes": self.download_bytes,
        }


def _sizes(pkgs: list[str]) -> dict[str, int]:
    out = _run(["apt-cache", "show", "--no-all-versions", *pkgs])
    sizes: dict[str, int] = {}
    name = None
    for line in out.splitlines():
        if line.startswith("Package:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Size:") and name in pkgs and name not in sizes:
            sizes[name] = int(line.split(":", 1)[1])
    return {p: sizes.get(p, 0) for p in pkgs}


def plan(line: str, root: str | None = None) -> Plan:
    names = resolve(line)
    base = os.path.join(root or cache_dir(), names["release"])
    cached = os.path.exists(os.path.join(base, "fetched.json"))
    return Plan(line, names["release"], _sizes([names[k] for k in PACKAGE_KEYS]), base, cached)


def cached_tree(line: str, root: str | None = None) -> KernelTree | None:
    """The newest cached tree of `line`, found without apt (for machines with no network)."""
    base = root or cache_dir()
    found = []
    for p in glob.glob(os.path.join(base, "*", "fetched.json")):
        try:
            with open(p, encoding="utf-8") as f:
                t = KernelTree(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if t.line == line and os.path.exists(t.vmlinux):
            found.append((os.path.getmtime(p), t))
    return max(found, key=lambda x: x[0])[1] if found else None


def registry_reachable(package: str = "busybox-static", timeout: float = 5.0) -> tuple[bool, str]:
    """Can apt download from here? apt prints the package's URL (no download); one HEAD request
    to it answers, in a few seconds at most, without fetching anything."""
    import urllib.request

    try:
        out = _run(["apt-get", "download", "--print-uris", "-q", package])
    except OracleUnavailable as e:
        return False, str(e)
    m = re.search(r"'((?:https?)://[^']+)'", out)
    if not m:
        return False, f"apt gives no http(s) URL for {package}"
    try:
        req = urllib.request.Request(m.group(1), method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return (r.status == 200), f"{m.group(1)}: HTTP {r.status}"
    except OSError as e:
        return False, f"Debian package registry unreachable ({m.group(1).split('/')[2]}): {e}"


def fetch(
    line: str, root: str | None = None, progress: Callable[[int, int, str], None] | None = None
) -> KernelTree:
    """Download (once) and unpack kernel line `line` into the cache; return its paths.
    `progress(done_bytes, total_bytes, package)` is called around each package's download.
    Without apt or network, a tree already in the cache is used."""
    try:
        names = resolve(line)
    except OracleUnavailable as e:
        tree = cached_tree(line, root)
        if tree is None:
            raise OracleUnavailable(f"kernel {line} is not cached and apt cannot resolve it: {e}") from None
        return tree
    release = names["release"]
    base = os.path.join(root or cache_dir(), release)
    debs = os.path.join(base, "debs")
    os.makedirs(debs, exist_ok=True)
    done = os.path.join(base, "fetched.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            return KernelTree(**json.load(f))
    pkgs = [names[k] for k in PACKAGE_KEYS]
    sizes = _sizes(pkgs) if progress else {}
    total, got = sum(sizes.values()), 0
    for p in pkgs:  # one at a time, so a progress bar can move
        if progress:
            progress(got, total, p)
        _download([p], debs)
        got += sizes.get(p, 0)
    if progress:
        progress(total, total, "")
    pkg = os.path.join(base, "pkg")
    hdr = os.path.join(base, "hdr")
    bb = os.path.join(base, "bb")
    for d in (pkg, hdr, bb):
        shutil.rmtree(d, ignore_errors=True)
    _extract(_deb(debs, names["image"]), pkg)
    for k in ("headers", "common", "kbuild"):
        _extract(_deb(debs, names[k]), hdr)
    _extract(_deb(debs, names["busybox"]), bb)
    headers = os.path.join(hdr, "usr", "src", f"linux-headers-{release}")
    _rewrite_abs_paths(headers, hdr)
    bzimage = os.path.join(pkg, "boot", f"vmlinuz-{release}")
    vmlinux = os.path.join(base, "vmlinux")
    unpack_vmlinux(bzimage, vmlinux)
    tree = KernelTree(
        line=line,
        release=release,
        version=_version(names["image"]),
        root=base,
        vmlinux=vmlinux,
        bzimage=bzimage,
        config=os.path.join(pkg, "boot", f"config-{release}"),
        modules=os.path.join(pkg, "lib", "modules", release, "kernel"),
        headers=headers,
        busybox=os.path.join(bb, "bin", "busybox"),
    )
    for p in (tree.config, tree.modules, tree.headers, tree.busybox):
        if not os.path.exists(p):
            raise OracleUnavailable(f"unpacked kernel {release} lacks {p}")
    write_text_atomic(done, json.dumps(tree.to_json(), indent=1))
    return tree


def _rewrite_abs_paths(headers: str, hdr_root: str) -> None:
    """The arch headers' Makefile includes /usr/src/linux-headers-*-common/... by absolute path:
    point it at the unpacked copy. Symlinks into /usr/lib/linux-kbuild-*
    are absolute too in some releases; re-aim those as well."""
    mk = os.path.join(headers, "Makefile")
    with open(mk, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"(?<![\w/])/usr/src/", os.path.join(hdr_root, "usr", "src") + "/", text)
    write_text_atomic(mk, text)
    for dirpath, dirnames, filenames in os.walk(headers):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                target = os.readlink(p)
                if target.startswith("/usr/"):
                    os.unlink(p)
                    os.symlink(os.path.join(hdr_root, target.lstrip("/")), p)
