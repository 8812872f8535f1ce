"""Request rewriting for JSON bodies: ``useModelName`` and ``filters``, in llama-swap's order.

1. the ``model`` field is renamed (``useModelName``, or a peer's own name for the model);
2. ``stripParams`` keys are removed;
3. ``setParams`` keys are set, in sorted key order;
4. ``setParamsByID[<the name the client asked for>]`` keys are set (so they win over 3).

``model`` is never stripped or set by 2-4 (validation drops it). A body that
needs none of this is forwarded byte for byte: only a rewrite decodes it.
"""

from __future__ import annotations

import msgspec

from trio_swap.config.model import FilterConfig
from trio_swap.errors import BadRequest

__all__ = ["needs_rewrite", "rewrite_json"]


def needs_rewrite(
    filters: FilterConfig, rename: str | None, requested: str, sent: str | None = None
) -> bool:
    """Whether :func:`rewrite_json` would change anything (cheap; no decoding).

    ``sent`` is the name in the body when a profile or selector replaced it
    (``requested`` is then the replacement); None: the body says ``requested``.
    """
    if rename is not None and rename != (requested if sent is None else sent):
        return True
    return bool(filters.strip_params or filters.set_params) or requested in filters.set_params_by_id


def rewrite_json(
    body: bytes,
    *,
    filters: FilterConfig,
    rename: str | None,
    requested: str,
    sent: str | None = None,
) -> bytes:
    """The body with the rewrites applied; top-level key order is kept, new keys go last.

    Raises:
        BadRequest: the body is not a JSON object (callers have decoded its
            ``model`` already, so this only happens for odd bodies like arrays).
    """
    if not needs_rewrite(filters, rename, requested, sent):
        return body
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:  # e.g. a number too large for a float
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest("request body is nested too deeply") from exc
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    if rename is not None:
        payload["model"] = rename
    for key in filters.strip_params:
        payload.pop(key, None)
    payload.update(filters.set_params)
    payload.update(filters.set_params_by_id.get(requested, {}))
    return msgspec.json.encode(payload)
