"""The oracle registry: `get_oracle(name)` imports a backend only when asked for it, and
`availability(name)` says whether it can run here and, if not, why (for need_oracle skips).

    unicorn       harness.oracles.unicorn_oracle.UnicornOracle   (in-process)
    qemu          harness.oracles.qemu.QemuOracle                (qemu-system-x86_64 + probe guest)
    kvm           harness.oracles.kvm.KvmOracle                  (/dev/kvm + probe guest)
    qemu-monitor  harness.oracles.qemu_monitor                   (translation-only monitor queries)
    model         harness.oracles.model.ModelOracle              (x86pt's own walker; tests)
"""
from __future__ import annotations

import importlib
import inspect
import os
import shutil
from typing import Any

from harness.oracles.base import Oracle
from x86pt.errors import OracleUnavailable

BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unicorn": ("harness.oracles.unicorn_oracle", ("UnicornOracle",)),
    "qemu": ("harness.oracles.qemu", ("QemuOracle",)),
    "kvm": ("harness.oracles.kvm", ("KvmOracle",)),
    "qemu-monitor": ("harness.oracles.qemu_monitor", ("QemuMonitorOracle", "MonitorOracle",
                                                      "QemuMonitor")),
    "model": ("harness.oracles.model", ("ModelOracle",)),
}
# The oracles `--oracle all` means (the model compared with itself proves nothing).
REAL_ORACLES = ("unicorn", "qemu", "kvm")


def oracle_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def _module(name: str):
    if name not in BACKENDS:
        raise OracleUnavailable(f"unknown oracle {name!r} (one of {', '.join(BACKENDS)})")
    modname = BACKENDS[name][0]
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            raise OracleUnavailable(f"{name}: backend module {modname} is not present") from None
        raise OracleUnavailable(f"{name}: {modname} needs the missing module {e.name}") from None
    except ImportError as e:
        raise OracleUnavailable(f"{name}: cannot import {modname}: {e}") from None


def _class(name: str, mod) -> type:
    for cls_name in BACKENDS[name][1]:
        cls = getattr(mod, cls_name, None)
        if inspect.isclass(cls):
            return cls
    # A backend whose class is named otherwise: the one class that looks like an Oracle.
    found = [c for _, c in inspect.getmembers(mod, inspect.isclass)
             if c.__module__ == mod.__name__ and hasattr(c, "run") and hasattr(c, "capabilities")]
    if len(found) == 1:
        return found[0]
    raise OracleUnavailable(f"{name}: {mod.__name__} defines no oracle class "
                            f"({' or '.join(BACKENDS[name][1])})")


def _host_check(name: str) -> str | None:
    """A cheap reason the oracle cannot run here, before importing anything heavy."""
    if name == "unicorn":
        try:
            import unicorn  # noqa: F401
        except ImportError:
            return "the unicorn package is not installed (pip install unicorn==2.1.4)"
    elif name in ("qemu", "qemu-monitor"):
        if shutil.which("qemu-system-x86_64") is None:
            return ("qemu-system-x86_64 is not installed "
                    "(apt-get install --no-install-recommends qemu-system-x86)")
    elif name == "kvm":
        try:
            fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            return f"/dev/kvm cannot be opened: {e.strerror}"
        os.close(fd)
    return None


def availability(name: str) -> tuple[bool, str]:
    """(available, reason). Asks the backend's own `available()` when it has one."""
    reason = _host_check(name) if name in BACKENDS else f"unknown oracle {name!r}"
    if reason:
        return False, reason
    try:
        mod = _module(name)
        _class(name, mod)
    except OracleUnavailable as e:
        return False, str(e)
    probe = next((getattr(mod, fn) for fn in ("available", "kvm_usable", "qemu_available")
                  if callable(getattr(mod, fn, None))), None)
    if callable(probe):
        try:
            res = probe()
        except Exception as e:   # a backend's self-check failing is a reason, not a crash
            return False, f"{name}: availability check failed: {type(e).__name__}: {e}"
        if isinstance(res, tuple):
            ok, why = bool(res[0]), str(res[1]) if len(res) > 1 else ""
        else:
            ok, why = bool(res), ""
        if not ok:
            return False, why or f"{name}: backend reports it is unavailable"
    return True, ""


def get_oracle(name: str, **kwargs: Any) -> Oracle:
    """A ready oracle. Raises OracleUnavailable with the reason when it cannot run here."""
    reason = _host_check(name) if name in BACKENDS else None
    if reason:
        raise OracleUnavailable(f"{name}: {reason}")
    mod = _module(name)
    cls = _class(name, mod)
    try:
        return cls(**kwargs)
    except OracleUnavailable:
        raise
    except OSError as e:
        raise OracleUnavailable(f"{name}: {e}") from None
