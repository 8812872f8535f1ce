"""Where a model's server listens, parsed once from its ``proxy`` URL.

Parsed when the config loads (a malformed ``proxy`` is a located config
error, never a crash later) and carried on every router grant
(:class:`~trio_swap.router.Lease`), so the request path never parses a URL.
"""

from __future__ import annotations

from typing import final
from urllib.parse import urlsplit

__all__ = ["Upstream"]


@final
class Upstream:
    """The scheme, host, port and base path of one model server."""

    __slots__ = ("authority", "base_path", "host", "port", "tls", "url")

    def __init__(self, proxy: str) -> None:
        """Raises: ValueError: ``proxy`` is not an absolute http(s) URL with a valid
        host and port."""
        parts = urlsplit(proxy)  # ValueError for a broken IPv6 literal
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {proxy!r}")
        # The resolver encodes the name this way: an empty or over-long label
        # (``a..b``) would fail there, at the first connection, not here.
        parts.hostname.encode("idna")  # UnicodeError is a ValueError
        port = parts.port  # ValueError when out of range or not a number
        self.url = proxy
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.tls else 80)
        self.authority = parts.netloc.rsplit("@", 1)[-1].encode()
        self.base_path = parts.path.rstrip("/").encode()

    def target(self, raw_path: bytes, query: bytes) -> bytes:
        target = self.base_path + raw_path
        return target + b"?" + query if query else target

    def __repr__(self) -> str:
        return f"<Upstream {self.url}>"
