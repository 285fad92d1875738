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

import ipaddress
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from yaml.nodes import MappingNode, Node, ScalarNode

from guard.errors import Code, Diagnostic, Location
from guard.policy.model import (
    API_VERSION,
    KIND,
    TEST_KIND,
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
from guard.policy.yamlnodes import (
    STRING_TAGS,
    TAG_INT,
    TAG_NULL,
    Bad,
    Context,
    choice,
    compose,
    converted,
    exact,
    mapping_fields,
    node_list,
    node_string,
    wrong_type,
    yaml_checks,
)

MAX_FILE_BYTES = 1 << 20  # policies are written by hand; a bigger file is a mistake
PATH_MAX = 4096  # bytes, including the terminating NUL (Linux)
NAME_MAX = 255  # bytes in one path component (Linux)
POLICY_SUFFIXES = (".yaml", ".yml")
EDITOR_DROPPINGS = ("~", ".swp", ".swx", ".swo")

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
NAME_LEN = 63
CGROUP_MOUNT_PREFIXES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")



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
    tests: tuple[object, ...] = ()  # what the test reader made of PolicyTest documents

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")


@dataclass(frozen=True)
class _Document:
    """One document's outcome: its name (for the duplicate check) and its policy."""

    name: str | None
    name_location: Location | None
    policy: Policy | None  # None when the document has an error
    kind: str = KIND
    test: object | None = None  # a PolicyTest document, as the test reader made it


# Reads a PolicyTest document (guard.policy.policytest, which builds on this module):
# given its fields, returns its name, the name's node and the test (None on an error).
TestReader = Callable[[Context, Mapping[str, Node]], tuple[str | None, Node | None, object]]


# --------------------------------------------------------------------------- loading


STDIN_PATH = "-"  # a path argument that means standard input
STDIN_NAME = "<stdin>"  # how diagnostics name it


def load_policy_paths(paths: Sequence[str], *, stdin: bytes | None = None,
                      tests: TestReader | None = None) -> LoadResult:
    """Read every policy file named or found below the given paths, and validate all of it.

    A directory contributes every ``*.yaml``/``*.yml`` below it, recursively, in
    sorted order, skipping dot-names and editor droppings; an explicitly named
    file is always read, whatever its name. The path ``-`` is ``stdin`` (the
    caller reads standard input), named ``<stdin>`` in diagnostics. Documents of
    kind PolicyTest are read by ``tests`` when given (``guard check``, ``guard
    test``), and skipped unread otherwise: enforcement ignores them.
    """
    diagnostics: list[Diagnostic] = []
    documents: list[_Document] = []
    files = _collect_files(paths, diagnostics)
    for name in files:
        if name == STDIN_NAME:
            text, problem = _decode(stdin or b"", name)
        else:
            text, problem = _read_text(name)
        if problem is not None:
            diagnostics.append(problem)
            continue
        file_documents, file_diagnostics = _parse_documents(text, name, tests)
        documents.extend(file_documents)
        diagnostics.extend(file_diagnostics)
    diagnostics.extend(_duplicate_names(documents))
    errors = any(d.severity == "error" for d in diagnostics)
    policy_set = None
    if not errors:
        policies = sorted((d.policy for d in documents if d.policy is not None),
                          key=lambda p: p.name)
        policy_set = PolicySet(tuple(policies))
    found = tuple(d.test for d in documents if d.test is not None)
    return LoadResult(policy_set, tuple(sorted(diagnostics)), tuple(files), found)


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
        if path == STDIN_PATH:
            if STDIN_NAME not in seen:
                seen.add(STDIN_NAME)
                files.append(STDIN_NAME)
        elif os.path.isdir(path):
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
    return _decode(data, name)


def _decode(data: bytes, name: str) -> tuple[str, Diagnostic | None]:
    """A file's bytes (at most MAX_FILE_BYTES + 1 of them) as text, or why they are not."""
    if len(data) > MAX_FILE_BYTES:
        return "", Diagnostic(Location(name, 1, 1), Code.FILE_TOO_LARGE,
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


# --------------------------------------------------------------------------- documents


def _parse_documents(text: str, filename: str, tests: TestReader | None = None,
                     ) -> tuple[list[_Document], list[Diagnostic]]:
    ctx = Context(filename, text)
    documents: list[_Document] = []
    seen_any = False
    # Errors found while composing a document (anchors, aliases) are counted
    # before its root is yielded: the baseline is where the previous one ended.
    errors_before = 0
    for root in compose(text, ctx):
        seen_any = True
        yaml_checks(ctx, root)
        if id(root) in ctx.rejected:
            pass  # the whole document is an alias or a tagged value: already reported
        elif isinstance(root, ScalarNode) and root.tag == TAG_NULL and root.value == "":
            ctx.warning(root, Code.EMPTY_DOCUMENT, "empty document: it contains no policy")
        else:
            documents.append(_read_document(ctx, root, errors_before, tests))
        errors_before = ctx.error_count
    if not seen_any and ctx.error_count == 0:
        ctx.warning(None, Code.EMPTY_FILE, "no policy in this file")
    return documents, ctx.finish()


def _duplicate_names(documents: Iterable[_Document]) -> list[Diagnostic]:
    first: dict[tuple[str, str], Location] = {}
    found: list[Diagnostic] = []
    for document in documents:
        if document.name is None or document.name_location is None:
            continue
        key = (document.kind, document.name)
        what = "policy" if document.kind == KIND else "test"
        if key in first:
            found.append(Diagnostic(
                document.name_location, Code.DUPLICATE_NAME,
                f"duplicate {what} name {_q(document.name)}: first defined at {first[key]}"))
        else:
            first[key] = document.name_location
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


def _kind(root: Node) -> str | None:
    """The document's kind when it is written as a plain string, else None."""
    if not isinstance(root, MappingNode):
        return None
    for key, value in root.value:
        if isinstance(key, ScalarNode) and key.value == "kind" and \
                isinstance(value, ScalarNode) and value.tag in STRING_TAGS:
            return str(value.value)
    return None


def _read_document(ctx: Context, root: Node, errors_before: int,
                   tests: TestReader | None = None) -> _Document:
    """The document's policy, built only when nothing in it (since errors_before) was wrong.
    A PolicyTest document goes to ``tests``, or is skipped unread without one."""
    if _kind(root) == TEST_KIND:
        if tests is None:
            return _Document(None, None, None, TEST_KIND)
        fields = mapping_fields(ctx, root, "a test document", _ROOT_KEYS, _ROOT_KEYS)
        if fields is None:
            return _Document(None, None, None, TEST_KIND)
        if "apiVersion" in fields:
            exact(ctx, fields["apiVersion"], "apiVersion", API_VERSION, Code.BAD_API_VERSION)
        name, name_node, test = tests(ctx, fields)
        name_location = ctx.location(name_node) if name is not None else None
        return _Document(name, name_location, None, TEST_KIND,
                         test if ctx.error_count == errors_before else None)
    fields = mapping_fields(ctx, root, "a policy document", _ROOT_KEYS, _ROOT_KEYS)
    if fields is None:
        return _Document(None, None, None)
    if "apiVersion" in fields:
        exact(ctx, fields["apiVersion"], "apiVersion", API_VERSION, Code.BAD_API_VERSION)
    if "kind" in fields:
        kind = node_string(ctx, fields["kind"], "kind")
        if kind is not None and kind != KIND:
            ctx.error(fields["kind"], Code.BAD_KIND,
                      f"unsupported kind {_q(kind)}: expected {KIND!r} (or {TEST_KIND!r} for "
                      f"a test document)")
    name, name_node, description = None, None, ""
    metadata = mapping_fields(ctx, fields["metadata"], "metadata", ("name",), _METADATA_KEYS) \
        if "metadata" in fields else None
    if metadata is not None:
        if "name" in metadata:
            name_node = metadata["name"]
            name = _policy_name(ctx, name_node)
        if "description" in metadata:
            description = node_string(ctx, metadata["description"], "metadata.description") or ""
    policy = None
    spec = _read_spec(ctx, fields["spec"]) if "spec" in fields else None
    if spec is not None and name is not None and ctx.error_count == errors_before:
        mode, scope, exec_section, files, egress = spec
        policy = Policy(name, description, mode, scope, exec_section, files, egress,
                        ctx.location(root))
    name_location = ctx.location(name_node) if name is not None else None
    return _Document(name, name_location, policy)


_Spec = tuple[Mode, Scope, ExecSection | None, FilesSection | None, EgressSection | None]


def _read_spec(ctx: Context, node: Node) -> _Spec | None:
    fields = mapping_fields(ctx, node, "spec", (), _SPEC_KEYS, _SPEC_HINTS)
    if fields is None:
        return None
    mode = choice(ctx, fields["mode"], "spec.mode", Mode) if "mode" in fields else Mode.ENFORCE
    scope = _read_scope(ctx, fields["scope"]) if "scope" in fields else Scope()
    exec_section = _read_exec(ctx, fields["exec"]) if "exec" in fields else None
    files = _read_files(ctx, fields["files"]) if "files" in fields else None
    egress = _read_network(ctx, fields["network"]) if "network" in fields else None
    if mode is None or scope is None:
        return None
    return mode, scope, exec_section, files, egress


def _read_scope(ctx: Context, node: Node) -> Scope | None:
    fields = mapping_fields(ctx, node, "spec.scope", (), _SCOPE_KEYS)
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
        for i, item in enumerate(node_list(ctx, fields["cgroups"], "spec.scope.cgroups",
                                       empty="remove 'cgroups' (no scope means the whole host)")):
            cgroup = converted(ctx, item, f"spec.scope.cgroups[{i}]", _cgroup_path)
            if cgroup is not None:
                cgroups.setdefault(cgroup)
    if "units" in fields:
        for i, item in enumerate(node_list(ctx, fields["units"], "spec.scope.units",
                                       empty="remove 'units' (no scope means the whole host)")):
            unit = converted(ctx, item, f"spec.scope.units[{i}]", _unit_name)
            if unit is not None:
                units.setdefault(unit)
    return Scope(tuple(cgroups), tuple(units))


def _read_exec(ctx: Context, node: Node) -> ExecSection | None:
    fields = mapping_fields(ctx, node, "spec.exec", (), _EXEC_KEYS)
    if fields is None:
        return None
    default = choice(ctx, fields["default"], "spec.exec.default", Default) \
        if "default" in fields else Default.ALLOW
    rules: list[ExecRule] = []
    for index, item in _rule_items(ctx, fields, "spec.exec.rules"):
        where = f"spec.exec.rules[{index}]"
        rule = mapping_fields(ctx, item, where, _EXEC_RULE_KEYS, _EXEC_RULE_KEYS, _EXEC_RULE_HINTS)
        if rule is None:
            continue
        action = choice(ctx, rule["action"], f"{where}.action", Action) \
            if "action" in rule else None
        paths = _paths(ctx, rule["paths"], f"{where}.paths") if "paths" in rule else None
        if action is not None and paths is not None:
            rules.append(ExecRule(index, action, paths, ctx.location(item)))
    if default is None:
        return None
    return ExecSection(default, tuple(rules), ctx.location(node))


def _read_files(ctx: Context, node: Node) -> FilesSection | None:
    fields = mapping_fields(ctx, node, "spec.files", (), _FILES_KEYS, _FILES_HINTS)
    if fields is None:
        return None
    rules: list[FileRule] = []
    for index, item in _rule_items(ctx, fields, "spec.files.rules"):
        where = f"spec.files.rules[{index}]"
        rule = mapping_fields(ctx, item, where, _FILE_RULE_KEYS, _FILE_RULE_KEYS)
        if rule is None:
            continue
        action = choice(ctx, rule["action"], f"{where}.action", Action) \
            if "action" in rule else None
        access = _access(ctx, rule["access"], f"{where}.access") if "access" in rule else None
        paths = _paths(ctx, rule["paths"], f"{where}.paths") if "paths" in rule else None
        if action is not None and access is not None and paths is not None:
            rules.append(FileRule(index, action, access, paths, ctx.location(item)))
    return FilesSection(tuple(rules), ctx.location(node))


def _read_network(ctx: Context, node: Node) -> EgressSection | None:
    fields = mapping_fields(ctx, node, "spec.network", (), _NETWORK_KEYS, _NETWORK_HINTS)
    if fields is None or "egress" not in fields:
        return None
    egress = fields["egress"]
    section = mapping_fields(ctx, egress, "spec.network.egress", (), _EGRESS_KEYS)
    if section is None:
        return None
    default = choice(ctx, section["default"], "spec.network.egress.default", Default) \
        if "default" in section else Default.ALLOW
    rules: list[NetRule] = []
    for index, item in _rule_items(ctx, section, "spec.network.egress.rules"):
        where = f"spec.network.egress.rules[{index}]"
        rule = mapping_fields(ctx, item, where, _NET_RULE_REQUIRED, _NET_RULE_KEYS, _NET_RULE_HINTS)
        if rule is None:
            continue
        action = choice(ctx, rule["action"], f"{where}.action", Action) \
            if "action" in rule else None
        to = _networks(ctx, rule["to"], f"{where}.to") if "to" in rule else None
        ports = _ports(ctx, rule["ports"], f"{where}.ports") if "ports" in rule else ()
        protocol = choice(ctx, rule["protocol"], f"{where}.protocol", Protocol) \
            if "protocol" in rule else Protocol.ANY
        if action is not None and to is not None and ports is not None and protocol is not None:
            rules.append(NetRule(index, action, to, ports, protocol, ctx.location(item)))
    if default is None:
        return None
    return EgressSection(default, tuple(rules), ctx.location(egress))


def _rule_items(ctx: Context, fields: Mapping[str, Node], where: str) -> list[tuple[int, Node]]:
    if "rules" not in fields:
        return []
    return list(enumerate(node_list(ctx, fields["rules"], where, empty=None)))


# --------------------------------------------------------------------------- values


def _policy_name(ctx: Context, node: Node) -> str | None:
    """A name is a DNS label, so it fits in events, syslog fields and file names."""
    return converted(ctx, node, "metadata.name", _check_name)


def _check_name(name: str) -> str:
    if len(name) <= NAME_LEN and NAME_RE.fullmatch(name):
        return name
    guess = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:NAME_LEN].strip("-")
    hint = f"; did you mean {_q(guess)}?" if guess and guess != name else ""
    raise Bad(Code.BAD_NAME, f"invalid policy name {_q(name)}: use at most {NAME_LEN} lowercase "
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
        raise Bad(Code.BAD_PATH, "empty path")
    if "\0" in text:
        raise Bad(Code.BAD_PATH, "path contains a NUL character")
    if subtree_ok and text == "**":
        return "/", True  # the whole tree, same as '/**'
    subtree = subtree_ok and (text == "/**" or text.endswith("/**"))
    base = (text[:-3] or "/") if subtree else text
    if any(c in base for c in "*?["):
        if not subtree_ok:
            raise Bad(Code.UNSUPPORTED_GLOB, f"{_q(text)}: patterns are not supported here; "
                                              "write an exact path")
        hint = f"; did you mean {text[:-1] + '**'!r}?" if text.endswith("/*") else ""
        raise Bad(Code.UNSUPPORTED_GLOB,
                   f"unsupported glob {_q(text)}: the only pattern is a trailing '/**' "
                   f"(everything below a directory, e.g. '/tmp/**'); '*', '?' and '[' "
                   f"are not allowed anywhere else{hint}")
    if not base.startswith("/"):
        raise Bad(Code.RELATIVE_PATH, f"path {_q(text)} is not absolute: paths start with '/'")
    normal = _normalize(base)
    canonical = str(PathPattern(normal, subtree, Location("", 0, 0)))
    if canonical != text:
        also = ""
        if subtree_ok and text.endswith("/") and normal != "/":
            also = f" (or {normal + '/**'!r} for everything below it)"
        raise Bad(Code.UNNORMALIZED_PATH, f"path {_q(text)} is not normalized: write "
                                           f"{_q(canonical)}{also}")
    try:
        encoded = normal.encode()
    except UnicodeEncodeError:
        raise Bad(Code.BAD_PATH, f"path {_q(text)} cannot be encoded as UTF-8") from None
    if len(encoded) >= PATH_MAX:
        raise Bad(Code.BAD_PATH, f"path is longer than {PATH_MAX - 1} bytes")
    if any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise Bad(Code.BAD_PATH, f"a component of {_q(text)} is longer than {NAME_MAX} bytes")
    return normal, subtree


def _paths(ctx: Context, node: Node, where: str) -> tuple[PathPattern, ...] | None:
    items = node_list(ctx, node, where, empty="a rule needs at least one path")
    errors_before = ctx.error_count
    patterns: dict[PathPattern, None] = {}  # an ordered set; equality ignores locations
    for i, item in enumerate(items):
        parsed = converted(ctx, item, f"{where}[{i}]", lambda t: _parse_path(t, subtree_ok=True))
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
            raise Bad(Code.BAD_CGROUP, f"cgroup paths are relative to the cgroup2 mount: write "
                                        f"{_q(inside)}, not {_q(text)}")
    path, _ = _parse_path(text, subtree_ok=False)
    return path


def _unit_name(text: str) -> str:
    problem = check_unit_name(text)
    if problem is not None:
        raise Bad(Code.BAD_UNIT, problem)
    return text


def _access(ctx: Context, node: Node, where: str) -> frozenset[Access] | None:
    items = node_list(ctx, node, where, empty="list read, write or both")
    errors_before = ctx.error_count
    found: set[Access] = set()
    for i, item in enumerate(items):
        if isinstance(item, ScalarNode) and item.tag in STRING_TAGS and item.value == "exec":
            ctx.error(item, Code.BAD_VALUE,
                      "'exec' is not a file access (valid: read, write): executions are "
                      "controlled by exec rules, in spec.exec.rules")
            continue
        access = choice(ctx, item, f"{where}[{i}]", Access)
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
        raise Bad(Code.BAD_NETWORK, f"{_q(text)}: zone indexes (%...) are not supported")
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
            raise Bad(Code.BAD_NETWORK,
                       f"{_q(text)} is not an IP address or network{hint}") from None
        address = text.split("/", 1)[0]
        single = f"{address}/{loose.max_prefixlen}"
        raise Bad(Code.BAD_NETWORK, f"{_q(text)} has host bits set: did you mean "
                                     f"{str(loose)!r}, or {single!r} for the one address?"
                   ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            # The kernel reports a v4 peer of a dual-stack socket as ::ffff:a.b.c.d
            # but guard matches it as the v4 address it is: one rule, one family.
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _networks(ctx: Context, node: Node, where: str) -> tuple[IPNetwork, ...] | None:
    items = node_list(ctx, node, where,
                  empty="list addresses or networks (0.0.0.0/0 and ::/0 for anywhere)")
    errors_before = ctx.error_count
    networks: dict[IPNetwork, None] = {}
    for i, item in enumerate(items):
        network = converted(ctx, item, f"{where}[{i}]", _network)
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
        raise Bad(Code.BAD_PORT, f"port {_q(digits)[1:-1]} is out of range: ports are 1..65535")
    return port


def _port_range(text: str) -> tuple[int, int]:
    if _SIGNED_DECIMAL_RE.fullmatch(text):
        first = last = _port_number(text)
    else:
        pair = _PORT_RANGE_RE.fullmatch(text)
        if not pair:
            raise Bad(Code.BAD_PORT, f"invalid port {_q(text)}: write a number (443) or a range "
                                      f"as a string (\"8000-8080\")")
        first, last = _port_number(pair[1]), _port_number(pair[2])
    if first > last:
        raise Bad(Code.BAD_PORT, f"port range {_q(text)} is backwards: write \"{last}-{first}\"")
    return first, last


def _ports(ctx: Context, node: Node, where: str) -> tuple[PortRange, ...] | None:
    items = node_list(ctx, node, where, empty="remove 'ports' to match any port")
    errors_before = ctx.error_count
    ports: dict[PortRange, None] = {}
    for i, item in enumerate(items):
        what = f"{where}[{i}]"
        if id(item) in ctx.rejected:
            continue
        if isinstance(item, ScalarNode) and item.tag == TAG_INT:
            if not _SIGNED_DECIMAL_RE.fullmatch(str(item.value)):
                # YAML 1.1 reads 0x1bb, 0o17, 025 (octal!), 1_000 and 1:30 as integers.
                ctx.error(item, Code.BAD_PORT, f"write port {_q(item.value)} as a plain decimal "
                                               "number")
                continue
            text = str(item.value)
        elif isinstance(item, ScalarNode) and item.tag in STRING_TAGS:
            text = str(item.value)
        else:
            wrong_type(ctx, item, what, "a port number or a \"FIRST-LAST\" range")
            continue
        try:
            first, last = _port_range(text)
        except Bad as bad:
            ctx.error(item, bad.code, bad.message)
            continue
        port = PortRange(first, last, ctx.location(item))
        ports.setdefault(port)
    if not items or ctx.error_count != errors_before:
        return None
    return tuple(ports)
