"""The rig's oracles. Each is registered under the `x86pt.oracles` entry-point group in
pyproject.toml, as a third party's oracle would be, and found through x86pt.oracle's registry:

    unicorn       harness.oracles.unicorn_oracle:UnicornOracle   (in-process)
    qemu          harness.oracles.qemu:QemuOracle                (qemu-system-x86_64 + probe guest)
    kvm           harness.oracles.kvm:KvmOracle                  (/dev/kvm + probe guest)
    qemu-monitor  harness.oracles.qemu_monitor:QemuMonitorOracle (translation-only monitor queries)
    model         harness.oracles.model:ModelOracle              (x86pt's own walker; tests)
"""
