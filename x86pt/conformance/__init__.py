"""x86pt's conformance suite for emulator and hypervisor projects:

    python -m pytest --pyargs x86pt.conformance --x86pt-oracle NAME|cmd:PROGRAM ARGS

The test module here names one fixture; the pytest plugin that ships with x86pt (entry point
`pytest11: x86pt`) parametrizes it with the cases (docs/conformance.md). Importing this package
imports nothing else.
"""
