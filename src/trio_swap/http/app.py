"""The quart-trio application: model listing, health, and the admin API.

The model-routed POST endpoints are served in front of it by
:mod:`trio_swap.http.inference` (see there for why).
"""

from __future__ import annotations

import logging
from typing import Final

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trio_swap import __version__
from trio_swap.errors import BodyTooLarge, ModelNotFound, SwapError
from trio_swap.http.capabilities import capability_fields, model_meta
from trio_swap.http.errors import error_response, json_response, plain_error
from trio_swap.http.fit_view import fit_document, fit_fields
from trio_swap.http.grants import visible
from trio_swap.http.logs import register_log_routes
from trio_swap.http.observe import register_observe_routes
from trio_swap.http.profiles import listing_entries, listing_entry, register_profile_routes
from trio_swap.http.state import AppState, model_rows
from trio_swap.http.ui import register_ui_routes
from trio_swap.upstream.logs import LogBook

__all__ = ["DEFAULT_MAX_BODY_BYTES", "build_app"]

log = logging.getLogger("trio_swap.http")

DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024 * 1024


def build_app(
    state: AppState,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    logs: LogBook | None = None,
) -> QuartTrio:
    app = QuartTrio("trio_swap")
    # Quart's defaults cut streams after 60 s without a word and reject bodies over 16 MiB.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 600
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.errorhandler(SwapError)
    async def _swap_error(error: SwapError) -> Response:
        if error.status >= 500:
            log.warning(
                "%s %s -> %d: %s", request.method, request.path, error.status, error.message
            )
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return error_response(
                BodyTooLarge(f"request body larger than the {max_body_bytes} byte limit")
            )
        if status == 404:
            return plain_error(
                404, f"no route {request.path}", "invalid_request_error", "not_found"
            )
        if status == 405:
            # RFC 9110 §15.5.6: a 405 must say which methods the resource takes.
            allowed = ", ".join(sorted(getattr(error, "valid_methods", None) or ()))
            return plain_error(
                405,
                f"{request.method} is not allowed on {request.path}",
                "invalid_request_error",
                "method_not_allowed",
                headers={"Allow": allowed} if allowed else None,
            )
        return plain_error(
            status, error.description or str(error), "invalid_request_error", "bad_request"
        )

    @app.get("/health")
    @app.get("/wol-health")  # llama-swap's spelling, polled by wake-on-LAN proxies
    async def health() -> Response:
        return Response("OK", content_type="text/plain")

    @app.get("/v1/models")
    @app.get("/models")
    async def list_models() -> Response:
        # a scoped key: only what it may use
        data = visible(request.scope, _model_listing(state), state.config)
        return json_response({"object": "list", "data": data})

    @app.get("/running")
    async def running() -> Response:
        rows = []
        for model_id in sorted(state.processes):
            process = state.processes[model_id]
            if process.state.value == "stopped":
                continue
            model = process.model
            rows.append(
                {
                    "model": model_id,
                    "state": process.state.value,
                    "cmd": " ".join(model.cmd),
                    "proxy": model.proxy,
                    "ttl": model.ttl,
                    "name": model.name,
                    "description": model.description,
                    "pid": process.pid,
                    **fit_fields(state.router.ledger, model_id),
                }
            )
        return json_response({"running": rows})

    @app.get("/api/fit")
    async def api_fit() -> Response:
        return json_response(fit_document(state.router.ledger, state.processes))

    @app.get("/api/models")
    async def api_models() -> Response:
        rows = model_rows(state)  # the web UI's live feed sends the same rows
        return json_response(
            {"models": rows, "swaps": state.router.swap_count, "version": __version__}
        )

    @app.post("/api/models/unload")
    async def unload_all() -> Response:
        await state.router.unload()
        return json_response({"msg": "ok"})

    @app.get("/unload")
    async def unload_all_get() -> Response:
        await state.router.unload()
        return Response("OK", content_type="text/plain")

    @app.post("/api/models/unload/<path:name>")
    async def unload_one(name: str) -> Response:
        model_id = state.config.resolve(name)
        if model_id is None:
            raise ModelNotFound(name)
        await state.router.unload([model_id])
        return json_response({"msg": "ok", "model": model_id})

    if logs is not None:
        register_log_routes(app, logs, lambda name: state.config.resolve(name))
    if state.observer is not None:
        register_observe_routes(app, state.observer, state)
    register_profile_routes(app, state)  # /api/profiles, /api/profiles/active
    register_ui_routes(app, state, logs)  # /, /ui, /api/events, /api/models/load

    return app


def _model_listing(state: AppState) -> list[dict[str, object]]:
    """``/v1/models`` entries: listed models, their aliases when asked for, peer models
    (as ``peerId/model``), sorted by id."""
    data: list[dict[str, object]] = []
    for model in state.config.models.values():
        if model.unlisted:
            continue
        loaded = state.processes[model.id].state.value != "stopped"
        status = {"value": "loaded" if loaded else "unloaded"}
        entry = listing_entry(model.id, state.started_at, model.name, model.description)
        entry.update(capability_fields(model.capabilities))
        # llama-swap publishes metadata under meta.llamaswap; keep the same place.
        llamaswap = {**model.metadata, "type": "model", "aliases": list(model.aliases)}
        entry["meta"] = model_meta(model.capabilities, llamaswap)
        entry["status"] = status
        data.append(entry)
        if state.config.include_aliases_in_list:
            for alias in model.aliases:
                entry = listing_entry(alias, state.started_at, model.name, model.description)
                entry.update(capability_fields(model.capabilities))  # the same model's
                entry["meta"] = {"llamaswap": {"type": "alias", "modelID": model.id}}
                entry["status"] = status
                data.append(entry)
    for peer in state.config.peers.values():
        for name in peer.models:
            if peer.qualified(name) in state.config.selectors:
                continue  # a selector of that name answers it (docs/selectors.md)
            entry = listing_entry(peer.qualified(name), state.started_at, f"{peer.id}: {name}", "")
            entry["meta"] = {"llamaswap": {"type": "peer", "peerID": peer.id}}
            entry["status"] = {"value": "unloaded"}  # another machine swaps it
            data.append(entry)
    data.extend(listing_entries(state, state.started_at))  # selectors, the profile's pins
    data.sort(key=lambda entry: str(entry["id"]))
    return data
