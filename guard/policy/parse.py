"""Policy files in, policy model out: the parser and validator behind ``guard check``.

The YAML is *composed*, never constructed: ``yaml.compose`` yields nodes that
keep their type tag and their position, so every diagnostic points at the
offending value (a bad CIDR at the list item, an unknown key at the key), and no
YAML tag can ever make the loader build a Python object. The parser events come
from libyaml when PyYAML has it (ten times faster: a reload re-reads the whole
directory), else from PyYAML's pure-Python parser; positions are the same.

Everything is collected, nothing is raised: every file, every document and every
value is checked, and the result is the full sorted list of diagnostics (capped
at ``MAX_ERRORS_PER_FILE`` per file). Any input text, even binary garbage,
yields policies or positioned diagnostics, never a traceback.

Decisions (docs/policy.md says them for users):

- Anchors and aliases (``&a``, ``*a``) and merge keys (``<<``) are rejected: a
  policy is read by people reviewing a diff, and an alias hides the value it
  stands for. Rejecting them also rules out alias-expansion bombs.
- Only the plain YAML types are accepted (string, integer, boolean, null, list,
  mapping); an explicit tag such as ``!!python/object`` is an error.
- ``null`` is never a value: ``exec:`` with nothing after it is an error that
  says to write ``{}`` or remove the key, because an empty value is more often
  an unfinished edit than an intent.
- Empty sections are allowed and mean their defaults: ``exec: {}`` is
  ``default: allow`` with no rules; ``rules: []`` is no rules. An empty
  ``scope`` (or an empty ``cgroups``/``units`` list) is an error, because
  "no scope" means the *whole host*, which is never what an empty list meant.
- Lists whose emptiness would be meaningless (``paths``, ``access``, ``to``,
  ``ports``) must not be empty; omit ``ports`` for "any port".
- A file with no document, or an empty document between ``---`` separators,
  is a warning, not an error: it contributes no policy.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from guard.policy.model import (
    API_VERSION,
    KIND,
    Access,
    Action,
    Default,
    EgressSection,
    ExecRule,
    ExecSection,
    FileRule,
    FilesSection,
    IPNetwork,
    Mode,
    NetRule,
    PathPattern,
    Policy,
    PolicySet,
    PortRange,
    Protocol,
    Scope,
)
from guard.policy.text import quoted as _q
from guard.policy.units import check_unit_name

MAX_ERRORS_PER_FILE = 1000
MAX_FILE_BYTES = 1 << 20  # policies are written by hand; a bigger file is a mistake
MAX_DEPTH = 64  # a policy nests 8 levels deep; deeper input is rejected, not recursed into
PATH_MAX = 4096  # bytes, including the terminating NUL (Linux)
NAME_MAX = 255  # bytes in one path component (Linux)
POLICY_SUFFIXES = (".yaml", ".yml")
EDITOR_DROPPINGS = ("~", ".swp", ".swx", ".swo")

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
NAME_LEN = 63
CGROUP_MOUNT_PREFIXES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL = _TAG + "str", _TAG + "int", _TAG + "float", _TAG + "bool"
_NULL, _TIMESTAMP = _TAG + "null", _TAG + "timestamp"
_VALUE, _MERGE = _TAG + "value", _TAG + "merge"
_SEQ, _MAP = _TAG + "seq", _TAG + "map"
# What a plain scalar may resolve to. ``value`` (a lone ``=``) and ``merge``
# (``<<``) are what PyYAML's YAML 1.1 resolver makes of those strings.
_SCALAR_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL, _TIMESTAMP, _VALUE, _MERGE})
_STRING_TAGS = frozenset({_STR, _VALUE, _MERGE})
_KIND_OF_TAG = {
    _INT: "an integer",
    _FLOAT: "a number",
    _BOOL: "a boolean",
    _NULL: "nothing (null)",
    _TIMESTAMP: "a date",
}
_LINE_BREAK_RE = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # what YAML counts as a line break
# The characters YAML allows in a stream (YAML 1.1 "printable", as both parsers check).
_NON_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD"
                            "\U00010000-\U0010FFFF]")

E = TypeVar("E", bound=StrEnum)
_T = TypeVar("_T")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LoadResult:
    """What a set of policy paths amounts to.

    ``policy_set`` is None as soon as any diagnostic is an error, so nothing
    half-valid is ever compiled; ``diagnostics`` holds every problem (errors and
    warnings) of every file, sorted; ``files`` the policy files read, in order.
    """

    policy_set: PolicySet | None
    diagnostics: tuple[Diagnostic, ...]
    files: tuple[str, ...]

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")


@dataclass(frozen=True)
class _Document:
    """One document's outcome: its name (for the duplicate check) and its policy."""

    name: str | None
    name_location: Location | None
    policy: Policy | None  # None when the document has an error


class _Bad(Exception):
    """A value is invalid; the caller reports it at the value's node."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Context:
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
            self._lines = _LINE_BREAK_RE.split(self.text)
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


# --------------------------------------------------------------------------- loading


def load_policy_paths(paths: Sequence[str]) -> LoadResult:
    """Read every policy file named or found below the given paths, and validate all of it.

    A directory contributes every ``*.yaml``/``*.yml`` below it, recursively, in
    sorted order, skipping dot-names and editor droppings; an explicitly named
    file is always read, whatever its name.
    """
    diagnostics: list[Diagnostic] = []
    documents: list[_Document] = []
    files = _collect_files(paths, diagnostics)
    for name in files:
        text, problem = _read_text(name)
        if problem is not None:
            diagnostics.append(problem)
            continue
        file_documents, file_diagnostics = _parse_documents(text, name)
        documents.extend(file_documents)
        diagnostics.extend(file_diagnostics)
    diagnostics.extend(_duplicate_names(documents))
    errors = any(d.severity == "error" for d in diagnostics)
    policy_set = None
    if not errors:
        policies = sorted((d.policy for d in documents if d.policy is not None),
                          key=lambda p: p.name)
        policy_set = PolicySet(tuple(policies))
    return LoadResult(policy_set, tuple(sorted(diagnostics)), tuple(files))


def parse_text(text: str, filename: str) -> tuple[list[Policy], list[Diagnostic]]:
    """Parse one file's text (one or more ``---``-separated documents).

    Returns the policies of the documents without errors and every diagnostic,
    sorted. Names are checked for duplicates within this text only.
    """
    documents, diagnostics = _parse_documents(text, filename)
    diagnostics.extend(_duplicate_names(documents))
    policies = [d.policy for d in documents if d.policy is not None]
    return policies, sorted(diagnostics)


def _collect_files(paths: Sequence[str], diagnostics: list[Diagnostic]) -> list[str]:
    """The files to read, in argument order, each directory's files sorted, no repeats."""
    files: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        key = os.path.normpath(os.path.abspath(name))
        if key not in seen:
            seen.add(key)
            files.append(name)

    for path in paths:
        if os.path.isdir(path):
            for name in _directory_files(path, diagnostics):
                add(name)
        elif os.path.lexists(path):
            add(path)
        else:
            diagnostics.append(Diagnostic(Location(path, 1, 1), Code.PATH_NOT_FOUND,
                                          "no such file or directory"))
    return files


def _is_policy_name(name: str) -> bool:
    return (name.endswith(POLICY_SUFFIXES) and not name.startswith((".", "#"))
            and not name.endswith(EDITOR_DROPPINGS))


def _directory_files(top: str, diagnostics: list[Diagnostic]) -> list[str]:
    """Policy files below ``top``. Symlinked files are read; symlinked directories
    are not entered (no loops, and the tree read is the tree seen)."""
    found: list[tuple[tuple[str, ...], str]] = []

    def unreadable(error: OSError) -> None:
        name = str(error.filename or top)
        diagnostics.append(Diagnostic(Location(name, 1, 1), Code.READ_ERROR,
                                      f"cannot read directory: {error.strerror or error}"))

    for directory, dirnames, filenames in os.walk(top, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if _is_policy_name(name):
                full = os.path.join(directory, name)
                parts = tuple(os.path.relpath(full, top).split(os.sep))
                found.append((parts, full))
    return [full for _, full in sorted(found)]


def _read_text(name: str) -> tuple[str, Diagnostic | None]:
    """The file's text, or the diagnostic saying why there is none."""
    at_start = Location(name, 1, 1)
    try:
        info = os.stat(name)
    except FileNotFoundError:
        return "", Diagnostic(at_start, Code.READ_ERROR,
                              "broken symbolic link" if os.path.islink(name)
                              else "no such file or directory")
    except OSError as error:
        return "", Diagnostic(at_start, Code.READ_ERROR, f"cannot read: {error.strerror or error}")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device would block or never end; a policy is a regular file.
        return "", Diagnostic(at_start, Code.READ_ERROR, "not a regular file")
    try:
        with open(name, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        return "", Diagnostic(at_start, Code.READ_ERROR, f"cannot read: {error.strerror or error}")
    if len(data) > MAX_FILE_BYTES:
        return "", Diagnostic(at_start, Code.FILE_TOO_LARGE,
                              f"file is larger than {MAX_FILE_BYTES} bytes")
    try:
        # utf-8-sig: a leading byte-order mark is dropped, so columns match editors.
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        prefix = data[line_start:error.start].decode("utf-8-sig", errors="replace")
        return "", Diagnostic(Location(name, line, len(prefix) + 1), Code.BAD_ENCODING,
                              f"not UTF-8 text: byte 0x{data[error.start]:02x} cannot be decoded")


# --------------------------------------------------------------------------- YAML level


class _TooDeep(MarkedYAMLError):
    pass


class _Rejected(ScalarNode):
    """Stands in for an alias: reported once, then skipped by every check."""


class _GuardComposer(Composer, Resolver):
    """PyYAML's composer with anchors and aliases reported, not resolved, and a
    nesting limit (the composer recurses once per level). It reads parser events
    from whichever parser it is combined with below."""

    ctx: _Context
    depth: int

    def _start(self, ctx: _Context) -> None:
        Composer.__init__(self)
        Resolver.__init__(self)
        self.ctx = ctx
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):  # type: ignore[attr-defined]
            event = self.get_event()  # type: ignore[attr-defined]
            self.ctx.error(event.start_mark, Code.YAML_ALIAS,
                           "YAML aliases (*name) are not supported: write the value out")
            node = _Rejected(_NULL, "", event.start_mark, event.end_mark)
            self.ctx.rejected.add(id(node))
            return node
        event = self.peek_event()  # type: ignore[attr-defined]
        if event.anchor is not None:
            self.ctx.error(event.start_mark, Code.YAML_ANCHOR,
                           "YAML anchors (&name) are not supported: write the value out")
            event.anchor = None  # report once; never registered, so never a duplicate
        if self.depth >= MAX_DEPTH:
            raise _TooDeep(None, None, f"nested more than {MAX_DEPTH} levels deep",
                           event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _PythonLoader(_GuardComposer, Reader, Scanner, Parser):
    """Events from PyYAML's pure-Python scanner and parser."""

    def __init__(self, text: str, ctx: _Context) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._start(ctx)


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _LibyamlLoader(_GuardComposer, CParser):
        """Events from libyaml: the same events and marks, about ten times faster,
        which matters to a daemon that re-reads the whole directory on every change."""

        def __init__(self, text: str, ctx: _Context) -> None:
            CParser.__init__(self, text)
            self._start(ctx)


# Which parser produces the events (PyYAML may be built without libyaml); tests run
# the fixtures through both.
USE_LIBYAML = yaml.__with_libyaml__


def _line_col(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of a character index, counting line breaks as YAML does."""
    line, start = 1, 0
    for match in _LINE_BREAK_RE.finditer(text, 0, index):
        line, start = line + 1, match.end()
    return line, index - start + 1


def _yaml_error(ctx: _Context, error: yaml.YAMLError) -> None:
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
        code = Code.YAML_TOO_DEEP if isinstance(error, _TooDeep) else Code.YAML_SYNTAX
        ctx.add(Diagnostic(where, code, message))
        return
    ctx.error(None, Code.YAML_SYNTAX, str(error))


def _compose(text: str, ctx: _Context) -> Iterator[Node]:
    """Each document's root node; a syntax error is reported and ends the stream."""
    bad = _NON_PRINTABLE.search(text)
    if bad:
        # Checked here, for both parsers alike: libyaml would report a byte offset.
        line, col = _line_col(text, bad.start())
        ctx.add(Diagnostic(Location(ctx.filename, line, col), Code.BAD_CHARACTER,
                           f"character U+{ord(bad.group()):04X} is not allowed in YAML"))
        return
    loader: _GuardComposer = (_LibyamlLoader if USE_LIBYAML else _PythonLoader)(text, ctx)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                yield node
    except yaml.YAMLError as error:
        _yaml_error(ctx, error)
    finally:
        loader.dispose()  # type: ignore[attr-defined]


def _yaml_checks(ctx: _Context, root: Node) -> None:
    """What is wrong at the YAML level anywhere in a document: unsupported tags,
    duplicate keys (PyYAML keeps the last one silently), merge keys."""
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in ctx.rejected:
            continue
        if not _tag_fits(node):
            ctx.error(node, Code.YAML_TAG, f"unsupported YAML tag {_show_tag(node.tag)}: "
                      "policies use plain strings, numbers, booleans, lists and mappings")
            ctx.rejected.add(id(node))
            continue
        if isinstance(node, MappingNode):
            first: dict[str, Node] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and id(key) not in ctx.rejected:
                    if key.tag == _MERGE:
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


def _tag_fits(node: Node) -> bool:
    if isinstance(node, MappingNode):
        return node.tag == _MAP
    if isinstance(node, SequenceNode):
        return node.tag == _SEQ
    return node.tag in _SCALAR_TAGS


def _show_tag(tag: str) -> str:
    # Quoted like any echoed value: a tag may hold %-escapes such as a line break.
    return _q("!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag)


# --------------------------------------------------------------------------- documents


def _parse_documents(text: str, filename: str) -> tuple[list[_Document], list[Diagnostic]]:
    ctx = _Context(filename, text)
    documents: list[_Document] = []
    seen_any = False
    # Errors found while composing a document (anchors, aliases) are counted
    # before its root is yielded: the baseline is where the previous one ended.
    errors_before = 0
    for root in _compose(text, ctx):
        seen_any = True
        _yaml_checks(ctx, root)
        if id(root) in ctx.rejected:
            pass  # the whole document is an alias or a tagged value: already reported
        elif isinstance(root, ScalarNode) and root.tag == _NULL and root.value == "":
            ctx.warning(root, Code.EMPTY_DOCUMENT, "empty document: it contains no policy")
        else:
            documents.append(_read_document(ctx, root, errors_before))
        errors_before = ctx.error_count
    if not seen_any and ctx.error_count == 0:
        ctx.warning(None, Code.EMPTY_FILE, "no policy in this file")
    return documents, ctx.finish()


def _duplicate_names(documents: Iterable[_Document]) -> list[Diagnostic]:
    first: dict[str, Location] = {}
    found: list[Diagnostic] = []
    for document in documents:
        if document.name is None or document.name_location is None:
            continue
        if document.name in first:
            found.append(Diagnostic(
                document.name_location, Code.DUPLICATE_NAME,
                f"duplicate policy name {_q(document.name)}: first defined at "
                f"{first[document.name]}"))
        else:
            first[document.name] = document.name_location
    return found


# Keys each mapping accepts, and hints for keys people write that belong elsewhere.
_ROOT_KEYS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_KEYS = ("name", "description")
_SPEC_KEYS = ("mode", "scope", "exec", "files", "network")
_SPEC_HINTS = {
    "egress": "egress rules go under 'network:' as 'network: {egress: ...}'",
    "ingress": "guard controls outbound connections only (network.egress)",
    "default": "defaults are per section: exec.default and network.egress.default",
    "rules": "rules belong to a section: exec.rules, files.rules or network.egress.rules",
}
_SCOPE_KEYS = ("cgroups", "units")
_EXEC_KEYS = ("default", "rules")
_FILES_KEYS = ("rules",)
_FILES_HINTS = {"default": "the files section has no default: accesses no rule matches "
                           "are allowed"}
_NETWORK_KEYS = ("egress",)
_NETWORK_HINTS = {"ingress": "guard controls outbound connections only (egress)"}
_EGRESS_KEYS = ("default", "rules")
_EXEC_RULE_KEYS = ("action", "paths")
_EXEC_RULE_HINTS = {"access": "'access' belongs to files rules; an exec rule has "
                              "'action' and 'paths'"}
_FILE_RULE_KEYS = ("action", "access", "paths")
_NET_RULE_REQUIRED = ("action", "to")
_NET_RULE_KEYS = ("action", "to", "ports", "protocol")
_NET_RULE_HINTS = {
    "from": "guard controls outbound connections only: name their destination with 'to'",
    "cidr": "did you mean 'to'?",
    "cidrs": "did you mean 'to'?",
    "addresses": "did you mean 'to'?",
    "destination": "did you mean 'to'?",
    "port": "did you mean 'ports'?",
}


def _read_document(ctx: _Context, root: Node, errors_before: int) -> _Document:
    """The document's policy, built only when nothing in it (since errors_before) was wrong."""
    fields = _fields(ctx, root, "a policy document", _ROOT_KEYS, _ROOT_KEYS)
    if fields is None:
        return _Document(None, None, None)
    if "apiVersion" in fields:
        _exact(ctx, fields["apiVersion"], "apiVersion", API_VERSION, Code.BAD_API_VERSION)
    if "kind" in fields:
        _exact(ctx, fields["kind"], "kind", KIND, Code.BAD_KIND)
    name, name_node, description = None, None, ""
    metadata = _fields(ctx, fields["metadata"], "metadata", ("name",), _METADATA_KEYS) \
        if "metadata" in fields else None
    if metadata is not None:
        if "name" in metadata:
            name_node = metadata["name"]
            name = _policy_name(ctx, name_node)
        if "description" in metadata:
            description = _string(ctx, metadata["description"], "metadata.description") or ""
    policy = None
    spec = _read_spec(ctx, fields["spec"]) if "spec" in fields else None
    if spec is not None and name is not None and ctx.error_count == errors_before:
        mode, scope, exec_section, files, egress = spec
        policy = Policy(name, description, mode, scope, exec_section, files, egress,
                        ctx.location(root))
    name_location = ctx.location(name_node) if name is not None else None
    return _Document(name, name_location, policy)


_Spec = tuple[Mode, Scope, ExecSection | None, FilesSection | None, EgressSection | None]


def _read_spec(ctx: _Context, node: Node) -> _Spec | None:
    fields = _fields(ctx, node, "spec", (), _SPEC_KEYS, _SPEC_HINTS)
    if fields is None:
        return None
    mode = _choice(ctx, fields["mode"], "spec.mode", Mode) if "mode" in fields else Mode.ENFORCE
    scope = _read_scope(ctx, fields["scope"]) if "scope" in fields else Scope()
    exec_section = _read_exec(ctx, fields["exec"]) if "exec" in fields else None
    files = _read_files(ctx, fields["files"]) if "files" in fields else None
    egress = _read_network(ctx, fields["network"]) if "network" in fields else None
    if mode is None or scope is None:
        return None
    return mode, scope, exec_section, files, egress


def _read_scope(ctx: _Context, node: Node) -> Scope | None:
    fields = _fields(ctx, node, "spec.scope", (), _SCOPE_KEYS)
    if fields is None:
        return None
    if not fields:
        ctx.error(node, Code.EMPTY_SCOPE,
                  "empty scope: list cgroups and/or units, or remove 'scope' to cover the "
                  "whole host")
        return None
    # dicts as ordered sets: a repeated entry counts once, in first-seen order
    cgroups: dict[str, None] = {}
    units: dict[str, None] = {}
    if "cgroups" in fields:
        for i, item in enumerate(_list(ctx, fields["cgroups"], "spec.scope.cgroups",
                                       empty="remove 'cgroups' (no scope means the whole host)")):
            cgroup = _value(ctx, item, f"spec.scope.cgroups[{i}]", _cgroup_path)
            if cgroup is not None:
                cgroups.setdefault(cgroup)
    if "units" in fields:
        for i, item in enumerate(_list(ctx, fields["units"], "spec.scope.units",
                                       empty="remove 'units' (no scope means the whole host)")):
            unit = _value(ctx, item, f"spec.scope.units[{i}]", _unit_name)
            if unit is not None:
                units.setdefault(unit)
    return Scope(tuple(cgroups), tuple(units))


def _read_exec(ctx: _Context, node: Node) -> ExecSection | None:
    fields = _fields(ctx, node, "spec.exec", (), _EXEC_KEYS)
    if fields is None:
        return None
    default = _choice(ctx, fields["default"], "spec.exec.default", Default) \
        if "default" in fields else Default.ALLOW
    rules: list[ExecRule] = []
    for index, item in _rule_items(ctx, fields, "spec.exec.rules"):
        where = f"spec.exec.rules[{index}]"
        rule = _fields(ctx, item, where, _EXEC_RULE_KEYS, _EXEC_RULE_KEYS, _EXEC_RULE_HINTS)
        if rule is None:
            continue
        action = _choice(ctx, rule["action"], f"{where}.action", Action) \
            if "action" in rule else None
        paths = _paths(ctx, rule["paths"], f"{where}.paths") if "paths" in rule else None
        if action is not None and paths is not None:
            rules.append(ExecRule(index, action, paths, ctx.location(item)))
    if default is None:
        return None
    return ExecSection(default, tuple(rules), ctx.location(node))


def _read_files(ctx: _Context, node: Node) -> FilesSection | None:
    fields = _fields(ctx, node, "spec.files", (), _FILES_KEYS, _FILES_HINTS)
    if fields is None:
        return None
    rules: list[FileRule] = []
    for index, item in _rule_items(ctx, fields, "spec.files.rules"):
        where = f"spec.files.rules[{index}]"
        rule = _fields(ctx, item, where, _FILE_RULE_KEYS, _FILE_RULE_KEYS)
        if rule is None:
            continue
        action = _choice(ctx, rule["action"], f"{where}.action", Action) \
            if "action" in rule else None
        access = _access(ctx, rule["access"], f"{where}.access") if "access" in rule else None
        paths = _paths(ctx, rule["paths"], f"{where}.paths") if "paths" in rule else None
        if action is not None and access is not None and paths is not None:
            rules.append(FileRule(index, action, access, paths, ctx.location(item)))
    return FilesSection(tuple(rules), ctx.location(node))


def _read_network(ctx: _Context, node: Node) -> EgressSection | None:
    fields = _fields(ctx, node, "spec.network", (), _NETWORK_KEYS, _NETWORK_HINTS)
    if fields is None or "egress" not in fields:
        return None
    egress = fields["egress"]
    section = _fields(ctx, egress, "spec.network.egress", (), _EGRESS_KEYS)
    if section is None:
        return None
    default = _choice(ctx, section["default"], "spec.network.egress.default", Default) \
        if "default" in section else Default.ALLOW
    rules: list[NetRule] = []
    for index, item in _rule_items(ctx, section, "spec.network.egress.rules"):
        where = f"spec.network.egress.rules[{index}]"
        rule = _fields(ctx, item, where, _NET_RULE_REQUIRED, _NET_RULE_KEYS, _NET_RULE_HINTS)
        if rule is None:
            continue
        action = _choice(ctx, rule["action"], f"{where}.action", Action) \
            if "action" in rule else None
        to = _networks(ctx, rule["to"], f"{where}.to") if "to" in rule else None
        ports = _ports(ctx, rule["ports"], f"{where}.ports") if "ports" in rule else ()
        protocol = _choice(ctx, rule["protocol"], f"{where}.protocol", Protocol) \
            if "protocol" in rule else Protocol.ANY
        if action is not None and to is not None and ports is not None and protocol is not None:
            rules.append(NetRule(index, action, to, ports, protocol, ctx.location(item)))
    if default is None:
        return None
    return EgressSection(default, tuple(rules), ctx.location(egress))


def _rule_items(ctx: _Context, fields: Mapping[str, Node], where: str) -> list[tuple[int, Node]]:
    if "rules" not in fields:
        return []
    return list(enumerate(_list(ctx, fields["rules"], where, empty=None)))


# --------------------------------------------------------------------------- structure


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _KIND_OF_TAG.get(node.tag, "a string")


def _quote_hint(node: Node) -> str:
    """For a plain scalar YAML read as a non-string (yes, 1.0, 2024-01-01, 0755)."""
    if (isinstance(node, ScalarNode) and not node.style and node.tag not in _STRING_TAGS
            and node.value != ""):
        return f" (quote it to make it a string: \"{_q(node.value)[1:-1]}\")"
    return ""


def _wrong_type(ctx: _Context, node: Node, where: str, expected: str, hint: str = "") -> None:
    if isinstance(node, ScalarNode) and node.tag == _NULL:
        hint = hint or (" (write {} for an empty section, or remove the key)"
                        if expected == "a mapping" else "")
        ctx.error(node, Code.WRONG_TYPE, f"{where} is empty: expected {expected}{hint}")
        return
    ctx.error(node, Code.WRONG_TYPE, f"expected {expected} for {where}, got {_kind(node)}{hint}")


def _fields(ctx: _Context, node: Node, where: str, required: Sequence[str],
            allowed: Sequence[str], hints: Mapping[str, str] | None = None,
            ) -> dict[str, Node] | None:
    """A mapping's known keys and their value nodes; unknown and missing keys reported.

    The first occurrence of a duplicated key counts (the duplicate is reported
    by _yaml_checks). A missing required key that an unknown key is a near miss
    of is not reported twice: "unknown key 'pahts'; did you mean 'paths'?" says it.
    """
    if id(node) in ctx.rejected:
        return None
    if not isinstance(node, MappingNode):
        _wrong_type(ctx, node, where, "a mapping")
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
            ctx.error(key, Code.BAD_KEY, f"keys in {where} must be plain words, got {_kind(key)}")
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


def _list(ctx: _Context, node: Node, where: str, empty: str | None) -> list[Node]:
    """A list's items; ``empty`` is the advice when an empty list is an error (None: allowed)."""
    if id(node) in ctx.rejected:
        return []
    if not isinstance(node, SequenceNode):
        hint = ""
        if isinstance(node, ScalarNode) and node.tag != _NULL:
            hint = f" (a list of one is written [{_q(node.value)[1:-1]}])"
        elif isinstance(node, MappingNode):
            hint = " (write each item on a line of its own starting with '- ')"
        _wrong_type(ctx, node, where, "a list", hint)
        return []
    if not node.value and empty is not None:
        ctx.error(node, Code.EMPTY_LIST, f"{where} is an empty list: {empty}")
    return list(node.value)


def _string(ctx: _Context, node: Node, where: str) -> str | None:
    if id(node) in ctx.rejected:
        return None
    if not isinstance(node, ScalarNode) or node.tag not in _STRING_TAGS:
        _wrong_type(ctx, node, where, "a string", _quote_hint(node))
        return None
    return str(node.value)


def _exact(ctx: _Context, node: Node, where: str, expected: str, code: Code) -> None:
    value = _string(ctx, node, where)
    if value is not None and value != expected:
        ctx.error(node, code, f"unsupported {where} {_q(value)}: expected {expected!r}")


def _choice(ctx: _Context, node: Node, where: str, enum: type[E]) -> E | None:
    valid = [member.value for member in enum]
    if id(node) in ctx.rejected:
        return None
    if not isinstance(node, ScalarNode) or node.tag not in _STRING_TAGS:
        # Quoting helps only when the text is a valid choice YAML read as something else.
        hint = _quote_hint(node) if node.value in valid else ""
        _wrong_type(ctx, node, where, "one of " + ", ".join(valid), hint)
        return None
    value = str(node.value)
    if value in valid:
        return enum(value)
    close = difflib.get_close_matches(value.lower(), valid, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]!r}?" if close else ""
    ctx.error(node, Code.BAD_VALUE,
              f"invalid {where} {_q(value)}{hint} (valid: {', '.join(valid)})")
    return None


def _value(ctx: _Context, node: Node, where: str, convert: Callable[[str], _T]) -> _T | None:
    """A string scalar passed through ``convert``; a _Bad it raises is reported at the node."""
    text = _string(ctx, node, where)
    if text is None:
        return None
    try:
        return convert(text)
    except _Bad as bad:
        ctx.error(node, bad.code, bad.message)
        return None


# --------------------------------------------------------------------------- values


def _policy_name(ctx: _Context, node: Node) -> str | None:
    """A name is a DNS label, so it fits in events, syslog fields and file names."""
    return _value(ctx, node, "metadata.name", _check_name)


def _check_name(name: str) -> str:
    if len(name) <= NAME_LEN and NAME_RE.fullmatch(name):
        return name
    guess = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:NAME_LEN].strip("-")
    hint = f"; did you mean {_q(guess)}?" if guess and guess != name else ""
    raise _Bad(Code.BAD_NAME, f"invalid policy name {_q(name)}: use at most {NAME_LEN} lowercase "
                              f"letters, digits and '-', starting and ending with a letter or "
                              f"digit{hint}")


def _normalize(path: str) -> str:
    normal = posixpath.normpath(path)
    # POSIX lets normpath keep a leading '//'; on Linux it is just '/'.
    return "/" + normal.lstrip("/") if normal.startswith("/") else normal


def _parse_path(text: str, *, subtree_ok: bool) -> tuple[str, bool]:
    """``(path, subtree)`` of an absolute, normalized path, or ``DIR/**`` if allowed.

    The written form must be the canonical one: a policy is reviewed as text,
    so ``/etc/../tmp`` is rejected with the form to write instead of quietly
    meaning ``/tmp``.
    """
    if text == "":
        raise _Bad(Code.BAD_PATH, "empty path")
    if "\0" in text:
        raise _Bad(Code.BAD_PATH, "path contains a NUL character")
    if subtree_ok and text == "**":
        return "/", True  # the whole tree, same as '/**'
    subtree = subtree_ok and (text == "/**" or text.endswith("/**"))
    base = (text[:-3] or "/") if subtree else text
    if any(c in base for c in "*?["):
        if not subtree_ok:
            raise _Bad(Code.UNSUPPORTED_GLOB, f"{_q(text)}: patterns are not supported here; "
                                              "write an exact path")
        hint = f"; did you mean {text[:-1] + '**'!r}?" if text.endswith("/*") else ""
        raise _Bad(Code.UNSUPPORTED_GLOB,
                   f"unsupported glob {_q(text)}: the only pattern is a trailing '/**' "
                   f"(everything below a directory, e.g. '/tmp/**'); '*', '?' and '[' "
                   f"are not allowed anywhere else{hint}")
    if not base.startswith("/"):
        raise _Bad(Code.RELATIVE_PATH, f"path {_q(text)} is not absolute: paths start with '/'")
    normal = _normalize(base)
    canonical = str(PathPattern(normal, subtree, Location("", 0, 0)))
    if canonical != text:
        also = ""
        if subtree_ok and text.endswith("/") and normal != "/":
            also = f" (or {normal + '/**'!r} for everything below it)"
        raise _Bad(Code.UNNORMALIZED_PATH, f"path {_q(text)} is not normalized: write "
                                           f"{_q(canonical)}{also}")
    try:
        encoded = normal.encode()
    except UnicodeEncodeError:
        raise _Bad(Code.BAD_PATH, f"path {_q(text)} cannot be encoded as UTF-8") from None
    if len(encoded) >= PATH_MAX:
        raise _Bad(Code.BAD_PATH, f"path is longer than {PATH_MAX - 1} bytes")
    if any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise _Bad(Code.BAD_PATH, f"a component of {_q(text)} is longer than {NAME_MAX} bytes")
    return normal, subtree


def _paths(ctx: _Context, node: Node, where: str) -> tuple[PathPattern, ...] | None:
    items = _list(ctx, node, where, empty="a rule needs at least one path")
    errors_before = ctx.error_count
    patterns: dict[PathPattern, None] = {}  # an ordered set; equality ignores locations
    for i, item in enumerate(items):
        parsed = _value(ctx, item, f"{where}[{i}]", lambda t: _parse_path(t, subtree_ok=True))
        if parsed is not None:
            pattern = PathPattern(parsed[0], parsed[1], ctx.location(item))
            patterns.setdefault(pattern)
    if not items or ctx.error_count != errors_before:
        return None
    return tuple(patterns)


def _cgroup_path(text: str) -> str:
    for prefix in CGROUP_MOUNT_PREFIXES:
        if text.startswith(prefix + "/"):
            inside = text[len(prefix):]
            raise _Bad(Code.BAD_CGROUP, f"cgroup paths are relative to the cgroup2 mount: write "
                                        f"{_q(inside)}, not {_q(text)}")
    path, _ = _parse_path(text, subtree_ok=False)
    return path


def _unit_name(text: str) -> str:
    problem = check_unit_name(text)
    if problem is not None:
        raise _Bad(Code.BAD_UNIT, problem)
    return text


def _access(ctx: _Context, node: Node, where: str) -> frozenset[Access] | None:
    items = _list(ctx, node, where, empty="list read, write or both")
    errors_before = ctx.error_count
    found: set[Access] = set()
    for i, item in enumerate(items):
        if isinstance(item, ScalarNode) and item.tag in _STRING_TAGS and item.value == "exec":
            ctx.error(item, Code.BAD_VALUE,
                      "'exec' is not a file access (valid: read, write): executions are "
                      "controlled by exec rules, in spec.exec.rules")
            continue
        access = _choice(ctx, item, f"{where}[{i}]", Access)
        if access is not None:
            found.add(access)
    if not items or ctx.error_count != errors_before:
        return None
    return frozenset(found)


def _network(text: str) -> IPNetwork:
    """A CIDR network or a single address; IPv4-mapped IPv6 networks become IPv4.

    Host bits must be clear (``10.0.0.1/8`` is an error naming ``10.0.0.0/8``):
    a typo in a prefix silently widening or narrowing a rule is worse than an error.
    """
    if "%" in text:
        raise _Bad(Code.BAD_NETWORK, f"{_q(text)}: zone indexes (%...) are not supported")
    try:
        network: IPNetwork = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            looks_like_host = re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?", text) and \
                re.search(r"[A-Za-z]", text)
            hint = ": guard matches addresses, not host names" if looks_like_host else \
                " (write an address such as 10.0.0.1 or 2001:db8::1, or a network such " \
                "as 10.0.0.0/8 or 2001:db8::/32)"
            raise _Bad(Code.BAD_NETWORK,
                       f"{_q(text)} is not an IP address or network{hint}") from None
        address = text.split("/", 1)[0]
        single = f"{address}/{loose.max_prefixlen}"
        raise _Bad(Code.BAD_NETWORK, f"{_q(text)} has host bits set: did you mean "
                                     f"{str(loose)!r}, or {single!r} for the one address?"
                   ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            # The kernel reports a v4 peer of a dual-stack socket as ::ffff:a.b.c.d
            # but guard matches it as the v4 address it is: one rule, one family.
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _networks(ctx: _Context, node: Node, where: str) -> tuple[IPNetwork, ...] | None:
    items = _list(ctx, node, where,
                  empty="list addresses or networks (0.0.0.0/0 and ::/0 for anywhere)")
    errors_before = ctx.error_count
    networks: dict[IPNetwork, None] = {}
    for i, item in enumerate(items):
        network = _value(ctx, item, f"{where}[{i}]", _network)
        if network is not None:
            networks.setdefault(network)
    if not items or ctx.error_count != errors_before:
        return None
    return tuple(networks)


_SIGNED_DECIMAL_RE = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_PORT_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)")


def _port_number(digits: str) -> int:
    port = int(digits) if len(digits) <= 7 else 10**7  # int() refuses very long digit strings
    if not 1 <= port <= 65535:
        raise _Bad(Code.BAD_PORT, f"port {_q(digits)[1:-1]} is out of range: ports are 1..65535")
    return port


def _port_range(text: str) -> tuple[int, int]:
    if _SIGNED_DECIMAL_RE.fullmatch(text):
        first = last = _port_number(text)
    else:
        pair = _PORT_RANGE_RE.fullmatch(text)
        if not pair:
            raise _Bad(Code.BAD_PORT, f"invalid port {_q(text)}: write a number (443) or a range "
                                      f"as a string (\"8000-8080\")")
        first, last = _port_number(pair[1]), _port_number(pair[2])
    if first > last:
        raise _Bad(Code.BAD_PORT, f"port range {_q(text)} is backwards: write \"{last}-{first}\"")
    return first, last


def _ports(ctx: _Context, node: Node, where: str) -> tuple[PortRange, ...] | None:
    items = _list(ctx, node, where, empty="remove 'ports' to match any port")
    errors_before = ctx.error_count
    ports: dict[PortRange, None] = {}
    for i, item in enumerate(items):
        what = f"{where}[{i}]"
        if id(item) in ctx.rejected:
            continue
        if isinstance(item, ScalarNode) and item.tag == _INT:
            if not _SIGNED_DECIMAL_RE.fullmatch(str(item.value)):
                # YAML 1.1 reads 0x1bb, 0o17, 025 (octal!), 1_000 and 1:30 as integers.
                ctx.error(item, Code.BAD_PORT, f"write port {_q(item.value)} as a plain decimal "
                                               "number")
                continue
            text = str(item.value)
        elif isinstance(item, ScalarNode) and item.tag in _STRING_TAGS:
            text = str(item.value)
        else:
            _wrong_type(ctx, item, what, "a port number or a \"FIRST-LAST\" range")
            continue
        try:
            first, last = _port_range(text)
        except _Bad as bad:
            ctx.error(item, bad.code, bad.message)
            continue
        port = PortRange(first, last, ctx.location(item))
        ports.setdefault(port)
    if not items or ctx.error_count != errors_before:
        return None
    return tuple(ports)
