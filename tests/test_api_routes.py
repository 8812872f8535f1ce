"""Every model-routed endpoint family, checked by what the upstream actually received.

The responder records each request byte for byte (``GET /debug/requests`` on
the model's own port), so these tests assert on the upstream's side of the
proxy: which path, which query, which body bytes.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import trio

from tests.conftest import Harness, chat, make_config, responder_model, running
from trio_swap.config.model import Config, FilterConfig


async def upstream_requests(h: Harness, model_id: str) -> list[dict[str, object]]:
    """What the model's responder received, oldest first."""
    proxy = h.server.processes[model_id].model.proxy
    response = await h.client.get(f"{proxy}/debug/requests")
    response.raise_for_status()
    records: list[dict[str, object]] = response.json()
    return records


async def last_upstream_request(h: Harness, model_id: str) -> dict[str, object]:
    records = await upstream_requests(h, model_id)
    assert records, f"{model_id} received nothing"
    return records[-1]


async def test_filters_and_use_model_name_rewrite_json_bodies_in_llama_swap_order() -> None:
    filters = FilterConfig(
        strip_params=("temperature", "top_p"),
        set_params={"max_tokens": 5, "top_k": 40},
        set_params_by_id={"A-precise": {"top_k": 1}},
    )
    model = responder_model("A", use_model_name="real-a", filters=filters, aliases=("A-precise",))
    with trio.fail_after(60):
        async with running(make_config(model)) as h:
            request = chat("A", temperature=0.7, top_p=0.9, max_tokens=100, user="kept")
            response = await h.client.post("/v1/chat/completions", json=request)
            assert response.status_code == 200, response.text
            # The upstream answers with the model name it was sent.
            assert response.json()["model"] == "real-a"
            received = json.loads(str((await last_upstream_request(h, "A"))["body"]))
            assert received["model"] == "real-a"
            assert "temperature" not in received and "top_p" not in received
            assert received["max_tokens"] == 5 and received["top_k"] == 40
            assert received["user"] == "kept"
            assert received["messages"] == request["messages"]

            # setParamsByID applies to the name the client asked for, after setParams.
            response = await h.client.post("/v1/chat/completions", json=chat("A-precise"))
            assert response.status_code == 200, response.text
            received = json.loads(str((await last_upstream_request(h, "A"))["body"]))
            assert received["top_k"] == 1 and received["max_tokens"] == 5


async def test_a_body_that_needs_no_rewrite_is_forwarded_byte_for_byte() -> None:
    config = make_config(responder_model("A", aliases=("a-alias",)))
    raw = b'{ "model" : "a-alias",\n  "messages": [{"role":"user","content":"h\\u00e9"}], "n":1 }'
    with trio.fail_after(60):
        async with running(config) as h:
            response = await h.client.post(
                "/v1/chat/completions",
                content=raw,
                headers={"content-type": "application/json", "x-trace": "t1"},
            )
            assert response.status_code == 200, response.text
            record = await last_upstream_request(h, "A")
            assert str(record["body"]).encode() == raw
            headers = record["headers"]
            assert isinstance(headers, dict) and headers["x-trace"] == "t1"


def _multipart(model: str, payload: bytes) -> tuple[bytes, str]:
    """A form like the OpenAI SDK's: the model field first, then the file."""
    request = httpx.Request(
        "POST",
        "http://x/v1/audio/transcriptions",
        data={"model": model, "language": "en"},
        files={"file": ("speech.wav", payload, "audio/wav")},
    )
    body = request.read()
    return body, request.headers["content-type"]


async def test_multipart_upload_routes_by_its_model_field_and_renames_it_in_place() -> None:
    whisper = responder_model("whisper", use_model_name="whisper-large-v3")
    config = make_config(whisper, responder_model("other"))
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    body, content_type = _multipart("whisper", payload)
    with trio.fail_after(60):
        async with running(config) as h:
            response = await h.client.post(
                "/v1/audio/transcriptions",
                content=body,
                headers={"content-type": content_type},
            )
            assert response.status_code == 200, response.text
            text = response.json()["text"]
            # The upload arrived whole, with the field renamed for the upstream.
            assert "1048576 bytes" in text and "whisper-large-v3" in text
            assert f"sha256 {hashlib.sha256(payload).hexdigest()[:16]}" in text
            record = await last_upstream_request(h, "whisper")
            assert record["path"] == "/v1/audio/transcriptions"
            assert (await h.models())["other"]["state"] == "stopped"


async def test_multipart_errors_are_clear() -> None:
    config = make_config(responder_model("whisper"))
    with trio.fail_after(60):
        async with running(config) as h:
            cases = [
                (*_multipart("", b"abc"), 400, "no 'model' field"),
                (*_multipart("nope", b"abc"), 404, "nope"),
                (b"{}", "application/json", 400, "multipart/form-data"),
                (b"--x\r\n", "multipart/form-data", 400, "boundary"),
            ]
            for body, ctype, status, words in cases:
                response = await h.client.post(
                    "/v1/audio/transcriptions", content=body, headers={"content-type": ctype}
                )
                assert response.status_code == status, response.text
                assert words in response.json()["error"]["message"]


async def test_query_routes_take_the_model_from_the_query_string() -> None:
    model = responder_model("A", use_model_name="real-a")
    config = make_config(model, responder_model("B"))
    with trio.fail_after(60):
        async with running(config) as h:
            response = await h.client.get("/props", params={"model": "A", "x": "1 2"})
            assert response.status_code == 200, response.text
            record = await last_upstream_request(h, "A")
            assert record["path"] == "/props"
            assert "model=real-a" in str(record["query"]) and "x=1" in str(record["query"])
            response = await h.client.get("/sdapi/v1/loras", params={"model": "B"})
            assert response.status_code == 200, response.text
            assert (await last_upstream_request(h, "B"))["path"] == "/sdapi/v1/loras"
            response = await h.client.get("/props")
            assert response.status_code == 400
            assert "?model=" in response.json()["error"]["message"]


async def test_upstream_passthrough_loads_the_model_and_forwards_any_method() -> None:
    config = make_config(responder_model("org/model-a"), responder_model("B"))
    with trio.fail_after(60):
        async with running(config) as h:
            assert (await h.models())["org/model-a"]["state"] == "stopped"
            response = await h.client.get("/upstream/org/model-a/v1/models")
            assert response.status_code == 200, response.text
            assert response.json()["data"][0]["id"] == "org/model-a"
            assert (await h.models())["org/model-a"]["state"] == "ready"

            # %2F works as well as a plain slash; the rest keeps its escaping.
            response = await h.client.put(
                "/upstream/org%2Fmodel-a/echo/a%20b?q=1", content=b"raw body"
            )
            assert response.status_code == 200, response.text
            record = await last_upstream_request(h, "org/model-a")
            assert record["method"] == "PUT"
            assert record["path"] == "/echo/a b" and record["query"] == "q=1"
            assert record["body"] == "raw body"

            # Passthrough to another model is a swap like any request.
            response = await h.client.delete("/upstream/B/echo/x")
            assert response.status_code == 200, response.text
            assert (await h.models())["org/model-a"]["state"] == "stopped"


async def test_upstream_passthrough_redirects_refuses_escapes_and_unknown_models() -> None:
    config = make_config(responder_model("A"))
    with trio.fail_after(60):
        async with running(config) as h:
            response = await h.client.get("/upstream/A?x=1")
            assert response.status_code == 301
            assert response.headers["location"] == "/upstream/A/?x=1"
            response = await h.client.post("/upstream/A", content=b"{}")
            assert response.status_code == 308
            response = await h.client.get("/upstream/A/v1/%2e%2e/%2E%2E/secret")
            assert response.status_code == 400
            assert "'..'" in response.json()["error"]["message"]
            response = await h.client.get("/upstream/nope/v1/models")
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "model_not_found"
            assert (await h.models())["A"]["state"] == "stopped"


async def test_versionless_routes_drop_the_v_prefix_upstream() -> None:
    config = make_config(responder_model("A"))
    with trio.fail_after(60):
        async with running(config) as h:
            await h.client.post("/v/chat/completions", json=chat("A"))
            record = await last_upstream_request(h, "A")
            assert record["path"] == "/chat/completions"


async def test_anthropic_routes_answer_errors_in_anthropic_style() -> None:
    config = make_config(responder_model("A"))
    with trio.fail_after(60):
        async with running(config) as h:
            response = await h.client.post("/v1/messages", json={"model": "nope"})
            assert response.status_code == 404
            assert response.json() == {
                "type": "error",
                "error": {
                    "type": "not_found_error",
                    "message": response.json()["error"]["message"],
                },
            }
            response = await h.client.get("/v1/messages/count_tokens")
            assert response.status_code == 405
            assert response.headers["allow"] == "POST"
            assert response.json()["error"]["type"] == "invalid_request_error"
            response = await h.client.post("/v1/messages", content=b"{")
            assert response.status_code == 400
            assert response.json()["type"] == "error"
            # The OpenAI routes keep OpenAI's shape.
            response = await h.client.post("/v1/responses", json={"model": "nope"})
            assert response.json()["error"]["code"] == "model_not_found"


def _listing_config() -> Config:
    config = make_config(
        responder_model("A", aliases=("a1", "a2"), name="Model A"),
        responder_model("B", unlisted=True, aliases=("b1",)),
    )
    return config


async def test_models_listing_includes_aliases_only_when_asked() -> None:
    import msgspec

    config = _listing_config()
    with trio.fail_after(60):
        async with running(config) as h:
            ids = [m["id"] for m in (await h.client.get("/v1/models")).json()["data"]]
            assert ids == ["A"]
            assert (await h.client.get("/models")).json()["data"][0]["id"] == "A"
        config = msgspec.structs.replace(config, include_aliases_in_list=True)
        async with running(config) as h:
            data = (await h.client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in data] == ["A", "a1", "a2"]
            alias = data[1]
            assert alias["meta"]["llamaswap"] == {"type": "alias", "modelID": "A"}
            assert alias["name"] == "Model A"


async def test_a_body_over_the_limit_is_refused_and_the_client_can_go_on() -> None:
    config = make_config(responder_model("whisper"))
    body, content_type = _multipart("whisper", bytes(4 * 1024 * 1024))
    with trio.fail_after(60):
        async with running(config, max_body_bytes=64 * 1024) as h:
            for _ in range(3):
                response = await h.client.post(
                    "/v1/audio/transcriptions", content=body, headers={"content-type": content_type}
                )
                assert response.status_code == 413
                assert response.json()["error"]["code"] == "request_too_large"
                # The unread body makes the connection unusable; the client is told so.
                assert response.headers["connection"] == "close"
                response = await h.client.post("/v1/chat/completions", json=chat("whisper"))
                assert response.status_code == 200, response.text
            assert (await h.models())["whisper"]["start_count"] == 1


async def test_a_stream_cut_by_the_upstream_raises_in_both_sdks() -> None:
    import anthropic
    import openai

    config = make_config(responder_model("A", "--tokens", "8", "--crash-after-tokens", "2"))
    with trio.fail_after(60):
        async with running(config) as h:
            claude = anthropic.Anthropic(base_url=h.server.url, api_key="x", max_retries=0)
            gpt = openai.OpenAI(base_url=h.server.url + "/v1", api_key="x", max_retries=0)

            def anthropic_stream() -> str:
                with claude.messages.stream(
                    model="A", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                ) as stream:
                    return "".join(stream.text_stream)

            def openai_stream() -> str:
                chunks = gpt.chat.completions.create(model="A", messages=[], stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

            try:
                for run, error_type in (
                    (anthropic_stream, anthropic.APIError),
                    (openai_stream, openai.APIError),
                ):
                    try:
                        text = await trio.to_thread.run_sync(run)
                    except error_type as exc:
                        assert "response cut off" in str(exc)
                        assert str(exc).count("failed:") == 1  # the cause is not repeated
                    else:
                        raise AssertionError(f"a truncated stream looked complete: {text!r}")
            finally:
                claude.close()
                gpt.close()


async def test_odd_but_valid_bodies_are_served_and_bad_ones_are_400() -> None:
    model = responder_model("A", filters=FilterConfig(set_params={"top_k": 1}))
    with trio.fail_after(60):
        async with running(make_config(model)) as h:
            for stream in (1, 0, "false", None):
                response = await h.client.post(
                    "/v1/completions", json={"model": "A", "prompt": "x", "stream": stream}
                )
                assert response.status_code == 200, (stream, response.text)
            # Valid for the model peek, invalid for the rewrite: still a clear 400.
            response = await h.client.post("/v1/completions", content=b'{"model": "A", "t": 1e400}')
            assert response.status_code == 400
            assert "not valid JSON" in response.json()["error"]["message"]
            response = await h.client.get("/upstream/A/echo/..%2fsecret")
            assert response.status_code == 400
            assert (await h.client.get("/wol-health")).text == "OK"
