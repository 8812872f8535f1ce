"""Two small trio building blocks: a one-shot reply slot and a first-to-finish race."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar, final

import trio

__all__ = ["Reply", "race"]

T = TypeVar("T")
K = TypeVar("K")


@final
class Reply(Generic[T]):
    """The answer to one message: set exactly once by its owner, awaited by the sender.

    Setting never blocks, so the single-writer tasks (router, process
    supervisors) can answer from plain ``def`` code without yielding.
    """

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def set(self, value: T) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self) -> T:
        """The value, or the error raised here (each waiter gets the same instance)."""
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set() stored a T


async def race(contenders: Mapping[K, Callable[[], Awaitable[object]]]) -> K:
    """Run the contenders together; return the key of the first to finish, cancel the rest.

    Keys are meant to be members of one enum (the outcomes), so callers
    ``match`` on them and a type checker sees every case.
    """
    winner: list[K] = []
    async with trio.open_nursery() as nursery:

        async def run(key: K, fn: Callable[[], Awaitable[object]]) -> None:
            await fn()
            if not winner:
                winner.append(key)
            nursery.cancel_scope.cancel(reason=f"{key} finished first")

        for key, fn in contenders.items():
            nursery.start_soon(run, key, fn)
    return winner[0]
