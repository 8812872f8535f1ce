"""Where a model-routed request goes, and exactly what it carries there. Pure: no I/O, no trio.

:func:`resolve` takes what the handler has read (the route from
:func:`~trio_swap.http.routes.classify`, the request line, headers and the
whole body) and the config in effect, and returns an :class:`Outbound`, or a
:class:`Redirect` for ``/upstream/<model>`` without its trailing slash:

1. find the model name where the route keeps it: the JSON body's ``model``
   (msgspec decodes only ``model`` and ``stream`` and skips the rest), a
   multipart form field, the query string, or the ``/upstream/`` path;
2. let the active profile and the selectors say which name it really is
   (``choose``, :mod:`trio_swap.http.selection`; not for ``/upstream/``), then
   look it up (:func:`lookup`): a local model id or alias wins over a peer
   model of the same name; anything else is a 404;
3. rewrite only what ``useModelName``, ``filters``, a peer's own model name or
   a profile's or selector's choice ask for; otherwise the body goes on byte
   for byte (the same object).

Everything it raises is a :class:`~trio_swap.errors.SwapError` the handler
sends as the endpoint's error body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final, final
from urllib.parse import parse_qsl, urlencode

import msgspec

from trio_swap.config.model import Config, FilterConfig, PeerConfig
from trio_swap.errors import BadRequest, ModelNotFound
from trio_swap.http.filters import rewrite_json
from trio_swap.http.multipart import boundary_of, find_field
from trio_swap.http.passthrough import split_passthrough
from trio_swap.http.routes import ModelSource, Route
from trio_swap.http.selection import Choice

__all__ = [
    "Body",
    "LocalModel",
    "Lookup",
    "Outbound",
    "PeerModel",
    "Redirect",
    "Target",
    "lookup",
    "resolve",
]

#: A request body as sent upstream: the client's bytes, or pieces of them around a renamed field.
Body = bytes | Sequence[bytes | memoryview]


@final
class LocalModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model this trio-swap runs: the request waits for the router's lease."""

    #: Its id in ``config.models`` (an alias is already resolved).
    id: str


@final
class PeerModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model another machine serves: forwarded there, no lease, no swap."""

    peer: PeerConfig
    #: The peer's own name for the model (what the peer is asked for).
    name: str


Target = LocalModel | PeerModel


@final
class Lookup(msgspec.Struct, frozen=True, kw_only=True):
    """What a requested model name resolves to."""

    target: Target
    #: The name to send instead of the client's (``useModelName``, a peer's own
    #: name); None when the client's name goes out unchanged.
    rename: str | None
    #: The JSON rewrites of the model or peer (only JSON bodies apply them).
    filters: FilterConfig


@final
class Outbound(msgspec.Struct, frozen=True, kw_only=True):
    """A request ready to go: where, and exactly what to send there."""

    target: Target
    #: The name the client asked for (an id, an alias or a peer model name).
    requested: str
    body: Body
    #: The raw path for the upstream (its base path is added by :class:`Upstream`).
    path: bytes
    query: bytes
    #: The client asked for a stream (only read to decide on loading progress).
    stream: bool = False
    #: What a profile or selector made of the client's name (None: not consulted).
    choice: Choice | None = None


@final
class Redirect(msgspec.Struct, frozen=True, kw_only=True):
    """``/upstream/<model>`` without the slash: send the client to the slashed path."""

    location: bytes
    #: 301 for GET and HEAD, 308 (keeps the method and body) for the rest.
    status: int


class _Envelope(msgspec.Struct):
    """The only part of a JSON request body trio-swap reads; msgspec skips the rest."""

    model: str | None = None
    #: Any JSON value: servers take ``1`` or ``"true"`` too, so it is only tested for truth.
    stream: object = None


_decode_envelope: Final = msgspec.json.Decoder(_Envelope).decode
#: Maps a requested name to the one to look up (profiles, selectors).
Chooser = Callable[[str], Choice]
#: ``stream`` values that do not ask for a stream.
_NOT_STREAMING: Final = (None, False, 0, "", "false")


def resolve(
    config: Config,
    route: Route,
    *,
    method: str,
    raw_path: bytes,
    query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    choose: Chooser | None = None,
) -> Outbound | Redirect:
    """Where the request goes and what it carries there (see the module docstring).

    ``raw_path`` and ``query`` are the request's, still escaped; ``headers``
    are ASGI's (lower-case names), only read for a multipart ``content-type``.

    Raises:
        BadRequest: no model named, or a malformed body, form or path.
        ModelNotFound: the name is neither a local model nor a peer model.
    """
    match route.source:
        case ModelSource.JSON:
            path = raw_path if route.upstream_path is None else route.upstream_path.encode()
            return _resolve_json(config, body, path, query, choose)
        case ModelSource.MULTIPART:
            return _resolve_multipart(config, headers, body, raw_path, query, choose)
        case ModelSource.QUERY:
            return _resolve_query(config, body, raw_path, query, choose)
        case ModelSource.PATH:
            return _resolve_passthrough(config, method, body, raw_path, query)


def lookup(config: Config, requested: str) -> Lookup:
    """Resolve a requested name; local models and aliases win over peer models of that name.

    Raises:
        ModelNotFound: neither a local model nor a peer model.
    """
    model_id = config.resolve(requested)
    if model_id is not None:
        model = config.models[model_id]
        rename = model.use_model_name
        return Lookup(
            target=LocalModel(id=model_id),
            rename=rename if rename and rename != requested else None,
            filters=model.filters,
        )
    found = config.resolve_peer(requested)
    if found is None:
        raise ModelNotFound(requested)
    peer_id, name = found
    peer = config.peers[peer_id]
    return Lookup(
        target=PeerModel(peer=peer, name=name),
        rename=name if name != requested else None,
        filters=peer.filters,
    )


def _chosen(config: Config, requested: str, choose: Chooser | None) -> tuple[Choice, Lookup]:
    """The name after profiles and selectors, and what it resolves to; a name they
    changed goes upstream in place of the client's (unless a rename already does)."""
    choice = choose(requested) if choose is not None else Choice(requested)
    if not choice.name:  # the active profile turns this name off
        raise ModelNotFound(requested)
    found = lookup(config, choice.name)
    if choice.name != requested and found.rename is None:
        found = Lookup(target=found.target, rename=choice.name, filters=found.filters)
    return choice, found


def _resolve_json(
    config: Config, body: bytes, path: bytes, query: bytes, choose: Chooser | None
) -> Outbound:
    try:
        envelope = _decode_envelope(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # msgspec recurses into the fields it skips
        raise BadRequest("request body is nested too deeply") from exc
    if not envelope.model:
        raise BadRequest("the request body has no 'model' field")
    choice, found = _chosen(config, envelope.model, choose)
    requested = choice.name
    return Outbound(
        target=found.target,
        requested=requested,
        body=rewrite_json(
            body,
            filters=found.filters,
            rename=found.rename,
            requested=requested,
            sent=envelope.model if envelope.model != requested else None,
        ),
        path=path,
        query=query,
        stream=envelope.stream not in _NOT_STREAMING,
        choice=choice if choose is not None else None,
    )


def _resolve_multipart(
    config: Config,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    path: bytes,
    query: bytes,
    choose: Chooser | None,
) -> Outbound:
    content_type = next((value for name, value in headers if name == b"content-type"), b"")
    boundary = boundary_of(content_type.decode("latin-1"))
    field = find_field(body, boundary, "model")
    if field is None or not field.value:
        raise BadRequest("the multipart form has no 'model' field")
    choice, found = _chosen(config, field.value, choose)
    outgoing: Body = body if found.rename is None else field.replaced(body, found.rename)
    return Outbound(
        target=found.target,
        requested=choice.name,
        body=outgoing,
        path=path,
        query=query,
        choice=choice if choose is not None else None,
    )


def _resolve_query(
    config: Config, body: bytes, path: bytes, query: bytes, choose: Chooser | None
) -> Outbound:
    params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    requested = next((value for name, value in params if name == "model"), "")
    if not requested:
        raise BadRequest("this endpoint needs the model in the query string: ?model=<name>")
    choice, found = _chosen(config, requested, choose)
    if found.rename is not None:
        rename = found.rename
        query = urlencode([(name, rename if name == "model" else v) for name, v in params]).encode()
    return Outbound(
        target=found.target,
        requested=choice.name,
        body=body,
        path=path,
        query=query,
        choice=choice if choose is not None else None,
    )


def _resolve_passthrough(
    config: Config, method: str, body: bytes, path: bytes, query: bytes
) -> Outbound | Redirect:
    """``/upstream/<model>/<rest>``: the rest goes to the model as is, model name unchanged."""

    def is_model(name: str) -> bool:
        return config.resolve(name) is not None or config.resolve_peer(name) is not None

    target = split_passthrough(path, is_model)
    if target.rest is None:
        location = path + b"/" + (b"?" + query if query else b"")
        return Redirect(location=location, status=301 if method in ("GET", "HEAD") else 308)
    return Outbound(
        target=lookup(config, target.model).target,
        requested=target.model,
        body=body,
        path=target.rest,
        query=query,
        stream=("stream", "true") in parse_qsl(query.decode("latin-1")),
    )
