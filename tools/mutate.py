#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Mutation-test one verdict module with mutmut 3, in a throw-away copy of the repo.

    tools/mutate.py x86pt/walk.py                 # the module's fast test selection (table below)
    tools/mutate.py x86pt/walk.py --tests tests/test_walk_rules.py
    tools/mutate.py --list                        # the module -> tests table
    tools/mutate.py x86pt/walk.py --update        # rewrite tools/mutants/walk.txt's survivor list
    tools/mutate.py harness/matrix.py --only 'build_batch' 'Space.*' --update   # some functions only

With --only, only the mutants of the named functions run (a glob on the function name as the list
writes it, `Space.flags_of`, or on mutmut's mutant name, `harness.matrix.x_build*`), and --update
replaces only those functions' survivors and score lines in the list: the others are kept, so a big
module can be worked a group of functions at a time; the module's score is then the sum of the
per-function lines (`# run FUNC killed/total`).

The working tree is copied (tracked + untracked, not ignored files) into a temporary directory and
mutmut runs there: files in the checkout are never touched. mutmut 3 mutates inside functions and
methods only (module-level tables are not mutated: see docs/mutation.md). It prints the score
(killed / total) and every survivor as file:line, the function and the mutation, then compares the
survivors with tools/mutants/<module>.txt, the justified list kept in the repo: exit 0 when every
survivor is listed there, 1 when a survivor is new (kill it with a test or justify it), 2 on a tool
error.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTS = ROOT / "tools" / "mutants"

# module -> the in-process test files that exercise it. Fast (a module's run fits in minutes on 2
# cores) and never oracle-heavy (no qemu/kvm/linux tests; unicorn-free model tests preferred).
# Tests that only drive the code through a subprocess do not count: mutmut maps tests to functions
# by tracing calls in-process.
TESTS: dict[str, list[str]] = {
    "x86pt/walk.py": [
        "tests/test_walk_rules.py",
        "tests/test_walk_measured.py",
        "tests/test_tlb.py",
        "tests/test_mutants_walk.py",
    ],
    "x86pt/fields.py": ["tests/test_fields.py", "tests/test_mutants_fields.py"],
    "x86pt/state.py": [
        "tests/test_walk_rules.py",
        "tests/test_walk_measured.py",
        "tests/test_tlb.py",
        "tests/test_matrix.py",
        "tests/test_mutants_state.py",
    ],
    "x86pt/coalesce.py": [
        "tests/test_formats_ptdump.py",
        "tests/test_formats_qemu.py",
        "tests/test_scan.py",
        "tests/test_mutants_coalesce.py",
    ],
    "x86pt/census.py": ["tests/test_cpa_rules.py", "tests/test_dump_cli.py", "tests/test_mutants_census.py"],
    # The recorded real-kernel dumps (tests/test_linux_ptdump_exact.py, no boot) are the format's
    # ground truth but every mutant of the text path then costs ~6 s: a thorough run passes them
    # with --tests (about 25 min on 2 cores); the default stays fast.
    "x86pt/formats/ptdump.py": ["tests/test_formats_ptdump.py", "tests/test_mutants_ptdump.py"],
    "x86pt/formats/qemu.py": ["tests/test_formats_qemu.py", "tests/test_mutants_qemu.py"],
    "x86pt/cpa/counters.py": [
        "tests/test_cpa_rules.py",
        "tests/test_cpa_merge.py",
        "tests/test_mutants_counters.py",
    ],
    "x86pt/cpa/split.py": [
        "tests/test_cpa_rules.py",
        "tests/test_cpa_merge.py",
        "tests/test_mutants_split.py",
    ],
    "x86pt/cpa/merge.py": [
        "tests/test_cpa_merge.py",
        "tests/test_cpa_rules.py",
        "tests/test_mutants_merge.py",
    ],
    "x86pt/cpa/validate.py": [
        "tests/test_cpa_rules.py",
        "tests/test_cpa_reference.py",
        "tests/test_mutants_validate.py",
    ],
    "x86pt/scan.py": ["tests/test_scan.py", "tests/test_hostile_values.py", "tests/test_mutants_scan.py"],
    "x86pt/compare.py": ["tests/test_mutants_compare.py", "tests/test_differential.py"],
    "harness/differential.py": ["tests/test_differential.py", "tests/test_mutants_differential.py"],
    "harness/matrix.py": ["tests/test_matrix.py", "tests/test_mutants_matrix.py"],
    "harness/matrix_pack.py": ["tests/test_matrix.py", "tests/test_mutants_matrix.py"],
}

MUTMUT_HINT = (
    "mutmut 3 is missing: .venv/bin/pip install 'mutmut>=3.3,<4' (the pyproject extra `mutation` lists it)"
)


@dataclass
class Survivor:
    key: str  # mutmut's name, e.g. x86pt.walk.x_walk__mutmut_12 (ordinal: unstable)
    status: str  # survived / no tests / timeout / suspicious ...
    line: int  # line in the original module (0 if unknown)
    func: str  # Class.method or function
    old: str  # the original line
    new: str  # the mutated line

    @property
    def ident(self) -> str:
        """Stable identity kept in tools/mutants/*.txt: function and the changed line, not the
        mutant's ordinal (which shifts when the function changes)."""
        return f"{self.func} | {self.old.strip()} => {self.new.strip()}"


def list_name(module: str) -> Path:
    return LISTS / (Path(module).stem + ".txt")


def check_mutmut() -> str:
    exe = Path(sys.executable).parent / "mutmut"
    if not exe.exists():
        found = shutil.which("mutmut")
        if not found:
            print(MUTMUT_HINT, file=sys.stderr)
            sys.exit(2)
        exe = Path(found)
    try:  # `mutmut --version` needs a config in the cwd: ask the package metadata instead
        from importlib.metadata import version

        out = version("mutmut")
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        out = ""
    if not out or int(out.split(".")[0]) < 3:
        print(f"need mutmut 3, found {out or 'none'}. " + MUTMUT_HINT, file=sys.stderr)
        sys.exit(2)
    return str(exe)


def copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("mutants/", "build/")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def func_lines(source: str) -> dict[str, int]:
    """'Class.method' / 'function' -> the first line of its code as mutmut shows it: the `def`, or
    its first decorator, or the comment lines right above those (mutmut's diff of a function starts
    there, so a line number counted from the `def` was off by the comment's length)."""
    out: dict[str, int] = {}
    tree = ast.parse(source)
    lines = source.splitlines()

    def start(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        i = first - 1  # 1-based line above
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            i -= 1
        return i + 1

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = start(node)
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{sub.name}"] = start(sub)
    return out


def func_of_key(key: str) -> str:
    """x86pt.fields.xǁLevelǁindex__mutmut_1 -> Level.index; x86pt.walk.x_walk__mutmut_3 -> walk."""
    name = key.split(".")[-1].rsplit("__mutmut_", 1)[0]
    parts = name.split("ǁ")
    if len(parts) == 3:
        return f"{parts[1]}.{parts[2]}"
    return name[2:] if name.startswith("x_") else name


# One process prints every survivor's diff (`mutmut show` per mutant costs a process start,
# ~2 s on the loaded machine: minutes for a module with hundreds of survivors).
_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
keys = json.load(sys.stdin)
json.dump({k: get_diff_for_mutant(k, path=sys.argv[1]) for k in keys}, sys.stdout)
"""


def diffs_of(mutmut: str, work: Path, module: str, keys: list[str]) -> dict[str, str]:
    """key -> the mutant's diff, all in one process; per-key `mutmut show` if that fails."""
    if not keys:
        return {}
    r = subprocess.run(
        [sys.executable, "-c", _DIFFS, module],
        cwd=work,
        input=json.dumps(keys),
        capture_output=True,
        text=True,
    )
    try:
        out = json.loads(r.stdout)
        if isinstance(out, dict) and set(out) == set(keys):
            return {k: str(v) for k, v in out.items()}
    except ValueError:
        pass
    return {
        k: subprocess.run([mutmut, "show", k], cwd=work, capture_output=True, text=True).stdout for k in keys
    }


def locate(
    mutmut: str, work: Path, key: str, defs: dict[str, int], diff: str | None = None
) -> tuple[int, str, str]:
    if diff is None:
        diff = subprocess.run([mutmut, "show", key], cwd=work, capture_output=True, text=True).stdout
    lines = diff.splitlines()
    start, old, new, rel = 0, "", "", 0
    for i, ln in enumerate(lines):
        m = re.match(r"@@ -(\d+)", ln)
        if m:
            start = int(m.group(1))
            rel = 0
            for ln2 in lines[i + 1 :]:
                if ln2.startswith("-") and not old:
                    old = ln2[1:]
                    break
                if not ln2.startswith("+"):
                    rel += 1
            for ln2 in lines[i + 1 :]:
                if ln2.startswith("+") and not ln2.startswith("+++"):
                    new = ln2[1:]
                    break
            break
    func = func_of_key(key)
    base = defs.get(func, 0)
    line = base + start - 1 + rel if base and start else 0
    return line, old, new


def confirm(
    work: Path, module: str, survivors: list[Survivor], tests: list[str], env: dict[str, str]
) -> set[str]:
    """Keys of the survivors that `tests` kill, each applied alone to the copy's module."""
    path = work / module
    orig = path.read_text()
    lines = orig.splitlines(keepends=True)
    killed = set()
    for s in survivors:
        i = s.line - 1
        if not (0 <= i < len(lines)) or lines[i].strip() != s.old.strip() or not s.new.strip():
            continue
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        text = "".join(lines[:i] + [indent + s.new.strip() + "\n"] + lines[i + 1 :])
        try:
            ast.parse(text)  # a mutation spanning lines cannot be replayed this way
        except SyntaxError:
            continue
        path.write_text(text)
        try:
            r = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                cwd=work,
                env=dict(env, PYTHONPATH=str(work)),
                capture_output=True,
                timeout=120,
            )  # a hang (an endless loop) counts as killed
            if r.returncode not in (0, 5):
                killed.add(s.key)
        except subprocess.TimeoutExpired:
            killed.add(s.key)
        finally:
            path.write_text(orig)
    return killed


def dotted(module: str) -> str:
    """harness/matrix.py -> harness.matrix (mutmut's prefix of the module's mutant names)."""
    return module[: -len(".py")].replace("/", ".")


def mutant_glob(module: str, func: str) -> str:
    """The glob of every mutant of `func` ('Class.method' or 'function') in mutmut's names."""
    cls, _, meth = func.rpartition(".")
    mangled = f"x\u01c1{cls}\u01c1{meth}" if cls else f"x_{func}"
    return f"{dotted(module)}.{mangled}__mutmut_*"


def only_patterns(module: str, globs: list[str], funcs: list[str]) -> list[str]:
    """mutmut name globs for --only: a glob on mutmut's names (it starts with the module's dotted
    name) is kept as is; any other is matched against the function names (`Space.*`, `build_*`)
    and becomes one exact glob per matching function (so `hi_bit` does not also take `hi_bits`)."""
    out: list[str] = []
    for g in globs:
        if g.startswith(dotted(module) + "."):
            out.append(g)
            continue
        hits = [f for f in funcs if fnmatch.fnmatchcase(f, g)]
        if not hits:
            raise ValueError(f"--only {g!r} matches no function of {module}")
        out += [mutant_glob(module, f) for f in hits]
    return out


def selected(key: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


RUN_LINE = re.compile(r"^# run (\S+) (\d+)/(\d+)(?: (.*))?$")


def read_runs(path: Path) -> dict[str, tuple[int, int, str]]:
    """func -> (killed, total, note) from the list's `# run FUNC killed/total note` lines."""
    out: dict[str, tuple[int, int, str]] = {}
    if not path.exists():
        return out
    for ln in path.read_text().splitlines():
        m = RUN_LINE.match(ln)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)), (m.group(4) or "").strip())
    return out


def _entry_func(line: str) -> str:
    body = re.sub(r"^\S+:\d+\s+", "", line)
    return body.partition(" | ")[0].strip()


def _entry_line(line: str) -> int:
    m = re.match(r"^\S+:(\d+)\s", line)
    return int(m.group(1)) if m else 0


def merge_list(
    old_text: str,
    module: str,
    entries: list[str],
    runs: dict[str, tuple[int, int, str]],
    ran: set[str] | None,
    date: str,
    exists: set[str] | None = None,
) -> str:
    """The new text of a survivor list. `entries` are the survivor lines of this run, `runs` its
    per-function scores, `ran` the functions it covered (None: the whole module). The old list's
    survivors and score lines of every function not in `ran` are kept (a partial run never drops
    what it did not look at) unless the function is gone from the module (not in `exists`); the
    header's score is the sum of the per-function lines."""
    kept: list[str] = []
    old_runs: dict[str, tuple[int, int, str]] = {}
    if ran is not None:
        for ln in old_text.splitlines():
            m = RUN_LINE.match(ln)
            if m:
                if m.group(1) not in ran and (exists is None or m.group(1) in exists):
                    old_runs[m.group(1)] = (int(m.group(2)), int(m.group(3)), (m.group(4) or "").strip())
            elif ln.strip() and not ln.startswith("#") and _entry_func(ln) not in ran:
                if exists is None or _entry_func(ln) in exists:
                    kept.append(ln)
    all_runs = dict(old_runs, **runs)
    killed = sum(k for k, _, _ in all_runs.values())
    total = sum(t for _, t, _ in all_runs.values())
    how = "one run" if ran is None else f"summed over the per-function runs below ({len(all_runs)} functions)"
    head = [
        f"# Surviving mutants of {module} (tools/mutate.py {module}); score {killed}/{total} "
        f"on {date}, {how}.",
        "# Each line: file:line  function | original => mutated  # why it is "
        "equivalent (or not worth a test)",
    ]
    head += [f"# run {f} {k}/{t} {note}".rstrip() for f, (k, t, note) in sorted(all_runs.items())]
    body = sorted(kept + entries, key=_entry_line)
    return "\n".join(head + body) + "\n"


def read_list(path: Path) -> dict[str, str]:
    """ident -> justification from a survivor list (lines: `ident  # justification`)."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for ln in path.read_text().splitlines():
        if not ln.strip() or ln.startswith("#"):
            continue
        body = re.sub(r"^\S+:\d+\s+", "", ln)  # drop the file:line prefix
        # the justification follows the last "  # ": the changed line may carry a comment itself
        ident, _, why = body.rpartition("  # ")
        out[ident.strip()] = why.strip()
    return out


def _squeeze(text: str) -> str:
    """A line with its layout taken out (spaces, trailing commas), for matching across reformatting."""
    return re.sub(r"\s+", "", text).rstrip(",")


def _parts(ident: str) -> tuple[str, str, str]:
    func, _, change = ident.partition(" | ")
    old, _, new = change.partition(" => ")
    return func, _squeeze(old), _squeeze(new)


def lookup(known: dict[str, str], ident: str) -> str | None:
    """The justification listed for `ident`, also when the line was reformatted since it was listed
    (ruff format splits or joins lines, so mutmut's changed line may be a fragment of the listed one,
    or the listed line a fragment of it): same function and the same change inside the longer line."""
    if ident in known:
        return known[ident]
    func, old, new = _parts(ident)
    for listed, why in known.items():
        lfunc, lold, lnew = _parts(listed)
        if lfunc != func:
            continue
        if (lold, lnew) == (old, new):
            return why
        if old and old in lold and lold.replace(old, new, 1) == lnew:
            return why
        if lold and lold in old and old.replace(lold, lnew, 1) == new:
            return why
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("module", nargs="?", help="e.g. x86pt/walk.py")
    ap.add_argument("--tests", nargs="+", help="test files to use instead of the table's")
    ap.add_argument("--max-children", type=int, default=2, help="worker processes (default 2, the cap)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy and print its path")
    ap.add_argument(
        "--update",
        action="store_true",
        help="rewrite tools/mutants/<module>.txt with the survivors (keeps justifications)",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="GLOB",
        help="mutate only these functions: globs on the function name (`build_batch`, `Space.*`) "
        "or on mutmut's mutant name (`harness.matrix.x_build*`); with --update the list keeps "
        "every other function's survivors and scores",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    ap.add_argument("--list", action="store_true", help="print the module -> tests table")
    ap.add_argument(
        "--confirm-with",
        nargs="+",
        metavar="TEST",
        help="apply each unjustified survivor by hand to the copy and run these (slower) "
        "tests on it, e.g. tests/test_linux_ptdump_exact.py: a survivor they fail "
        "on is killed by them",
    )
    a = ap.parse_args(argv)
    if a.module is None or a.list:
        for mod, tests in TESTS.items():
            print(f"{mod:26} {' '.join(tests)}")
        return 0
    module = a.module
    if not (ROOT / module).is_file():
        print(f"no such module: {module}", file=sys.stderr)
        return 2
    tests = a.tests or TESTS.get(module)
    if not tests:
        print(f"{module} has no test selection in the table; pass --tests", file=sys.stderr)
        return 2
    tests = [t for t in tests if (ROOT / t).exists()]
    defs = func_lines((ROOT / module).read_text())
    patterns: list[str] | None = None
    if a.only:
        try:
            patterns = only_patterns(module, a.only, list(defs))
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    mutmut = check_mutmut()
    children = max(1, min(a.max_children, 2))

    tmp = Path(tempfile.mkdtemp(prefix="x86pt-mutate-"))
    try:
        copy_tree(tmp)
        pkg = module.split("/")[0]
        other = [d for d in ("x86pt", "harness", "fixtures", "tests", "docs", "tools") if d != pkg]
        sel = "\n    ".join(tests)
        (tmp / "setup.cfg").write_text(
            "[mutmut]\n"
            f"source_paths = {pkg}\n"
            f"only_mutate = {module}\n"
            f"also_copy =\n    " + "\n    ".join(other) + "\n    README.md\n    pyproject.toml\n"
            f"pytest_add_cli_args_test_selection =\n    {sel}\n"
            "pytest_add_cli_args = -p no:cacheprovider -p no:randomly -q\n"
        )
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", X86PT_REQUIRE_ORACLES="")
        t0 = time.time()
        r = subprocess.run(
            [mutmut, "run", "--max-children", str(children), *(patterns or [])],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.time() - t0
        meta = tmp / "mutants" / (module + ".meta")
        if not meta.exists():
            print(r.stdout[-3000:], r.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"mutmut produced no results for {module}", file=sys.stderr)
            return 2
        codes: dict[str, int | None] = {
            k: v for k, v in json.loads(meta.read_text())["exit_code_by_key"].items() if selected(k, patterns)
        }
        if not codes:
            print(f"--only {' '.join(a.only or [])}: no mutant of {module} matched", file=sys.stderr)
            return 2
        res = subprocess.run(
            [mutmut, "results", "--all", "true"], cwd=tmp, capture_output=True, text=True
        ).stdout
        status = {}
        for ln in res.splitlines():
            k, _, s = ln.strip().partition(": ")
            if k in codes:
                status[k] = s.strip()
        survivors: list[Survivor] = []
        killed = 0
        per_func: dict[str, list[int]] = {}  # func -> [killed, total]
        diffs = diffs_of(mutmut, tmp, module, [k for k in codes if status.get(k, "?") != "killed"])
        for key in codes:
            st = status.get(key, "?")
            pf = per_func.setdefault(func_of_key(key), [0, 0])
            pf[1] += 1
            if st == "killed":
                killed += 1
                pf[0] += 1
                continue
            line, old, new = locate(mutmut, tmp, key, defs, diffs.get(key))
            survivors.append(Survivor(key, st, line, func_of_key(key), old, new))
        total = len(codes)
        survivors.sort(key=lambda s: (s.line, s.key))
        pct = 100.0 * killed / total if total else 100.0
        only = f", only {' '.join(a.only)}" if a.only else ""
        print(
            f"{module}: {killed}/{total} killed ({pct:.1f}%), {len(survivors)} not killed, "
            f"{took:.0f} s{only}, tests: {' '.join(tests)}"
        )
        ran = set(per_func) | {f for f in defs if selected(mutant_glob(module, f)[:-1] + "0", patterns)}
        listed = read_list(list_name(module))
        if a.only:  # the list's other functions were not looked at
            listed = {k: v for k, v in listed.items() if _parts(k)[0] in ran}
        # each survivor's listed justification, found across reformatting (lookup)
        known = {s.ident: why for s in survivors if (why := lookup(listed, s.ident)) is not None}
        if a.confirm_with:
            confirmed = confirm(
                tmp,
                module,
                [s for s in survivors if known.get(s.ident, "TODO").startswith("TODO")],
                a.confirm_with,
                env,
            )
            for s in survivors:
                if s.key in confirmed:
                    known[s.ident] = f"killed by {' '.join(a.confirm_with)} (--confirm-with)"
        new_ones = []
        for s in survivors:
            why = known.get(s.ident)
            if not why or why.startswith("TODO"):
                why = None
            mark = "  # " + why if why else "  # NEW: not justified"
            if not why:
                new_ones.append(s)
            print(f"  {module}:{s.line} [{s.status}] {s.ident}{mark}")
        gone = [g for g in listed if lookup({s.ident: "" for s in survivors}, g) is None]
        for g in sorted(gone):
            print(f"  (listed but now killed or gone: {g})")
        if a.update:
            LISTS.mkdir(parents=True, exist_ok=True)
            path = list_name(module)
            date = time.strftime("%Y-%m-%d")
            # a partial run's seconds are its own (the function group's), noted per function
            note = f"{date} ({took:.0f} s for {len(per_func)} functions)" if a.only else date
            text = merge_list(
                path.read_text() if path.exists() else "",
                module,
                [f"{module}:{s.line}  {s.ident}  # {known.get(s.ident, 'TODO')}" for s in survivors],
                {f: (k, t, note) for f, (k, t) in per_func.items()},
                ran if a.only else None,
                date,
                set(defs),
            )
            path.write_text(text)
        runs = read_runs(list_name(module))
        if a.only and runs:
            k_all = sum(k for k, _, _ in runs.values())
            t_all = sum(t for _, t, _ in runs.values())
            missing = [f for f in defs if f not in runs]
            print(
                f"{module} in the list: {k_all}/{t_all} summed over {len(runs)} functions' runs"
                + (f"; no run recorded for {len(missing)} functions: {' '.join(missing)}" if missing else "")
            )
        if a.json:
            Path(a.json).write_text(
                json.dumps(
                    {
                        "module": module,
                        "killed": killed,
                        "total": total,
                        "seconds": round(took),
                        "tests": tests,
                        "survivors": [s.__dict__ for s in survivors],
                    },
                    indent=1,
                )
            )
        return 1 if new_ones else 0
    finally:
        if a.keep:
            print(f"kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
