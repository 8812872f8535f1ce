"""Two trio-swap instances on loopback: a front door that owns some models and forwards
requests for the others to a second instance (a "peer": another GPU box).
"""

from __future__ import annotations

import msgspec
import openai
import trio

from tests.conftest import chat, free_port, make_config, responder_model, running, sse_data
from tests.test_responder import run_responder
from trio_swap.config.model import Config, FilterConfig, PeerConfig


def front_door(remote_url: str, *, api_key: str = "peer-secret") -> Config:
    """A local model ``local`` plus the remote box's ``big`` and ``org/other`` as peer models."""
    peer = PeerConfig(
        id="gpu2",
        proxy=remote_url,
        api_key=api_key,
        models=("big", "org/other"),
        filters=FilterConfig(set_params={"seed": 7}),
    )
    base = make_config(responder_model("local"))
    return Config(
        source="<front door>",
        models=base.models,
        health_check_timeout=base.health_check_timeout,
        log_to_stdout="none",
        peers={"gpu2": peer},
    )


def remote_box() -> Config:
    config = make_config(responder_model("big", "--tokens", "7"), responder_model("org/other"))
    return msgspec.structs.replace(config, api_keys=("peer-secret",))


async def test_requests_for_peer_models_cross_to_the_other_instance() -> None:
    with trio.fail_after(90):
        async with running(remote_box()) as remote, running(front_door(remote.server.url)) as h:
            remote.client.headers["authorization"] = "Bearer peer-secret"
            # The local model loads here; the peer model loads over there.
            response = await h.client.post("/v1/chat/completions", json=chat("local"))
            assert response.status_code == 200, response.text
            for name in ("gpu2/big", "big"):
                response = await h.client.post("/v1/chat/completions", json=chat(name))
                assert response.status_code == 200, response.text
                # The qualified name became the peer's own name for the model.
                assert response.json()["model"] == "big"
            assert (await h.models())["local"]["state"] == "ready"  # nothing swapped here
            assert (await remote.models())["big"]["state"] == "ready"
            assert (await remote.models())["big"]["start_count"] == 1

            # The peer's key was injected (the remote requires one); peer filters applied.
            proxy = remote.server.processes["big"].model.proxy
            records = (await h.client.get(f"{proxy}/debug/requests")).json()
            sent = msgspec.json.decode(records[-1]["body"])
            assert sent["seed"] == 7 and sent["model"] == "big"

            listed = (await h.client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in listed] == ["gpu2/big", "gpu2/org/other", "local"]
            assert listed[0]["meta"]["llamaswap"] == {"type": "peer", "peerID": "gpu2"}


async def test_streaming_crosses_peers_token_by_token_with_the_openai_sdk() -> None:
    with trio.fail_after(90):
        async with running(remote_box()) as remote, running(front_door(remote.server.url)) as h:
            async with h.client.stream(
                "POST", "/v1/chat/completions", json=chat("gpu2/big", stream=True)
            ) as response:
                assert response.status_code == 200
                assert response.headers["x-accel-buffering"] == "no"
                lines = [line async for line in response.aiter_lines()]
            data = sse_data(lines)
            assert data[-1] == "[DONE]" and len(data) >= 8

            client = openai.OpenAI(base_url=h.server.url + "/v1", api_key="x", max_retries=0)

            def stream_other() -> list[str]:
                chunks = client.chat.completions.create(
                    model="gpu2/org/other",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                )
                return [c.choices[0].delta.content or "" for c in chunks if c.choices]

            try:
                pieces = await trio.to_thread.run_sync(stream_other)
            finally:
                client.close()
            assert "".join(pieces)
            remote.client.headers["x-api-key"] = "peer-secret"
            assert (await remote.models())["org/other"]["state"] == "ready"


async def test_a_wrong_peer_key_and_a_peer_that_is_down_are_clear_errors() -> None:
    with trio.fail_after(90):
        async with running(remote_box()) as remote:
            wrong_key = front_door(remote.server.url, api_key="nope")
            async with running(wrong_key) as h:
                response = await h.client.post("/v1/chat/completions", json=chat("gpu2/big"))
                # The peer's own 401 reaches the client unchanged.
                assert response.status_code == 401
        down = front_door(f"http://127.0.0.1:{free_port()}")
        async with running(down) as h:
            response = await h.client.post("/v1/chat/completions", json=chat("gpu2/big"))
            assert response.status_code == 502
            assert "peer proxy error" in response.json()["error"]["message"]
            response = await h.client.post(
                "/v1/messages", json={"model": "big", "max_tokens": 5, "messages": []}
            )
            assert response.status_code == 502
            assert response.json()["type"] == "error"
            # The front door keeps serving its own models.
            response = await h.client.post("/v1/chat/completions", json=chat("local"))
            assert response.status_code == 200


async def test_upstream_passthrough_reaches_peer_models() -> None:
    with trio.fail_after(90):
        async with running(remote_box()) as remote, running(front_door(remote.server.url)) as h:
            response = await h.client.get("/upstream/gpu2/org/other/v1/models")
            # The rest of the path goes to the peer as is: here, the remote's own listing.
            assert response.status_code == 200, response.text
            assert [m["id"] for m in response.json()["data"]] == ["big", "org/other"]


async def test_a_client_leaving_a_peer_stream_cancels_the_peers_request() -> None:
    """The disconnect watcher runs beside peer exchanges too: the peer hears the client leave."""
    with trio.fail_after(60):
        async with run_responder(
            "--model", "big", "--tokens", "200", "--token-delay", "0.05"
        ) as peer:
            front = front_door(peer.url)
            async with running(front) as h:
                async with h.client.stream(
                    "POST", "/v1/chat/completions", json=chat("gpu2/big", stream=True)
                ) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if '"content"' in line:
                            break  # leave after the first token
                # Left alone the stream would end by itself after 10 s as "completed".
                while (record := (await peer.requests())[-1])["status"] == "in_flight":
                    await trio.sleep(0.02)
                assert record["status"] == "cancelled"
                tokens_sent = record["tokens_sent"]
                assert isinstance(tokens_sent, int) and tokens_sent < 200
