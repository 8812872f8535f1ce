"""``ui.activity.session_id``, validated: the request headers that carry a session id.

llama-swap's rules: names are trimmed, blank ones dropped, and duplicates
(compared in any case, as HTTP header names are) dropped keeping the first
spelling; ``[]`` records no session id; absent or null: the default pair.
"""

from __future__ import annotations

import re
from typing import Final

from trio_swap.config.model import DEFAULT_SESSION_ID_HEADERS
from trio_swap.config.schema import RawUi
from trio_swap.config.yamlsource import Document, KeyPath

__all__ = ["check_session_id_headers"]

#: An HTTP header name (RFC 9110 ``token``).
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_session_id_headers(raw: RawUi | None, doc: Document) -> tuple[str, ...]:
    """The header names, in order; raises a located error for one that is not a header name."""
    names = raw.activity.session_id if raw is not None and raw.activity is not None else None
    if names is None:
        return DEFAULT_SESSION_ID_HEADERS
    kept: dict[str, str] = {}
    for index, name in enumerate(names):
        name = name.strip()
        if not name:
            continue
        if _TOKEN.fullmatch(name) is None:
            path: KeyPath = ("ui", "activity", "session_id", index)
            raise doc.error(path, f"must be an HTTP header name (got {name!r})")
        kept.setdefault(name.lower(), name)
    return tuple(kept.values())
