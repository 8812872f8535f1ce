"""Keeping quart-trio's keep-alive connections closable at shutdown.

quart-trio cancels its request nursery as soon as the response is sent, while
hypercorn is still inside that last ``send`` recycling the connection for the
next request (it starts the idle-timeout task there). The cancellation lands
in that start, the idle task never runs, and hypercorn cannot close the idle
connection at shutdown: SIGTERM then waits the whole ``--shutdown-timeout``
for any client that keeps a connection open after an admin request (a browser
tab, a monitoring probe). Shielding the last body ``send`` lets hypercorn
finish its bookkeeping; it writes under a shield itself, so nothing can hang.
"""

from __future__ import annotations

import trio
from hypercorn.typing import ASGISendCallable, ASGISendEvent

__all__ = ["shield_last_send"]


def shield_last_send(send: ASGISendCallable) -> ASGISendCallable:
    """``send``, with the response's final body message sent under a cancel shield."""

    async def shielded(message: ASGISendEvent) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return shielded
