"""The quart-trio application and the streaming relay to upstream servers."""

from trio_swap.http.app import build_app
from trio_swap.http.state import AppState

__all__ = ["AppState", "build_app"]
