"""The `x86pt` command. Each command is a library call plus a renderer; bad input of any kind ends
in one line on stderr and exit status 2, never a traceback.

The library's other parts add commands through `register(subparsers)` in their own cli module
(x86pt.plugins.BUILTIN_COMMANDS); other packages (the rig among them) through a module registered under the
`x86pt.commands` entry-point group (x86pt/plugins.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from x86pt import __version__
from x86pt.errors import BadInputError, X86ptError
from x86pt.numbers import parse_int

# typing costs about 2 ms at start-up and nothing here needs it at run time; mypy reads any name
# TYPE_CHECKING as true (docs/startup.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any, Callable

    from x86pt.memory.base import PhysicalMemory
    from x86pt.walk import Access

    # one probe's answer: va, access, outcome, pa, page size, error code, CR2
    ProbeRow = tuple[int, Access, str, int | None, int | None, int | None, int | None]


def emit_json(obj: object, out: IO[str] | None = None) -> None:
    import json

    (out or sys.stdout).write(json.dumps(obj, indent=None, separators=(",", ":")) + "\n")


# -- decode / encode -----------------------------------------------------------------------------
def cmd_decode(args: argparse.Namespace) -> int:
    from x86pt.describe import decode_entry, render_decode

    raw = parse_int(args.value, "entry value")
    from x86pt.fields import BIT_PS, Kind, kind_from_name

    kind = kind_from_name(args.kind)
    if args.kind.lower() in ("pdpte", "pde") and raw & BIT_PS:  # PS picks the leaf format
        kind = {Kind.PDPTE: Kind.PDPTE_1G, Kind.PDE: Kind.PDE_2M}[kind]
    m = parse_int(args.maxphyaddr, "--maxphyaddr", lo=32, hi=52)
    d = decode_entry(raw, kind, m, args.vendor)
    if args.json:
        emit_json(d)
    else:
        print(render_decode(d))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from x86pt.describe import decode_entry, render_decode
    from x86pt import layouts
    from x86pt.fields import Kind, kind_from_name

    kind = kind_from_name(args.kind)
    m = parse_int(args.maxphyaddr, "--maxphyaddr", lo=32, hi=52)
    values: dict[str, int] = {}
    for item in args.fields:
        if "=" not in item:
            values[item.lower()] = 1
            continue
        k, v = item.split("=", 1)
        k = k.strip().lower()
        if k in ("address", "pa"):
            values["addr"] = parse_int(v, k) >> kind.frame_shift
            if parse_int(v, k) & ((1 << kind.frame_shift) - 1):
                raise BadInputError(f"{k}={v} is not aligned to {1 << kind.frame_shift:#x}")
        else:
            values[k] = parse_int(v, f"field {k}")
    if kind in (Kind.PDPTE_1G, Kind.PDE_2M):
        values.setdefault("ps", 1)
    raw = layouts.encode(values, kind, m, args.vendor)
    if args.json:
        emit_json(decode_entry(raw, kind, m, args.vendor))
    else:
        print(f"{raw:#018x}")
        if args.verbose:
            print(render_decode(decode_entry(raw, kind, m, args.vendor)))
    return 0


# -- translate / walk ------------------------------------------------------------------------------
def _access_from(args: argparse.Namespace) -> Access:
    from x86pt.walk import Access

    return Access(args.access, user=args.user, ac=args.ac, implicit=getattr(args, "implicit", False))


def cmd_translate(args: argparse.Namespace, steps: bool = False) -> int:
    from x86pt.describe import render_result, result_json
    from x86pt.cliargs import image_options
    from x86pt.image import open_image
    from x86pt.walk import walk

    with open_image(args.image, **image_options(args)) as img:
        access = _access_from(args)
        results = []
        for v in args.va:
            va = parse_int(v, "virtual address")
            results.append(walk(img.state, img.memory, va, access))
        if args.json:
            for r in results:
                d = result_json(r)
                emit_json(d if steps else {k: v for k, v in d.items() if k != "steps"})
        else:
            for n in img.notes:
                print(f"note: {n}", file=sys.stderr)
            if steps:
                print(f"state: {img.state.describe()}")
            for r in results:
                print(render_result(r, steps=steps, state=img.state))
    return 0 if all(r.outcome == "ok" for r in results) or not args.strict else 1


def cmd_walk(args: argparse.Namespace) -> int:
    return cmd_translate(args, steps=True)


# -- probe (the interface other tools rely on: docs/formats.md §2) -------------------------------
def read_probes(path: str) -> list[tuple[int, Access]]:
    """Parse a JSONL probe file. Each line: {"va": "0x...", "access": "read"|"write"|"fetch",
    "user": bool, "ac": bool}. A bad line is a one-line error naming its line number."""
    import json

    from x86pt.walk import Access

    probes: list[tuple[int, Access]] = []
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise BadInputError(f"cannot open probe file {path}: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise BadInputError(f"{path}:{n}: not UTF-8 text (byte {e.start})") from None
            if not line or line.startswith("#"):
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(f"{path}:{n}: bad JSON: {e.msg}") from None
            except RecursionError:
                raise BadInputError(f"{path}:{n}: bad JSON: nested too deeply") from None
            except ValueError as e:  # an integer longer than Python's digit limit
                raise BadInputError(f"{path}:{n}: bad JSON: {str(e).split(':')[0]}") from None
            if not isinstance(d, dict) or "va" not in d:
                raise BadInputError(f'{path}:{n}: a probe is an object with at least "va"')
            unknown = set(d) - {"va", "access", "user", "ac", "implicit"}
            if unknown:
                raise BadInputError(f"{path}:{n}: unknown key {sorted(unknown)[0]!r}")
            for key in ("user", "ac", "implicit"):
                if key in d and not isinstance(d[key], bool):
                    raise BadInputError(f'{path}:{n}: "{key}" must be true or false')
            va = parse_int(d["va"], f"{path}:{n}: va")
            access = d.get("access", "read")
            if access not in ("read", "write", "fetch"):
                raise BadInputError(f"{path}:{n}: access must be read, write or fetch, not {access!r}")
            probes.append(
                (
                    va,
                    Access(
                        access,
                        user=d.get("user", False),
                        ac=d.get("ac", False),
                        implicit=d.get("implicit", False),
                    ),
                )
            )
    return probes


def cmd_probe(args: argparse.Namespace) -> int:
    from x86pt.batch import ACCESS_CODES, OUTCOME_NAMES, translate_batch
    from x86pt.cliargs import image_options
    from x86pt.image import open_image
    from x86pt.walk import Translation, walk
    import json

    import numpy as np

    probes = read_probes(args.probes)
    out: list[ProbeRow] = []
    with open_image(args.image, **image_options(args)) as img:
        if args.update_ad:
            # A/D carried from probe to probe: the scalar walker on a copy-on-write overlay, so the
            # input image is never written.
            mem = _Overlay(img.memory)
            for va, acc in probes:
                r = walk(img.state, mem, va, acc, update_ad=True)
                if isinstance(r, Translation):
                    out.append((va, acc, r.outcome, r.pa, r.page_size, None, None))
                else:
                    out.append((va, acc, r.outcome, None, None, r.error_code, r.cr2))
        elif probes:
            vas = np.array([va for va, _ in probes], dtype=np.uint64)
            res = translate_batch(
                img.state,
                img.memory,
                vas,
                np.array([ACCESS_CODES[a.kind] for _, a in probes], dtype=np.uint8),
                np.array([a.user for _, a in probes]),
                np.array([a.ac for _, a in probes]),
                np.array([a.implicit for _, a in probes]),
            )
            gp_cr2 = img.state.profile.gp_writes_cr2
            for i, (va, acc) in enumerate(probes):
                oc = OUTCOME_NAMES[res.outcome[i]]
                ok = oc == "ok"
                cr2 = va if oc == "page_fault" or (oc == "general_protection" and gp_cr2) else None
                out.append(
                    (
                        va,
                        acc,
                        oc,
                        int(res.pa[i]) if ok else None,
                        int(res.page_size[i]) if ok else None,
                        None if ok else int(res.error_code[i]),
                        cr2,
                    )
                )
    lines = []
    for va, acc, oc, pa, size, ec, cr2 in out:
        rec = {
            "va": hex(va),
            "access": acc.kind,
            "user": acc.user,
            "outcome": oc,
            "pa": None if pa is None else hex(pa),
            "page_size": size,
            "error_code": ec,
            "cr2": None if cr2 is None else hex(cr2),
        }
        if args.json:
            lines.append(json.dumps(rec, separators=(",", ":")))
        else:
            extra = (
                f"pa={rec['pa']} size={size}"
                if oc == "ok"
                else f"error_code={ec:#x}" + (f" cr2={rec['cr2']}" if rec["cr2"] else "")
            )
            lines.append(f"{rec['va']} {acc.kind:<5} {'user' if acc.user else 'sup ':<4} {oc:<18} {extra}")
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


class _Overlay:
    """Copy-on-write view of a read-only image, so --update-ad never writes the input file."""

    def __init__(self, base: PhysicalMemory) -> None:
        self.base = base
        self.dirty: dict[int, int] = {}

    def read_u64(self, pa: int) -> int:
        v = self.dirty.get(pa)
        return self.base.read_u64(pa) if v is None else v

    def write_u64(self, pa: int, value: int) -> None:
        self.dirty[pa] = value

    def __getattr__(self, name: str) -> Any:  # the rest of the image's interface, as is
        return getattr(self.base, name)


# -- build ----------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from x86pt.build import build_from_spec
    from x86pt.memory import write_image
    from x86pt.memory.atomic import check_output

    check_output(args.output, [args.spec])  # before any work
    try:
        with open(args.spec, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BadInputError(f"cannot read spec {args.spec}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"spec {args.spec} is not UTF-8 text") from None
    memory, state = build_from_spec(
        text, args.spec, max_entries=parse_int(args.max_entries, "--max-entries", lo=1)
    )
    fmt = write_image(memory, state, args.output, args.out_format, inputs=[args.spec])
    if args.json:
        emit_json({"image": args.output, "format": fmt, **state.to_json(), "table_pages": len(memory.pages)})
    else:
        print(f"wrote {args.output} ({fmt}): {state.describe()}")
        if fmt == "raw":
            print(
                f"  walk it with: x86pt walk {args.output} VA --cr3 {state.cr3:#x} --cr4 {state.cr4:#x} "
                f"--efer {state.efer:#x}"
            )
    return 0


# -- demo -------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from x86pt.demo import run_demo

    return run_demo(args)


# -- plumbing ---------------------------------------------------------------------------------------
def _add_access_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--access", choices=("read", "write", "fetch"), default="read")
    p.add_argument("--user", action="store_true", help="access from CPL 3")
    p.add_argument("--ac", action="store_true", help="EFLAGS.AC=1 (SMAP override)")
    p.add_argument("--implicit", action="store_true", help="implicit supervisor access (GDT/IDT/TSS)")


# The commands this module defines, with their one-line help, in the order the help lists them (the
# others: x86pt.plugins.BUILTIN_COMMAND_NAMES and plugins).
OWN_HELP = {
    "decode": "decode one entry: every field, reserved bits flagged",
    "encode": "encode one entry from FIELD=VALUE pairs",
    "translate": "translate virtual addresses",
    "walk": "walk step by step, each entry decoded",
    "probe": "run a JSONL probe list through the model",
    "build": "build an image from a TOML spec of mappings",
    "demo": "build an embedded Linux-like address space and show x86pt at work",
}
OWN_COMMANDS = tuple(OWN_HELP)
# The first words for which `x86pt` prints the top-level help, its version or its usage error alone:
# argparse acts on the first option before it looks at any other word, so the commands' own
# arguments never matter (main builds the shallow tree for these and for no words at all).
TOP_ONLY = ("-h", "--help", "--version")


def _columns() -> int:
    """The terminal width exactly as shutil.get_terminal_size().columns computes it ($COLUMNS when
    positive, else stdout's terminal, else 80), without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        columns = os.get_terminal_size(stdout.fileno()).columns if stdout is not None else 0
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter with its default width computed by _columns. argparse builds a
    formatter in every add_argument (to check the metavar) and its own default width imports
    shutil, which imports zlib, bz2, lzma and fnmatch: about 2 ms at every start (docs/startup.md)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
        **kwargs: Any,  # what later Pythons add
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width, **kwargs)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose default formatter is _Formatter. Subparsers are built with the class of
    their parent (argparse's parser_class), so the whole tree gets it; a parser given its own
    formatter_class keeps it."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(**kwargs)


def build_parser(only: str | None = None, *, shallow: bool = False) -> argparse.ArgumentParser:
    """The whole argument tree; with `only` (a built-in command's name) the tree holds that command
    alone (its module's commands for one registered elsewhere) and no plugin is looked up: what
    `x86pt CMD ...` parses, at a fraction of the start-up cost (docs/startup.md). With `shallow`
    every command of this distribution is an empty parser with its one-line help
    (x86pt.plugins.SHIPPED_COMMANDS), a third party's plugin commands are registered in full: the
    tree `x86pt --help` prints, the same text as the whole tree's at a fraction of the cost."""
    from x86pt.plugins import BUILTIN_COMMAND_NAMES

    def want(name: str) -> bool:
        return only is None or only == name

    p = _Parser(prog="x86pt", description="x86-64 page tables: model, oracles, dumps, CPA")
    p.add_argument("--version", action="version", version=f"x86pt {__version__}")
    # prog as argparse would compute it (the top parser has no positionals), without the help
    # formatter it builds to compute it
    sub = p.add_subparsers(dest="command", metavar="COMMAND", prog="x86pt")
    sub.required = True
    if shallow:
        for name, text in OWN_HELP.items():
            sub.add_parser(name, help=text)
    elif only is None or only in OWN_COMMANDS:
        _add_own_commands(sub, want)
    if only in BUILTIN_COMMAND_NAMES:
        # a built-in module's register takes `only` (the plugin interface is register(subparsers))
        importlib.import_module(BUILTIN_COMMAND_NAMES[only]).register(sub, only)
    elif only not in OWN_COMMANDS:
        from x86pt.plugins import SHIPPED_COMMANDS, command_modules

        for mod in command_modules():
            if shallow and mod in SHIPPED_COMMANDS:
                for name, text in SHIPPED_COMMANDS[mod]:
                    sub.add_parser(name, help=text)
                continue
            try:
                m = importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name and (mod == e.name or mod.startswith(e.name + ".")):
                    continue
                raise
            m.register(sub)
    if shallow:  # the top-level help shows no command's description, epilog or options
        return p
    from x86pt.helpdoc import apply

    apply(p)
    return p


def _add_own_commands(sub: argparse._SubParsersAction[_Parser], want: Callable[[str], bool]) -> None:
    """The commands of this module for which want(name) holds, in the order the help lists them."""
    if want("decode"):
        d = sub.add_parser("decode", help=OWN_HELP["decode"])
        d.add_argument("value")
        d.add_argument("--kind", required=True, help="pml5e pml4e pdpte pdpte1g pde pde2m pte")
        d.add_argument("--maxphyaddr", default="52")
        d.add_argument("--vendor", choices=("intel", "amd"), default="intel")
        d.add_argument("--json", action="store_true")
        d.set_defaults(func=cmd_decode)

    if want("encode"):
        e = sub.add_parser("encode", help=OWN_HELP["encode"])
        e.add_argument("--kind", required=True)
        e.add_argument(
            "fields", nargs="*", metavar="FIELD=V", help="e.g. p=1 rw=1 addr=0x1234 (or pa=0x1234000)"
        )
        e.add_argument("--maxphyaddr", default="52")
        e.add_argument("--vendor", choices=("intel", "amd"), default="intel")
        e.add_argument("-v", "--verbose", action="store_true")
        e.add_argument("--json", action="store_true")
        e.set_defaults(func=cmd_encode)

    for name, func in (("translate", cmd_translate), ("walk", cmd_walk)):
        if want(name):
            from x86pt.cliargs import add_state_args

            t = sub.add_parser(name, help=OWN_HELP[name])
            t.add_argument("image")
            t.add_argument("va", nargs="+")
            _add_access_args(t)
            add_state_args(t)
            t.add_argument("--strict", action="store_true", help="exit 1 if any access faults")
            t.add_argument("--json", action="store_true")
            t.set_defaults(func=func)

    if want("probe"):
        from x86pt.cliargs import add_state_args

        pr = sub.add_parser("probe", help=OWN_HELP["probe"])
        pr.add_argument("image")
        pr.add_argument("--probes", required=True, metavar="FILE.jsonl", help="probe list ('-' for stdin)")
        add_state_args(pr)
        pr.add_argument("--update-ad", action="store_true", help="carry A/D updates from probe to probe")
        pr.add_argument("--json", action="store_true")
        pr.set_defaults(func=cmd_probe)

    if want("build"):
        from x86pt.limits import DEFAULT_MAX_BUILD_ENTRIES

        b = sub.add_parser("build", help=OWN_HELP["build"])
        b.add_argument("spec")
        b.add_argument("-o", "--output", required=True)
        b.add_argument("--out-format", choices=("elf", "raw", "lime"), default=None)
        b.add_argument(
            "--max-entries",
            default=str(DEFAULT_MAX_BUILD_ENTRIES),
            metavar="N",
            help="most leaf entries the spec may write (default %(default)s); a bigger "
            "spec stops with exit 2 before any table is allocated",
        )
        b.add_argument("--json", action="store_true")
        b.set_defaults(func=cmd_build)

    if want("demo"):
        dm = sub.add_parser("demo", help=OWN_HELP["demo"])
        dm.add_argument("--out", default=None, help="directory for the demo's files (default: a temp dir)")
        dm.add_argument("--json", action="store_true")
        dm.set_defaults(func=cmd_demo)


def _builtin_names() -> dict[str, str]:
    from x86pt.plugins import BUILTIN_COMMAND_NAMES

    return BUILTIN_COMMAND_NAMES


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("X86PT_DEBUG"))
    try:
        words = sys.argv[1:] if argv is None else argv
        first = words[0] if words else None
        # `x86pt CMD ...` for a built-in CMD parses with CMD's parser alone: the same parse, the same
        # help and errors (tests/test_startup.py compares them), without the other commands' set-up
        if first is None or first in TOP_ONLY:
            parser = build_parser(shallow=True)
        else:
            parser = build_parser(first if first in OWN_COMMANDS or first in _builtin_names() else None)
        args = parser.parse_args(words)
        return int(args.func(args) or 0)
    except X86ptError as e:
        print(f"x86pt: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print("x86pt: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # never a traceback for the user; X86PT_DEBUG=1 shows it
        if debug:
            raise
        print(
            f"x86pt: internal error: {type(e).__name__}: {e} (X86PT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
