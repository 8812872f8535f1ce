"""YAML text to plain Python values, remembering the line of every key.

PyYAML's ``safe_load`` forgets where values came from, and a config error
without a line number sends the user hunting. So we compose the node tree
ourselves and build plain values (``dict``/``list``/scalars) while recording,
for every key path, the line it was written on. Later stages (macros,
validation) raise errors through :meth:`Document.error`, which turns a key
path back into ``file:line: key.path: message``.

Scalars resolve with the YAML 1.2 core schema, as llama-swap's Go YAML
library does: only ``true``/``false`` are booleans (``yes``, ``no``, ``on``,
``off`` stay strings), there are no sexagesimal numbers, and dates stay
strings. Anchors, aliases and merge keys (``<<``) work; a duplicate key in one
mapping is an error (PyYAML would silently keep the last one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Final, final

import yaml
from yaml.composer import ComposerError
from yaml.events import Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from trio_swap.config.errors import ConfigError

#: A key path: mapping keys are ``str``, list positions are ``int``.
KeyPath = tuple[str | int, ...]

_STR: Final = "tag:yaml.org,2002:str"
_INT: Final = "tag:yaml.org,2002:int"
_FLOAT: Final = "tag:yaml.org,2002:float"
_BOOL: Final = "tag:yaml.org,2002:bool"
_NULL: Final = "tag:yaml.org,2002:null"
_MERGE: Final = "tag:yaml.org,2002:merge"
_MAP: Final = "tag:yaml.org,2002:map"
_SEQ: Final = "tag:yaml.org,2002:seq"

#: Alias expansion can blow a tiny file up exponentially ("billion laughs"):
#: the values built may hold this many nodes in all, and this many characters
#: of text (a long string repeated by aliases costs every later stage its length).
MAX_NODES: Final = 200_000
MAX_TEXT: Final = 16 << 20
#: How deep mappings and lists may nest, written or through aliases. A config
#: nests about 6 deep; every later stage (macros, validation, JSON answers)
#: recurses over values, so a deeper one is refused before any of them runs.
MAX_DEPTH: Final = 100


class _CoreLoader(yaml.SafeLoader):
    """SafeLoader whose implicit typing follows the YAML 1.2 core schema.

    Its composer stops at :data:`MAX_DEPTH`: PyYAML composes recursively (10k
    ``[`` raised ``RecursionError``, a traceback), and its scanner slows down
    with every open bracket, so a deep file is refused as early as possible.
    """

    # Our own table (not SafeLoader's), filled below.
    yaml_implicit_resolvers = {}

    _depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                # types-PyYAML leaves Parser.peek_event untyped.
                event: Event = self.peek_event()  # type: ignore[no-untyped-call]
                mark = event.start_mark if isinstance(event.start_mark, yaml.error.Mark) else None
                raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


for _tag, _pattern, _first in (
    (_BOOL, r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    (_INT, r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        _FLOAT,
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    (_NULL, r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (_MERGE, r"^(?:<<)$", "<"),
):
    _CoreLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def format_path(path: KeyPath) -> str:
    """Render ``("models", "qwen", "env", 2)`` as ``models.qwen.env[2]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # An empty or blank-edged key must still be visible: quote it.
            name = part if part and part == part.strip() else f'"{part}"'
            out += f".{name}" if out else name
    return out


def type_name(value: object) -> str:
    """A YAML-ish name for a value's type, for error messages."""
    names: dict[type, str] = {
        bool: "bool",
        int: "int",
        float: "float",
        str: "string",
        list: "list",
        dict: "mapping",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


@final
class Document:
    """A parsed YAML document: its value plus the line of every key path.

    A document merged from several files (``--config-dir``, :mod:`.merge`)
    also knows the file of every key path (``origins``), so an error found
    after merging still names the file and line the value was written on.
    """

    def __init__(
        self,
        source: str,
        value: object,
        lines: dict[KeyPath, int],
        *,
        origins: dict[KeyPath, str] | None = None,
        files: tuple[str, ...] = (),
    ) -> None:
        """``origins``: key path -> the file it was written in, for every path of
        ``lines`` (None: all of them are in ``source``). ``files``: the files in
        merge order, so warnings sort by file, then line."""
        #: The file, or for a merged document a description of its files.
        self.source = source
        #: Plain values: ``dict[str, ...]``, ``list``, ``str``, ``int``, ``float``,
        #: ``bool`` or ``None``. Mapping keys are always ``str``.
        self.value = value
        self._lines = lines
        self._origins = origins
        self._rank = {name: index for index, name in enumerate(files)}

    def locate(self, path: KeyPath) -> tuple[str, int | None]:
        """(file, line) where ``path`` was written, or its nearest written ancestor.

        A missing key (``cmd`` left out) thus points at the model it belongs to.
        """
        for end in range(len(path), -1, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                origins = self._origins
                source = self.source if origins is None else origins.get(path[:end], self.source)
                return source, line
        return self.source, None

    def line(self, path: KeyPath) -> int | None:
        """The line ``path`` was written on, or that of its nearest written ancestor."""
        return self.locate(path)[1]

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """A :class:`ConfigError` located at ``path``, for the caller to raise."""
        source, line = self.locate(path)
        return ConfigError(message, source=source, key_path=format_path(path), line=line)

    def warning(self, path: KeyPath, message: str) -> tuple[int, str]:
        """(sort key, text) of a warning at ``path``, worded and made safe like an error.

        The sort key is the line, after the rank of its file in a merged
        document, so warnings read file by file, each in line order.
        """
        error = self.error(path, message)
        return (self._rank.get(error.source, 0) << 32) + (error.line or 0), str(error)


def parse_document(text: str, source: str) -> Document:
    """Parse one YAML document; an empty file gives ``None`` as its value.

    Raises:
        ConfigError: YAML syntax errors (at the line PyYAML reports), duplicate
            keys, unsupported tags, recursive aliases.
    """
    root = compose(text, source)
    builder = _Builder(source)
    if root is None:
        return Document(source, None, {})
    builder.lines[()] = root.start_mark.line + 1
    value = builder.build(root, (), 1)
    return Document(source, value, builder.lines)


def compose(text: str, source: str) -> Node | None:
    """Compose ``text`` into a YAML node tree, translating syntax errors."""
    try:
        # The reader checks the whole text for control characters right here
        # (a NUL was a traceback before issue 9).
        loader = _CoreLoader(text)
    except yaml.reader.ReaderError as exc:
        raise _unacceptable(exc, text, source) from exc
    try:
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        parts = [p for p in (exc.context, exc.problem) if p]
        message = "invalid YAML: " + ", ".join(parts) if parts else "invalid YAML"
        raise ConfigError(message, source=source, line=line) from exc
    except yaml.reader.ReaderError as exc:
        raise _unacceptable(exc, text, source) from exc
    finally:
        loader.dispose()


def _unacceptable(exc: yaml.reader.ReaderError, text: str, source: str) -> ConfigError:
    line = text.count("\n", 0, exc.position) + 1
    message = (
        f"invalid YAML: unacceptable character #x{exc.character:04x} "
        '(control characters can only be written as escapes in double quotes, like "\\t")'
    )
    return ConfigError(message, source=source, line=line)


def iter_scalar_nodes(root: Node) -> Iterator[tuple[KeyPath, ScalarNode]]:
    """Every scalar node (keys included) once, with the first path reaching it.

    Used to find text that is YAML content rather than a comment. Merge keys
    are not applied here; a merged mapping is reported under its own anchor.
    """
    seen: set[int] = set()
    stack: list[tuple[KeyPath, Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            yield path, node
        elif isinstance(node, SequenceNode):
            stack.extend(((*path, i), child) for i, child in enumerate(node.value))
        elif isinstance(node, MappingNode):
            for key, value in reversed(node.value):
                child = (*path, key.value) if isinstance(key, ScalarNode) else path
                stack.append((child, value))
                stack.append((child, key))


@final
class _Builder:
    """Turns composed nodes into plain values, recording lines as it goes."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[KeyPath, int] = {}
        self._active: set[int] = set()
        self._count = 0  # values built, and pairs merged
        #: id(mapping node) -> its pairs, merges applied.
        self._pairs_of: dict[int, dict[str, tuple[Node, Node]]] = {}
        self._text = 0  # characters of scalar text built

    def _error(
        self, node: Node, path: KeyPath, message: str, *, line: int | None = None
    ) -> ConfigError:
        return ConfigError(
            message,
            source=self.source,
            key_path=format_path(path),
            line=node.start_mark.line + 1 if line is None else line,
        )

    def _count_nodes(self, count: int, node: Node, path: KeyPath) -> None:
        self._count += count
        if self._count > MAX_NODES:
            raise self._error(
                node,
                path,
                f"more than {MAX_NODES} values after expanding YAML aliases and merges; "
                "an alias repeats its anchor's whole value",
                line=self.lines.get(path),
            )

    def build(self, node: Node, path: KeyPath, depth: int) -> object:
        """The plain value of ``node``, found at ``path``, ``depth`` levels down."""
        self._count_nodes(1, node, path)
        if isinstance(node, ScalarNode):
            self._text += len(node.value)
            if self._text > MAX_TEXT:
                raise self._error(
                    node,
                    path,
                    f"more than {MAX_TEXT >> 20} MiB of text after expanding YAML aliases; "
                    "an alias repeats its anchor's whole value",
                    line=self.lines.get(path),
                )
            return self._scalar(node, path)
        if id(node) in self._active:
            # Point at the alias that closes the loop, not at the anchor.
            raise self._error(node, path, "recursive YAML alias", line=self.lines.get(path))
        if depth > MAX_DEPTH:
            message = f"nested more than {MAX_DEPTH} levels deep (after expanding YAML aliases)"
            raise self._error(node, path, message, line=self.lines.get(path))
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    raise self._error(node, path, f"unsupported YAML tag {node.tag!r}")
                items: list[object] = []
                for index, child in enumerate(node.value):
                    child_path = (*path, index)
                    self.lines[child_path] = child.start_mark.line + 1
                    items.append(self.build(child, child_path, depth + 1))
                return items
            if isinstance(node, MappingNode):
                if node.tag != _MAP:
                    raise self._error(node, path, f"unsupported YAML tag {node.tag!r}")
                mapping: dict[str, object] = {}
                for key, (key_node, value_node) in self._pairs(node, path).items():
                    child_path = (*path, key)
                    self.lines[child_path] = key_node.start_mark.line + 1
                    mapping[key] = self.build(value_node, child_path, depth + 1)
                return mapping
            raise self._error(node, path, f"unexpected YAML node {type(node).__name__}")
        finally:
            self._active.discard(id(node))

    def _pairs(self, node: MappingNode, path: KeyPath) -> dict[str, tuple[Node, Node]]:
        """Key → (key node, value node), with ``<<`` merges applied.

        Explicit keys override merged ones; among merged mappings the first
        listed wins (the YAML merge-key rules).
        """
        known = self._pairs_of.get(id(node))
        if known is not None:
            return known
        explicit: dict[str, tuple[Node, Node]] = {}
        merged: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                for source in self._merge_sources(value_node, path):
                    pairs = self._merged_pairs(source, path)
                    self._count_nodes(len(pairs), source, path)
                    for key, pair in pairs.items():
                        merged.setdefault(key, pair)
                continue
            if not isinstance(key_node, ScalarNode):
                raise self._error(key_node, path, "mapping keys must be plain scalars")
            key = key_node.value
            first = explicit.get(key)
            if first is not None:
                raise self._error(
                    key_node,
                    (*path, key),
                    f"duplicate key (first defined on line {first[0].start_mark.line + 1})",
                )
            explicit[key] = (key_node, value_node)
        # Kept: a mapping merged N times is worked out once (merge chains were
        # exponential work before issue 9, unseen by the node count).
        self._pairs_of[id(node)] = pairs = merged | explicit
        return pairs

    def _merged_pairs(self, source: MappingNode, path: KeyPath) -> dict[str, tuple[Node, Node]]:
        if id(source) in self._active:
            raise self._error(source, path, "recursive YAML merge")
        self._active.add(id(source))
        try:
            return self._pairs(source, path)
        finally:
            self._active.discard(id(source))

    def _merge_sources(self, value: Node, path: KeyPath) -> list[MappingNode]:
        if isinstance(value, MappingNode):
            return [value]
        if isinstance(value, SequenceNode) and all(
            isinstance(item, MappingNode) for item in value.value
        ):
            return [item for item in value.value if isinstance(item, MappingNode)]
        raise self._error(value, path, "a merge key '<<' needs a mapping or a list of mappings")

    def _scalar(self, node: ScalarNode, path: KeyPath) -> object:
        text: str = node.value
        tag = node.tag
        if tag == _STR:
            return text
        if tag == _NULL:
            return None
        try:
            if tag == _BOOL:
                return _parse_bool(text)
            if tag == _INT:
                return _parse_int(text)
            if tag == _FLOAT:
                return _parse_float(text)
        except ValueError as exc:
            raise self._error(node, path, f"invalid {tag.rsplit(':', 1)[-1]}: {text!r}") from exc
        if tag == "tag:yaml.org,2002:timestamp":
            return text
        raise self._error(node, path, f"unsupported YAML tag {tag!r}")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError(text)


def _parse_int(text: str) -> int:
    body = text.lstrip("+-")
    sign = -1 if text.startswith("-") else 1
    if body[:2] in ("0o", "0O"):
        return sign * int(body[2:], 8)
    if body[:2] in ("0x", "0X"):
        return sign * int(body[2:], 16)
    return int(text, 10)


def _parse_float(text: str) -> float:
    lowered = text.lower()
    if lowered.lstrip("+-") == ".inf":
        return -math.inf if lowered.startswith("-") else math.inf
    if lowered == ".nan":
        return math.nan
    return float(text)
