"""The dump, census, wx, find and diff commands, and their section of `x86pt demo`.

Each is a library call (x86pt.formats.dump, x86pt.formats.wx, x86pt.aliases, x86pt.census,
x86pt.diff) plus a renderer (x86pt.formats.*). Output streams to stdout in large
blocks, or goes to `-o FILE` atomically. Table issues (loops, pointers past the end, reserved bits)
go to stderr as notes for the byte-exact text formats and inline for JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import sys  # json: imported where JSON is read or printed (`x86pt dump` needs none)
from typing import TYPE_CHECKING, BinaryIO, Iterator

from x86pt.errors import BadInputError
from x86pt.numbers import parse_int
from x86pt.limits import DEFAULT_MAX_ENTRIES

if TYPE_CHECKING:
    import os
    from typing import Iterable

    from x86pt.demo import DemoContext
    from x86pt.image import Image
    from x86pt.scan import Filter, Scanner

MAX_NOTES = 20


# -- shared plumbing ------------------------------------------------------------------------------
@contextlib.contextmanager
def _output(path: str | None, inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Iterator[BinaryIO]:
    if path is None or path == "-":
        out = sys.stdout.buffer
        yield out
        out.flush()
        return
    from x86pt.memory.atomic import atomic_writer

    with atomic_writer(path, "wb", inputs=inputs) as f:
        yield f


def parse_range(text: str) -> tuple[int, int]:
    """'A-B' (B exclusive) or 'A+SIZE'. A bare 'A' is refused: a slot number, a size and an
    address all look alike there."""
    t = text.strip()
    if "+" in t:
        a, n = t.split("+", 1)
        lo = parse_int(a, "--range start")
        from x86pt.numbers import parse_size

        hi = lo + parse_size(n, "--range size")
    elif "-" in t[1:]:
        a, b = t.split("-", 1) if not t.startswith("-") else (t, "")
        lo, hi = parse_int(a, "--range start"), parse_int(b, "--range end")
    else:
        raise BadInputError(f"--range {text}: give A-B (B exclusive) or A+SIZE")
    if not lo < hi <= 1 << 64:
        raise BadInputError(f"--range {text}: the end must lie above the start")
    return lo, hi


def parse_levels(text: str) -> tuple[int, ...]:
    names = {
        "4k": 1,
        "pte": 1,
        "1": 1,
        "2m": 2,
        "pmd": 2,
        "pde": 2,
        "2": 2,
        "1g": 3,
        "pud": 3,
        "pdpte": 3,
        "3": 3,
    }
    out = []
    for w in text.replace(",", " ").split():
        if w.lower() not in names:
            raise BadInputError(f"--level {w!r}: use 4k, 2m, 1g (or 1, 2, 3)")
        out.append(names[w.lower()])
    if not out:
        raise BadInputError("--level needs at least one of 4k, 2m, 1g")
    return tuple(sorted(set(out)))


def _filter_from(args: argparse.Namespace, nxe: bool) -> Filter:
    user = (
        True
        if getattr(args, "user_only", False)
        else (False if getattr(args, "kernel_only", False) else None)
    )
    from x86pt.scan import Filter

    return Filter(
        user=user,
        writable=True if getattr(args, "writable", False) else None,
        executable=True if getattr(args, "executable", False) else None,
        levels=parse_levels(args.level) if getattr(args, "level", None) else None,
        has=getattr(args, "has", None),
        nxe=nxe,
    )


def _notes(scanner: Scanner, img: Image) -> None:
    for n in getattr(img, "notes", ()):
        print(f"x86pt: note: {n}", file=sys.stderr)
    st = scanner.stats
    for issue in st.issues[:MAX_NOTES]:
        print(f"x86pt: warning: {issue.describe()}", file=sys.stderr)
    if st.issue_count > MAX_NOTES:
        print(
            f"x86pt: warning: ... {st.issue_count - MAX_NOTES} more table issues (--format json lists them)",
            file=sys.stderr,
        )


def _scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-entries",
        default=str(DEFAULT_MAX_ENTRIES),
        metavar="N",
        help="stop with an error when the tables expand to more leaf entries "
        f"(shared/looping subtrees; default {DEFAULT_MAX_ENTRIES})",
    )


def _max_entries(args: argparse.Namespace) -> int:
    return parse_int(args.max_entries, "--max-entries", lo=1)


def _page_offset(args: argparse.Namespace) -> int | None:
    v = getattr(args, "page_offset", None)
    return None if v is None else parse_int(v, "--page-offset")


# (layout.json key, args attribute, option, dump_to keyword)
LAYOUT_KEYS = (
    ("page_offset_base", "page_offset", "--page-offset", "page_offset"),
    ("vmalloc_base", "vmalloc_base", "--vmalloc-base", "vmalloc"),
    ("vmemmap_base", "vmemmap_base", "--vmemmap-base", "vmemmap"),
)


def _marker_bases(args: argparse.Namespace) -> dict[str, int | None]:
    """PAGE_OFFSET, VMALLOC_START and VMEMMAP_START for the ptdump markers (KASLR moves all
    three): from --layout (a `x86pt linux run` layout.json: the kernel's page_offset_base,
    vmalloc_base, vmemmap_base), each overridden by its own option; None = nokaslr default."""
    out: dict[str, int | None] = {kw: None for _, _, _, kw in LAYOUT_KEYS}
    path = getattr(args, "layout", None)
    if path:
        import json

        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except OSError as e:
            raise BadInputError(f"--layout {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInputError(f"--layout {path}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise BadInputError(f"--layout {path}: expected a JSON object")
        for key, _, _, kw in LAYOUT_KEYS:
            v = data.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise BadInputError(f"--layout {path}: {key} is not a number")
            out[kw] = parse_int(v, f"--layout {path}: {key}")
    for _, attr, opt, kw in LAYOUT_KEYS:
        v = getattr(args, attr, None)
        if v is not None:
            out[kw] = parse_int(v, opt)
    return out


# -- dump -------------------------------------------------------------------------------------------
def cmd_dump(args: argparse.Namespace) -> int:
    from x86pt.formats.dump import dump_to
    from x86pt.cliargs import image_options
    from x86pt.image import open_image

    va_range = parse_range(args.range) if args.range else None
    bases = _marker_bases(args)
    with open_image(args.image, **image_options(args)) as img:
        with _output(args.output, [args.image, getattr(args, "layout", None)]) as out:
            sc = dump_to(
                out,
                img,
                args.dump_format,
                markers=args.markers,
                **bases,
                filt=_filter_from(args, img.state.nxe),
                va_range=va_range,
                coalesce_mode=args.coalesce,
                crlf=args.crlf,
                max_entries=_max_entries(args),
            )
        if args.dump_format != "json":
            _notes(sc, img)
        if args.dump_format == "ptdump" and args.range is None:
            from x86pt.formats.wx import guard_hole, guard_hole_wx

            _, present, _ = guard_hole_wx(img, _max_entries(args))
            if present:
                lo, hi = guard_hole(img.state)
                print(
                    f"x86pt: note: {present} mapping run(s) lie in the hypervisor guard hole "
                    f"[{lo:#x}, {hi:#x}), which ptdump does not walk and so does not show "
                    f"(--format json lists them)",
                    file=sys.stderr,
                )
    return 0


# -- census -----------------------------------------------------------------------------------------
def cmd_census(args: argparse.Namespace) -> int:
    import json

    from x86pt.census import census
    from x86pt.cliargs import image_options
    from x86pt.image import open_image

    with open_image(args.image, **image_options(args)) as img:
        from x86pt.census import KERNEL_MAP
        from x86pt.numbers import parse_size

        # [__START_KERNEL_map, +size) must end inside the address space: at most 2 GiB
        size = parse_size(args.kernel_image_size, "--kernel-image-size", hi=(1 << 64) - KERNEL_MAP)
        c = census(
            img.state,
            img.memory,
            _page_offset(args),
            max_entries=_max_entries(args),
            kernel_map=(KERNEL_MAP, KERNEL_MAP + size) if size else None,
        )
        cost = None
        if args.cost:
            from x86pt.cost import image_cost

            cost = image_cost(img.state, img.memory, c.page_offset, args, max_entries=_max_entries(args))
        if args.json:
            print(
                json.dumps(
                    {**c.to_json(), **({"cost": cost.to_json()} if cost else {})}, separators=(",", ":")
                )
            )
        else:
            sys.stdout.write(c.render(gbpages=not args.no_gbpages) + (cost.render() if cost else ""))
    return 0


# -- wx ---------------------------------------------------------------------------------------------
def cmd_wx(args: argparse.Namespace) -> int:
    import json

    from x86pt.formats.wx import guard_hole, guard_hole_wx, wx_ranges
    from x86pt.formats import ptdump
    from x86pt.cliargs import image_options
    from x86pt.image import open_image

    with open_image(args.image, **image_options(args)) as img:
        if not img.state.nxe:
            # ptdump_walk_pgd_level_checkwx(): no NX support, nothing to check
            print(
                "x86pt: note: EFER.NXE=0: every mapping is executable; the kernel skips the W+X check",
                file=sys.stderr,
            )
            return 0
        ranges, sc = wx_ranges(img, _max_entries(args))
        hole, _, sc2 = guard_hole_wx(img, _max_entries(args))
        lines, pages = ptdump.wx_report(ranges)
        hole_pages = sum(((e - s) & ((1 << 64) - 1)) // 4096 for s, e in hole)
        total = pages + hole_pages
        if args.json:
            for s, e in ranges:
                print(
                    json.dumps(
                        {
                            "start": f"{s:#018x}",
                            "end": f"{e:#018x}",
                            "pages": ((e - s) & ((1 << 64) - 1)) // 4096,
                        }
                    )
                )
            for s, e in hole:
                print(
                    json.dumps(
                        {
                            "start": f"{s:#018x}",
                            "end": f"{e:#018x}",
                            "pages": ((e - s) & ((1 << 64) - 1)) // 4096,
                            "region": "guard hole (not checked by the kernel)",
                        }
                    )
                )
            print(
                json.dumps(
                    {
                        "wx_pages": total,
                        "kernel_wx_pages": pages,
                        "guard_hole_wx_pages": hole_pages,
                        "passed": not total,
                    }
                )
            )
        else:
            if hole:
                lo, hi = guard_hole(img.state)
                lines = lines[:-1]
                for s, _e in hole:
                    lines.append(
                        f"x86pt: Found insecure W+X mapping at address {s:#x} in the "
                        f"hypervisor guard hole [{lo:#x}, {hi:#x}), which the kernel's "
                        f"check does not walk\n"
                    )
                lines.append(f"x86/mm: Checked W+X mappings: FAILED, {total} W+X pages found.\n")
                if not pages:
                    lines.append(
                        "x86pt: note: the kernel's own check would say passed: "
                        f"all {hole_pages} W+X pages are in the guard hole\n"
                    )
            sys.stdout.write("".join(lines))
        _notes(sc, img)
        for issue in sc2.stats.issues[:MAX_NOTES]:
            print(f"x86pt: warning: {issue.describe()}", file=sys.stderr)
    return 1 if total and args.strict else 0


# -- find -------------------------------------------------------------------------------------------
def cmd_find(args: argparse.Namespace) -> int:
    import json

    from x86pt.aliases import find_aliases
    from x86pt.describe import leaf_flags
    from x86pt.walk import rights_letters
    from x86pt.cliargs import image_options
    from x86pt.image import open_image
    from x86pt.scan import EFF_NX, EFF_RSVD, EFF_RW, EFF_US

    pa = parse_int(args.pa, "physical address")
    with open_image(args.image, **image_options(args)) as img:
        hits, sc = find_aliases(img.state, img.memory, pa, _max_entries(args))
        nxe = img.state.nxe
        for va, lvl, raw, eff, ea in hits:
            rights = rights_letters(bool(eff & EFF_US), bool(eff & EFF_RW), not (nxe and eff & EFF_NX))
            size = {1: "4K", 2: "2M", 3: "1G"}[lvl]
            if args.json:
                print(
                    json.dumps(
                        {
                            "va": f"{va:#018x}",
                            "pa": hex(pa),
                            "page_size": size,
                            "rights": rights,
                            "flags": leaf_flags(raw, lvl),
                            "entry_addr": hex(ea),
                            "reserved": bool(eff & EFF_RSVD),
                        }
                    )
                )
            else:
                print(
                    f"0x{va:016x}  {size}  {rights}  {leaf_flags(raw, lvl)}"
                    + ("  (reserved bits: faults)" if eff & EFF_RSVD else "")
                )
        if not hits and not args.json:
            print(f"x86pt: note: no virtual address maps {pa:#x}", file=sys.stderr)
        _notes(sc, img)
    return 0 if hits else 1


# -- diff -------------------------------------------------------------------------------------------
def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from x86pt.diff import diff_images
    from x86pt.cliargs import image_options
    from x86pt.image import open_image

    with (
        open_image(args.image_a, **image_options(args)) as a,
        open_image(args.image_b, **image_options(args)) as b,
    ):
        r = diff_images(a.state, a.memory, b.state, b.memory, max_entries=_max_entries(args))
    if args.json:
        for p in r.pieces:
            if args.all or p.category:
                print(json.dumps(p.to_json(), separators=(",", ":")))
        print(
            json.dumps(
                {
                    "summary": r.summary(),
                    "leaves_a": r.shape_a,
                    "leaves_b": r.shape_b,
                    "table_pages_a": r.tables_a,
                    "table_pages_b": r.tables_b,
                }
            )
        )
    else:
        sys.stdout.write(r.render(show_identical=args.all))
    return 1 if r.changed and args.strict else 0


# -- registration -------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], only: str | None = None) -> None:
    """Add dump, census, wx, find and diff to the subparsers `sub`; with `only`, that command alone."""

    def want(name: str) -> bool:
        return only is None or only == name

    from x86pt.formats import FORMATS
    from x86pt.cliargs import add_state_args

    if want("dump"):
        d = sub.add_parser("dump", help="dump every mapping: ptdump, QEMU info mem/tlb, JSON, CSV")
        d.add_argument("image")
        add_state_args(d)  # --image-format is the image's; --format the output's
        d.add_argument(
            "--format",
            dest="dump_format",
            choices=FORMATS,
            default="ptdump",
            help="output format (default ptdump)",
        )
        d.add_argument(
            "--markers",
            choices=("none", "linux"),
            default="none",
            help="ptdump: print Linux's x86_64 address-marker lines and break ranges at them",
        )
        d.add_argument("--page-offset", metavar="VA", help="ptdump markers: PAGE_OFFSET (default nokaslr)")
        d.add_argument("--vmalloc-base", metavar="VA", help="ptdump markers: VMALLOC_START (default nokaslr)")
        d.add_argument("--vmemmap-base", metavar="VA", help="ptdump markers: VMEMMAP_START (default nokaslr)")
        d.add_argument(
            "--layout",
            metavar="JSON",
            help="ptdump markers: read page_offset_base, vmalloc_base and vmemmap_base "
            "from a layout.json (`x86pt linux run`); the options above override it",
        )
        d.add_argument("--range", metavar="A-B", help="only entries overlapping [A, B) (also A+SIZE)")
        g = d.add_mutually_exclusive_group()
        g.add_argument(
            "--user", dest="user_only", action="store_true", help="only user-accessible (effective US)"
        )
        g.add_argument("--kernel", dest="kernel_only", action="store_true", help="only supervisor-only")
        d.add_argument("--writable", action="store_true", help="only effectively writable")
        d.add_argument("--executable", action="store_true", help="only executable (no XD on the walk)")
        d.add_argument("--level", metavar="L", help="only leaves of these sizes: 4k,2m,1g")
        d.add_argument("--has", metavar="FLAGS", help="leaf flags that must be set ('g d') or clear ('!a')")
        d.add_argument(
            "--coalesce",
            choices=("phys", "attrs", "none"),
            default="phys",
            help="json/csv rows: merge runs with equal attributes and contiguous frames "
            "(phys), equal attributes only (attrs), or one row per entry (none)",
        )
        d.add_argument(
            "--crlf", action="store_true", help="end lines with CR LF, as QEMU's monitor sends them"
        )
        d.add_argument("-o", "--output", metavar="FILE", help="write here (atomically) instead of stdout")
        _scan_args(d)
        d.set_defaults(func=cmd_dump)

    if want("census"):
        c = sub.add_parser("census", help="DirectMap4k/2M/1G as /proc/meminfo, leaves per level, table pages")
        c.add_argument("image")
        c.add_argument("--page-offset", metavar="VA", help="start of the direct map (default: detected)")
        c.add_argument("--no-gbpages", action="store_true", help="omit DirectMap1G (no direct_gbpages)")
        c.add_argument(
            "--kernel-image-size",
            default="1G",
            metavar="SIZE",
            help="KERNEL_IMAGE_SIZE: splits of [__START_KERNEL_map, +SIZE) count in DirectMap "
            "as in the kernel (1G with KASLR support, the default; 512M without; 0: ignore)",
        )
        c.add_argument("--json", action="store_true")
        from x86pt.cliargs import add_cost_args

        add_cost_args(c)
        _scan_args(c)
        add_state_args(c)
        c.set_defaults(func=cmd_census)

    if want("wx"):
        w = sub.add_parser(
            "wx", help="every writable+executable mapping, as the kernel's W+X check reports it"
        )
        w.add_argument("image")
        w.add_argument("--json", action="store_true")
        w.add_argument("--strict", action="store_true", help="exit 1 when W+X pages are found")
        _scan_args(w)
        add_state_args(w)
        w.set_defaults(func=cmd_wx)

    if want("find"):
        f = sub.add_parser("find", help="every virtual address that maps a physical address (aliases)")
        f.add_argument("image")
        f.add_argument("pa")
        f.add_argument("--json", action="store_true")
        _scan_args(f)
        add_state_args(f)
        f.set_defaults(func=cmd_find)

    if want("diff"):
        df = sub.add_parser("diff", help="semantic difference of two images' translations")
        df.add_argument("image_a")
        df.add_argument("image_b")
        df.add_argument("--all", action="store_true", help="also list identical ranges")
        df.add_argument("--json", action="store_true")
        df.add_argument("--strict", action="store_true", help="exit 1 when anything differs")
        _scan_args(df)
        add_state_args(df)
        df.set_defaults(func=cmd_diff)


# -- demo -------------------------------------------------------------------------------------------
def demo_section(ctx: DemoContext) -> None:
    import json

    import io
    from x86pt.build import split_2m
    from x86pt.census import census
    from x86pt.cpa.layout import PAGE_OFFSET
    from x86pt.formats.dump import dump_to
    from x86pt.diff import diff_images
    from x86pt.image import Image

    img = Image(ctx.memory, ctx.state, ctx.image_path)
    ctx.heading("Dump (x86pt dump IMAGE --format ptdump --markers linux)")
    buf = io.BytesIO()
    dump_to(buf, img, "ptdump", markers="linux")
    text = buf.getvalue().decode()
    if ctx.json:
        print(json.dumps({"section": "dump", "lines": text.count("\n")}))
    else:
        sys.stdout.write(text)
    ctx.heading("QEMU's view (x86pt dump IMAGE --format qemu-mem)")
    buf = io.BytesIO()
    dump_to(buf, img, "qemu-mem")
    if not ctx.json:
        sys.stdout.write(buf.getvalue().decode())
    ctx.heading("Census (x86pt census IMAGE)")
    c = census(ctx.state, ctx.memory)
    if ctx.json:
        print(json.dumps({"section": "census", **c.to_json()}))
    else:
        sys.stdout.write(c.render())
    # A set_memory_ro() of one direct-map page: its 2M page splits into 512 PTEs, one of them RO.
    after = ctx.memory.copy()
    split_2m(after, ctx.state, PAGE_OFFSET + 0x3000000, 0x7F00000, range(5, 6))
    ctx.heading("Diff after set_memory_ro(PAGE_OFFSET + 0x3005000, 1) (x86pt diff A B)")
    r = diff_images(ctx.state, ctx.memory, ctx.state, after)
    if ctx.json:
        for p in r.changed:
            print(json.dumps({"section": "diff", **p.to_json()}))
    else:
        print(
            "the split 2M page is reported only where the rights changed; the other 511 PTEs "
            "translate exactly as the 2M page did:"
        )
        sys.stdout.write(r.render())
