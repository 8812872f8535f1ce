"""What clients see at the HTTP surface: errors, listings, aliases, the OpenAI SDK."""

from __future__ import annotations

import json

import openai
import trio

from tests.conftest import chat, make_config, responder_model, running


async def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving() -> None:
    config = make_config(responder_model("A", concurrency_limit=1))
    with trio.fail_after(30):
        async with running(config, max_body_bytes=1024) as h:
            post = h.client.post
            cases = [
                (await post("/v1/chat/completions", content=b"{not json"), 400, "bad_request"),
                (await post("/v1/chat/completions", json={"messages": []}), 400, "bad_request"),
                (await post("/v1/chat/completions", json={"model": 7}), 400, "bad_request"),
                (await post("/v1/chat/completions", json=chat("nope")), 404, "model_not_found"),
                (
                    await post("/v1/chat/completions", json=chat("A", pad="x" * 2000)),
                    413,
                    "request_too_large",
                ),
                (await h.client.get("/v1/no-such-route"), 404, "not_found"),
                (await h.client.get("/v1/chat/completions"), 405, "method_not_allowed"),
            ]
            for response, status, code in cases:
                assert response.status_code == status, response.text
                assert response.headers["content-type"] == "application/json"
                error = response.json()["error"]
                assert error["code"] == code
                assert error["message"]
                assert error["type"]
            response = await post("/v1/chat/completions", json=chat("A"))
            assert response.status_code == 200


async def test_over_concurrency_limit_gets_429_with_retry_after() -> None:
    config = make_config(responder_model("A", concurrency_limit=1))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).status_code == 200
            held = trio.Event()

            async def hold() -> None:
                # ?delay keeps this request in flight upstream for a while
                async with h.client.stream(
                    "POST", "/v1/chat/completions?delay=1", json=chat("A")
                ) as response:
                    held.set()
                    await response.aread()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                with trio.fail_after(5):
                    while (await h.models())["A"]["in_flight"] == 0:
                        await trio.sleep(0.01)
                response = await h.client.post("/v1/chat/completions", json=chat("A"))
                assert response.status_code == 429
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["type"] == "rate_limit_error"
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).status_code == 200


async def test_aliases_route_and_use_model_name_rewrites_only_the_model_field() -> None:
    config = make_config(
        responder_model("A", aliases=("gpt-4o-mini",), use_model_name="upstream-name"),
        responder_model("B", aliases=("b-alias",), unlisted=True),
    )
    with trio.fail_after(30):
        async with running(config) as h:
            raw = b'{"model": "gpt-4o-mini",  "messages": [{"role":"user","content":"x"}], "z": 1}'
            response = await h.client.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            assert response.status_code == 200
            assert response.json()["model"] == "upstream-name"
            port = (await h.models())["A"]["port"]
            records = (await h.client.get(f"http://127.0.0.1:{port}/debug/requests")).json()
            sent = json.loads(records[-1]["body"])
            assert sent == {
                "model": "upstream-name",
                "messages": [{"role": "user", "content": "x"}],
                "z": 1,
            }
            # without useModelName the body reaches the upstream byte for byte, alias included
            raw_b = b'{"model":"b-alias",   "messages":[] ,"extra":{"k":[1,2.50]}}'
            response = await h.client.post(
                "/v1/chat/completions", content=raw_b, headers={"content-type": "application/json"}
            )
            assert response.status_code == 200
            port_b = (await h.models())["B"]["port"]
            records = (await h.client.get(f"http://127.0.0.1:{port_b}/debug/requests")).json()
            assert records[-1]["body"] == raw_b.decode()
            listed = (await h.client.get("/v1/models")).json()
            assert [m["id"] for m in listed["data"]] == ["A"]  # B is unlisted
            assert listed["data"][0]["meta"]["llamaswap"]["aliases"] == ["gpt-4o-mini"]


async def test_openai_sdk_user_story() -> None:
    """List models, chat with A (cold start), then B (a swap), then stream from B."""
    config = make_config(responder_model("A"), responder_model("B", "--tokens", "8"))
    with trio.fail_after(60):
        async with running(config) as h:
            client = openai.OpenAI(base_url=h.server.url + "/v1", api_key="unused")

            def story() -> tuple[list[str], str, str, list[str]]:
                ids = [m.id for m in client.models.list()]
                first = client.chat.completions.create(
                    model="A", messages=[{"role": "user", "content": "hello"}]
                )
                second = client.chat.completions.create(
                    model="B", messages=[{"role": "user", "content": "hello"}]
                )
                pieces = []
                stream = client.chat.completions.create(
                    model="B", messages=[{"role": "user", "content": "hello"}], stream=True
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
                return ids, first.model, second.model, pieces

            ids, first_model, second_model, pieces = await trio.to_thread.run_sync(story)
            assert ids == ["A", "B"]
            assert (first_model, second_model) == ("A", "B")
            assert len(pieces) == 8
            models = await h.models()
            assert models["A"]["state"] == "stopped"
            assert models["B"]["state"] == "ready"
            assert (models["A"]["start_count"], models["B"]["start_count"]) == (1, 1)
            try:
                await trio.to_thread.run_sync(
                    lambda: client.chat.completions.create(model="ghost", messages=[])
                )
            except openai.NotFoundError as exc:
                assert "ghost" in str(exc)
            else:
                raise AssertionError("unknown model must be a 404")
            finally:
                client.close()
