"""``logTimeFormat``, validated: the name of one of Go's time layouts (:mod:`trio_swap.gotime`).

As in llama-swap the name is trimmed and compared in any case, and a name it
does not know gives no special timestamp; here that comes with a warning
naming the valid ones, since a typo would otherwise go unnoticed.
"""

from __future__ import annotations

from trio_swap.config.yamlsource import Document
from trio_swap.gotime import LAYOUTS

__all__ = ["check_log_time_format"]


def check_log_time_format(value: str, doc: Document) -> tuple[str, list[tuple[int, str]]]:
    """The layout name in lower case ("" for none), and (line, warning) pairs."""
    name = value.strip().lower()
    if not name or name in LAYOUTS:
        return name, []
    known = ", ".join(LAYOUTS)
    warning = doc.warning(
        ("logTimeFormat",),
        f"unknown time format {value!r}; ignored, log lines keep trio-swap's own "
        f"timestamps (known: {known})",
    )
    return "", [warning]
