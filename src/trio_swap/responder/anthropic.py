"""Anthropic Messages API bodies: `/v1/messages` and `/v1/messages/count_tokens`.

llama-server answers Anthropic clients too, and trio-swap routes them, so the
responder speaks enough of the API for the official `anthropic` SDK to parse a
message, a stream (`messages.stream` and `create(stream=True)`) and a token
count. Text is the same `tok0 tok1 ...` as every other completion.
"""

from __future__ import annotations

from typing import Final, final

import msgspec

from trio_swap.responder.payloads import (
    MARKED_TOKEN,
    JSONObject,
    TokenEvents,
    completion_text,
    prompt_words,
    requested_tokens,
)

__all__ = [
    "MessageStreamTemplate",
    "count_tokens_body",
    "input_tokens",
    "message_body",
    "message_tokens",
]

_encode: Final = msgspec.json.Encoder().encode


def input_tokens(request: JSONObject) -> int:
    """Words in `system` (a string or text blocks) and `messages`: the prompt's size."""
    return prompt_words(request.get("system")) + prompt_words(request.get("messages"))


def count_tokens_body(request: JSONObject) -> bytes:
    """The `/v1/messages/count_tokens` answer."""
    return _encode({"input_tokens": input_tokens(request)})


def message_tokens(request: JSONObject, default: int) -> tuple[int, str]:
    """How many tokens to generate, and the stop reason: --tokens, cut to `max_tokens`.

    Anthropic clients must send `max_tokens`, and a model usually stops well
    before it; so it is a cap here (stop reason `max_tokens`), not the count as
    in OpenAI's chat. Otherwise the model ends its turn after --tokens tokens.

    Raises:
        BadRequest: if `max_tokens` is present but not a non-negative integer.
    """
    cap = requested_tokens(request, default, ("max_tokens",))
    return (cap, "max_tokens") if cap < default else (default, "end_turn")


def message_body(
    *, message_id: str, model: str, prompt_n: int, predicted_n: int, stop: str
) -> bytes:
    """A whole non-streaming `message` object."""
    return _encode(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": completion_text(predicted_n)}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_n, "output_tokens": predicted_n},
        }
    )


def _event(name: str, data: JSONObject) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), _encode(data))


@final
class MessageStreamTemplate:
    """The SSE events of one streamed message, in the order Anthropic sends them.

    `head` is message_start, content_block_start and a ping; each token is one
    content_block_delta; `tail` is content_block_stop, message_delta (stop reason
    and usage) and message_stop. Every event is `event: <name>\\ndata: <json>\\n\\n`.
    """

    __slots__ = ("_events", "_stop", "head")

    def __init__(self, *, message_id: str, model: str, prompt_n: int, stop: str) -> None:
        self._stop = stop
        message: JSONObject = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_n, "output_tokens": 0},
        }
        self.head: bytes = (
            _event("message_start", {"type": "message_start", "message": message})
            + _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            + _event("ping", {"type": "ping"})
        )
        delta = {"type": "text_delta", "text": MARKED_TOKEN}
        self._events = TokenEvents(
            _event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        )

    def tokens(self, start: int, stop: int) -> bytes:
        """The content_block_delta events for tokens `start` to `stop - 1`."""
        return self._events.run(start, stop)

    def tail(self, *, prompt_n: int, predicted_n: int, elapsed_s: float) -> bytes:
        """content_block_stop, message_delta and message_stop.

        `prompt_n` and `elapsed_s` are unused: Anthropic reports input tokens in
        message_start and has no timings.
        """
        del prompt_n, elapsed_s
        return (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._stop, "stop_sequence": None},
                    "usage": {"output_tokens": predicted_n},
                },
            )
            + _event("message_stop", {"type": "message_stop"})
        )
