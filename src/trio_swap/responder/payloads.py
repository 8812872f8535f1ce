"""What the responder says: request parsing and response bodies, pure and I/O-free.

Everything a client can see is built here, so the shapes are testable without a
server, and the streaming hot path in `app.py` is reduced to joining bytes that
`StreamTemplate` encoded once per request.

The shapes follow OpenAI's chat/legacy completions and embeddings, plus the
`timings` object llama-server adds (trio-swap reads it for tokens/s metrics).
"""

from __future__ import annotations

import hashlib
from typing import Final, Literal, final

import msgspec

__all__ = [
    "BadRequest",
    "Kind",
    "StreamTemplate",
    "completion_body",
    "embeddings_body",
    "error_body",
    "parse_json_object",
    "prompt_words",
    "requested_tokens",
    "token_text",
    "usage",
]

Kind = Literal["chat", "text"]
"""`chat` is /v1/chat/completions, `text` the legacy /v1/completions."""

JSONObject = dict[str, object]

_encode: Final = msgspec.json.Encoder().encode

# Stands in for the token index while a template is encoded, then split out.
_MARKER: Final = "\x00responder-token-index\x00"
_MARKER_JSON: Final = _encode(_MARKER)[1:-1]  # as it appears inside an encoded string


class BadRequest(Exception):
    """A client mistake; the app answers it with a 400 OpenAI-style error body."""

    def __init__(self, message: str, *, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def error_body(
    message: str, *, type_: str = "invalid_request_error", code: str | int | None = None
) -> bytes:
    """The OpenAI error envelope: `{"error": {"message", "type", "code"}}`."""
    return _encode({"error": {"message": message, "type": type_, "code": code}})


def parse_json_object(body: bytes) -> JSONObject:
    """Decode a request body that must be one JSON object.

    Raises:
        BadRequest: with code `invalid_json` for bad JSON or a non-object.
    """
    try:
        value: object = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(value, dict):
        raise BadRequest("the JSON body must be an object", code="invalid_json")
    return value


def requested_tokens(request: JSONObject, default: int) -> int:
    """How many tokens to generate: `max_tokens` (or `max_completion_tokens`) else `default`.

    Raises:
        BadRequest: if the field is present but not a non-negative integer.
    """
    for key in ("max_tokens", "max_completion_tokens"):
        value = request.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"{key} must be a non-negative integer")
        return value
    return default


def prompt_words(value: object) -> int:
    """Count whitespace-separated words in a prompt, messages list or embeddings input.

    Only text counts: strings, lists of them, and the `content`/`text` of message
    and content-part objects. It stands in for a tokenizer in `usage`.
    """
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(prompt_words(item) for item in value)
    if isinstance(value, dict):
        return prompt_words(value.get("content")) + prompt_words(value.get("text"))
    return 0


def token_text(index: int) -> str:
    """Token `index` of every completion: a word and a space, so words == tokens."""
    return f"tok{index} "


def usage(prompt_n: int, predicted_n: int) -> JSONObject:
    """The OpenAI `usage` object."""
    return {
        "prompt_tokens": prompt_n,
        "completion_tokens": predicted_n,
        "total_tokens": prompt_n + predicted_n,
    }


def timings(prompt_n: int, predicted_n: int, elapsed_s: float) -> JSONObject:
    """llama-server's `timings` object; the prompt is "processed" instantly."""
    elapsed_ms = elapsed_s * 1000.0
    return {
        "prompt_n": prompt_n,
        "prompt_ms": 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": round(elapsed_ms, 3),
        "predicted_per_second": round(predicted_n / max(elapsed_s, 1e-6), 3),
    }


def completion_body(
    *,
    kind: Kind,
    completion_id: str,
    created: int,
    model: str,
    prompt_n: int,
    predicted_n: int,
    elapsed_s: float,
) -> bytes:
    """A whole non-streaming `chat.completion` or `text_completion` object."""
    text = "".join(token_text(i) for i in range(predicted_n))
    choice: JSONObject
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
    return _encode(
        {
            "id": completion_id,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(prompt_n, predicted_n),
            "timings": timings(prompt_n, predicted_n, elapsed_s),
        }
    )


@final
class StreamTemplate:
    """The SSE events of one streamed completion, encoded once per request.

    Token events differ only in the token's index, so event `i` is
    `prefix + b"%d" % i + suffix` and a run of them is one `bytes.join`: no JSON
    encoding per token, which is what lets bulk mode exceed 100k events/s.
    Every event is `data: <json>\\n\\n`; `tail()` ends with `data: [DONE]`.
    """

    __slots__ = ("_between", "_envelope", "_kind", "_prefix", "_suffix", "head")

    def __init__(self, *, kind: Kind, completion_id: str, created: int, model: str) -> None:
        self._kind: Kind = kind
        self._envelope: JSONObject = {
            "id": completion_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
        }
        encoded = self._event(self._token_choice(f"tok{_MARKER} ", None))
        # rsplit: the marker's token text is the last string before the suffix, and
        # splitting from the right stays correct even if a client's model name
        # happened to contain the marker.
        prefix, suffix = encoded.rsplit(_MARKER_JSON, 1)
        self._prefix: bytes = prefix
        self._suffix: bytes = suffix
        self._between: bytes = suffix + prefix
        # Chat streams open with the assistant role; legacy completions have no role.
        self.head: bytes = (
            self._event({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})
            if kind == "chat"
            else b""
        )

    def tokens(self, start: int, stop: int) -> bytes:
        """The events for tokens `start` to `stop - 1`, concatenated."""
        if start >= stop:
            return b""
        digits = [b"%d" % i for i in range(start, stop)]
        return self._prefix + self._between.join(digits) + self._suffix

    def tail(self, *, prompt_n: int, predicted_n: int, elapsed_s: float) -> bytes:
        """The final `finish_reason: "stop"` event with usage and timings, then `[DONE]`."""
        event = self._event(
            self._token_choice("", "stop"),
            usage=usage(prompt_n, predicted_n),
            timings=timings(prompt_n, predicted_n, elapsed_s),
        )
        return event + b"data: [DONE]\n\n"

    def _token_choice(self, text: str, finish_reason: str | None) -> JSONObject:
        if self._kind == "chat":
            delta = {"content": text} if text else {}
            return {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _event(self, choice: JSONObject, **extra: JSONObject) -> bytes:
        return b"data: " + _encode({**self._envelope, "choices": [choice], **extra}) + b"\n\n"


def embedding_vector(text: str) -> list[float]:
    """Eight floats in [-1, 1) from a hash of `text`: the same text, the same vector."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return [
        round(int.from_bytes(digest[i : i + 2], "big") / 32768.0 - 1.0, 6) for i in range(0, 16, 2)
    ]


def embeddings_body(request: JSONObject, *, default_model: str) -> bytes:
    """The `/v1/embeddings` answer for a string or list-of-strings `input`.

    Raises:
        BadRequest: if `input` is missing or is neither.
    """
    raw = request.get("input")
    inputs: list[str]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        inputs = list(raw)
    else:
        raise BadRequest("input must be a string or a list of strings")
    model = request.get("model")
    words = prompt_words(inputs)
    return _encode(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": embedding_vector(text)}
                for i, text in enumerate(inputs)
            ],
            "model": model if isinstance(model, str) else default_model,
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
    )
