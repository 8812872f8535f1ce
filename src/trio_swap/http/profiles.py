"""``GET /api/profiles``, ``PUT /api/profiles/active``, and the ``/v1/models`` entries of
selectors and of the active profile's pins (docs/selectors.md).

Switching a profile changes how the next requests' names are read; requests
under way keep the name they were given. None is active at start and after a
reload.
"""

from __future__ import annotations

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from trio_swap.errors import BadRequest, SwapError
from trio_swap.http.errors import error_response, json_response
from trio_swap.http.selection import Selection
from trio_swap.http.state import AppState

__all__ = [
    "listing_entries",
    "listing_entry",
    "make_selection",
    "profiles_document",
    "register_profile_routes",
]


class _Activate(msgspec.Struct):
    name: str | None


class UnknownProfile(SwapError):
    """A profile name that the config does not have."""

    status = 404
    error_type = "invalid_request_error"
    code = "profile_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"profile {name!r} is not configured (see GET /api/profiles)")
        self.name = name


def register_profile_routes(app: QuartTrio, state: AppState) -> None:
    """Add the two profile routes; they answer 404 when the server has no selection."""

    @app.get("/api/profiles")
    async def list_profiles() -> Response:
        return json_response(profiles_document(state))

    @app.put("/api/profiles/active")
    async def activate_profile() -> Response:
        selection = state.selection
        try:
            wanted = msgspec.json.decode(await request.get_data(), type=_Activate)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            message = f'the body must be {{"name": "<profile>"}} or {{"name": null}}: {exc}'
            return error_response(BadRequest(message))
        known = wanted.name is None or wanted.name in state.config.profiles
        if selection is None or not known:
            return error_response(UnknownProfile(str(wanted.name)))
        selection.activate(wanted.name)
        return json_response({"active": selection.active})


def profiles_document(state: AppState) -> dict[str, object]:
    """``{"active": name or null, "profiles": [{id, description, pins}]}``, sorted by id."""
    selection = state.selection
    profiles = sorted(state.config.profiles.values(), key=lambda profile: profile.name)
    return {
        "active": selection.active if selection is not None else None,
        "profiles": [
            {"id": p.name, "description": p.description, "pins": dict(p.pins)} for p in profiles
        ],
    }


def listing_entries(state: AppState, created: int) -> list[dict[str, object]]:
    """``/v1/models`` entries for listed selectors and the active profile's pins.

    A pin is listed when it turns on a name (not ``""``) that is not already
    a model, alias, selector or listed peer model (``peer/model``).
    """
    config = state.config
    selection = state.selection
    entries: list[dict[str, object]] = []
    for selector in config.selectors.values():
        if selector.unlisted:
            continue
        entry = listing_entry(selector.id, created, selector.name, selector.description)
        entry["meta"] = {
            "llamaswap": {
                **selector.metadata,
                "type": "selector",
                "strategy": selector.strategy,
                "targets": list(selector.targets),
                "spillover": selector.spillover,
            }
        }
        loaded = selection is not None and selection.loaded(selector)
        entry["status"] = {"value": "loaded" if loaded else "unloaded"}
        entries.append(entry)
    if selection is not None and selection.active is not None:
        profile = config.profiles[selection.active]
        listed = {p.qualified(m) for p in config.peers.values() for m in p.models}
        for name, target in profile.pins.items():
            if not target or config.resolve(name) is not None or name in config.selectors:
                continue
            if name in listed:  # already listed as a peer model: one entry per id
                continue
            entry = listing_entry(name, created, "", profile.description)
            entry["meta"] = {
                "llamaswap": {"type": "profile", "profile": profile.name, "target": target}
            }
            entry["status"] = {"value": "unloaded"}
            entries.append(entry)
    return entries


def listing_entry(entry_id: str, created: int, name: str, description: str) -> dict[str, object]:
    """One ``/v1/models`` entry's common fields (name and description when not blank)."""
    entry: dict[str, object] = {
        "id": entry_id,
        "object": "model",
        "created": created,
        "owned_by": "trio-swap",
    }
    if name.strip():
        entry["name"] = name.strip()
    if description.strip():
        entry["description"] = description.strip()
    return entry


def make_selection(state: AppState) -> Selection:
    """A :class:`Selection` reading process states from ``state`` (the server's one)."""

    def state_of(model_id: str) -> str | None:
        process = state.processes.get(model_id)
        return process.state.value if process is not None else None

    return Selection(state.config, state_of)
