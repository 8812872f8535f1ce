"""Every error trio-swap reports to a client, and the HTTP status and body it becomes.

    SwapError                      base: knows its status, OpenAI ``type`` and ``code``
    ├── BadRequest                 400  malformed JSON, no ``model`` field
    ├── Unauthorized               401  no API key, or not one of ``apiKeys``
    ├── Forbidden                  403  an admin route called from another site's page
    ├── ModelNotFound              404  the name is neither a model id nor an alias
    ├── MethodNotAllowed           405  e.g. GET on a POST-only inference route
    ├── BodyTooLarge               413  request body over the configured limit
    ├── ModelPinned                409  the request needs a ``swappable: false`` model evicted
    │   (also 409, defined beside their use: ``PathNotLoading`` in http/passthrough.py,
    │   an ``upstream.ignorePaths`` path of a model not ready; ``ModelNotReady`` in
    │   http/websocket.py, a ``compat.ignoreWebsockets`` upgrade to a model not ready)
    ├── RateLimited                429  over the model's ``concurrencyLimit`` (Retry-After)
    ├── UpstreamFailed             502  the model's server broke the request (connect/read)
    │   └── UpstreamTimeout        504  no response head within ``timeouts.responseHeader``
    │                                   (http/upstream_client.py)
    ├── PeerFailed                 502  a peer (another machine) could not be reached
    ├── ModelStartFailed           503  the model's server did not become ready (quotes its log)
    ├── ModelUnloaded              503  an unload stopped the model this request waited for
    ├── QueueFull                  503  the scheduler's maxQueue is reached (Retry-After)
    ├── NoSelectorTarget           503  every target of a selector is being stopped
    └── ShuttingDown               503  trio-swap is stopping

Raise the most specific class; the HTTP layer turns it into
``{"error": {"message", "type", "code"}}`` with :attr:`SwapError.status`, or
into Anthropic's ``{"type": "error", "error": {"type", "message"}}`` on the
Anthropic routes (:func:`error_style`), so each SDK can read its own errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Final, Literal

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ErrorStyle",
    "Forbidden",
    "MethodNotAllowed",
    "ModelNotFound",
    "ModelPinned",
    "ModelStartFailed",
    "ModelUnloaded",
    "NoSelectorTarget",
    "PeerFailed",
    "QueueFull",
    "RateLimited",
    "ShuttingDown",
    "SwapError",
    "Unauthorized",
    "UpstreamFailed",
    "error_payload",
    "error_style",
]

ErrorStyle = Literal["openai", "anthropic"]

#: Paths whose clients are Anthropic SDKs (``/v/`` is llama-swap's versionless prefix).
_ANTHROPIC_PREFIXES: Final = ("/v1/messages", "/v/messages")

#: Anthropic's error ``type`` for each status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_style(path: str) -> ErrorStyle:
    """Which error body the client on ``path`` understands."""
    return "anthropic" if path.startswith(_ANTHROPIC_PREFIXES) else "openai"


def error_payload(
    style: ErrorStyle, status: int, message: str, error_type: str, code: str
) -> dict[str, object]:
    """An error body in ``style``; Anthropic's ``type`` follows from the status."""
    if style == "anthropic":
        kind = _ANTHROPIC_TYPES.get(
            status, "invalid_request_error" if status < 500 else "api_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": error_type, "code": code}}


#: The longest client-given name an error message repeats in full.
_NAME_SHOWN: Final = 200


def _quoted(name: str) -> str:
    """``name`` quoted for a message; a huge one (a hostile request) is cut short."""
    if len(name) <= _NAME_SHOWN:
        return repr(name)
    return f"{name[:_NAME_SHOWN]!r}... ({len(name)} characters)"


class SwapError(Exception):
    """A failure a client must hear about, with the HTTP status that describes it."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for the retryable ones)."""
        return {}

    def body(self, style: ErrorStyle = "openai") -> dict[str, object]:
        """The error object the client's SDK knows how to read."""
        return error_payload(style, self.status, self.message, self.error_type, self.code)


class BadRequest(SwapError):
    status = 400
    error_type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(SwapError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="trio-swap"'}


class Forbidden(SwapError):
    status = 403
    error_type = "permission_error"
    code = "forbidden"


class ModelNotFound(SwapError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {_quoted(model)} is not configured (see GET /v1/models)")
        self.model = model


class MethodNotAllowed(SwapError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, method: str, path: str, allowed: str = "POST") -> None:
        super().__init__(f"{method} is not allowed on {path} (use {allowed})")
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class BodyTooLarge(SwapError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class ModelPinned(SwapError):
    status = 409
    error_type = "invalid_request_error"
    code = "model_pinned"

    def __init__(self, model: str, pinned: str) -> None:
        super().__init__(
            f"model {model!r} cannot be loaded while {pinned!r} runs: {pinned!r} has "
            f"swappable: false, so only an unload stops it "
            f"(POST /api/models/unload/{pinned})"
        )
        self.model = model
        self.pinned = pinned


class QueueFull(SwapError):
    status = 503
    error_type = "server_error"
    code = "queue_full"

    def __init__(self, limit: int) -> None:
        super().__init__(f"too many requests waiting (maxQueue is {limit}); try again shortly")
        self.limit = limit

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class RateLimited(SwapError):
    status = 429
    error_type = "rate_limit_error"
    code = "concurrency_limit"

    def __init__(self, model: str, limit: int) -> None:
        super().__init__(
            f"too many requests for model {model!r}: its concurrencyLimit of {limit} is reached"
        )
        self.model = model
        self.limit = limit

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamFailed(SwapError):
    status = 502
    error_type = "server_error"
    code = "bad_gateway"

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"upstream for model {model!r} failed: {detail}")
        self.model = model
        self.detail = detail


class PeerFailed(SwapError):
    status = 502
    error_type = "server_error"
    code = "bad_gateway"

    def __init__(self, peer: str, detail: str) -> None:
        super().__init__(f"peer proxy error: peer {peer!r}: {detail}")
        self.peer = peer


class ModelStartFailed(SwapError):
    """The model's server exited, timed out its health check, or could not be spawned."""

    status = 503
    error_type = "server_error"
    code = "model_start_failed"

    def __init__(self, model: str, reason: str, log_tail: Sequence[str] = ()) -> None:
        message = f"model {model!r} failed to start: {reason}"
        if log_tail:
            message += "\nlast output lines:\n" + "\n".join(log_tail)
        super().__init__(message)
        self.model = model
        self.reason = reason
        self.log_tail = tuple(log_tail)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class ModelUnloaded(SwapError):
    status = 503
    error_type = "server_error"
    code = "model_unloaded"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} was unloaded while this request waited for it")
        self.model = model


class NoSelectorTarget(SwapError):
    status = 503
    error_type = "server_error"
    code = "no_selector_target"

    def __init__(self, selector: str) -> None:
        super().__init__(f"selector {selector!r} has no target to send to right now; try again")
        self.selector = selector

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ShuttingDown(SwapError):
    status = 503
    error_type = "server_error"
    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("trio-swap is shutting down")
