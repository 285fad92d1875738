"""The words guard's messages share: quoted values, verdicts, rules, patterns, port lines.

``guard check`` and the unit-name rule quote what was written with ``quoted``;
the compiler's listing (``guard compile``) and the evaluator's answers
(``guard explain``) name verdicts, rules, path patterns and port lines with the
rest, so every command says the same thing the same way. Pure: text in, text out.
"""

from __future__ import annotations

from guard.policy.plan import PORT_MAX, Decision, Plan, PortMatch, Proto, Verdict


def quoted(text: object, limit: int = 200) -> str:
    """A value quoted for a message, shortened: one diagnostic stays one readable line."""
    shown = str(text)
    return repr(shown if len(shown) <= limit else shown[:limit - 3] + "...")


def verdict_word(verdict: Verdict) -> str:
    return verdict.name.lower().replace("_", "-")


def rule_text(plan: Plan, rule_id: int) -> str:
    """``web-tier/exec.rules[0] (policies/web.yaml:12:9)``."""
    ref = plan.rule(rule_id)
    return "no rule" if ref is None else f"{ref.label} ({ref.location})"


def decision_text(plan: Plan, decision: Decision | None) -> str:
    if decision is None:
        return "-"
    return f"{verdict_word(decision.verdict)} by {rule_text(plan, decision.rule)}"


def pattern_text(path: str, subtree: bool) -> str:
    if not subtree:
        return path
    return "/**" if path == "/" else f"{path}/**"


def port_text(line: PortMatch) -> str:
    """``tcp port 25``, ``udp ports 1000-2000``, ``any port (any protocol)``."""
    if (line.first, line.last) == (0, PORT_MAX):
        ports = "any port"
    elif line.first == line.last:
        ports = f"port {line.first}"
    else:
        ports = f"ports {line.first}-{line.last}"
    if line.proto is Proto.ANY:
        return f"{ports} (any protocol)"
    return f"{line.proto.name.lower()} {ports}"
