"""Token counts, speeds and error messages read from an upstream's answer.

Parsed once, when the response is over, from what :mod:`.record` kept of it:
a whole JSON body (at most :data:`MAX_JSON_BYTES`) or the last few chunks of
an SSE stream. The fields are the ones llama-swap reads: OpenAI ``usage``
(top level, ``response.usage`` for the Responses API, ``message.usage`` for
Anthropic's ``message_start``), Anthropic's ``input_tokens``/``output_tokens``,
cached prompt tokens wherever a server puts them, and llama.cpp's ``timings``
(the only source of speeds the server measured itself).

msgspec decodes only the fields named here and skips the rest of a body
without building it, so a 1 MiB completion costs about as much as scanning it.
"""

from __future__ import annotations

from typing import Final, final

import msgspec

__all__ = ["MAX_JSON_BYTES", "SSE_TAIL_BYTES", "Usage", "from_json", "from_sse"]

#: Larger JSON bodies are not kept, so not parsed (embeddings of a big batch, images).
MAX_JSON_BYTES: Final = 1024 * 1024
#: How much of the end of a stream is searched for its usage event.
SSE_TAIL_BYTES: Final = 64 * 1024

#: Only these lines of a stream's tail are decoded at all.
_MARKERS: Final = (b'"usage"', b'"timings"', b'"error"', b'"tokens_predicted"')


@final
class Usage:
    """What the upstream said about one request; None where it said nothing."""

    __slots__ = (
        "cached_tokens",
        "completion_tokens",
        "error",
        "prompt_per_second",
        "prompt_tokens",
        "tokens_per_second",
    )

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None
        #: Prompt processing speed, as reported (llama.cpp ``timings``).
        self.prompt_per_second: float | None = None
        #: Generation speed, as reported (llama.cpp ``timings``).
        self.tokens_per_second: float | None = None
        #: The message of an error body or error event.
        self.error: str | None = None

    @property
    def complete(self) -> bool:
        return self.prompt_tokens is not None and self.completion_tokens is not None


# -- the shapes read (every field optional; numbers as float: JSON ints decode too) ----


class _Details(msgspec.Struct):
    cached_tokens: float | None = None


class _TokenUsage(msgspec.Struct):
    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    input_tokens: float | None = None
    output_tokens: float | None = None
    cache_read_input_tokens: float | None = None
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None


class _Timings(msgspec.Struct):
    prompt_n: float | None = None
    predicted_n: float | None = None
    cache_n: float | None = None
    prompt_per_second: float | None = None
    predicted_per_second: float | None = None


class _Nested(msgspec.Struct):
    """``response`` (Responses API) or ``message`` (Anthropic): only their usage."""

    usage: _TokenUsage | None = None


class _ErrorObject(msgspec.Struct):
    message: str | None = None


class _Report(msgspec.Struct):
    usage: _TokenUsage | None = None
    timings: _Timings | None = None
    response: _Nested | None = None
    message: str | _Nested | None = None
    tokens_evaluated: float | None = None
    tokens_predicted: float | None = None
    error: str | _ErrorObject | None = None
    detail: object = None


_decode_report = msgspec.json.Decoder(_Report).decode


def from_json(body: bytes) -> Usage:
    """Usage from a whole JSON response body (anything unreadable gives an empty one)."""
    usage = Usage()
    report = _decode(body)
    if report is not None:
        _merge(usage, report)
    return usage


def from_sse(tail: bytes) -> Usage:
    """Usage from the last bytes of an SSE stream: its last events win."""
    usage = Usage()
    tail = tail[-SSE_TAIL_BYTES:]
    for line in reversed(tail.split(b"\n")):
        if not line.startswith(b"data:") or not any(mark in line for mark in _MARKERS):
            continue
        report = _decode(line[5:])
        if report is not None:
            _merge(usage, report)
            if usage.complete and usage.tokens_per_second is not None:
                break
    return usage


def _decode(data: bytes) -> _Report | None:
    try:
        return _decode_report(data)
    except msgspec.DecodeError:  # not JSON, not an object, or a field of another type
        return None


def _merge(usage: Usage, report: _Report) -> None:
    """Fill what ``usage`` lacks from ``report`` (set fields are kept: later events win)."""
    tokens = report.usage
    if tokens is None and report.response is not None:
        tokens = report.response.usage
    if tokens is None and isinstance(report.message, _Nested):
        tokens = report.message.usage
    if tokens is not None:
        _merge_tokens(usage, tokens)
    timings = report.timings
    if timings is not None:
        if usage.prompt_tokens is None:
            usage.prompt_tokens = _int(timings.prompt_n)
        if usage.completion_tokens is None:
            usage.completion_tokens = _int(timings.predicted_n)
        if usage.cached_tokens is None:
            usage.cached_tokens = _int(timings.cache_n)
        if usage.prompt_per_second is None:
            usage.prompt_per_second = timings.prompt_per_second
        if usage.tokens_per_second is None:
            usage.tokens_per_second = timings.predicted_per_second
    if usage.prompt_tokens is None:
        usage.prompt_tokens = _int(report.tokens_evaluated)
    if usage.completion_tokens is None:
        usage.completion_tokens = _int(report.tokens_predicted)
    if usage.error is None:
        usage.error = _error_message(report)


def _merge_tokens(usage: Usage, tokens: _TokenUsage) -> None:
    if usage.prompt_tokens is None:
        prompt = tokens.prompt_tokens
        usage.prompt_tokens = _int(tokens.input_tokens if prompt is None else prompt)
    if usage.completion_tokens is None:
        completion = tokens.completion_tokens
        usage.completion_tokens = _int(tokens.output_tokens if completion is None else completion)
    if usage.cached_tokens is None:
        details = tokens.prompt_tokens_details or tokens.input_tokens_details
        cached = details.cached_tokens if details is not None else None
        usage.cached_tokens = _int(tokens.cache_read_input_tokens if cached is None else cached)


def _error_message(report: _Report) -> str | None:
    error = report.error
    if isinstance(error, _ErrorObject):
        return error.message
    if isinstance(error, str):
        return error
    if isinstance(report.message, str) and report.usage is None:
        return report.message
    if isinstance(report.detail, str):
        return report.detail
    return None


def _int(value: float | None) -> int | None:
    """A token count; a negative one (a confused upstream) counts as not reported."""
    return None if value is None or not 0 <= value < 2**63 else int(value)
