"""Putting a model's server to sleep and waking it (``sleep:``, docs/sleep.md).

Each call is one HTTP request on a fresh connection, closed after the answer
(no idle connection is left on the server, like the readiness probe), bounded
by the config's ``timeout``. Answers are judged plainly: a 2xx is success;
the check call (vLLM's ``GET /is_sleeping``) must also report the state
expected, when its answer says ``is_sleeping``.
"""

from __future__ import annotations

import logging
from typing import Final

import h11
import msgspec
import trio

from trio_swap.config.address import Upstream
from trio_swap.config.model import HttpCall, SleepConfig

__all__ = ["SleepFailed", "sleep_server", "wake_server"]

log = logging.getLogger("trio_swap.upstream")

_READ_SIZE: Final = 64 * 1024
#: Longest answer read (a test completion is a few hundred bytes).
_MAX_BODY: Final = 1 << 20


class SleepFailed(Exception):
    """A sleep, wake, check or test call failed; the message says which and why."""


async def sleep_server(upstream: Upstream, config: SleepConfig) -> None:
    """The sleep call, then the check (it must say asleep).

    Raises:
        SleepFailed: either failed, answered non-2xx, or timed out.
    """
    with trio.move_on_after(config.timeout) as scope:
        await _expect(upstream, config.sleep, "sleep")
        if config.check is not None:
            await _check(upstream, config.check, asleep=True)
    if scope.cancelled_caught:
        raise SleepFailed(f"no answer within {config.timeout:g}s")


async def wake_server(upstream: Upstream, config: SleepConfig) -> None:
    """The wake calls in order, the check (it must say awake), then the test request.

    Raises:
        SleepFailed: a call failed, answered non-2xx, or timed out (each call
            has the whole ``timeout``: a weight reload may be long).
    """
    for call in config.wake:
        with trio.move_on_after(config.timeout) as scope:
            await _expect(upstream, call, "wake")
        if scope.cancelled_caught:
            raise SleepFailed(f"{_show(call)}: no answer within {config.timeout:g}s")
    with trio.move_on_after(config.timeout) as scope:
        if config.check is not None:
            await _check(upstream, config.check, asleep=False)
        if config.test is not None:
            await _expect(upstream, config.test, "test request")
    if scope.cancelled_caught:
        raise SleepFailed(f"no answer to the check or test within {config.timeout:g}s")


async def _check(upstream: Upstream, call: HttpCall, *, asleep: bool) -> None:
    body = await _expect(upstream, call, "check")
    try:
        answer = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return  # not JSON: a 2xx is all it can say
    said = answer.get("is_sleeping") if isinstance(answer, dict) else None
    if isinstance(said, bool) and said is not asleep:
        state = "asleep" if said else "awake"
        raise SleepFailed(f"{_show(call)} says the server is {state}")


async def _expect(upstream: Upstream, call: HttpCall, what: str) -> bytes:
    try:
        status, body = await _request(upstream, call)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise SleepFailed(f"{what} {_show(call)}: {type(exc).__name__}: {exc}") from exc
    if not 200 <= status < 300:
        text = body[:200].decode(errors="replace").strip()
        raise SleepFailed(f"{what} {_show(call)} answered {status}: {text}")
    return body


def _show(call: HttpCall) -> str:
    return f"{call.method} {call.path}"


async def _request(upstream: Upstream, call: HttpCall) -> tuple[int, bytes]:
    payload = b"" if call.body is None else msgspec.json.encode(call.body)
    headers = [("host", upstream.authority.decode()), ("connection", "close")]
    if call.body is not None:
        headers.append(("content-type", "application/json"))
    headers.append(("content-length", str(len(payload))))
    target = upstream.target(*_split(call.path))
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(upstream.host, upstream.port)
    async with stream:
        data = conn.send(h11.Request(method=call.method, target=target, headers=headers))
        data = (data or b"") + (conn.send(h11.Data(data=payload)) or b"") if payload else data
        await stream.send_all((data or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status = 0
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_READ_SIZE)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
                if sum(map(len, chunks)) > _MAX_BODY:
                    break
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return status, b"".join(chunks)


def _split(path: str) -> tuple[bytes, bytes]:
    base, _, query = path.partition("?")
    return base.encode(), query.encode()
