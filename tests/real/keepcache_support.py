"""Helpers for the keepCache lane and its bench: llama-server models that save their slots,
a ~1,500-token conversation, and a streamed turn timed to its first token.

The lane's usual flags give each server a 256-token context; a conversation
of 1,500 tokens needs 2,048 (the tiny models' training context), in one slot
so the follow-up request lands where the restored prompt is.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

#: One slot of 2,048 tokens; ``{threads}`` filled in (the bench gives a big model two).
FLAGS = "--host 127.0.0.1 -c 2048 -np 1 --threads {threads} --threads-http 2"
#: Word pairs in the first message: about 1,500 tokens with the tiny models' vocabulary.
PAIRS = 318

Message = dict[str, str]


def model_entry(
    model_id: str,
    server: Path,
    model: Path,
    slots: Path,
    *,
    keep: bool,
    threads: int = 1,
    unload_timeout: float = 10.0,
) -> list[str]:
    """A llama-server model saving to ``slots`` (``--slot-save-path``), as YAML lines;
    ``keep``: ``keepCache: true``, else trio-swap never saves or restores its slots."""
    cmd = (
        f"{shlex.quote(str(server))} -m {shlex.quote(str(model))} --port ${{PORT}} "
        f"--slot-save-path {shlex.quote(str(slots))} {FLAGS.format(threads=threads)}"
    )
    return [
        f"  {model_id}:",
        f"    cmd: {cmd}",
        f"    keepCache: {'true' if keep else 'false'}",
        f"    unloadTimeout: {unload_timeout:g}",
    ]


def conversation(pairs: int = PAIRS) -> tuple[list[Message], list[Message]]:
    """(the first turn, the same conversation one exchange later)."""
    first = [{"role": "user", "content": " ".join(f"word{i} apple" for i in range(pairs))}]
    later = [
        *first,
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And what comes next?"},
    ]
    return first, later


@dataclass(frozen=True)
class Turn:
    """One streamed chat turn as the client saw it."""

    #: Seconds from sending the request to the first content token.
    first_token: float
    #: Seconds to the end of the stream.
    total: float
    #: llama-server's ``timings``: ``prompt_n`` processed, ``cache_n`` reused.
    prompt_n: int
    cache_n: int


def streamed(client: httpx.Client, model: str, messages: list[Message]) -> Turn:
    """Send one streamed chat turn; time its first token; read its final ``timings``."""
    body = {"model": model, "messages": messages, "max_tokens": 4, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    timings: dict[str, int] | None = None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            choices = event.get("choices") or [{}]
            if first is None and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - started
            timings = event.get("timings", timings)
    total = time.perf_counter() - started
    assert timings is not None, "llama-server sent no timings"
    return Turn(
        first_token=total if first is None else first,
        total=total,
        prompt_n=timings["prompt_n"],
        cache_n=timings.get("cache_n", 0),
    )


def whole(client: httpx.Client, model: str, messages: list[Message]) -> Turn:
    """One non-streamed chat turn (its first token is its whole answer), for the
    turns that are not timed to a first token."""
    body = {"model": model, "messages": messages, "max_tokens": 4}
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    total = time.perf_counter() - started
    assert response.status_code == 200, response.text
    timings = response.json()["timings"]
    return Turn(total, total, timings["prompt_n"], timings.get("cache_n", 0))


def load(client: httpx.Client, model: str) -> None:
    """Start ``model`` (and restore its slots) without sending it a prompt."""
    response = client.post(f"/api/models/load/{model}")
    assert response.status_code == 200, f"{model}: {response.status_code} {response.text}"
