"""The session id of a request, for the activity log (``ui.activity.session_id``).

Clients that group requests into conversations say so in a header
(``X-Session-ID``; LiteLLM's ``X-Litellm-Session-Id``). The configured names
are tried in order and the first one present gives the id, as llama-swap's UI
does. The value is shown in a browser and stored, so it is cut to
:data:`MAX_SESSION_ID` characters and anything unprintable is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

__all__ = ["MAX_SESSION_ID", "header_names", "session_id_of"]

#: Longest session id kept (a header may be kilobytes long).
MAX_SESSION_ID: Final = 128


def header_names(names: Iterable[str]) -> tuple[bytes, ...]:
    """Configured header names as ASGI spells them (lower-case bytes)."""
    return tuple(name.lower().encode("latin-1") for name in names)


def session_id_of(headers: Iterable[tuple[bytes, bytes]], names: Sequence[bytes]) -> str | None:
    """The value of the first of ``names`` present in ``headers`` (ASGI: lower-case names)."""
    if not names:
        return None
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in names and name not in found:
            found[name] = value
    for name in names:
        raw = found.get(name)
        if raw is not None:
            text = "".join(c for c in raw.decode("latin-1").strip() if c.isprintable())
            if text:
                return text[:MAX_SESSION_ID]
    return None
