"""Access control (``Host``, ``apiKeys``), CORS, and the websocket refusal: the outermost
ASGI middleware.

::

    hypercorn ─▶ AccessControl ─▶ InferenceRoutes ─▶ Quart app

Every HTTP and websocket request passes here first (lifespan goes straight
through):

* A ``Host`` that is not a host name (an empty label, one over 63
  characters: what IDNA cannot encode) gets 400. Quart's routing failed on
  it with a 500 and a traceback.
* A ``Host`` naming anything but loopback, an IP address, this machine, the
  listen host or an ``allowedHosts`` entry gets 403, on every path: that is
  what a DNS rebinding page sends (:mod:`trio_swap.http.hosts`).
* A websocket upgrade passes the same ``Host`` and key checks. One to a
  model route or ``/upstream/<model>/...`` then goes on to the websocket proxy
  (:mod:`trio_swap.http.websocket`), unless another origin's page opened it
  to ``/upstream/`` (``Sec-Fetch-Site``, or an ``Origin`` naming another host
  than ``Host``: browsers let any page open a websocket anywhere): 403, as
  for HTTP. Any other path is refused before its handshake completes (Quart's
  error handlers, written for HTTP requests, failed on a websocket with a
  500). A refusal is an HTTP answer with a JSON error body (400 for a path
  that takes no websocket), or a close with code 1008 where the server cannot
  send a response body.

* ``OPTIONS`` (any path) is a CORS preflight: answered here with 204 and the
  CORS headers, never authenticated, never passed on.
* With ``apiKeys`` set, every other request needs a key, except ``/health``,
  ``/wol-health``, the orchestrator probes ``/livez`` and ``/readyz``, and
  ``GET``/``HEAD /``. The key is the password of
  ``Authorization: Basic``, else the token of ``Authorization: Bearer``, else
  ``x-api-key`` (llama-swap's order). A missing or wrong key gets 401 with the
  error body the client's SDK reads (:func:`~trio_swap.errors.error_style`),
  after the request body is drained so the connection stays usable. The key
  headers are passed on (and so upstream) unchanged.
* The matching key's :class:`~trio_swap.config.keys.Grant` goes into the
  request's ASGI scope (:data:`~trio_swap.config.keys.GRANT_SCOPE`). A scoped
  key without ``admin: true`` gets 403 here on everything but the inference
  routes and the model list; which models those may reach is checked once the
  model is known (:mod:`trio_swap.http.grants`).
* ``GET``/``HEAD /ui...``, the web UI's static files, need no key either: the
  page must load to ask for one. Its data comes from ``/api``, which needs it.
* A request that carries ``Origin`` to a model route or ``/v1/models`` gets
  ``Access-Control-Allow-Origin: *`` and ``Access-Control-Expose-Headers:
  Retry-After`` on its response, 401s included, so a browser chat app can read
  answers and errors (llama-swap adds them to ``/v1/models`` only). The admin
  and log routes never get them: another site's page must not read logs,
  commands or model lists. A header the inner app already set wins.
* A browser request another origin's page made (``Sec-Fetch-Site:
  cross-site`` or ``same-site``) to anything but a model route, ``/v1/models``, ``/health`` or
  the web UI's files (a link may open the UI) is refused with 403: it could
  otherwise unload models or reach an upstream's own admin endpoints through
  ``/upstream/`` without being read.

The key comparison does not depend on which key matched, or where two keys
differ: the presented key and every configured key are hashed to SHA-256
digests (the configured ones once, here), and the presented digest is
compared with *every* configured digest through :func:`hmac.compare_digest`,
without stopping at a match.

The common request (no keys configured, no ``Origin``, the same ``Host`` as
the last request) costs one scan of the header list and two bytes
comparisons, and allocates nothing. A reload swaps the keys and the host
allowlist with one assignment each (:meth:`AccessControl.set_api_keys`,
:meth:`AccessControl.set_allowed_hosts`).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, cast, final

import msgspec
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
    WebsocketScope,
)

from trio_swap.config.keys import GRANT_SCOPE, Grant
from trio_swap.config.model import ScopedKey
from trio_swap.errors import BadRequest, Forbidden, SwapError, Unauthorized, error_style
from trio_swap.http.hosts import HostPolicy, host_name
from trio_swap.http.routes import (
    JSON_PATHS,
    MULTIPART_PATHS,
    PASSTHROUGH_PREFIX,
    QUERY_PATHS,
    VERSIONLESS_PATHS,
)
from trio_swap.http.websocket_paths import is_websocket_route

__all__ = [
    "CORS_ALLOW_METHODS",
    "DEFAULT_ALLOW_HEADERS",
    "AccessControl",
    "HostNotAllowed",
    "NotAdmin",
]

AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

#: Paths anyone may read, whatever the method (health probes).
_OPEN_PATHS: Final = frozenset({"/health", "/wol-health", "/livez", "/readyz"})
#: ``Sec-Fetch-Site`` values of a request another origin's page made (another
#: port of the same host is ``same-site``: a different origin all the same).
_OTHER_ORIGIN: Final = (b"cross-site", b"same-site")
#: What another site's page may call and read: inference, the model list, health.
_CROSS_SITE_PATHS: Final = (
    JSON_PATHS
    | MULTIPART_PATHS
    | QUERY_PATHS
    | VERSIONLESS_PATHS
    | _OPEN_PATHS
    | {"/v1/models", "/models"}
)
#: What a scoped key without ``admin: true`` may call (besides ``/upstream/``): the
#: inference routes and the model list. Which models it reaches is checked later.
_KEY_PATHS: Final = _CROSS_SITE_PATHS
#: Methods that may read ``/`` without a key.
_OPEN_ROOT_METHODS: Final = frozenset({"GET", "HEAD"})

CORS_ALLOW_METHODS: Final = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
#: ``Access-Control-Allow-Headers`` when the preflight asks for none (or none valid).
DEFAULT_ALLOW_HEADERS: Final = "Content-Type, Authorization, Accept, X-Requested-With, x-api-key"
#: An HTTP field name (RFC 9110 §5.1: a ``token``).
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_PREFLIGHT_FIXED: Final = (
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", CORS_ALLOW_METHODS.encode()),
    (b"access-control-max-age", b"86400"),
)
_ACAO: Final = b"access-control-allow-origin"
_ACEH: Final = b"access-control-expose-headers"
_EXPOSED: Final = b"Retry-After"

#: Most body bytes read from a refused request to keep its connection open.
_DRAIN_LIMIT: Final = 256 * 1024

NO_KEY: Final = "no API key: send Authorization: Bearer <key> or x-api-key"
BAD_KEY: Final = "invalid API key"
BAD_HOST: Final = "invalid Host header: not a host name (a label is empty or too long)"
NO_WEBSOCKETS: Final = (
    "trio-swap takes websockets only on model routes and /upstream/<model>/...: "
    "use HTTP here (streams are Server-Sent Events)"
)
#: Longest part of a refused ``Host`` repeated in the 403's message.
_HOST_SHOWN: Final = 100

#: One configured key: the SHA-256 of the key (equal lengths, so the comparison
#: leaks nothing) and what it may do.
_Key = tuple[bytes, Grant]


class HostNotAllowed(Forbidden):
    """403: the ``Host`` header names a host trio-swap does not answer (DNS rebinding)."""

    code = "host_not_allowed"


class NotAdmin(Forbidden):
    """403: a scoped key without ``admin: true`` on an admin route."""

    code = "admin_key_required"


@final
class AccessControl:
    """ASGI middleware: the Host check and CORS for every request, and ``apiKeys`` when
    any are configured.

    ``allowed_hosts`` is the config's ``allowedHosts``; ``listen_host`` the host
    trio-swap listens on (allowed when it is a name); ``machine_name`` this
    machine's host name (None: :func:`socket.gethostname`; tests pass one).
    """

    def __init__(
        self,
        app: AsgiApp,
        *,
        api_keys: Sequence[str | ScopedKey] = (),
        allowed_hosts: Sequence[str] = (),
        listen_host: str | None = None,
        machine_name: str | None = None,
    ) -> None:
        self._app = app
        self._keys = _key_table(api_keys)
        self._listen_host = listen_host
        self._machine_name = machine_name
        self._hosts = HostPolicy(allowed_hosts, listen_host=listen_host, machine_name=machine_name)
        #: The last ``Host`` found valid: a client sends the same one every time.
        self._good_host = b""

    def set_api_keys(self, api_keys: Sequence[str | ScopedKey]) -> None:
        """A reload: the next request is checked against these keys (one assignment)."""
        self._keys = _key_table(api_keys)

    def set_allowed_hosts(self, allowed_hosts: Sequence[str]) -> None:
        """A reload: the next request's ``Host`` is checked against this list (one assignment)."""
        self._hosts = HostPolicy(
            allowed_hosts, listen_host=self._listen_host, machine_name=self._machine_name
        )

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:  # lifespan
            await self._app(scope, receive, send)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        hosts = self._hosts
        authorization: bytes | None = None
        x_api_key: bytes | None = None
        has_origin = cross_site = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"x-api-key":
                if x_api_key is None:
                    x_api_key = value
            elif name == b"origin":
                has_origin = True
            elif name == b"sec-fetch-site":
                cross_site = value in _OTHER_ORIGIN
            elif name == b"host":
                if value != self._good_host:
                    if _bad_host(value):
                        await _send_refusal(send, scope, receive, BadRequest(BAD_HOST))
                        return
                    self._good_host = value  # the next request from this client skips it
                if not hosts.allows(value):
                    await _send_refusal(send, scope, receive, _host_refused(value))
                    return
        if scope["method"] == "OPTIONS":
            await _preflight(scope, send)
            return
        if has_origin or cross_site:
            if scope["path"] in _CROSS_SITE_PATHS:
                send = _with_cors(send)
            elif cross_site and not _is_page(scope):
                await _send_refusal(send, scope, receive, _forbidden(scope))
                return
        keys = self._keys
        if not keys:
            await self._app(scope, receive, send)
            return
        if not _is_open(scope):
            grant, denied = _authenticate(keys, authorization, x_api_key)
            if grant is None:
                keep_alive = await _drain(scope, receive)
                await _send_unauthorized(send, denied, scope["path"], keep_alive=keep_alive)
                return
            if not grant.admin and not _is_key_path(scope["path"]):
                await _send_refusal(send, scope, receive, _not_admin(scope, grant))
                return
            scope = cast(HTTPScope, {**scope, GRANT_SCOPE: grant})
        await self._app(scope, receive, send)

    async def _websocket(
        self, scope: WebsocketScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """403 for a foreign Host, 401 when a key is required and not valid, 400 for a
        path that takes no websocket, 403 another origin's to ``/upstream/``; else on to
        the websocket proxy."""
        authorization: bytes | None = None
        x_api_key: bytes | None = None
        host: bytes | None = None
        origin: bytes | None = None
        cross_site = False
        hosts = self._hosts
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"x-api-key" and x_api_key is None:
                x_api_key = value
            elif name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                cross_site = value in _OTHER_ORIGIN
            elif name == b"host":
                if not hosts.allows(value):
                    await _refuse_websocket(scope, send, _host_refused(value))
                    return
                host = value
        keys = self._keys
        grant: Grant | None = None
        if keys and scope["path"] not in _OPEN_PATHS:
            grant, denied = _authenticate(keys, authorization, x_api_key)
            if grant is None:
                await _refuse_websocket(scope, send, Unauthorized(denied))
                return
        path = scope["path"]
        if not is_websocket_route(path):
            await _refuse_websocket(scope, send, BadRequest(NO_WEBSOCKETS))
            return
        if (cross_site or _other_origin(origin, host)) and path not in _CROSS_SITE_PATHS:
            await _refuse_websocket(scope, send, _forbidden_websocket(path))
            return
        if grant is not None:
            scope = cast(WebsocketScope, {**scope, GRANT_SCOPE: grant})
        await self._app(scope, receive, send)


def _key_table(api_keys: Sequence[str | ScopedKey]) -> tuple[_Key, ...]:
    return tuple(
        (hashlib.sha256((k if isinstance(k, str) else k.key).encode()).digest(), Grant.of(k, i))
        for i, k in enumerate(api_keys)
    )


def _authenticate(
    keys: tuple[_Key, ...], authorization: bytes | None, x_api_key: bytes | None
) -> tuple[Grant | None, str]:
    """The presented key's grant, or None and why not (the 401 message).

    Every configured digest is compared, whatever matched (no early exit); the
    loader refuses a key listed twice, so at most one matches.
    """
    key = _presented_key(authorization, x_api_key)
    if key is None:
        return None, NO_KEY
    presented = hashlib.sha256(key).digest()
    granted: Grant | None = None
    for digest, grant in keys:
        if hmac.compare_digest(digest, presented):
            granted = grant
    return granted, BAD_KEY


def _is_key_path(path: str) -> bool:
    """Inference and the model list: what a key without ``admin: true`` may call."""
    return path in _KEY_PATHS or path.startswith(PASSTHROUGH_PREFIX)


def _is_open(scope: HTTPScope) -> bool:
    path = scope["path"]
    if scope["method"] in _OPEN_ROOT_METHODS and _is_ui_file(path):
        return True  # the web UI's static files: the page must load to ask for the key
    return path in _OPEN_PATHS or (path == "/" and scope["method"] in _OPEN_ROOT_METHODS)


def _is_page(scope: HTTPScope) -> bool:
    """The web UI's files (and ``/``): a link from another site may open them."""
    path = scope["path"]
    return scope["method"] in _OPEN_ROOT_METHODS and (path == "/" or _is_ui_file(path))


def _is_ui_file(path: str) -> bool:
    """``/ui`` and ``/ui/...`` without ``.``/``..`` segments (docs/ui.md); no data behind them."""
    if path == "/ui":
        return True
    return path.startswith("/ui/") and not any(
        segment in (".", "..") for segment in path.split("/")
    )


def _presented_key(authorization: bytes | None, x_api_key: bytes | None) -> bytes | None:
    """The Basic password, else the Bearer token, else ``x-api-key``; None when none is given."""
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(b" ")
        credentials = credentials.strip()
        scheme = scheme.lower()
        if scheme == b"basic" and credentials:
            try:
                decoded = binascii.a2b_base64(credentials, strict_mode=True)
            except binascii.Error:
                decoded = b""
            _, colon, password = decoded.partition(b":")
            if colon and password:
                return password
        elif scheme == b"bearer" and credentials:
            return credentials
    if x_api_key:
        return x_api_key.strip() or None
    return None


def _allow_headers(requested: bytes | None) -> bytes:
    """The preflight's requested header names that are valid tokens, or the default list."""
    if requested:
        names = [
            name
            for name in (part.strip() for part in requested.split(b","))
            if _TOKEN.fullmatch(name)
        ]
        if names:
            return b", ".join(names)
    return DEFAULT_ALLOW_HEADERS.encode()


async def _preflight(scope: HTTPScope, send: ASGISendCallable) -> None:
    requested: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"access-control-request-headers":
            requested = value if requested is None else requested + b"," + value
    headers = [
        *_PREFLIGHT_FIXED,
        (b"access-control-allow-headers", _allow_headers(requested)),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _with_cors(send: ASGISendCallable) -> ASGISendCallable:
    """``send`` that adds the CORS response headers the inner app did not set itself."""

    async def send_with_cors(message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start":
            headers = list(message["headers"])
            names = {name.lower() for name, _ in headers}
            if _ACAO not in names:
                headers.append((_ACAO, b"*"))
            if _ACEH not in names:
                headers.append((_ACEH, _EXPOSED))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_cors


async def _drain(scope: HTTPScope, receive: ASGIReceiveCallable) -> bool:
    """Read and drop a refused request's body; False when the connection must close.

    A response sent before the request body is read makes hypercorn close the
    connection without saying so, and the client's next request on it fails.
    Up to :data:`_DRAIN_LIMIT` is read (as Go's net/http does), beyond that the
    refusal says ``Connection: close``. Nothing is read when the request says
    its body is larger, or says ``Expect: 100-continue`` (such a client may hold
    its body back, and the refusal with it, until it times out).
    """
    for name, value in scope["headers"]:
        if name == b"expect" and value.lower() == b"100-continue":
            return False
        if name == b"content-length" and (not value.isdigit() or int(value) > _DRAIN_LIMIT):
            return False
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False  # the client went away
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if size > _DRAIN_LIMIT:
            return False


def _error_response(error: SwapError, path: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = msgspec.json.encode(error.body(error_style(path)))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        *((name.lower().encode(), value.encode()) for name, value in error.headers().items()),
    ]
    return headers, body


def _host_refused(value: bytes) -> HostNotAllowed:
    shown = host_name(value) or value.decode("latin-1")
    if len(shown) > _HOST_SHOWN:
        shown = shown[:_HOST_SHOWN] + "..."
    return HostNotAllowed(
        f"Host {shown!r} is not allowed: trio-swap answers localhost, IP addresses, this "
        "machine's name and the names in allowedHosts (DNS rebinding protection, "
        "docs/security.md)"
    )


def _not_admin(scope: HTTPScope, grant: Grant) -> NotAdmin:
    return NotAdmin(
        f"the API key {grant.name!r} may not call {scope['path'][:_HOST_SHOWN]}: "
        "it is for inference and /v1/models only (admin: true opens the admin routes)"
    )


def _forbidden(scope: HTTPScope) -> Forbidden:
    return Forbidden(
        f"{scope['path']} cannot be called from another origin's page "
        "(Sec-Fetch-Site: cross-site or same-site); only model routes and /v1/models can"
    )


def _forbidden_websocket(path: str) -> Forbidden:
    return Forbidden(
        f"a websocket to {path[:_HOST_SHOWN]} cannot be opened from another origin's page "
        "(Sec-Fetch-Site, or an Origin naming another host than Host)"
    )


def _other_origin(origin: bytes | None, host: bytes | None) -> bool:
    """Whether ``Origin`` names another host and port than ``Host`` (a page elsewhere).

    A browser always sends ``Origin`` on a websocket handshake, which no CORS check
    guards; other clients usually send none.
    """
    if origin is None or origin == b"null":
        return origin is not None
    _, _, authority = origin.partition(b"://")
    return host is None or authority.lower() != host.lower()


def _bad_host(value: bytes) -> bool:
    """A ``Host`` whose name IDNA cannot encode (an empty label, one over 63 characters).

    werkzeug's routing encodes it so for every Quart route, and its error escaped Quart's
    error handling as a 500 with a traceback. RFC 9112 §3.2: an invalid Host is a 400.
    """
    name = value.decode("latin-1").lower().partition(":")[0]  # as werkzeug splits it
    try:
        name.encode("idna")
    except UnicodeError:
        return True
    return False


async def _send_refusal(
    send: ASGISendCallable, scope: HTTPScope, receive: ASGIReceiveCallable, error: SwapError
) -> None:
    """``error`` as the answer, the request body read first so the connection stays usable."""
    keep_alive = await _drain(scope, receive)
    headers, body = _error_response(error, scope["path"])
    if not keep_alive:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_unauthorized(
    send: ASGISendCallable, message: str, path: str, *, keep_alive: bool
) -> None:
    headers, body = _error_response(Unauthorized(message), path)
    if not keep_alive:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _refuse_websocket(
    scope: WebsocketScope, send: ASGISendCallable, error: SwapError
) -> None:
    """``error`` as a response with its JSON body where the server can send one, else
    close 1008 (policy violation; hypercorn answers the handshake with a 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers, body = _error_response(error, scope["path"])
        await send(
            {"type": "websocket.http.response.start", "status": error.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error.message})
