"""YAML files read with the line of every key (for errors that say file:line) and `!vault NAME`
references: the inventories and the roles' defaults.yml."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from provisioner.errors import Problem

VAULT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
# libyaml's parser where PyYAML was built with it: every command reads the inventory and every
# role's defaults.yml, which the pure-Python parser took ~40 ms for (the C one ~2 ms). Its nodes
# carry the same marks (line numbers); a file it refuses is parsed again by the Python parser,
# whose messages name the character or alias at fault.
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


# --------------------------------------------------------------------------------------------
# Vault references
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VaultRef:
    """`!vault NAME`: a secret the vault must provide. Equal by name; the rest says where it is."""

    name: str
    file: str | None = field(default=None, compare=False, repr=False)
    line: int | None = field(default=None, compare=False, repr=False)
    key: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"!vault {self.name}"


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------

KeyPath = tuple  # of str (mapping keys) and int (sequence indexes)

_TAG = "tag:yaml.org,2002:"
_MERGE, _MAP, _SEQ = _TAG + "merge", _TAG + "map", _TAG + "seq"


def format_path(path: Iterable) -> str:
    """('groups', 'app', 'hosts', 1) -> 'groups.app.hosts[1]'."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and re.match(r"^[A-Za-z0-9_-]+\Z", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


@dataclass
class YamlDoc:
    """A YAML file as plain data, plus the line (1-based) of every key path in it."""

    path: Path
    data: Any
    lines: dict[KeyPath, int]
    raw_bools: dict[KeyPath, str] = field(default_factory=dict)  # source text of yes/no/on/off...
    broken: set[KeyPath] = field(default_factory=set)  # values already reported (bad tag...)

    def line(self, path: Iterable) -> int | None:
        """Line of `path`, or of its nearest ancestor present in the file."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


MAX_YAML_VALUES = 100_000    # an inventory holds hundreds; nested aliases can make billions


class _Builder:
    """Turns a composed node tree into plain data, recording lines and reporting duplicates."""

    def __init__(self, path: Path, loader: yaml.SafeLoader, problems: list[Problem]):
        self.built = 0
        self.path = path
        self.loader = loader
        self.problems = problems
        self.lines: dict[KeyPath, int] = {}
        self.raw_bools: dict[KeyPath, str] = {}
        self.broken: set[KeyPath] = set()

    def problem(self, node: Node, keypath: KeyPath, message: str, fix: str) -> None:
        self.broken.add(keypath)
        self.problems.append(Problem(self.path, node.start_mark.line + 1,
                                     format_path(keypath) or None, message, fix))

    def value(self, node: Node, keypath: KeyPath, active: set[int]) -> Any:
        self.built += 1
        if self.built > MAX_YAML_VALUES:
            if self.built == MAX_YAML_VALUES + 1:
                self.problem(node, keypath, f"the file expands to more than {MAX_YAML_VALUES} "
                             "values (aliases of aliases?)", "write the values out instead of "
                             "nesting aliases")
            return None
        if id(node) in active:
            self.problem(node, keypath, "an alias refers to a value that contains it",
                         "remove the recursive alias")
            return None
        if node.tag == "!vault":
            return self.vault(node, keypath)
        if node.tag == "!file":
            return self.file(node, keypath)
        if isinstance(node, ScalarNode):
            try:
                value = self.loader.construct_object(node)
                if isinstance(value, bool):
                    self.raw_bools[keypath] = node.value
                return value
            except yaml.YAMLError:
                self.problem(node, keypath, f"unknown YAML tag '{node.tag}'",
                             "remove the tag; the custom tags are `!vault NAME` and `!file PATH`")
                return None
        if node.tag not in (_MAP, _SEQ):
            self.problem(node, keypath, f"unsupported YAML tag '{node.tag}'",
                         "remove the tag; the custom tags are `!vault NAME` and `!file PATH`")
            return None
        active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                out = []
                for i, item in enumerate(node.value):
                    self.lines[keypath + (i,)] = item.start_mark.line + 1
                    out.append(self.value(item, keypath + (i,), active))
                return out
            return self.mapping(node, keypath, active)
        finally:
            active.discard(id(node))

    def vault(self, node: Node, keypath: KeyPath) -> VaultRef | None:
        name = node.value.strip() if isinstance(node, ScalarNode) else ""
        if not VAULT_NAME_RE.match(name):
            self.problem(node, keypath, "`!vault` needs the name of a secret",
                         "write `!vault NAME`, e.g. `!vault postgresql_password` (letters, digits, "
                         "'_', '.', '-')")
            # Still a reference, so the checks downstream do not report a second problem here.
        return VaultRef(name, str(self.path), node.start_mark.line + 1, format_path(keypath))

    def file(self, node: Node, keypath: KeyPath) -> str | None:
        """`!file PATH`: the text of a file on the controller (e.g. a public key), relative to
        this YAML file; read at load time, trailing whitespace stripped. Not for secrets: those
        belong in the vault, where they stay encrypted."""
        rel = node.value.strip() if isinstance(node, ScalarNode) else ""
        target = (self.path.parent / Path(rel).expanduser()) if rel else None
        try:
            return target.read_text().rstrip() if target else None
        except OSError as e:
            self.problem(node, keypath, f"`!file {rel}`: cannot read {target} ({e.strerror or e})",
                         "fix the path (relative to this file) or create the file" if rel else
                         "write `!file PATH`, e.g. `!file ../.testbed/id_ed25519.pub`")
            return None

    def mapping(self, node: MappingNode, keypath: KeyPath, active: set[int]) -> dict:
        explicit: list[tuple[Any, Node, Node]] = []
        merges: list[Node] = []
        for knode, vnode in node.value:
            if knode.tag == _MERGE:
                sources = vnode.value if isinstance(vnode, SequenceNode) else [vnode]
                if not all(isinstance(s, MappingNode) for s in sources):
                    self.problem(knode, keypath, "`<<` must merge a mapping or a list of mappings",
                                 "write `<<: *anchor` where the anchor is a mapping")
                    continue
                merges.extend(sources)
                continue
            if not isinstance(knode, ScalarNode) or knode.tag == "!vault":
                self.problem(knode, keypath, "a key must be a plain name",
                             "write `name: value`; keys cannot be lists, mappings or tags")
                continue
            try:
                key = self.loader.construct_object(knode)
                hash(key)
            except (yaml.YAMLError, TypeError):
                self.problem(knode, keypath, f"unusable key '{knode.value}'", "write a plain name")
                continue
            explicit.append((key, knode, vnode))
        out: dict = {}
        # Merged mappings first, earlier sources winning over later ones; explicit keys win over all.
        for source in reversed(merges):
            out.update(self.value(source, keypath, active) or {})
        seen: dict[Any, int] = {}
        for key, knode, vnode in explicit:
            line = knode.start_mark.line + 1
            if key in seen:
                self.problem(knode, keypath + (key,),
                             f"duplicate key '{key}' (first at line {seen[key]})",
                             "remove or rename one of them; YAML would silently keep only the last")
            else:
                seen[key] = line
            self.lines[keypath + (key,)] = line
            out[key] = self.value(vnode, keypath + (key,), active)
        return out


def _compose(text: str) -> tuple[yaml.SafeLoader, Node | None]:
    """(the loader, the document's root node); see _FAST_LOADER."""
    if _FAST_LOADER is not None:
        loader = _FAST_LOADER(text)
        try:
            return loader, loader.get_single_node()
        except yaml.YAMLError:
            pass                      # parsed again below, for the Python parser's message
        finally:
            loader.dispose()
    loader = yaml.SafeLoader(text)
    try:
        return loader, loader.get_single_node()
    finally:
        loader.dispose()


def read_yaml(path: Path, problems: list[Problem]) -> YamlDoc | None:
    """Read one YAML document as plain data with line numbers; `!vault NAME` -> VaultRef.

    Problems (syntax, duplicate keys, unknown tags) are appended to `problems`. Returns None when
    the file cannot be read or parsed at all; `data` is None for an empty file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem(path, None, None, f"cannot read the file: {e}",
                                "check that it exists, is readable and is UTF-8 text"))
        return None
    try:
        loader, root = _compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or str(e)
        if e.context and e.context_mark is not None:
            what += f" ({e.context} at line {e.context_mark.line + 1})"
        problems.append(Problem(path, mark.line + 1 if mark else None, None,
                                f"invalid YAML: {what}",
                                "fix the syntax near that line (indentation uses spaces, not tabs; "
                                "quote values containing ': ' or starting with special characters)"))
        return None
    except yaml.YAMLError as e:
        problems.append(Problem(path, None, None, f"invalid YAML: {e}", "fix the syntax"))
        return None
    if root is None:
        return YamlDoc(path, None, {(): 1})
    builder = _Builder(path, loader, problems)
    builder.lines[()] = root.start_mark.line + 1
    data = builder.value(root, (), set())
    return YamlDoc(path, data, builder.lines, builder.raw_bools, builder.broken)
