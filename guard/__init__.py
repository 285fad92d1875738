"""guard: security policies as code, enforced in the kernel with eBPF.

The data path runs one way (see docs/architecture.md):

    parse -> model -> compile -> plan -> resolve/apply -> BPF maps
    kernel events -> audit -> sinks (syslog)
"""

__version__ = "0.1.0"
