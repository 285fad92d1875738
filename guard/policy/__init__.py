"""The pure middle: policy text in, a compiled plan out, and the offline evaluator.

Nothing here touches the kernel or imports bcc: parse (YAML nodes with their
positions) -> model (frozen dataclasses) -> compile -> plan, and evaluate (the
kernel's decision rule over a plan, for ``guard explain``).
"""
