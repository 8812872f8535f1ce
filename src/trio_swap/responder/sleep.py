"""vLLM's and SGLang's sleep mode, faked (``--sleep-api vllm|sglang``).

A sleeping server keeps its process and gives its memory back; trio-swap
puts models to sleep instead of stopping them (issue 12). The routes, in the
servers' own shapes::

    --sleep-api vllm
    POST /sleep?level=1|2               200, empty body (level 1 without ?level)
    POST /wake_up[?tags=weights,...]    200, empty body (tags accepted, a full wake)
    GET  /is_sleeping                   {"is_sleeping": bool}
    POST /reset_prefix_cache            200, empty body
    POST /collective_rpc                {"method": "reload_weights"} -> {"results": [null]}

    --sleep-api sglang
    GET|POST /release_memory_occupation   optional JSON body -> {"success": true, ...}
    GET|POST /resume_memory_occupation    optional JSON body -> {"success": true, ...}

Every sleep (level 1, level 2, SGLang's release) unmaps --hold-memory's block,
so RSS really drops, and every wake maps and touches it again. (Real vLLM
level 1 keeps the weights in host RAM; the responder releases them anyway,
so a test sees the memory move.) While asleep, generating routes answer 503
"sleeping"; /health keeps answering 200, as vLLM's does. After a level-2
wake they answer 500 "weights not loaded" until ``reload_weights`` runs, as
vLLM needs. ``--sleep-delay`` and ``--wake-delay`` make each call take that
long; ``--broken-after-wake`` makes every generating route answer 500 after
the first wake (a wake that left the server broken). ``--asleep-memory``
holds a block of its own while asleep (what vLLM's level 1 keeps in host
RAM), so a test sees a sleeper that holds more than it did awake.

Calls are serialised: a wake sent during a sleep waits for it.
"""

from __future__ import annotations

import contextlib
from typing import Final, final
from urllib.parse import parse_qs

import msgspec
import trio

from trio_swap.responder.memory import HeldMemory
from trio_swap.responder.options import ResponderOptions
from trio_swap.responder.payloads import BadRequest, error_body

__all__ = ["SLEEP_PATHS", "Answer", "SleepApi"]

#: (status, body): what a route answers.
Answer = tuple[int, bytes]

_encode: Final = msgspec.json.Encoder().encode
_VLLM_PATHS: Final = {
    "/sleep": "POST",
    "/wake_up": "POST",
    "/is_sleeping": "GET",
    "/reset_prefix_cache": "POST",
    "/collective_rpc": "POST",
}
_SGLANG_PATHS: Final = {
    "/release_memory_occupation": "GET|POST",
    "/resume_memory_occupation": "GET|POST",
}
#: Each flavour's paths -> the methods they take.
SLEEP_PATHS: Final = {"vllm": _VLLM_PATHS, "sglang": _SGLANG_PATHS}
_OK: Final = (200, b"")


@final
class SleepApi:
    """The sleep state of one responder, and its routes.

    Invariants: ``memory`` (if any) is held exactly when the server is awake
    (or a wake failed to hold it, then it stays asleep); ``weights_loaded``
    is False only between a level-2 wake and the ``reload_weights`` call.
    """

    def __init__(self, options: ResponderOptions, memory: HeldMemory | None) -> None:
        assert options.sleep_api is not None
        self._options = options
        self._paths = SLEEP_PATHS[options.sleep_api]
        self._memory = memory
        #: Held while asleep only (``--asleep-memory``): the weights moved to host RAM.
        self._asleep_memory = HeldMemory(options.asleep_memory) if options.asleep_memory else None
        self._lock = trio.Lock()
        self.sleeping = False
        self._level = 1
        self.weights_loaded = True
        self.woken = False

    def __repr__(self) -> str:
        state = f"asleep (level {self._level})" if self.sleeping else "awake"
        return f"<SleepApi {self._options.sleep_api} {state}>"

    def owns(self, path: str) -> bool:
        """Whether ``path`` is one of this flavour's sleep routes."""
        return path in self._paths

    def refusal(self) -> Answer | None:
        """What a generating route answers instead of generating, or None to generate."""
        if self.sleeping:
            body = error_body("the model is sleeping", type_="unavailable_error", code=503)
            return 503, body
        if self.woken and self._options.broken_after_wake:
            message = "simulated failure after wake (--broken-after-wake)"
            return 500, error_body(message, type_="server_error", code=500)
        if not self.weights_loaded:
            message = (
                "weights not loaded: after a level-2 wake, POST /collective_rpc "
                '{"method": "reload_weights"}'
            )
            return 500, error_body(message, type_="server_error", code=500)
        return None

    async def handle(self, method: str, path: str, query: bytes, body: bytes) -> Answer:
        """Answer one of :meth:`owns`'s routes.

        Raises:
            BadRequest: a bad ``?level=`` or body.
        """
        if method not in self._paths[path].split("|"):
            message = f"method {method} not allowed on {path}"
            return 405, error_body(message, code="method_not_allowed")
        match path:
            case "/sleep":
                return await self._sleep(_level(query))
            case "/wake_up" | "/resume_memory_occupation":
                _json_or_empty(body)
                return await self._wake(sglang=path != "/wake_up")
            case "/release_memory_occupation":
                _json_or_empty(body)
                return await self._sleep(1, sglang=True)
            case "/is_sleeping":
                return 200, _encode({"is_sleeping": self.sleeping})
            case "/reset_prefix_cache":
                return _OK
            case _:  # /collective_rpc
                return self._collective_rpc(body)

    async def _sleep(self, level: int, *, sglang: bool = False) -> Answer:
        async with self._lock:
            # Generating routes refuse from the call's start, as the engine pauses first.
            self.sleeping = True
            self._level = level
            if self._memory is not None:
                self._memory.release()
            if self._asleep_memory is not None:
                try:
                    await self._asleep_memory.hold()
                except (OSError, OverflowError) as error:
                    message = f"cannot hold the asleep memory: {error}"
                    return 500, error_body(message, type_="server_error", code=500)
            await trio.sleep(self._options.sleep_delay)
            _log(f"sleeping (level {level})" if not sglang else "memory released")
        return (200, _encode({"success": True, "message": "released"})) if sglang else _OK

    async def _wake(self, *, sglang: bool) -> Answer:
        async with self._lock:
            if self._memory is not None:
                try:
                    await self._memory.hold()
                except (OSError, OverflowError) as error:
                    message = f"cannot hold the memory again: {error}"
                    return 500, error_body(message, type_="server_error", code=500)
            if self._asleep_memory is not None:
                self._asleep_memory.release()
            await trio.sleep(self._options.wake_delay)
            if self.sleeping:
                self.weights_loaded = self._level != 2
                self.woken = True
            self.sleeping = False
            _log("awake" if not sglang else "memory resumed")
        return (200, _encode({"success": True, "message": "resumed"})) if sglang else _OK

    def _collective_rpc(self, body: bytes) -> Answer:
        request = _json_or_empty(body)
        method = request.get("method")
        if method != "reload_weights":
            message = f"the responder's collective_rpc knows only reload_weights, not {method!r}"
            raise BadRequest(message)
        if self.sleeping:
            return 503, error_body("the model is sleeping", type_="unavailable_error", code=503)
        self.weights_loaded = True
        _log("weights reloaded")
        return 200, _encode({"results": [None]})


def _log(line: str) -> None:
    """As ``app.log`` (importing it would close a cycle): a closed stdout is not fatal."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def _level(query: bytes) -> int:
    values = parse_qs(query.decode("latin-1")).get("level", ["1"])
    if values[-1] not in ("1", "2"):
        raise BadRequest(f"level must be 1 or 2, got {values[-1]!r}")
    return int(values[-1])


def _json_or_empty(body: bytes) -> dict[str, object]:
    """A body that is empty or one JSON object."""
    if not body.strip():
        return {}
    try:
        value: object = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(value, dict):
        raise BadRequest("the JSON body must be an object", code="invalid_json")
    return value
