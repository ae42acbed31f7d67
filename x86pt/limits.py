"""Default work limits, in a module that imports nothing, so the argument parser can show them
without loading the scanner or the builder (start-up time)."""
# SPDX-License-Identifier: GPL-2.0-or-later

# Page-table entries a scan may visit (512 per table read); `--max-entries N` raises it.
DEFAULT_MAX_ENTRIES = 1 << 26
# Leaf entries one `build` may write, checked before any table is allocated.
DEFAULT_MAX_BUILD_ENTRIES = 1 << 20
