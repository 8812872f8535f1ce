"""llama-server's native API: `/completion`, `/infill` and `/props`.

Clients such as llama.vscode talk to these directly, and trio-swap routes
them, so the responder answers in llama-server's shapes (trimmed to the fields
clients read): `content`, `stop`, `tokens_predicted` and the `timings` object.
"""

from __future__ import annotations

from typing import Final, final

import msgspec

from trio_swap.responder.payloads import (
    MARKED_TOKEN,
    BadRequest,
    JSONObject,
    TokenEvents,
    completion_text,
    prompt_words,
    requested_tokens,
    timings,
)

__all__ = [
    "NativeStreamTemplate",
    "native_body",
    "native_prompt_words",
    "native_tokens",
    "props_body",
]

_encode: Final = msgspec.json.Encoder().encode
_CONTEXT_SIZE: Final = 4096


def native_tokens(request: JSONObject, default: int) -> int:
    """How many tokens to generate: `n_predict`, else `max_tokens`, else `default`.

    A negative `n_predict` (llama-server's -1, "until done") means `default`.

    Raises:
        BadRequest: if either field is present but not an integer (or `max_tokens` < 0).
    """
    n_predict = request.get("n_predict")
    if n_predict is None:
        return requested_tokens(request, default)
    if isinstance(n_predict, bool) or not isinstance(n_predict, int):
        raise BadRequest("n_predict must be an integer")
    return n_predict if n_predict >= 0 else default


def native_prompt_words(request: JSONObject) -> int:
    """Words in `prompt`, plus `/infill`'s prefix, suffix and extra context chunks."""
    return sum(
        prompt_words(request.get(key))
        for key in ("prompt", "input_prefix", "input_suffix", "input_extra")
    )


def native_body(*, model: str, prompt_n: int, predicted_n: int, elapsed_s: float) -> bytes:
    """A whole `/completion` or `/infill` answer."""
    return _encode(
        {
            "content": completion_text(predicted_n),
            "model": model,
            "stop": True,
            "tokens_predicted": predicted_n,
            "tokens_evaluated": prompt_n,
            "timings": timings(prompt_n, predicted_n, elapsed_s),
        }
    )


@final
class NativeStreamTemplate:
    """The SSE events of a streamed `/completion`: `data: {"content", "stop": false}`
    per token, then one `stop: true` event with the totals. No `[DONE]`, as in
    llama-server.
    """

    __slots__ = ("_events", "_model", "head")

    def __init__(self, *, model: str) -> None:
        self._model = model
        self.head: bytes = b""
        self._events = TokenEvents(_data({"content": MARKED_TOKEN, "stop": False}))

    def tokens(self, start: int, stop: int) -> bytes:
        """The events for tokens `start` to `stop - 1`."""
        return self._events.run(start, stop)

    def tail(self, *, prompt_n: int, predicted_n: int, elapsed_s: float) -> bytes:
        """The final event: empty content, `stop: true`, counts and timings."""
        return _data(
            {
                "content": "",
                "model": self._model,
                "stop": True,
                "tokens_predicted": predicted_n,
                "tokens_evaluated": prompt_n,
                "timings": timings(prompt_n, predicted_n, elapsed_s),
            }
        )


def _data(event: JSONObject) -> bytes:
    return b"data: " + _encode(event) + b"\n\n"


def props_body(model: str) -> bytes:
    """`GET /props`: the loaded model and the settings clients read from it."""
    return _encode(
        {
            "model": model,
            "default_generation_settings": {"n_ctx": _CONTEXT_SIZE},
            "total_slots": 1,
        }
    )
