"""Keeping quart-trio's keep-alive connections closable at shutdown.

quart-trio cancels its request nursery as soon as the response is sent, while
hypercorn is still inside that last ``send`` recycling the connection for the
next request (it starts the idle-timeout task there). The cancellation lands
in that start, the idle task never runs, and hypercorn cannot close the idle
connection at shutdown: SIGTERM then waits the whole ``--shutdown-timeout``
for any client that keeps a connection open after an admin request (a browser
tab, a monitoring probe). Shielding the last body ``send`` lets hypercorn
finish its bookkeeping. The model-routed handler (:mod:`trio_swap.http.inference`)
needs the same: its disconnect watcher sees the ``http.disconnect`` that
recycling posts, and cancels the exchange from inside that same last send.

The shield is bounded (:data:`LAST_SEND_SHIELD`): the last send writes a few
bytes at most, and only waits when the client stopped reading (a full socket
buffer, or an HTTP/2 flow-control window it never opens). Unbounded, such a
client held its handler past every deadline, shutdown's included.
"""

from __future__ import annotations

import logging
from typing import Final

import trio
from hypercorn.typing import ASGISendCallable, ASGISendEvent

__all__ = ["LAST_SEND_SHIELD", "shield_last_send"]

log = logging.getLogger("trio_swap.http")

#: Longest the last send holds off a cancellation (seconds).
LAST_SEND_SHIELD: Final = 5.0


def shield_last_send(send: ASGISendCallable) -> ASGISendCallable:
    """``send``, with the response's final body message shielded from cancellation a while."""

    async def shielded(message: ASGISendEvent) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.move_on_after(LAST_SEND_SHIELD, shield=True) as scope:
                await send(message)
            if scope.cancelled_caught:
                log.info("a client read nothing for %gs: response end abandoned", LAST_SEND_SHIELD)
        else:
            await send(message)

    return shielded
