"""The oracle registry: oracles by name. A name is either registered under the entry-point group
`x86pt.oracles` (x86pt/plugins.py; the rig's own oracles are registered that way in pyproject.toml,
exactly as a third party's would be) or `cmd:PROGRAM ARGS`, an external program speaking the
command-oracle protocol (x86pt/cmdoracle.py). The interface the oracles implement is in
x86pt/oracle.py; docs/design.md §4.7 describes both.
"""

from __future__ import annotations

import inspect
from typing import Any

from x86pt.errors import BadInputError, OracleUnavailable
from x86pt.oracle import Oracle


# A name "cmd:PROGRAM ARGS" is an external program speaking the command-oracle protocol
# (x86pt/cmdoracle.py, docs/oracle-protocol.md); it needs no registration.
CMD_PREFIX = "cmd:"


def is_command(name: str) -> bool:
    return name.startswith(CMD_PREFIX)


def oracle_names() -> tuple[str, ...]:
    """Every oracle registered under the `x86pt.oracles` entry-point group, sorted."""
    from x86pt.plugins import ORACLES, entry_points

    return tuple(sorted(entry_points(ORACLES)))


def oracle_class(name: str) -> type:
    """The class registered as `name`; OracleUnavailable when the name is unknown or its package
    cannot be imported here (with the missing module named)."""
    if is_command(name):
        from x86pt.cmdoracle import CmdOracle

        return CmdOracle
    from x86pt.plugins import ORACLES, entry_points, load

    eps = entry_points(ORACLES)
    if name not in eps:
        raise OracleUnavailable(f"unknown oracle {name!r} (one of {', '.join(sorted(eps)) or 'none'})")
    try:
        cls = load(eps[name])
    except ModuleNotFoundError as e:
        raise OracleUnavailable(f"{name}: {eps[name]} needs the missing module {e.name}") from None
    except (ImportError, AttributeError) as e:
        raise OracleUnavailable(f"{name}: cannot load {eps[name]}: {e}") from None
    if not inspect.isclass(cls) or not callable(getattr(cls, "run", None)):
        raise OracleUnavailable(f"{name}: {eps[name]} is not an oracle class (no run method)")
    return cls


def availability(name: str) -> tuple[bool, str]:
    """(available, reason): the class's own `available()` when it has one."""
    if is_command(name):
        from x86pt.cmdoracle import program_available

        return program_available(name[len(CMD_PREFIX) :])
    try:
        cls = oracle_class(name)
    except OracleUnavailable as e:
        return False, str(e)
    check = getattr(cls, "available", None)
    if not callable(check):
        return True, ""
    try:
        res = check()
    except Exception as e:  # a backend's self-check failing is a reason, not a crash
        return False, f"{name}: availability check failed: {type(e).__name__}: {e}"
    ok, why = (
        (bool(res[0]), str(res[1]) if len(res) > 1 else "") if isinstance(res, tuple) else (bool(res), "")
    )
    return (True, "") if ok else (False, why or f"{name}: backend reports it is unavailable")


def all_oracles() -> tuple[str, ...]:
    """The oracles `--oracle all` means: every registered one whose class does not set
    `in_all = False` (a class that cannot load here is kept, so its reason is reported)."""
    out = []
    for name in oracle_names():
        try:
            cls = oracle_class(name)
        except OracleUnavailable:
            out.append(name)
            continue
        if getattr(cls, "in_all", True):
            out.append(name)
    return tuple(out)


def get_oracle(name: str, **kwargs: Any) -> Oracle:
    """A ready oracle. Raises OracleUnavailable with the reason when it cannot run here."""
    ok, why = availability(name)
    if not ok:
        raise OracleUnavailable(
            why if why.startswith(f"{name}:") or why.startswith("unknown") else f"{name}: {why}"
        )
    cls = oracle_class(name)
    try:
        oracle: Oracle = cls(name[len(CMD_PREFIX) :], **kwargs) if is_command(name) else cls(**kwargs)
        return oracle
    except OracleUnavailable:
        raise
    except OSError as e:
        raise OracleUnavailable(f"{name}: {e}") from None


def oracle_list(text: str, *, what: str = "--oracle") -> list[str]:
    """The oracles a comma list names ("all": all_oracles()); BadInputError for an unknown name.
    A "cmd:PROGRAM ARGS" item runs to the end of the text (its arguments may hold commas)."""
    head, sep, command = text.partition(CMD_PREFIX)
    if sep and head.strip() and not head.rstrip().endswith(","):
        raise BadInputError(f"{what} {text!r}: {CMD_PREFIX} starts an item of the list")
    names = [n.strip() for n in head.split(",") if n.strip()]
    if sep:
        if not command.strip():
            raise BadInputError(f"{what} {text!r}: {CMD_PREFIX} names no program ({CMD_PREFIX}PROGRAM ARGS)")
        if names == ["all"]:
            raise BadInputError(f"{what} {text!r}: all cannot be combined with {CMD_PREFIX}")
        known = oracle_names()
        bad = [n for n in names if n not in known]
        if bad:
            raise BadInputError(
                f"{what} {text!r}: unknown oracle {bad[0]!r} (one of {', '.join(known)}, all, "
                f"{CMD_PREFIX}PROGRAM ARGS)"
            )
        return names + [CMD_PREFIX + command.strip()]
    if names == ["all"]:
        return list(all_oracles())
    known = oracle_names()
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise BadInputError(
            f"{what} {text!r}: unknown oracle {bad[0] if bad else ''!r} "
            f"(one of {', '.join(known)}, all, {CMD_PREFIX}PROGRAM ARGS)"
        )
    return names
