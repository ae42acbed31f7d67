"""The Linux CPA model (docs/cpa.md): the direct map's page tables, change_page_attr, the merge
policies, the validator, traces and workloads. The modules, bottom up: kernel, layout, counters
-> tables (the table store) -> space (the kernel's view of it) -> protect -> split, merge, boot,
hotplug, export -> ops (CpaModel, the CPA operations) -> validate, trace, workload, importer."""
