"""The official ``openai`` and ``anthropic`` SDKs, pointed at trio-swap, doing what users do.

The SDKs are synchronous here (run in a worker thread) because that is how
most scripts use them; each call crosses trio-swap to a responder upstream
and may swap models on the way.
"""

from __future__ import annotations

import base64
import hashlib
import io

import anthropic
import openai
import trio

from tests.conftest import make_config, responder_model, running


async def test_openai_sdk_across_every_endpoint_family() -> None:
    config = make_config(
        responder_model("llm", "--tokens", "6"),
        responder_model("embedder"),
        responder_model("whisper", use_model_name="whisper-1"),
        responder_model("painter"),
        responder_model("speaker"),
    )
    upload = io.BytesIO(b"RIFF" + bytes(300_000))
    upload.name = "speech.wav"
    with trio.fail_after(120):
        async with running(config) as h:
            client = openai.OpenAI(base_url=h.server.url + "/v1", api_key="unused", max_retries=0)

            def session() -> dict[str, object]:
                seen: dict[str, object] = {}
                chat = client.chat.completions.create(
                    model="llm", messages=[{"role": "user", "content": "hello there"}]
                )
                seen["chat"] = chat.choices[0].message.content
                stream = client.chat.completions.create(
                    model="llm", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                seen["stream"] = [
                    c.choices[0].delta.content
                    for c in stream
                    if c.choices and c.choices[0].delta.content
                ]
                completion = client.completions.create(model="llm", prompt="once upon")
                seen["completion"] = completion.choices[0].text
                response = client.responses.create(model="llm", input="say something")
                seen["responses"] = response.output_text
                embedding = client.embeddings.create(model="embedder", input=["a", "b c"])
                seen["embeddings"] = [len(e.embedding) for e in embedding.data]
                transcript = client.audio.transcriptions.create(model="whisper", file=upload)
                seen["transcript"] = transcript.text
                image = client.images.generate(model="painter", prompt="a red fox")
                seen["image"] = base64.b64decode(image.data[0].b64_json or "")
                speech = client.audio.speech.create(model="speaker", voice="alloy", input="hi")
                seen["speech"] = speech.read()
                return seen

            try:
                seen = await trio.to_thread.run_sync(session)
            finally:
                client.close()
            assert isinstance(seen["chat"], str) and seen["chat"]
            assert seen["stream"] and len(seen["stream"]) == 6  # type: ignore[arg-type]
            assert isinstance(seen["completion"], str) and seen["completion"]
            assert isinstance(seen["responses"], str) and seen["responses"]
            assert seen["embeddings"] and len(seen["embeddings"]) == 2  # type: ignore[arg-type]
            # The upload arrived whole, under the name the upstream knows (useModelName).
            transcript = str(seen["transcript"])
            assert "300004 bytes" in transcript and "whisper-1" in transcript
            digest = hashlib.sha256(upload.getvalue()).hexdigest()[:16]
            assert f"sha256 {digest}" in transcript
            assert isinstance(seen["image"], bytes) and seen["image"].startswith(b"\x89PNG")
            assert isinstance(seen["speech"], bytes) and seen["speech"]
            models = await h.models()
            # Five different models, one at a time: every request was a swap, none failed.
            assert [m for m, row in models.items() if row["state"] == "ready"] == ["speaker"]
            assert all(row["start_count"] >= 1 for row in models.values())


async def test_anthropic_sdk_messages_streaming_and_count_tokens() -> None:
    config = make_config(responder_model("claude-local", "--tokens", "5"))
    with trio.fail_after(60):
        async with running(config) as h:
            client = anthropic.Anthropic(base_url=h.server.url, api_key="unused", max_retries=0)

            def session() -> tuple[str, list[str], int, str]:
                message = client.messages.create(
                    model="claude-local",
                    max_tokens=64,
                    messages=[{"role": "user", "content": "hello from the sdk"}],
                )
                text = "".join(b.text for b in message.content if b.type == "text")
                with client.messages.stream(
                    model="claude-local",
                    max_tokens=64,
                    messages=[{"role": "user", "content": "stream please"}],
                ) as stream:
                    pieces = list(stream.text_stream)
                count = client.messages.count_tokens(
                    model="claude-local",
                    messages=[{"role": "user", "content": "four words right here"}],
                )
                try:
                    client.messages.create(
                        model="ghost", max_tokens=8, messages=[{"role": "user", "content": "x"}]
                    )
                except anthropic.NotFoundError as exc:
                    error = str(exc)
                else:
                    error = ""
                return text, pieces, count.input_tokens, error

            try:
                text, pieces, tokens, error = await trio.to_thread.run_sync(session)
            finally:
                client.close()
            assert text
            assert len(pieces) == 5
            assert tokens > 0
            # The SDK parsed trio-swap's own error (Anthropic's shape) into NotFoundError.
            assert "ghost" in error
