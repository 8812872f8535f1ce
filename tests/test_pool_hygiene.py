"""trio-swap never keeps a connection to a model process that is going (issue 11).

Read from /proc, not from trio-swap's bookkeeping: after a swap, an unload or a
crash, this process (which runs trio-swap in-process) holds no socket to the
old server's port, in any state (an idle pooled connection to a stopped server
used to linger in CLOSE-WAIT, and an idle keep-alive connection holds a real
llama-server's exit by ~100 ms).
"""

from __future__ import annotations

import os
import signal

import trio

from tests.conftest import chat, make_config, responder_model, running, sockets_to, wait_for


def port_of(proxy: str) -> int:
    return int(proxy.rsplit(":", 1)[1])


async def test_a_swap_unload_or_crash_leaves_no_connection_to_the_old_server() -> None:
    a, b = responder_model("a"), responder_model("b")
    port_a, port_b = port_of(a.proxy), port_of(b.proxy)
    with trio.fail_after(30):
        async with running(make_config(a, b)) as harness:
            for _ in range(3):
                response = await harness.client.post("/v1/chat/completions", json=chat("a"))
                assert response.status_code == 200
            assert sockets_to(port_a) == 1  # one pooled keep-alive connection
            response = await harness.client.post("/v1/chat/completions", json=chat("b"))
            assert response.status_code == 200
            assert sockets_to(port_a) == 0  # closed before a was told to stop
            assert sockets_to(port_b) == 1
            await harness.client.post("/api/models/unload")
            assert sockets_to(port_b) == 0
            response = await harness.client.post("/v1/chat/completions", json=chat("a"))
            assert response.status_code == 200
            pid = harness.pid("a")
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # a crash: nobody ordered a stop
            await harness.wait_for_state("a", "stopped")
            await wait_for(lambda: sockets_to(port_a) == 0, what="no socket to the dead server")
            response = await harness.client.post("/v1/chat/completions", json=chat("a"))
            assert response.status_code == 200  # a fresh connection to the new process
