"""What a scoped API key may reach, once the request's model is known.

The access middleware (:mod:`trio_swap.http.access`) authenticates the key
and puts its :class:`~trio_swap.config.keys.Grant` in the ASGI scope; it
cannot know the model, which is inside the body. The inference routes call
:func:`target_refusal` after :func:`~trio_swap.http.resolve.resolve` has
turned the requested name (an alias, ``peer/model``, a bare peer model name,
``/upstream/<model>/``) into its target, before any model loads or any byte
goes to a peer. A selector (or a profile's pin) is resolved first, so the
check is on the target it chose. ``/v1/models`` keeps only the entries
:func:`visible` says the key may use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from trio_swap.config.keys import Grant, grant_of
from trio_swap.config.model import Config
from trio_swap.errors import Forbidden
from trio_swap.http.resolve import LocalModel, PeerModel, Target

__all__ = ["OutOfScope", "target_refusal", "visible"]

#: Longest requested name repeated in a refusal.
_NAME_SHOWN = 200


class OutOfScope(Forbidden):
    """403: the key's ``models``/``peers`` do not include the model the request names."""

    code = "model_not_allowed"


def target_refusal(
    scope: Mapping[str, object], target: Target, requested: str, selector: str | None = None
) -> OutOfScope | None:
    """The 403 for a request the key may not send to ``target``, or None when it may.

    ``requested`` is the name looked up (a selector's choice, when ``selector``
    chose it), shown in the message.
    """
    grant = grant_of(scope)
    if grant is None:
        return None
    match target:
        case LocalModel(id=model_id):
            if grant.allows_model(model_id):
                return None
        case PeerModel(peer=peer):
            if grant.allows_peer(peer.id):
                return None
    chosen = f", which selector {selector!r} chose," if selector is not None else ""
    return OutOfScope(
        f"the API key {grant.name!r} may not use model {requested[:_NAME_SHOWN]!r}{chosen} "
        "(see GET /v1/models for the models it may use)"
    )


def visible(
    scope: Mapping[str, object], entries: Iterable[dict[str, object]], config: Config
) -> list[dict[str, object]]:
    """The ``/v1/models`` entries the request's key may use, in their order.

    Each entry's ``meta.llamaswap`` says what it is: a ``model`` (by ``id``), an
    ``alias`` (by ``modelID``), a ``peer`` model (by ``peerID``), a
    ``selector`` (when the key may use *every* one of its targets: any of them
    may be chosen) or a profile's pin (by its target, the same way). Entries of
    any other type are shown to full keys only.
    """
    grant = grant_of(scope)
    if grant is None or grant.full:
        return list(entries)
    return [entry for entry in entries if _may_use(grant, entry, config)]


def _may_use(grant: Grant, entry: Mapping[str, object], config: Config) -> bool:
    meta = entry.get("meta")
    info = meta.get("llamaswap") if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        return False
    match info.get("type"):
        case "model":
            return grant.allows_model(str(entry.get("id")))
        case "alias":
            return grant.allows_model(str(info.get("modelID")))
        case "peer":
            return grant.allows_peer(str(info.get("peerID")))
        case "selector":
            return _may_request(grant, str(entry.get("id")), config)
        case "profile":
            return _may_request(grant, str(info.get("target")), config)
    return False


def _may_request(grant: Grant, name: str, config: Config, *, depth: int = 0) -> bool:
    """Whether every target a request for ``name`` can end at is in the key's scope."""
    model_id = config.resolve(name)
    if model_id is not None:
        return grant.allows_model(model_id)
    selector = config.selectors.get(name)
    if selector is not None:  # the loader refuses a selector naming a selector; bounded anyway
        return depth < 2 and all(
            _may_request(grant, target, config, depth=depth + 1) for target in selector.targets
        )
    peer = config.resolve_peer(name)
    return peer is not None and grant.allows_peer(peer[0])
