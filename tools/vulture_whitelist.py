# SPDX-License-Identifier: GPL-2.0-or-later
"""Names vulture reports that are used in ways it cannot see (tests/test_lint.py runs
`vulture x86pt harness tools tools/vulture_whitelist.py --min-confidence 80`). Each line names
the use; vulture reads this file, nothing imports it. Add a name here only with its reason;
dead code is deleted instead."""
# ruff: noqa: F821, B018

exc  # the exception arguments of __exit__(self, *exc) and (exc_type, exc, tb): the protocol's signature
x86pt_oracle  # harness/pytest_plugin.py: a fixture requested by name, so its value is not read
