"""Fake children for the router/process test layer (``tests/test_router_lifecycle.py``).

The real :class:`~trio_swap.upstream.process.ModelProcess` and
:class:`~trio_swap.router.Router` run unchanged; only the two seams are
replaced: the :class:`~trio_swap.upstream.launcher.Launcher` (a
:class:`FakeLauncher` whose children are timers on trio's clock) and the
:class:`~trio_swap.upstream.probe.HealthProbe` (:class:`FakeLauncher.probe`,
which answers from the fake child's state). Under the ``autojump_clock``
fixture a 30 s load costs no real time, and virtual times are exact, so tests
assert on them.

A fake child follows a :class:`Behaviour`: it passes its health check
``ready_after`` seconds after its spawn, may exit by itself (``crash_after``),
exits ``term_delay`` seconds after SIGTERM (or never, ``ignore_sigterm``), and
at once on SIGKILL. Every spawn and signal is recorded in
:attr:`FakeLauncher.events` with its virtual time.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import final

import trio

from trio_swap.config.address import Upstream
from trio_swap.config.model import ModelConfig

__all__ = ["Behaviour", "FakeChild", "FakeLauncher", "fake_model"]

_BASE_PORT = 41000


def fake_model(name: str, index: int, **settings: object) -> ModelConfig:
    """A model whose command the fake launcher understands: ``fake <name>``."""
    return ModelConfig(
        id=name,
        cmd=("fake", name),
        proxy=f"http://127.0.0.1:{_BASE_PORT + index}",
        **settings,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Behaviour:
    """How one model's fake server behaves (seconds on trio's clock)."""

    ready_after: float = 1.0
    #: Exits with status 1 this long after its spawn (before or after it got ready).
    crash_after: float | None = None
    term_delay: float = 0.1
    ignore_sigterm: bool = False
    #: The spawn itself fails (a missing executable).
    spawn_error: bool = False
    #: Printed on its output when it starts.
    lines: tuple[str, ...] = ()


@final
class _FakeOutput(trio.abc.ReceiveStream):
    """A child's stdout: lines written synchronously, EOF once it exits."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](1000)

    def write(self, data: bytes) -> None:
        self._send.send_nowait(data)

    def end(self) -> None:
        self._send.close()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return b""

    async def aclose(self) -> None:
        await self._receive.aclose()


@final
class FakeChild:
    """A :class:`~trio_swap.upstream.launcher.ChildProcess` that is only timers."""

    def __init__(self, launcher: FakeLauncher, name: str, pid: int, behaviour: Behaviour) -> None:
        self.name = name
        self.pid = pid
        self.pgid = pid
        self.exited = trio.Event()
        self.behaviour = behaviour
        self.spawned_at = trio.current_time()
        self._launcher = launcher
        self._returncode: int | None = None
        self._output = _FakeOutput()
        self._output_taken = False
        for line in behaviour.lines:
            self._output.write(line.encode() + b"\n")
        if behaviour.crash_after is not None:
            launcher.nursery.start_soon(self._exit_after, behaviour.crash_after, 1)

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def healthy(self) -> bool:
        return self._returncode is None and (
            trio.current_time() >= self.spawned_at + self.behaviour.ready_after
        )

    def output_stream(self) -> trio.abc.ReceiveStream:
        if self._output_taken:
            raise RuntimeError("output stream already taken")
        self._output_taken = True
        return self._output

    async def watch(self) -> None:
        await self.exited.wait()

    async def wait(self) -> None:
        await self.exited.wait()

    def signal_group(self, sig: int) -> bool:
        if self._returncode is not None:
            return False
        self._launcher.record(self.name, signal.Signals(sig).name)
        if sig == signal.SIGKILL:
            self._exit(-signal.SIGKILL)
        elif sig == signal.SIGTERM and not self.behaviour.ignore_sigterm:
            self._launcher.nursery.start_soon(
                self._exit_after, self.behaviour.term_delay, -signal.SIGTERM
            )
        return True

    def close(self) -> None:
        self._output.end()

    async def _exit_after(self, delay: float, code: int) -> None:
        await trio.sleep(delay)
        self._exit(code)

    def _exit(self, code: int) -> None:
        if self._returncode is None:
            self._returncode = code
            self._launcher.record(self.name, f"exit {code}")
            self._output.end()
            self.exited.set()

    def __repr__(self) -> str:
        return f"<FakeChild {self.name} pid={self.pid} returncode={self._returncode}>"


@dataclass
class FakeLauncher:
    """Spawns :class:`FakeChild` processes and answers health probes for them.

    ``nursery`` runs the children's timers: give it the test's nursery, which
    outlives the supervisors.
    """

    nursery: trio.Nursery
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    #: (virtual time, model, what happened): "spawn", "SIGTERM", "SIGKILL", "exit N".
    events: list[tuple[float, str, str]] = field(default_factory=list)
    children: list[FakeChild] = field(default_factory=list)
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str]) -> FakeChild:
        if tuple(argv[:1]) != ("fake",):
            raise OSError(2, f"No such file or directory: {argv[0]!r}")
        name = argv[1]
        behaviour = self.behaviours.get(name, Behaviour())
        if behaviour.spawn_error:
            raise OSError(2, "No such file or directory")
        self.record(name, "spawn")
        child = FakeChild(self, name, next(self._pids), behaviour)
        self.children.append(child)
        return child

    async def probe(self, upstream: Upstream, path: str, *, timeout: float) -> bool:
        """The health check: 200 once the live child on that port is past ``ready_after``."""
        await trio.lowlevel.checkpoint()
        index = upstream.port - _BASE_PORT
        return any(child.healthy for child in self.children if self._index(child.name) == index)

    def record(self, name: str, what: str) -> None:
        self.events.append((trio.current_time(), name, what))

    def running(self) -> list[str]:
        """Models with a live fake process, in spawn order."""
        return [child.name for child in self.children if child.returncode is None]

    def what(self, name: str) -> list[str]:
        """What happened to ``name``'s processes, in order (without times)."""
        return [what for _, model, what in self.events if model == name]

    def when(self, name: str, what: str) -> list[float]:
        """Virtual times at which ``what`` happened to ``name``."""
        return [at for at, model, seen in self.events if model == name and seen == what]

    _indexes: dict[str, int] = field(default_factory=dict)

    def _index(self, name: str) -> int:
        return self._indexes[name]

    def register(self, models: Sequence[ModelConfig]) -> None:
        """Learn which port each fake model listens on (from its ``proxy``)."""
        for model in models:
            self._indexes[model.id] = Upstream(model.proxy).port - _BASE_PORT
