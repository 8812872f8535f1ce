"""Several parsed YAML files to one document, as llama-swap's ``-config-dir`` merges them.

The rules (llama-swap's, docs/configuration.md#several-files), per key, in
the order the files are given:

* mappings merge recursively;
* lists concatenate (duplicates kept: ``apiKeys`` from two files are all keys);
* scalars must be identical, otherwise it is an error naming both files;
* an empty value (``key:``, or ``~``/``null``) yields to the other side;
* a mapping in one file and a list or scalar in another is an error;
* in the *identity maps* (``models``, ``peers``, ``groups``, ``profiles``,
  ``selectors``, ``matrix`` and their ``routing.router.settings`` spellings)
  a key may appear in one file only: a model, peer, group, profile or
  selector is defined whole, in one place.

``macros`` merge like any other mapping: names from different files are
combined (earlier files' first, so a later file's macro may use them) and a
name defined twice must have the same value.

Every value keeps its origin: the merged :class:`~.yamlsource.Document`
maps each key path (list positions renumbered after concatenation) to the
file and line it was written on, so every later error (a bad ``cmd`` in the
third file) names that file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

from trio_swap.config.errors import ConfigError
from trio_swap.config.yamlsource import Document, KeyPath, format_path, type_name

__all__ = ["IDENTITY_MAPS", "merge_documents"]

#: Mappings whose keys name things defined whole in one file.
IDENTITY_MAPS: Final[frozenset[KeyPath]] = frozenset(
    {
        ("models",),
        ("peers",),
        ("groups",),
        ("profiles",),
        ("selectors",),
        ("matrix",),
        ("routing", "router", "settings", "groups"),
        ("routing", "router", "settings", "matrix"),
    }
)
#: What one key of each identity map is, for messages.
_WHAT: Final[dict[KeyPath, str]] = {
    ("models",): "model",
    ("peers",): "peer",
    ("groups",): "group",
    ("profiles",): "profile",
    ("selectors",): "selector",
    ("matrix",): "matrix key",
    ("routing", "router", "settings", "groups"): "group",
    ("routing", "router", "settings", "matrix"): "matrix key",
}


def merge_documents(docs: Sequence[Document], source: str) -> Document:
    """Merge parsed files in order into one document called ``source``.

    Empty files (value None) are skipped; each other file's top level must be
    a mapping.

    Raises:
        ConfigError: a top level that is not a mapping (at that file), or a
            merge conflict (at the later file, naming the earlier one).
    """
    merger = _Merger()
    files = tuple(doc.source for doc in docs)
    value: object = None
    for doc in docs:
        if doc.value is None:
            continue
        if not isinstance(doc.value, dict):
            got = type_name(doc.value)
            raise doc.error((), f"the top level must be a mapping of keys (got {got})")
        if value is None:
            value = merger.adopt(doc.value, doc, (), ())
        else:
            value = merger.merge(value, doc.value, doc, ())
    return Document(source, value, merger.lines, origins=merger.origins, files=files)


@final
class _Merger:
    """The merged document's locations, filled while values are merged."""

    def __init__(self) -> None:
        self.lines: dict[KeyPath, int] = {}
        self.origins: dict[KeyPath, str] = {}

    def _where(self, path: KeyPath) -> str:
        """``file:line`` of what the merged document holds at ``path`` so far."""
        source = self.origins.get(path, "?")
        line = self.lines.get(path)
        return source if line is None else f"{source}:{line}"

    def _record(self, doc: Document, src: KeyPath, dst: KeyPath) -> None:
        source, line = doc.locate(src)
        if line is not None:
            self.lines[dst] = line
        self.origins[dst] = source

    def adopt(self, value: object, doc: Document, src: KeyPath, dst: KeyPath) -> object:
        """Take ``value`` (at ``src`` in ``doc``) whole, to be found at ``dst``."""
        self._record(doc, src, dst)
        if isinstance(value, dict):
            for key, item in value.items():
                self.adopt(item, doc, (*src, key), (*dst, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                self.adopt(item, doc, (*src, index), (*dst, index))
        return value

    def merge(self, old: object, new: object, doc: Document, path: KeyPath) -> object:
        """``old`` (merged so far) with ``new`` (at ``path`` in ``doc``) merged in."""
        if new is None:
            return old
        if old is None:  # an empty value has nothing below it: only its own place moves
            self.lines.pop(path, None)
            return self.adopt(new, doc, path, path)
        if isinstance(old, dict) and isinstance(new, dict):
            identity = path in IDENTITY_MAPS
            for key, item in new.items():
                child = (*path, key)
                if key not in old:
                    old[key] = self.adopt(item, doc, child, child)
                elif identity:
                    raise self._duplicate(doc, path, key)
                else:
                    old[key] = self.merge(old[key], item, doc, child)
            return old
        if isinstance(old, list) and isinstance(new, list):
            offset = len(old)
            for index, item in enumerate(new):
                old.append(self.adopt(item, doc, (*path, index), (*path, offset + index)))
            return old
        if isinstance(old, dict | list) or isinstance(new, dict | list):
            message = (
                f"is a {type_name(new)} here but a {type_name(old)} in {self._where(path)}; "
                "files merged by --config-dir must agree on the kind of each key"
            )
            raise doc.error(path, message)
        if type(old) is not type(new) or old != new:
            message = (
                f"conflicting values: {new!r} here, {old!r} in {self._where(path)} "
                "(files merged by --config-dir may repeat a setting only with the same value)"
            )
            raise doc.error(path, message)
        return old

    def _duplicate(self, doc: Document, path: KeyPath, key: str) -> ConfigError:
        what = _WHAT[path]
        first = self._where((*path, key))
        message = (
            f"{what} {key!r} is also defined in {first}; "
            f"a {what} must be defined in one file only ({format_path(path)} "
            "entries are not merged)"
        )
        return doc.error((*path, key), message)
