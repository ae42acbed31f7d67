# SPDX-License-Identifier: GPL-2.0-or-later
"""The command-oracle protocol, version 1 (docs/oracle-protocol.md): its messages, not the program
that speaks it (that is x86pt/cmdoracle.py).

* The JSON Schema (docs/oracle-protocol.schema.json, the same file as
  x86pt/data/oracle-protocol.schema.json) and `check`, a small validator of the keywords it uses;
  `check_result`, the same check with a fast path for the result lines of every batch.
* The JSON codecs of a probe line (docs/formats.md §2.1 plus `wvalue`) and a result line, both
  directions (x86pt writes probes and reads results; an adapter does the reverse).
* A case directory: `write_case` writes `case.json` (paths, state, RAM size), the image (an ELF
  core with the CPU-state notes, as x86pt.memory.write_image writes it, or a raw image) and the
  probes as JSONL; `read_case` is the adapter side.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from x86pt.errors import BadInputError
from x86pt.memory.sparse import SparseMemory
from x86pt.oracle import HARNESS_SLOT, RIG_IMAGE_BASE, Probe, ProbeResult
from x86pt.state import PagingState

PROTOCOL = 1
_SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "data", "oracle-protocol.schema.json")


# -- the schema and a small validator ---------------------------------------------------------------
_schema_cache: dict[str, Any] | None = None


def schema() -> dict[str, Any]:
    """The protocol's JSON Schema (docs/oracle-protocol.schema.json)."""
    global _schema_cache
    if _schema_cache is None:
        with open(_SCHEMA_FILE, encoding="utf-8") as f:
            _schema_cache = json.load(f)
    return _schema_cache


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_pattern_cache: dict[str, re.Pattern[str]] = {}


def _type_ok(v: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])


def check(value: Any, definition: str) -> str | None:
    """None when `value` is valid against `$defs/<definition>` of the schema, else the first
    violation as one line ("at $.cr2: ..."). Implements the keywords the schema uses: $ref, anyOf,
    type, enum, const, required, properties, additionalProperties (false), items, minimum,
    maximum, minLength, pattern (tests/test_cmd_oracle.py checks that no other keyword appears)."""
    s = schema()
    return _check(value, s["$defs"][definition], s, "$")


def _check(v: Any, sch: dict[str, Any], root: dict[str, Any], at: str) -> str | None:
    ref = sch.get("$ref")
    if ref is not None:
        return _check(v, root["$defs"][ref.rsplit("/", 1)[1]], root, at)
    alts = sch.get("anyOf")
    if alts is not None:
        errs = [_check(v, a, root, at) for a in alts]
        if all(errs):
            return f"at {at}: {_short(v)} matches none of the allowed forms ({'; '.join(e.split(': ', 1)[1] for e in errs if e)})"
        return None
    if "const" in sch and not (v == sch["const"] and type(v) is type(sch["const"])):
        return f"at {at}: expected {json.dumps(sch['const'])}, got {_short(v)}"
    if "enum" in sch and not any(v == e and type(v) is type(e) for e in sch["enum"]):
        return f"at {at}: {_short(v)} is not one of {', '.join(json.dumps(e) for e in sch['enum'])}"
    t = sch.get("type")
    if t is not None:
        ts = t if isinstance(t, list) else [t]
        if not any(_type_ok(v, x) for x in ts):
            return f"at {at}: expected {' or '.join(ts)}, got {_short(v)}"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in sch and v < sch["minimum"]:
            return f"at {at}: {v} is below {sch['minimum']}"
        if "maximum" in sch and v > sch["maximum"]:
            return f"at {at}: {v} is above {sch['maximum']}"
    if isinstance(v, str):
        if "minLength" in sch and len(v) < sch["minLength"]:
            return f"at {at}: empty string"
        pat = sch.get("pattern")
        if pat is not None:
            rx = _pattern_cache.get(pat) or _pattern_cache.setdefault(pat, re.compile(pat))
            if not rx.search(v):
                return f"at {at}: {_short(v)} does not match {pat}"
    if isinstance(v, dict):
        for k in sch.get("required", ()):
            if k not in v:
                return f"at {at}: {k!r} is missing"
        props = sch.get("properties", {})
        if sch.get("additionalProperties") is False:
            extra = [k for k in v if k not in props]
            if extra:
                return f"at {at}: unknown key {extra[0]!r}"
        for k, sub in props.items():
            if k in v:
                e = _check(v[k], sub, root, f"{at}.{k}")
                if e:
                    return e
    if isinstance(v, list) and "items" in sch:
        for i, x in enumerate(v):
            e = _check(x, sch["items"], root, f"{at}[{i}]")
            if e:
                return e
    return None


_OUTCOMES = ("ok", "page_fault", "general_protection")
_U64_KEYS = ("cr2", "pa", "value")


def check_result(d: Any) -> str | None:
    """check(d, "result"), with a fast path for the valid lines of every batch (about 20x faster
    than the general validator; tests/test_cmd_oracle.py checks that the two agree)."""
    return None if _result_ok(d) else check(d, "result")


def _result_ok(d: Any) -> bool:
    if type(d) is not dict:
        return False
    oc = d.get("outcome")
    if type(oc) is not str or oc not in _OUTCOMES:
        return False
    rx = _hex_rx()
    for k, v in d.items():
        if v is None and k != "detail" and k != "outcome":
            continue
        if k in _U64_KEYS:
            if type(v) is int:
                if not 0 <= v <= 0xFFFFFFFFFFFFFFFF:
                    return False
            elif type(v) is not str or not rx.search(v):
                return False
        elif k == "error_code":
            if type(v) is not int or not 0 <= v <= 0xFFFFFFFF:
                return False
        elif k == "vector":
            if type(v) is not int or not 0 <= v <= 255:
                return False
        elif k == "detail":
            if type(v) is not str:
                return False
    return True


def _hex_rx() -> re.Pattern[str]:
    pat = schema()["$defs"]["u64"]["anyOf"][1]["pattern"]
    return _pattern_cache.get(pat) or _pattern_cache.setdefault(pat, re.compile(pat))


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _u64(v: Any) -> int | None:
    if v is None:
        return None
    return v if isinstance(v, int) else int(v, 16)


# -- what x86pt writes -----------------------------------------------------------------------------
def probe_json(p: Probe) -> dict[str, Any]:
    """One probe line: docs/formats.md §2.1 plus wvalue (the value a write stores)."""
    d = {"va": hex(p.va), "access": p.access, "user": p.user, "ac": p.ac}
    if p.implicit:
        d["implicit"] = True
    if p.access == "write":
        d["wvalue"] = hex(p.wvalue)
    return d


def probe_from_json(d: dict[str, Any]) -> Probe:
    """A probe line back (the adapter side); BadInputError when it violates the schema."""
    err = check(d, "probe")
    if err:
        raise BadInputError(f"bad probe line: {err}")
    va, wvalue = _u64(d["va"]), _u64(d.get("wvalue", 0))
    assert va is not None and wvalue is not None  # the schema: both are u64 (never null)
    return Probe(
        va,
        d["access"],
        d.get("user", False),
        d.get("ac", False),
        wvalue,
        d.get("implicit", False),
    )


def result_json(r: ProbeResult) -> dict[str, Any]:
    """One result line (the adapter side)."""
    return {
        "outcome": r.outcome,
        "error_code": r.error_code,
        "cr2": None if r.cr2 is None else hex(r.cr2),
        "pa": None if r.pa is None else hex(r.pa),
        "value": None if r.value is None else hex(r.value),
        "vector": r.vector,
        **({"detail": r.detail} if r.detail else {}),
    }


def result_from_json(d: dict[str, Any]) -> ProbeResult:
    return ProbeResult(
        d["outcome"],
        d.get("error_code"),
        _u64(d.get("cr2")),
        _u64(d.get("pa")),
        _u64(d.get("value")),
        d.get("vector"),
        d.get("detail", ""),
    )


def write_case(
    case_dir: str,
    memory: SparseMemory,
    state: PagingState,
    probes: Sequence[Probe],
    image_format: str = "elf",
) -> dict[str, Any]:
    """Write a batch into `case_dir` (case.json, the image, probes.jsonl); returns the case dict."""
    from x86pt.memory import write_image

    image = os.path.join(case_dir, "image." + ("elf" if image_format == "elf" else "raw"))
    write_image(memory, state, image, image_format)
    probes_path = os.path.join(case_dir, "probes.jsonl")
    with open(probes_path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(probe_json(p), separators=(",", ":")) + "\n" for p in probes))
    case = {
        "protocol": PROTOCOL,
        "image": image,
        "image_format": image_format,
        "probes": probes_path,
        "probe_count": len(probes),
        "results": os.path.join(case_dir, "results.jsonl"),
        "memory_after": os.path.join(case_dir, "memory-after.elf"),
        "state": state.to_json(),
        "ram_size": memory.size,
        "rig_image_base": RIG_IMAGE_BASE,
        "harness_slot": HARNESS_SLOT,
    }
    with open(os.path.join(case_dir, "case.json"), "w", encoding="utf-8") as f:
        json.dump(case, f, indent=1)
        f.write("\n")
    return case


def read_case(case_dir: str) -> tuple[dict[str, Any], SparseMemory, PagingState, list[Probe]]:
    """The adapter side of write_case: (case dict, memory, state, probes). BadInputError on
    anything that is not a protocol-1 case."""
    from x86pt.memory import open_memory

    try:
        with open(os.path.join(case_dir, "case.json"), encoding="utf-8") as f:
            case = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInputError(f"{case_dir}/case.json: {e}") from None
    err = check(case, "case")
    if err:
        raise BadInputError(f"{case_dir}/case.json: {err}")
    state = PagingState.from_json(case["state"])
    mem = SparseMemory(case["ram_size"])
    src = open_memory(case["image"], case["image_format"])
    try:
        for seg in src.segments():
            mem.write(seg.start, src.read(seg.start, seg.size))
    finally:
        src.close()
    probes = []
    with open(case["probes"], encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    probes.append(probe_from_json(json.loads(line)))
                except (ValueError, BadInputError) as e:
                    raise BadInputError(f"{case['probes']}:{n}: {e}") from None
    return case, _drop_zero_pages(mem), state, probes


def _drop_zero_pages(mem: SparseMemory) -> SparseMemory:
    """An image written from SparseMemory holds whole segments; pages never written read as
    zeros either way, so all-zero pages are dropped to keep the copy as sparse as the original."""
    zero = bytes(4096)
    for pn in [pn for pn, page in mem.pages.items() if page == zero]:
        del mem.pages[pn]
    return mem
