"""Which paths take a websocket upgrade (the proxy itself is :mod:`trio_swap.http.websocket`).

Pure, so the access middleware can ask before anything else runs: a websocket
to any other path is refused there, after the ``Host`` and key checks.
"""

from __future__ import annotations

from typing import Final

from trio_swap.http.routes import (
    JSON_PATHS,
    MULTIPART_PATHS,
    PASSTHROUGH_PREFIX,
    QUERY_PATHS,
    VERSIONLESS_PATHS,
)

__all__ = ["REALTIME_PATH", "WEBSOCKET_PATHS", "is_websocket_route"]

#: OpenAI's Realtime API: a websocket that names its model in ``?model=``.
REALTIME_PATH: Final = "/v1/realtime"
#: Paths (besides ``/upstream/<model>/...``) whose websocket names its model in ``?model=``:
#: every model-routed path, and the Realtime API's.
WEBSOCKET_PATHS: Final = (
    JSON_PATHS | MULTIPART_PATHS | QUERY_PATHS | VERSIONLESS_PATHS | {REALTIME_PATH}
)


def is_websocket_route(path: str) -> bool:
    """Whether a websocket upgrade to ``path`` is proxied to a model."""
    return path.startswith(PASSTHROUGH_PREFIX) or path in WEBSOCKET_PATHS
