"""The quart-trio application and the streaming relay to upstream servers."""

from trio_swap.http.app import AppState, build_app

__all__ = ["AppState", "build_app"]
