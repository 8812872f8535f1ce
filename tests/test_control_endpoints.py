"""No client reaches an upstream's control endpoints (sleep, wake, weights) through trio-swap.

vLLM marks its sleep-mode and weight-update endpoints dev-only and SGLang's
memory release is the same kind of thing: only trio-swap may call them
(issue 12). ``/upstream/<model>/...`` refuses them with an OpenAI-style 403,
however the path is spelled; everything else passes through as before.
"""

from __future__ import annotations

import pytest
import trio

from tests.conftest import make_config, responder_model, running

REFUSED = [
    "sleep?level=1",
    "wake_up",
    "is_sleeping",
    "collective_rpc",
    "reset_prefix_cache",
    "release_memory_occupation",
    "resume_memory_occupation",
    "update_weights_from_disk",
    "Sleep",
    "sleep/",
    "/sleep",
    "%73leep",
    "wake%5Fup",
]


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_control_endpoints_are_refused_with_403(method: str) -> None:
    with trio.fail_after(30):
        async with running(make_config(responder_model("m"))) as harness:
            for path in REFUSED:
                response = await harness.client.request(method, f"/upstream/m/{path}")
                assert response.status_code == 403, (path, response.text)
                error = response.json()["error"]
                assert error["type"] == "permission_error"
                assert "only trio-swap calls it" in error["message"]
            assert harness.server.processes["m"].start_count == 0  # refused before any load
            # not a control endpoint: passed through to the model as before
            response = await harness.client.get("/upstream/m/health")
            assert response.status_code == 200
            response = await harness.client.get("/upstream/m/v1/models")
            assert response.status_code == 200
