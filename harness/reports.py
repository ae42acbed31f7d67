"""What `x86pt conform` prints and writes, whichever way it ran (in this process, in local
processes, on a Dask cluster, or joined from shard reports by `x86pt conform merge`), and the
report file of `--json-report FILE` (docs/conformance-sweeps.md §3).

Every path hands the same `Reporter` the same things: mismatch records (harness.executors.
mismatch_record: JSON, text and repro of one mismatch, without a repro file yet) in case order, then
one summary dict per oracle. The Reporter writes the repro files (the first --max-repros), prints
the first --max-report mismatches (or every one as JSON with --json), the summary lines and the
closing `conform: M mismatches in N cases (...)` line, and keeps the report.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from typing import Callable

from x86pt.errors import BadInputError

REPORT_VERSION = 1
# The configuration keys two shard reports must agree on to be parts of one run.
CONFIG_KEYS = ("oracle", "profile", "cases", "extended", "seed", "limit", "sample", "per_tree")
_SUM_KEYS = ("cases", "probes", "mismatches")
_SECONDS_KEYS = ("model_seconds", "oracle_seconds", "build_seconds")


def selection(args) -> dict:
    """The conform options that choose the cases: profile, case kind, extended, seed, limit, sample."""
    return {
        "profile": args.profile,
        "cases": args.cases,
        "extended": bool(args.extended),
        "seed": args.seed,
        "limit": args.limit,
        "sample": args.sample,
    }


def run_config(args) -> dict:
    """What decides a run's cases and their outcomes (not how it ran: --batch, --jobs, executor)."""
    return {
        "oracle": args.oracle,
        **selection(args),
        "per_tree": args.per_tree if args.cases == "random" else None,
    }


def combine_summaries(name: str, parts: list[dict], seconds: float) -> dict:
    """One oracle's summary from its parts' summaries (Summary.to_json shape)."""
    out: dict = {"type": "summary", "oracle": name}
    for k in _SUM_KEYS:
        out[k] = sum(int(p.get(k, 0)) for p in parts)
    out["seconds"] = round(seconds, 3)
    for k in _SECONDS_KEYS:
        out[k] = round(sum(float(p.get(k, 0.0)) for p in parts), 3)
    out["oracle_cases_per_s"] = round(out["cases"] / out["oracle_seconds"]) if out["oracle_seconds"] else None
    out["model_cases_per_s"] = round(out["cases"] / out["model_seconds"]) if out["model_seconds"] else None
    skipped = sorted({p["skipped"] for p in parts if p.get("skipped")})
    if skipped:
        out["skipped"] = "; ".join(skipped)
    if any(p.get("interrupted") for p in parts):
        out["interrupted"] = True
    return out


def summary_line(s: dict) -> str:
    return (
        f"{s['oracle']}: {s['cases']} cases ({s['probes']} probes), {s['mismatches']} mismatches, "
        f"{s['seconds']:.1f} s; oracle {s['oracle_cases_per_s']} cases/s, "
        f"model {s['model_cases_per_s']} cases/s" + (" (interrupted)" if s.get("interrupted") else "")
    )


def repro_line(path: str, oracle: str) -> str:
    """The last line of a mismatch's text when it has a repro file (Mismatch.render), quoted so
    it can be pasted into a shell (a cmd: oracle's name holds spaces)."""
    return f"  repro: x86pt conform --repro {shlex.quote(path)} --oracle {shlex.quote(oracle)}"


class Reporter:
    def __init__(
        self, args, config: dict, shards: tuple[int, list[int]], *, keep: bool, max_kept: int = 10_000
    ) -> None:
        self.args = args
        self.config = config
        self.shards = shards
        self.keep = keep  # keep records for the report file
        self.max_kept = max_kept
        self.reported = 0
        self.total_cases = 0
        self.total_mm = 0
        self.ran: list[str] = []
        self.oracles: list[dict] = []
        self.skipped: list[dict] = []
        self._records: list[dict] = []
        self._dropped = 0
        self.extra: dict = {}

    # -- one mismatch --------------------------------------------------------------------------------
    def _repro_path(self, oracle: str, label: str) -> str | None:
        a = self.args
        if a.no_repro or self.reported >= a.max_repros:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{oracle}-{label}")
        return os.path.join(a.repro_dir, safe + ".json")

    def mismatch(self, rec: dict, write: Callable[[str], None] = print) -> None:
        from x86pt.cli import emit_json
        from x86pt.memory.atomic import write_text_atomic

        oracle = rec["json"]["oracle"]
        path = self._repro_path(oracle, rec["case"])
        text = rec["text"]
        if path:
            os.makedirs(self.args.repro_dir, exist_ok=True)
            write_text_atomic(path, json.dumps(rec["repro"] | {"file": path}, indent=1) + "\n")
            text += "\n" + repro_line(path, oracle)
        self.reported += 1
        if self.args.json:
            emit_json(rec["json"] | {"repro": path})
        elif self.reported <= self.args.max_report:
            write(text)
        if self.keep:
            if len(self._records) < self.max_kept:
                self._records.append(rec)
            else:
                self._dropped += 1

    def dropped(self, n: int) -> None:
        """Mismatches counted by a part but not carried back."""
        self._dropped += n

    # -- one oracle ----------------------------------------------------------------------------------------
    def oracle_done(self, summary: dict, caps: dict, extra: dict | None = None) -> None:
        from x86pt.cli import emit_json

        name = summary["oracle"]
        self.ran.append(name)
        self.total_cases += summary["cases"]
        self.total_mm += summary["mismatches"]
        if self.args.json:
            emit_json(summary | (extra or {}) | {"capabilities": caps})
        else:
            print(summary_line(summary))
        self.oracles.append(
            {
                "name": name,
                "summary": summary,
                "capabilities": caps,
                "mismatches": self._records,
                "dropped": self._dropped,
            }
        )
        self._records, self._dropped = [], 0

    def skip(self, name: str, reason: str) -> None:
        print(f"conform: skipping {name}: {reason}", file=sys.stderr)
        self.skipped.append({"oracle": name, "reason": reason})

    # -- the end ----------------------------------------------------------------------------------------------
    def report(self, interrupted: bool) -> dict:
        from x86pt import __version__

        count, done = self.shards
        return {
            "x86pt_conform_report": REPORT_VERSION,
            "x86pt_version": __version__,
            "config": self.config,
            "shards": {"count": count, "done": sorted(done)},
            **self.extra,
            "interrupted": bool(interrupted),
            "totals": {"cases": self.total_cases, "mismatches": self.total_mm},
            "oracles": self.oracles,
            "skipped": self.skipped,
        }

    def finish(self, interrupted: bool, report_file: str | None, inputs=()) -> int:
        from x86pt.memory.atomic import write_text_atomic

        if self.total_mm > self.args.max_report and not self.args.json:
            print(f"({self.total_mm - self.args.max_report} more mismatches not shown; --max-report N)")
        if report_file:
            write_text_atomic(
                report_file, json.dumps(self.report(interrupted), indent=1) + "\n", inputs=inputs
            )
        line = f"conform: {self.total_mm} mismatches in {self.total_cases} cases ({', '.join(self.ran)})"
        if interrupted:
            print(line + ", interrupted", flush=True)
            return 130
        print(line, flush=True)
        return 0 if self.total_mm == 0 else 1


# -- reading and joining reports ---------------------------------------------------------------------------
def load_report(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise BadInputError(f"cannot read report {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise BadInputError(f"report {path} is not JSON: {str(e).splitlines()[0][:120]}") from None
    what = f"{path}: not an x86pt conform report (written by `x86pt conform --json-report FILE`)"
    if not isinstance(d, dict) or d.get("x86pt_conform_report") is None:
        raise BadInputError(what)
    if d["x86pt_conform_report"] != REPORT_VERSION:
        raise BadInputError(
            f"{path}: conform report version {d['x86pt_conform_report']!r}, this x86pt "
            f"reads version {REPORT_VERSION}"
        )
    try:
        cfg, sh, ors = d["config"], d["shards"], d["oracles"]
        ok = (
            isinstance(cfg, dict)
            and all(k in cfg for k in CONFIG_KEYS)
            and isinstance(sh, dict)
            and isinstance(sh["count"], int)
            and sh["count"] >= 1
            and isinstance(sh["done"], list)
            and all(isinstance(i, int) and 1 <= i <= sh["count"] for i in sh["done"])
            and isinstance(ors, list)
        )
        for o in ors:
            s = o["summary"]
            ok = (
                ok
                and isinstance(o["name"], str)
                and isinstance(o["mismatches"], list)
                and all(isinstance(s[k], int) for k in _SUM_KEYS)
                and isinstance(o["capabilities"], dict)
            )
            for r in o["mismatches"]:
                ok = (
                    ok
                    and isinstance(r["case"], str)
                    and isinstance(r["text"], str)
                    and isinstance(r["json"], dict)
                    and isinstance(r["repro"], dict)
                    and r["json"].get("oracle") == o["name"]
                )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise BadInputError(what + "; it is malformed")
    return d


def merge_reports(reports: list[tuple[str, dict]]) -> dict:
    """Shard reports of one run, joined in shard order. Refuses reports of different runs,
    interrupted ones, and missing or duplicate shards (one line each)."""
    if not reports:
        raise BadInputError("conform merge: no reports given")
    p0, r0 = reports[0]
    count = r0["shards"]["count"]
    owner: dict[int, str] = {}
    for path, r in reports:
        if r.get("interrupted"):
            raise BadInputError(f"conform merge: {path} is the report of an interrupted run")
        if r.get("x86pt_version") != r0.get("x86pt_version"):
            raise BadInputError(
                f"conform merge: {path} and {p0} differ in x86pt version "
                f"({r.get('x86pt_version')} vs {r0.get('x86pt_version')})"
            )
        for k in CONFIG_KEYS:
            if r["config"].get(k) != r0["config"].get(k):
                raise BadInputError(
                    f"conform merge: {path} and {p0} are not shards of one run: {k} "
                    f"{r['config'].get(k)!r} vs {r0['config'].get(k)!r}"
                )
        if r["shards"]["count"] != count:
            raise BadInputError(
                f"conform merge: {path} and {p0} differ in shard count ({r['shards']['count']} vs {count})"
            )
        names, names0 = [o["name"] for o in r["oracles"]], [o["name"] for o in r0["oracles"]]
        if names != names0:
            raise BadInputError(
                f"conform merge: {path} ran {', '.join(names) or 'no oracle'}, {p0} ran "
                f"{', '.join(names0) or 'no oracle'}"
            )
        for o, o0 in zip(r["oracles"], r0["oracles"]):
            if o["capabilities"] != o0["capabilities"]:
                diff = sorted(
                    k
                    for k in set(o["capabilities"]) | set(o0["capabilities"])
                    if o["capabilities"].get(k) != o0["capabilities"].get(k)
                )
                raise BadInputError(
                    f"conform merge: {path} and {p0} ran {o['name']} with different "
                    f"capabilities ({', '.join(diff)})"
                )
        for i in r["shards"]["done"]:
            if i in owner:
                raise BadInputError(f"conform merge: shard {i}/{count} is in both {owner[i]} and {path}")
            owner[i] = path
    missing = [i for i in range(1, count + 1) if i not in owner]
    if missing:
        raise BadInputError(
            f"conform merge: shard{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))} of {count} missing"
        )
    ordered = sorted(reports, key=lambda pr: min(pr[1]["shards"]["done"], default=0))
    oracles = []
    for k, o0 in enumerate(r0["oracles"]):
        parts = [r["oracles"][k] for _, r in ordered]
        summ = combine_summaries(
            o0["name"],
            [o["summary"] for o in parts],
            sum(float(o["summary"].get("seconds", 0.0)) for o in parts),
        )
        oracles.append(
            {
                "name": o0["name"],
                "summary": summ,
                "capabilities": o0["capabilities"],
                "mismatches": [rec for o in parts for rec in o["mismatches"]],
                "dropped": sum(int(o.get("dropped", 0)) for o in parts),
            }
        )
    return {
        "config": r0["config"],
        "count": count,
        "oracles": oracles,
        "skipped": [s for _, r in ordered for s in r.get("skipped", [])],
    }
