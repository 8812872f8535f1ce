"""The one exception the config loader raises, located down to the line.

    Exception
    └── ConfigError    the file cannot be read, parsed, expanded or validated

Every stage of loading (reading the file, ``${env.X}`` substitution, YAML
parsing, macro expansion, type conversion, validation) reports problems as a
:class:`ConfigError` that names the file, the dotted key path (with the model
ID, never a list position for a model) and the 1-based line, so a user can go
straight to the mistake::

    config.yaml:14: models.qwen-7b.ttl: must be >= -1 (got -5)
"""

from __future__ import annotations

from typing import Final, final

#: Longest message and key path shown: an echoed value or key can be a whole file.
MAX_MESSAGE: Final = 600
MAX_KEY_PATH: Final = 300


@final
class ConfigError(Exception):
    """A configuration that cannot be loaded.

    Attributes:
        source: The file path as given (or ``<demo>``, ``<string>``).
        key_path: Dotted key path such as ``models.qwen-7b.ttl`` or
            ``models.qwen-7b.env[2]``; empty when the problem is the whole
            document (a YAML syntax error, a missing file).
        line: 1-based line in ``source``; ``None`` only when no line exists
            (the file is missing or unreadable).
        message: What is wrong, without the location prefix.

    ``message`` and ``key_path`` are made printable on one line (control
    characters and line breaks escaped as in a Python literal) and a long one
    loses its middle, so an error echoing a hostile key or value stays one
    readable terminal line.
    """

    def __init__(
        self, message: str, *, source: str, key_path: str = "", line: int | None = None
    ) -> None:
        self.source = source
        self.key_path = one_line(key_path, MAX_KEY_PATH)
        self.line = line
        self.message = one_line(message, MAX_MESSAGE)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.key_path:
            return f"{where}: {self.key_path}: {self.message}"
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"ConfigError({self.message!r}, source={self.source!r}, "
            f"key_path={self.key_path!r}, line={self.line!r})"
        )


def one_line(text: str, limit: int) -> str:
    """``text`` with non-printable characters escaped, cut in the middle to ``limit``."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
