"""``POST /api/config/reload``: reload the config file now and say what changed.

200 with the diff (model ids by ``added``, ``removed``, ``changed``,
``restart``, ``unchanged``, plus top-level ``settings`` that changed and
``warnings``); 422 with the loader's error (file, key path, line) when the
file does not load, the previous config still serving; 409 when trio-swap
was not started from a file. See docs/reload.md.
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from trio_swap.config import ConfigError
from trio_swap.http.errors import json_response
from trio_swap.reload import Reloader, ReloadUnavailable

__all__ = ["register_reload_route"]


def register_reload_route(app: QuartTrio, reloader: Reloader) -> None:
    @app.post("/api/config/reload")
    async def reload_config() -> Response:
        try:
            report = await reloader.reload()
        except ReloadUnavailable as exc:
            error = {"message": str(exc), "type": "invalid_request_error", "code": "no_config_file"}
            return json_response({"error": error}, 409)
        except ConfigError as exc:
            located: dict[str, object] = {
                "message": f"{exc}; the previous config keeps serving",
                "type": "invalid_request_error",
                "code": "invalid_config",
                "source": exc.source,
                "key_path": exc.key_path,
                "line": exc.line,
            }
            return json_response({"error": located}, 422)
        return json_response(report)
