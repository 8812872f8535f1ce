"""``timeouts:`` of a model or a peer, validated: llama-swap's Go transport knobs.

Every value is seconds, finite and not negative (0 is no limit, as in Go).
Which ones trio-swap applies, and how, is in docs/configuration.md#timeouts.
"""

from __future__ import annotations

import math

from trio_swap.config.model import UpstreamTimeouts
from trio_swap.config.schema import RawPeerTimeouts, RawTimeouts
from trio_swap.config.yamlsource import Document, KeyPath

__all__ = ["check_peer_timeouts", "check_timeouts"]

#: YAML key -> the field of the raw and final Structs.
_FIELDS = {
    "connect": "connect",
    "keepalive": "keepalive",
    "responseHeader": "response_header",
    "tlsHandshake": "tls_handshake",
    "expectContinue": "expect_continue",
    "idleConn": "idle_conn",
}
#: The peer keys checked here (``connect`` and ``responseHeader`` are checked with the peer).
_PEER_ONLY = ("keepalive", "tlsHandshake", "expectContinue", "idleConn")


def check_timeouts(raw: RawTimeouts | None, path: KeyPath, doc: Document) -> UpstreamTimeouts:
    """A model's ``timeouts`` (``path`` ends in ``timeouts``); None: llama-swap's defaults."""
    if raw is None:
        return UpstreamTimeouts()
    values = {field: _seconds(raw, key, field, path, doc) for key, field in _FIELDS.items()}
    return UpstreamTimeouts(**values)


def check_peer_timeouts(raw: RawPeerTimeouts, path: KeyPath, doc: Document) -> None:
    """The peer keys that only need to be valid: trio-swap's peer client has no such knob."""
    for key in _PEER_ONLY:
        _seconds(raw, key, _FIELDS[key], path, doc)


def _seconds(
    raw: RawTimeouts | RawPeerTimeouts, key: str, field: str, path: KeyPath, doc: Document
) -> float:
    value = float(getattr(raw, field))
    if not math.isfinite(value) or value < 0:
        shown = f"{value:g}"
        raise doc.error(
            (*path, key), f"must be a number of seconds >= 0 (got {shown}); 0 = no limit"
        )
    return value
