"""``upstream.ignorePaths``, validated: regexes over the path after ``/upstream/<model>``.

A request whose path matches one (anywhere: a search, as Go's
``MatchString``) gets 409 while its local model is not ready, instead of
loading it (docs/api.md#passthrough). llama-swap compiles them with Go's RE2;
here they are Python ``re`` patterns, compiled at load so a bad one is a
located error. The two agree on the usual syntax. RE2's ``\\z`` is
Python's ``\\Z``; RE2's POSIX classes (``[[:alpha:]]``), ``\\pN`` and the
``(?U)`` flag mean something else or nothing in Python; Python accepts what
RE2 refuses (lookarounds, backreferences), and unlike RE2 it can backtrack
for a long time on a pathological pattern. An empty or missing list means
llama-swap's default.
"""

from __future__ import annotations

import re

from trio_swap.config.model import DEFAULT_IGNORE_PATHS
from trio_swap.config.schema import RawUpstream
from trio_swap.config.yamlsource import Document

__all__ = ["check_ignore_paths"]


def check_ignore_paths(raw: RawUpstream | None, doc: Document) -> tuple[str, ...]:
    """The patterns as written (each compiles), or the default when none are given."""
    if raw is None or not raw.ignore_paths:
        return DEFAULT_IGNORE_PATHS
    for index, pattern in enumerate(raw.ignore_paths):
        try:
            re.compile(pattern)
        except re.error as exc:
            path = ("upstream", "ignorePaths", index)
            raise doc.error(path, f"is not a valid regular expression: {exc}") from exc
        except RecursionError as exc:
            path = ("upstream", "ignorePaths", index)
            raise doc.error(path, "is not a valid regular expression: nested too deeply") from exc
    return tuple(raw.ignore_paths)
