"""What the responder says: request parsing and response bodies, pure and I/O-free.

Everything a client can see is built here, so the shapes are testable without a
server, and the streaming hot path in `app.py` is reduced to joining bytes that
`StreamTemplate` encoded once per request.

The shapes follow OpenAI's chat/legacy completions, embeddings, the Responses
API and reranking, plus the `timings` object llama-server adds (trio-swap reads
it for tokens/s metrics). Other API families live in their own modules
(`anthropic`, `llama`, `media`) and reuse `TokenEvents` for their streams.
"""

from __future__ import annotations

import hashlib
from typing import Final, Literal, Protocol, final

import msgspec

__all__ = [
    "MARKED_TOKEN",
    "BadRequest",
    "JSONObject",
    "Kind",
    "StreamTemplate",
    "TokenEvents",
    "TokenStream",
    "completion_body",
    "completion_text",
    "embeddings_body",
    "error_body",
    "model_of",
    "parse_json_object",
    "prompt_words",
    "requested_tokens",
    "rerank_body",
    "responses_body",
    "timings",
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
MARKED_TOKEN: Final = f"tok{_MARKER} "
"""`token_text(i)` with the marker for `i`: put it in the one event `TokenEvents` splits."""


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


def model_of(request: JSONObject, default: str) -> str:
    """The request's `model` if it names one, else `default` (the --model option).

    Answers echo it so tests can see what trio-swap's `useModelName` sent upstream.
    """
    model = request.get("model")
    return model if isinstance(model, str) else default


def requested_tokens(
    request: JSONObject,
    default: int,
    keys: tuple[str, ...] = ("max_tokens", "max_completion_tokens"),
) -> int:
    """How many tokens to generate: the first of `keys` present, else `default`.

    Raises:
        BadRequest: if the field is present but not a non-negative integer.
    """
    for key in keys:
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


def completion_text(predicted_n: int) -> str:
    """The whole text of a completion of `predicted_n` tokens."""
    return "".join(token_text(i) for i in range(predicted_n))


def usage(prompt_n: int, predicted_n: int, cache_n: int | None = None) -> JSONObject:
    """The OpenAI `usage` object (with llama-server's cached tokens when slots are on)."""
    body: JSONObject = {
        "prompt_tokens": prompt_n,
        "completion_tokens": predicted_n,
        "total_tokens": prompt_n + predicted_n,
    }
    if cache_n is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cache_n}
    return body


def timings(
    prompt_n: int, predicted_n: int, elapsed_s: float, cache_n: int | None = None
) -> JSONObject:
    """llama-server's `timings` object; the prompt is "processed" instantly.

    With `cache_n` (slots on), `prompt_n` counts only the tokens processed, as
    llama-server's does: the prompt minus the `cache_n` reused from the slot.
    """
    elapsed_ms = elapsed_s * 1000.0
    if cache_n is not None:
        return {
            "cache_n": cache_n,
            "prompt_n": prompt_n - cache_n,
            "prompt_ms": 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": round(elapsed_ms, 3),
            "predicted_per_second": round(predicted_n / max(elapsed_s, 1e-6), 3),
        }
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
    cache_n: int | None = None,
) -> bytes:
    """A whole non-streaming `chat.completion` or `text_completion` object."""
    text = completion_text(predicted_n)
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
            "usage": usage(prompt_n, predicted_n, cache_n),
            "timings": timings(prompt_n, predicted_n, elapsed_s, cache_n),
        }
    )


class TokenStream(Protocol):
    """What `app.py` streams a generation from: head, token runs, tail.

    Each API family (OpenAI chat and legacy, Anthropic messages, llama.cpp's
    /completion) has its own; the app paces, batches and crashes them all alike.
    """

    @property
    def head(self) -> bytes:
        """The events before the first token (may be empty)."""
        ...

    def tokens(self, start: int, stop: int) -> bytes:
        """The events for tokens `start` to `stop - 1`, concatenated."""
        ...

    def tail(self, *, prompt_n: int, predicted_n: int, elapsed_s: float) -> bytes:
        """The events after the last token, ending the stream."""
        ...


@final
class TokenEvents:
    """The events of a run of tokens, from one event encoded with `MARKED_TOKEN`.

    Token events differ only in the token's index, so event `i` is
    `prefix + b"%d" % i + suffix` and a run of them is one `bytes.join`: no JSON
    encoding per token, which is what lets bulk mode exceed 100k events/s.
    """

    __slots__ = ("_between", "_prefix", "_suffix")

    def __init__(self, encoded: bytes) -> None:
        # rsplit: the marker's token text is the last string before the suffix, and
        # splitting from the right stays correct even if a client's model name
        # happened to contain the marker.
        prefix, suffix = encoded.rsplit(_MARKER_JSON, 1)
        self._prefix: bytes = prefix
        self._suffix: bytes = suffix
        self._between: bytes = suffix + prefix

    def run(self, start: int, stop: int) -> bytes:
        """The events for tokens `start` to `stop - 1`, concatenated."""
        if start >= stop:
            return b""
        digits = [b"%d" % i for i in range(start, stop)]
        return self._prefix + self._between.join(digits) + self._suffix


@final
class StreamTemplate:
    """The SSE events of one streamed OpenAI completion, encoded once per request.

    Every event is `data: <json>\\n\\n`; `tail()` ends with `data: [DONE]`.
    """

    __slots__ = ("_cache_n", "_envelope", "_events", "_kind", "head")

    def __init__(
        self,
        *,
        kind: Kind,
        completion_id: str,
        created: int,
        model: str,
        cache_n: int | None = None,
    ) -> None:
        self._kind: Kind = kind
        self._cache_n = cache_n
        self._envelope: JSONObject = {
            "id": completion_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
        }
        self._events = TokenEvents(self._event(self._token_choice(MARKED_TOKEN, None)))
        # Chat streams open with the assistant role; legacy completions have no role.
        self.head: bytes = (
            self._event({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})
            if kind == "chat"
            else b""
        )

    def tokens(self, start: int, stop: int) -> bytes:
        """The events for tokens `start` to `stop - 1`, concatenated."""
        return self._events.run(start, stop)

    def tail(self, *, prompt_n: int, predicted_n: int, elapsed_s: float) -> bytes:
        """The final `finish_reason: "stop"` event with usage and timings, then `[DONE]`."""
        event = self._event(
            self._token_choice("", "stop"),
            usage=usage(prompt_n, predicted_n, self._cache_n),
            timings=timings(prompt_n, predicted_n, elapsed_s, self._cache_n),
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


def responses_body(
    *, response_id: str, created: int, model: str, prompt_n: int, predicted_n: int
) -> bytes:
    """A completed `/v1/responses` object: one assistant message of `output_text`.

    Minimal, but every field the openai SDK's `Response` model requires is there,
    so `client.responses.create(...).output_text` works.
    """
    message = {
        "type": "message",
        "id": f"msg_{response_id.removeprefix('resp_')}",
        "status": "completed",
        "role": "assistant",
        "content": [
            {"type": "output_text", "text": completion_text(predicted_n), "annotations": []}
        ],
    }
    return _encode(
        {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": "completed",
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "model": model,
            "output": [message],
            "usage": {
                "input_tokens": prompt_n,
                "output_tokens": predicted_n,
                "total_tokens": prompt_n + predicted_n,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
    )


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def rerank_body(request: JSONObject, *, default_model: str) -> bytes:
    """The `/v1/rerank` answer (llama-server's and Jina's shape), best document first.

    A document's score is the share of the query's distinct words it contains, so
    a test can predict the order. Documents are strings or `{"text": ...}` objects;
    `top_n` keeps that many results.

    Raises:
        BadRequest: if `query` is not a string or `documents` not a list of documents.
    """
    query = request.get("query")
    documents = request.get("documents")
    if not isinstance(query, str):
        raise BadRequest("query must be a string")
    if not isinstance(documents, list):
        raise BadRequest("documents must be a list")
    texts: list[str] = []
    for document in documents:
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str):
            raise BadRequest("each document must be a string or an object with a text string")
        texts.append(text)
    wanted = _words(query)
    scores = [len(wanted & _words(text)) / max(len(wanted), 1) for text in texts]
    # sorted() is stable: equal scores keep the documents' order.
    ranked = sorted(range(len(texts)), key=lambda i: scores[i], reverse=True)
    top_n = request.get("top_n")
    if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n >= 0:
        ranked = ranked[:top_n]
    words = prompt_words(query) + prompt_words(texts)
    return _encode(
        {
            "model": model_of(request, default_model),
            "object": "list",
            "usage": {"prompt_tokens": words, "total_tokens": words},
            "results": [{"index": i, "relevance_score": round(scores[i], 6)} for i in ranked],
        }
    )
