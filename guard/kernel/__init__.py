"""The kernel edge: the only code that loads BPF programs, writes their maps or
reads cgroupfs and bpffs (loader, apply, resolve, cgroups, pin, tamper)."""
