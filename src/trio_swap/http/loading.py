"""Loading progress for streaming chat clients that wait for a cold model (``sendLoadingState``).

A streaming ``/v1/chat/completions`` request for a model that is not ready
can wait seconds to minutes (queued behind other models, then the load). With
``sendLoadingState`` the client is told what is happening while it waits:
trio-swap answers ``200 text/event-stream`` and writes OpenAI
chat-completion chunks whose only delta is ``reasoning_content``, which
clients such as Open WebUI show as the model "thinking":

    trio-swap: loading model <id>      once the router says it waits
    queue position #N                  every second while queued
    loading <id>… 3s                   every second while it loads
    done in N.NNs                      when the router grants the request

then the upstream's own SSE body follows on the same response. The chunks are
written to the response in the order they are produced; nothing is buffered.

Admission comes first (llama-swap §5.6: rate-limit rejections are proper
429s, not errors inside a 200 stream), and the router says when it is over:
:meth:`Router.acquire` calls ``on_wait`` when the scheduler admits the
request but cannot grant it at once (it queues, or waits for a load). Only
then does :meth:`LoadingProgress.acquire` send the 200 and start the
progress. A request granted at once, or rejected at once (429
``concurrencyLimit``, 503 ``maxQueue`` or shutdown, 409 for a pinned model in
the way), never gets that call and is answered the ordinary way, however far
the router lags behind its event queue. A request that waited does get
progress, however short the wait.

Once the 200 is sent, the upstream's status and headers can no longer reach
the client: a non-2xx upstream answer becomes an SSE error event, as do a
failed load (:meth:`LoadingProgress.fail`) and a body the upstream cut off.
The stream then ends without ``data: [DONE]``; the OpenAI SDKs raise
``APIError`` on an ``{"error": ...}`` event.
"""

from __future__ import annotations

import logging
import time
from typing import Final, final

import msgspec
import trio
from hypercorn.typing import ASGISendCallable

from trio_swap.errors import SwapError, UpstreamFailed
from trio_swap.http.relay import relay_body, sse_error_event, upstream_cut_off
from trio_swap.http.upstream_client import UpstreamResponse
from trio_swap.router import Admission, Lease, Router

__all__ = ["CHAT_COMPLETIONS", "PROGRESS_INTERVAL", "LoadingProgress"]

log = logging.getLogger("trio_swap.http")

#: The only route whose stream format carries progress (OpenAI chat ``reasoning_content``).
CHAT_COMPLETIONS: Final = "/v1/chat/completions"
#: Seconds between two progress updates.
PROGRESS_INTERVAL: Final = 1.0
#: Most bytes of a non-2xx upstream body quoted in the error event.
_ERROR_BODY_LIMIT: Final = 4096

_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx in front not to buffer SSE
]


class _Delta(msgspec.Struct, frozen=True):
    reasoning_content: str


class _Choice(msgspec.Struct, frozen=True):
    index: int
    delta: _Delta
    finish_reason: None = None


class _Chunk(msgspec.Struct, frozen=True):
    """An OpenAI ``chat.completion.chunk`` (field order as OpenAI writes it)."""

    id: str
    object: str
    created: int
    model: str
    choices: tuple[_Choice, ...]


_encode = msgspec.json.Encoder().encode


def _sse_event(payload: object) -> bytes:
    """One SSE ``data:`` event carrying ``payload`` as JSON."""
    return b"data: " + _encode(payload) + b"\n\n"


@final
class LoadingProgress:
    """Acquire a model for one streaming chat request, reporting progress while it waits.

    Used by :class:`~trio_swap.http.inference.InferenceRoutes` only when the
    model has ``send_loading_state``, the request streams, and the model is
    not ready when the request arrives; every other request calls ``router.acquire``
    directly and pays nothing for this feature.

    Lifecycle: :meth:`acquire` once; then, if :attr:`streaming`, the caller
    finishes the response with :meth:`relay` or :meth:`fail` (the 200 and the
    progress are already sent), otherwise it answers the ordinary way.
    """

    def __init__(
        self, router: Router, model_id: str, requested: str, send: ASGISendCallable
    ) -> None:
        self._router = router
        self._model = model_id
        self._requested = requested
        self._send = send
        #: The router's grant. Set by the acquiring task with no checkpoint after
        #: ``router.acquire`` returns, so the handler's ``finally`` releases it
        #: even when the handler is cancelled before :meth:`acquire` returns.
        self.lease: Lease | None = None
        #: True once the ``200 text/event-stream`` head has been sent.
        self.streaming = False
        self._error: SwapError | None = None
        #: What the router said the request waits for; None until (unless) it says so.
        self._waits_for: Admission | None = None
        #: Set when the router said the request waits, or when the acquire ended.
        self._answered = trio.Event()
        #: Set when the acquire ended (a lease or an error).
        self._done = trio.Event()
        self._chunk_id = ""

    def __repr__(self) -> str:
        state = "streaming" if self.streaming else "admitting"
        return f"<LoadingProgress {self._model}: {state} lease={self.lease}>"

    async def acquire(self) -> Lease:
        """Wait for the router's grant, streaming progress once the router says the request waits.

        Runs in the request handler's task; cancelling it (client disconnect)
        cancels the wait, which gives the request's place back to the router.

        Raises:
            SwapError: the router rejected or failed the request. If
                :attr:`streaming` is False nothing has been sent yet.
        """
        started = trio.current_time()
        request_id = self._router.new_request_id()
        self._chunk_id = f"trio-swap-loading-{request_id}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._acquire, request_id)
            await self._answered.wait()
            # 1. the router said it waits (even if the grant has come since): stream
            # 2. granted or rejected at once: nothing sent, answered the ordinary way
            if self._waits_for is not None:
                await self._start_stream()
                await self._report(request_id, started)
        if self._error is not None:
            raise self._error
        assert self.lease is not None, "the acquiring task ended without a lease or an error"
        if self.streaming:
            await self._say(f"done in {trio.current_time() - started:.2f}s\n")
        return self.lease

    async def relay(self, answer: UpstreamResponse) -> None:
        """Finish the stream with the upstream's body (its status and headers are not sent).

        The body is relayed as it arrives, unparsed, like every other response;
        an upstream that answers a streaming request with plain JSON is relayed
        as is. A body cut off ends with an error event: the client was
        promised an event stream.
        """
        if not 200 <= answer.status < 300:
            await self._relay_failure(answer)
            return
        await relay_body(
            answer.iter_raw(),
            self._send,
            sse=True,
            style="openai",
            broken=UpstreamFailed,
            cut_off=upstream_cut_off,
        )

    async def fail(self, error: SwapError) -> None:
        """Finish the stream with an OpenAI error event (which the OpenAI SDKs raise)."""
        body = sse_error_event(error, "openai")
        await self._send({"type": "http.response.body", "body": body, "more_body": True})
        await self._end()

    # -- internals --------------------------------------------------------------------

    def _on_wait(self, admission: Admission) -> None:
        """Called by the router task (must not block): admitted, but not granted at once."""
        self._waits_for = admission
        self._answered.set()

    async def _acquire(self, request_id: int) -> None:
        try:
            self.lease = await self._router.acquire(
                self._model, request_id=request_id, on_wait=self._on_wait
            )
        except SwapError as error:
            self._error = error
        finally:
            self._done.set()
            self._answered.set()

    async def _report(self, request_id: int, started: float) -> None:
        """Say what the request waits for, every :data:`PROGRESS_INTERVAL`, until it is decided."""
        await self._say(f"trio-swap: loading model {self._model}\n")
        while True:
            with trio.move_on_after(PROGRESS_INTERVAL):
                await self._done.wait()
                return
            position = self._router.queue_position(request_id)
            if position is not None:
                await self._say(f"queue position #{position}\n")
            else:
                elapsed = int(trio.current_time() - started)
                await self._say(f"loading {self._model}… {elapsed}s\n")

    async def _start_stream(self) -> None:
        log.info("model %s: streaming loading progress to %s", self._model, self._chunk_id)
        self.streaming = True  # from here on no second response head may be sent
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": _SSE_HEADERS,
                "trailers": False,
            }
        )

    async def _say(self, text: str) -> None:
        chunk = _Chunk(
            id=self._chunk_id,
            object="chat.completion.chunk",
            created=int(time.time()),
            model=self._requested,
            choices=(_Choice(index=0, delta=_Delta(reasoning_content=text)),),
        )
        await self._send(
            {"type": "http.response.body", "body": _sse_event(chunk), "more_body": True}
        )

    async def _relay_failure(self, answer: UpstreamResponse) -> None:
        """Turn a non-2xx upstream answer into an error event quoting its body."""
        log.warning(
            "model %s: upstream answered %d after a loading stream began; "
            "sending it as an error event",
            self._model,
            answer.status,
        )
        pieces: list[bytes] = []
        size = 0
        try:
            # read to the end (error bodies are small) so the connection can be reused
            async for chunk in answer.iter_raw():
                if size < _ERROR_BODY_LIMIT:
                    pieces.append(chunk)
                    size += len(chunk)
        except UpstreamFailed:
            pass  # quote what arrived
        text = b"".join(pieces)[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").strip()
        await self.fail(UpstreamFailed(self._model, f"HTTP {answer.status}: {text}"))

    async def _end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
