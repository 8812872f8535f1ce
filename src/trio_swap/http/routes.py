"""Which paths are model-routed, and where each finds the model name.

The table is llama-swap's (see docs/api.md): a JSON body field for most
inference endpoints, a multipart form field for uploads, the query string for
a few GETs, and the path itself under ``/upstream/``. Everything else goes to
the admin app.
"""

from __future__ import annotations

import enum
from typing import Final, final

__all__ = ["ModelSource", "Route", "classify"]


class ModelSource(enum.Enum):
    """Where a route's request names its model."""

    JSON = "json"
    MULTIPART = "multipart"
    QUERY = "query"
    PATH = "path"


@final
class Route:
    """A model-routed request: where its model name is, and which path goes upstream."""

    __slots__ = ("source", "upstream_path")

    def __init__(self, source: ModelSource, upstream_path: str | None = None) -> None:
        self.source = source
        #: The path sent upstream when it differs from the request's (the ``/v`` prefix).
        self.upstream_path = upstream_path


#: POST routes whose JSON body's ``model`` field names the model.
JSON_PATHS: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/rerank",
        "/v1/reranking",
        "/rerank",
        "/reranking",
        "/infill",
        "/completion",
        "/v1/audio/speech",
        "/v1/audio/voices",
        "/v1/images/generations",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/audioapi/v1/tasks/run",
    }
)
#: llama-swap's "versionless" spellings: ``/v/chat/completions`` goes upstream as
#: ``/chat/completions`` (for servers mounted without a ``/v1`` prefix).
VERSIONLESS_PATHS: Final = frozenset(
    {
        "/v/chat/completions",
        "/v/responses",
        "/v/completions",
        "/v/messages",
        "/v/messages/count_tokens",
        "/v/embeddings",
        "/v/rerank",
        "/v/reranking",
    }
)
#: POST routes whose multipart form field ``model`` names the model (file uploads).
MULTIPART_PATHS: Final = frozenset({"/v1/audio/transcriptions", "/v1/images/edits"})
#: GET routes whose query parameter ``model`` names the model.
QUERY_PATHS: Final = frozenset({"/props", "/v1/audio/voices", "/sdapi/v1/loras"})
#: Raw passthrough to a model's server: ``/upstream/<model>/<path>``.
PASSTHROUGH_PREFIX: Final = "/upstream/"

_JSON: Final = Route(ModelSource.JSON)
_MULTIPART: Final = Route(ModelSource.MULTIPART)
_QUERY: Final = Route(ModelSource.QUERY)
_PATH: Final = Route(ModelSource.PATH)
_VERSIONLESS: Final = {path: Route(ModelSource.JSON, path[2:]) for path in VERSIONLESS_PATHS}


class WrongMethod(Exception):
    """A model-routed path asked with a method it does not take."""

    def __init__(self, allowed: str) -> None:
        super().__init__(allowed)
        self.allowed = allowed


def classify(method: str, path: str) -> Route | None:
    """The route for ``method path``, or None when the admin app should answer.

    Raises:
        WrongMethod: the path is model-routed but not with this method.
    """
    if path.startswith(PASSTHROUGH_PREFIX):
        return _PATH
    if method == "POST":
        if path in JSON_PATHS:
            return _JSON
        if path in MULTIPART_PATHS:
            return _MULTIPART
        if path in QUERY_PATHS:
            return _raise_wrong_method("GET")
        return _VERSIONLESS.get(path)
    if method == "GET" and path in QUERY_PATHS:
        return _QUERY
    if method == "OPTIONS":
        return None  # CORS preflight, answered by the access middleware or the admin app
    if path in JSON_PATHS or path in MULTIPART_PATHS or path in VERSIONLESS_PATHS:
        return _raise_wrong_method("POST" if path not in QUERY_PATHS else "GET, POST")
    if path in QUERY_PATHS:
        return _raise_wrong_method("GET")
    return None


def _raise_wrong_method(allowed: str) -> Route:
    raise WrongMethod(allowed)
