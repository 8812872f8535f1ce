"""Turn a ``cmd``/``cmdStop`` string into argv, the way llama-swap does.

Configs hold long, multi-line ``llama-server`` command lines with commented-out
flags and shell-style ``\\`` continuations. No shell ever runs them: trio-swap
spawns argv directly, so pipes, redirects and ``$VAR`` mean nothing unless the
user writes ``sh -c '...'`` themselves. The rules:

1. Drop every line whose first non-blank character is ``#``.
2. A line ending in ``\\`` (trailing blanks ignored) joins the next one.
3. Split what is left with POSIX shell quoting rules (:mod:`shlex`). A ``#``
   in the middle of a line is an ordinary character, not a comment.
"""

from __future__ import annotations

import shlex


def strip_comment_lines(text: str) -> str:
    """Remove the lines whose first non-blank character is ``#``.

    Macro expansion calls this *before* substituting, so a ``${...}`` inside
    a commented-out flag never injects text or counts as using ``${PORT}``.
    """
    return "\n".join(line for line in text.split("\n") if not line.lstrip().startswith("#"))


def split_command(text: str) -> tuple[str, ...]:
    """Split a command string into argv.

    Returns an empty tuple for a blank or comment-only command; the caller
    decides whether that is an error (it is for ``cmd``, not for ``cmdStop``).

    Raises:
        ValueError: unbalanced quotes, or a ``\\`` escaping nothing at the end.
    """
    lines: list[str] = []
    for line in strip_comment_lines(text).split("\n"):
        trimmed = line.rstrip()
        if trimmed.endswith("\\") and not trimmed.endswith("\\\\"):
            lines.append(trimmed[:-1] + " ")
        else:
            lines.append(line)
    # Joined with newlines, which shlex treats as blanks: a quoted argument may
    # still span lines, exactly as in a POSIX shell.
    return tuple(shlex.split("\n".join(lines), comments=False, posix=True))
