"""Renderers: they take scan records (x86pt.scan.Chunk streams) and return text, never reading
memory themselves (the one exception is QEMU 7.2's LA57 `info mem`, whose quirk follows
non-present entries, so it walks the tables its own way).

ptdump.py   Linux /sys/kernel/debug/page_tables/* text, markers, the W+X check
qemu.py     QEMU 7.2 `info tlb` / `info mem`
tabular.py  JSON lines and CSV
cli.py      the dump, census, wx, find and diff commands
"""

FORMATS = ("ptdump", "qemu-mem", "qemu-tlb", "json", "csv")
