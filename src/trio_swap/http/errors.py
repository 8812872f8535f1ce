"""Turning errors into OpenAI-style JSON responses with the right status."""

from __future__ import annotations

import msgspec
from quart import Response

from trio_swap.errors import SwapError

__all__ = ["error_response", "json_response", "plain_error"]


def json_response(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response encoded with msgspec (fast, and ordered as built)."""
    return Response(
        msgspec.json.encode(payload),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(error: SwapError) -> Response:
    return json_response(error.body(), error.status, error.headers())


def plain_error(
    status: int,
    message: str,
    error_type: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """An OpenAI-style error for statuses that have no :class:`SwapError` class (404 route, 405)."""
    payload = {"error": {"message": message, "type": error_type, "code": code}}
    return json_response(payload, status, headers)
