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

from typing import final


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
    """

    def __init__(
        self, message: str, *, source: str, key_path: str = "", line: int | None = None
    ) -> None:
        self.source = source
        self.key_path = key_path
        self.line = line
        self.message = message
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
