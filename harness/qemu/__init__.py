"""Running QEMU for the rig, one concern per module (docs/oracles.md §5.1):

    process  find the binary, start QEMU in its own process group, wait for it, kill it, clean up
    qmp      the one QMP client of the project (on the `qemu.qmp` library)
    gdb      the few GDB remote-protocol packets the monitor needs (register read/write)
    ram      the guest RAM as a shared tmpfs file, and where the pc machine puts each address
    monitor  QemuMonitor: a paused QEMU whose RAM is an image, queried through QMP and the gdbstub

The parsers of QEMU's `info tlb` / `info mem` text are in the library, next to the writers of that
format (x86pt/formats/qemu_parse.py).
"""
