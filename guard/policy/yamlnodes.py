"""YAML nodes with their positions, and typed access to them with positioned errors.

The layer of guard's parser (guard.policy.parse) that knows YAML and nothing of
policies: composing a text into nodes (anchors, aliases and tags reported, not
resolved; a nesting limit; libyaml's events when PyYAML has it, else the
pure-Python parser, with the same positions), collecting diagnostics per file
(``Context``: 1-based FILE:LINE:COL, capped), and reading a node as a mapping
with known fields, a list, a string, one of an enum's values, or a converted
value, each reporting a wrong type at the node itself.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import TypeVar

import yaml
from yaml.composer import Composer
from yaml.error import Mark, MarkedYAMLError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from guard.errors import Code, Diagnostic, Location
from guard.policy.text import quoted as _q

MAX_DEPTH = 64  # a policy nests 8 levels deep; deeper input is rejected, not recursed into
MAX_ERRORS_PER_FILE = 1000
TAG_PREFIX = "tag:yaml.org,2002:"
TAG_STR, TAG_INT = TAG_PREFIX + "str", TAG_PREFIX + "int"
TAG_FLOAT, TAG_BOOL = TAG_PREFIX + "float", TAG_PREFIX + "bool"
TAG_NULL, TAG_TIMESTAMP = TAG_PREFIX + "null", TAG_PREFIX + "timestamp"
TAG_VALUE, TAG_MERGE = TAG_PREFIX + "value", TAG_PREFIX + "merge"
TAG_SEQ, TAG_MAP = TAG_PREFIX + "seq", TAG_PREFIX + "map"
# What a plain scalar may resolve to. ``value`` (a lone ``=``) and ``merge``
# (``<<``) are what PyYAML's YAML 1.1 resolver makes of those strings.
SCALAR_TAGS = frozenset({TAG_STR, TAG_INT, TAG_FLOAT, TAG_BOOL, TAG_NULL, TAG_TIMESTAMP,
                         TAG_VALUE, TAG_MERGE})
STRING_TAGS = frozenset({TAG_STR, TAG_VALUE, TAG_MERGE})
KIND_OF_TAG = {
    TAG_INT: "an integer",
    TAG_FLOAT: "a number",
    TAG_BOOL: "a boolean",
    TAG_NULL: "nothing (null)",
    TAG_TIMESTAMP: "a date",
}
LINE_BREAK_RE = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # what YAML counts as a line break
# The characters YAML allows in a stream (YAML 1.1 "printable", as both parsers check).
NON_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD"
                            "\U00010000-\U0010FFFF]")

E = TypeVar("E", bound=StrEnum)
_T = TypeVar("_T")


class Bad(Exception):
    """A value is invalid; the caller reports it at the value's node."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Context:
    """Diagnostics of one file, with the cap and the set of nodes already reported."""

    def __init__(self, filename: str, text: str) -> None:
        self.filename = filename
        self.text = text
        self._lines: list[str] | None = None
        self.diagnostics: list[Diagnostic] = []
        self.error_count = 0  # including those past the cap
        self.suppressed_at: Location | None = None
        # Nodes whose problem was reported at the YAML level (bad tag, alias):
        # the schema walk passes over them silently instead of adding a second,
        # confusing "wrong type" error.
        self.rejected: set[int] = set()

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = LINE_BREAK_RE.split(self.text)
        return self._lines

    def location(self, where: Node | Mark | None) -> Location:
        mark = where.start_mark if isinstance(where, Node) else where
        if mark is None:
            return Location(self.filename, 1, 1)
        line, col = mark.line + 1, mark.column + 1
        # libyaml reports the end of a stream without a final line break one line
        # further down; an error "at the end" is shown at the end of the last line.
        if line > len(self.lines):
            line, col = len(self.lines), len(self.lines[-1]) + 1
        return Location(self.filename, line, min(col, len(self.lines[line - 1]) + 1))

    def text_at(self, where: Location) -> str:
        """The rest of the line from a location, to recognize what an error is about."""
        return self.lines[where.line - 1][where.col - 1:]

    def error(self, where: Node | Mark | None, code: Code, message: str) -> None:
        self.add(Diagnostic(self.location(where), code, message))

    def warning(self, where: Node | Mark | None, code: Code, message: str) -> None:
        self.add(Diagnostic(self.location(where), code, message, "warning"))

    def add(self, diagnostic: Diagnostic) -> None:
        if diagnostic.severity == "error":
            self.error_count += 1
        if len(self.diagnostics) < MAX_ERRORS_PER_FILE:
            self.diagnostics.append(diagnostic)
        elif self.suppressed_at is None:
            self.suppressed_at = diagnostic.location

    def finish(self) -> list[Diagnostic]:
        if self.suppressed_at is not None:
            hidden = self.error_count - sum(d.severity == "error" for d in self.diagnostics)
            self.diagnostics.append(Diagnostic(
                self.suppressed_at, Code.TOO_MANY_ERRORS,
                f"too many problems: stopped reporting after {MAX_ERRORS_PER_FILE} "
                f"({hidden} more error(s) in this file)"))
        return self.diagnostics


# --------------------------------------------------------------------------- YAML level


class TooDeep(MarkedYAMLError):
    pass


class Rejected(ScalarNode):
    """Stands in for an alias: reported once, then skipped by every check."""


class GuardComposer(Composer, Resolver):
    """PyYAML's composer with anchors and aliases reported, not resolved, and a
    nesting limit (the composer recurses once per level). It reads parser events
    from whichever parser it is combined with below."""

    ctx: Context
    depth: int

    def _start(self, ctx: Context) -> None:
        Composer.__init__(self)
        Resolver.__init__(self)
        self.ctx = ctx
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):  # type: ignore[attr-defined]
            event = self.get_event()  # type: ignore[attr-defined]
            self.ctx.error(event.start_mark, Code.YAML_ALIAS,
                           "YAML aliases (*name) are not supported: write the value out")
            node = Rejected(TAG_NULL, "", event.start_mark, event.end_mark)
            self.ctx.rejected.add(id(node))
            return node
        event = self.peek_event()  # type: ignore[attr-defined]
        if event.anchor is not None:
            self.ctx.error(event.start_mark, Code.YAML_ANCHOR,
                           "YAML anchors (&name) are not supported: write the value out")
            event.anchor = None  # report once; never registered, so never a duplicate
        if self.depth >= MAX_DEPTH:
            raise TooDeep(None, None, f"nested more than {MAX_DEPTH} levels deep",
                           event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class PythonLoader(GuardComposer, Reader, Scanner, Parser):
    """Events from PyYAML's pure-Python scanner and parser."""

    def __init__(self, text: str, ctx: Context) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._start(ctx)


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class LibyamlLoader(GuardComposer, CParser):
        """Events from libyaml: the same events and marks, about ten times faster,
        which matters to a daemon that re-reads the whole directory on every change."""

        def __init__(self, text: str, ctx: Context) -> None:
            CParser.__init__(self, text)
            self._start(ctx)


# Which parser produces the events (PyYAML may be built without libyaml); tests run
# the fixtures through both.
USE_LIBYAML = yaml.__with_libyaml__


def line_col(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of a character index, counting line breaks as YAML does."""
    line, start = 1, 0
    for match in LINE_BREAK_RE.finditer(text, 0, index):
        line, start = line + 1, match.end()
    return line, index - start + 1


def yaml_error(ctx: Context, error: yaml.YAMLError) -> None:
    if isinstance(error, MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        message = error.problem or error.context or "invalid YAML"
        if error.problem and error.context:
            started = ""
            context_mark = error.context_mark
            if context_mark is not None and (mark is None or context_mark.index != mark.index):
                started = f" starting at {context_mark.line + 1}:{context_mark.column + 1}"
            message = f"{error.problem} ({error.context}{started})"
        where = ctx.location(mark)
        after = ctx.text_at(where)
        if after.startswith("::"):
            message += " (quote IPv6 addresses: \"::/0\")"
        elif after.startswith("\t"):
            message += " (a tab: YAML indents with spaces)"
        code = Code.YAML_TOO_DEEP if isinstance(error, TooDeep) else Code.YAML_SYNTAX
        ctx.add(Diagnostic(where, code, message))
        return
    ctx.error(None, Code.YAML_SYNTAX, str(error))


def compose(text: str, ctx: Context) -> Iterator[Node]:
    """Each document's root node; a syntax error is reported and ends the stream."""
    bad = NON_PRINTABLE.search(text)
    if bad:
        # Checked here, for both parsers alike: libyaml would report a byte offset.
        line, col = line_col(text, bad.start())
        ctx.add(Diagnostic(Location(ctx.filename, line, col), Code.BAD_CHARACTER,
                           f"character U+{ord(bad.group()):04X} is not allowed in YAML"))
        return
    loader: GuardComposer = (LibyamlLoader if USE_LIBYAML else PythonLoader)(text, ctx)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                yield node
    except yaml.YAMLError as error:
        yaml_error(ctx, error)
    finally:
        loader.dispose()  # type: ignore[attr-defined]


def yaml_checks(ctx: Context, root: Node) -> None:
    """What is wrong at the YAML level anywhere in a document: unsupported tags,
    duplicate keys (PyYAML keeps the last one silently), merge keys."""
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in ctx.rejected:
            continue
        if not tag_fits(node):
            ctx.error(node, Code.YAML_TAG, f"unsupported YAML tag {show_tag(node.tag)}: "
                      "policies use plain strings, numbers, booleans, lists and mappings")
            ctx.rejected.add(id(node))
            continue
        if isinstance(node, MappingNode):
            first: dict[str, Node] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and id(key) not in ctx.rejected:
                    if key.tag == TAG_MERGE:
                        ctx.error(key, Code.YAML_MERGE_KEY,
                                  "YAML merge keys (<<) are not supported: write the keys out")
                        ctx.rejected.add(id(key))
                    elif key.value in first:
                        there = ctx.location(first[key.value])
                        ctx.error(key, Code.DUPLICATE_KEY,
                                  f"duplicate key {_q(key.value)} (first at "
                                  f"{there.line}:{there.col}); a key may appear once")
                    else:
                        first[key.value] = key
                stack.extend((value, key))
        elif isinstance(node, SequenceNode):
            stack.extend(reversed(node.value))


def tag_fits(node: Node) -> bool:
    if isinstance(node, MappingNode):
        return node.tag == TAG_MAP
    if isinstance(node, SequenceNode):
        return node.tag == TAG_SEQ
    return node.tag in SCALAR_TAGS


def show_tag(tag: str) -> str:
    # Quoted like any echoed value: a tag may hold %-escapes such as a line break.
    return _q("!!" + tag[len(TAG_PREFIX):] if tag.startswith(TAG_PREFIX) else tag)


# --------------------------------------------------------------------------- structure


def node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return KIND_OF_TAG.get(node.tag, "a string")


def quote_hint(node: Node) -> str:
    """For a plain scalar YAML read as a non-string (yes, 1.0, 2024-01-01, 0755)."""
    if (isinstance(node, ScalarNode) and not node.style and node.tag not in STRING_TAGS
            and node.value != ""):
        return f" (quote it to make it a string: \"{_q(node.value)[1:-1]}\")"
    return ""


def wrong_type(ctx: Context, node: Node, where: str, expected: str, hint: str = "") -> None:
    if isinstance(node, ScalarNode) and node.tag == TAG_NULL:
        hint = hint or (" (write {} for an empty section, or remove the key)"
                        if expected == "a mapping" else "")
        ctx.error(node, Code.WRONG_TYPE, f"{where} is empty: expected {expected}{hint}")
        return
    ctx.error(node, Code.WRONG_TYPE,
              f"expected {expected} for {where}, got {node_kind(node)}{hint}")


def mapping_fields(ctx: Context, node: Node, where: str, required: Sequence[str],
            allowed: Sequence[str], hints: Mapping[str, str] | None = None,
            ) -> dict[str, Node] | None:
    """A mapping's known keys and their value nodes; unknown and missing keys reported.

    The first occurrence of a duplicated key counts (the duplicate is reported
    by yaml_checks). A missing required key that an unknown key is a near miss
    of is not reported twice: "unknown key 'pahts'; did you mean 'paths'?" says it.
    """
    if id(node) in ctx.rejected:
        return None
    if not isinstance(node, MappingNode):
        wrong_type(ctx, node, where, "a mapping")
        return None
    fields: dict[str, Node] = {}
    seen: set[str] = set()
    suggested: set[str] = set()
    unreadable = False  # a merge key or alias may have meant to supply a missing key
    for key, value in node.value:
        if id(key) in ctx.rejected:
            unreadable = True
            continue
        if not isinstance(key, ScalarNode):
            ctx.error(key, Code.BAD_KEY,
                      f"keys in {where} must be plain words, got {node_kind(key)}")
            continue
        name = str(key.value)
        if name in seen:
            continue
        seen.add(name)
        if name in allowed:
            fields[name] = value
            continue
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        if not close:
            close = [a for a in allowed if a.lower() == name.lower()]
        if hints and name in hints and not close:
            hint = hints[name]
        elif close:
            hint = f"did you mean {close[0]!r}?"
            suggested.add(close[0])
        else:
            hint = "valid keys: " + ", ".join(allowed)
        ctx.error(key, Code.UNKNOWN_KEY, f"unknown key {_q(name)} in {where}; {hint}")
    for name in required:
        if name not in fields and name not in suggested and not unreadable:
            ctx.error(node, Code.MISSING_KEY, f"missing required key {_q(name)} in {where}")
    return fields


def node_list(ctx: Context, node: Node, where: str, empty: str | None) -> list[Node]:
    """A list's items; ``empty`` is the advice when an empty list is an error (None: allowed)."""
    if id(node) in ctx.rejected:
        return []
    if not isinstance(node, SequenceNode):
        hint = ""
        if isinstance(node, ScalarNode) and node.tag != TAG_NULL:
            hint = f" (a list of one is written [{_q(node.value)[1:-1]}])"
        elif isinstance(node, MappingNode):
            hint = " (write each item on a line of its own starting with '- ')"
        wrong_type(ctx, node, where, "a list", hint)
        return []
    if not node.value and empty is not None:
        ctx.error(node, Code.EMPTY_LIST, f"{where} is an empty list: {empty}")
    return list(node.value)


def node_string(ctx: Context, node: Node, where: str) -> str | None:
    if id(node) in ctx.rejected:
        return None
    if not isinstance(node, ScalarNode) or node.tag not in STRING_TAGS:
        wrong_type(ctx, node, where, "a string", quote_hint(node))
        return None
    return str(node.value)


def exact(ctx: Context, node: Node, where: str, expected: str, code: Code) -> None:
    value = node_string(ctx, node, where)
    if value is not None and value != expected:
        ctx.error(node, code, f"unsupported {where} {_q(value)}: expected {expected!r}")


def choice(ctx: Context, node: Node, where: str, enum: type[E]) -> E | None:
    valid = [member.value for member in enum]
    if id(node) in ctx.rejected:
        return None
    if not isinstance(node, ScalarNode) or node.tag not in STRING_TAGS:
        # Quoting helps only when the text is a valid choice YAML read as something else.
        hint = quote_hint(node) if node.value in valid else ""
        wrong_type(ctx, node, where, "one of " + ", ".join(valid), hint)
        return None
    value = str(node.value)
    if value in valid:
        return enum(value)
    close = difflib.get_close_matches(value.lower(), valid, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]!r}?" if close else ""
    ctx.error(node, Code.BAD_VALUE,
              f"invalid {where} {_q(value)}{hint} (valid: {', '.join(valid)})")
    return None


def converted(ctx: Context, node: Node, where: str, convert: Callable[[str], _T]) -> _T | None:
    """A string scalar passed through ``convert``; a Bad it raises is reported at the node."""
    text = node_string(ctx, node, where)
    if text is None:
        return None
    try:
        return convert(text)
    except Bad as bad:
        ctx.error(node, bad.code, bad.message)
        return None


