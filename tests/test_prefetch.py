"""Prefetch while idle (issue 11): which stopped models' files are kept in the page cache,
within which budget, kept warm, paused while a model starts; and the config keys.

The choice is pure (`rank`, `room`, `choose`); the `Prefetcher` runs against a
fake table of supervisors (state and config are all it reads) and real files;
end to end, trio-swap with responder models warms a stopped model's ``files:``
and ``/api/models`` shows them resident.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import msgspec
import pytest
import trio
import trio.testing

from tests.conftest import make_config, responder_model, running, wait_for
from tests.test_pagecache import MIB, dropped, write_file
from trio_swap.config.errors import ConfigError
from trio_swap.config.files import weight_files
from trio_swap.config.load import load_config_text
from trio_swap.config.model import ModelConfig, PrefetchConfig
from trio_swap.fit.ledger import FitLedger
from trio_swap.upstream.pagecache import WarmResult, drop, resident_bytes
from trio_swap.upstream.prefetch import (
    DEFAULT_BUDGET_SHARE,
    Candidate,
    Prefetcher,
    RoundReport,
    choose,
    rank,
    room,
    running_files,
)
from trio_swap.upstream.process import ModelProcess, ProcessState

# --- the choice ----------------------------------------------------------------------


def model(model_id: str, *files: str, prefetch: bool = True) -> ModelConfig:
    return ModelConfig(  # a command of its own: the ledger learns per command
        id=model_id,
        cmd=("server", model_id),
        proxy="http://127.0.0.1:1",
        files=files,
        prefetch=prefetch,
    )


def test_rank_puts_the_likeliest_costliest_reload_first() -> None:
    models = {name: model(name) for name in ("idle", "slow", "busy", "fast")}
    ledger = FitLedger({}, models)
    ledger.loaded("slow", 20.0)
    ledger.loaded("busy", 2.0)
    ledger.loaded("fast", 0.5)
    for now in range(3):
        ledger.requested("busy", float(now))
    ledger.requested("slow", 3.0)
    ledger.requested("fast", 4.0)
    candidates = [Candidate(name, (f"/m/{name}",)) for name in models]
    ranked = [c.model for c in rank(candidates, ledger)]
    # slow: 1 request x 20 s; busy: ~3 requests x 2 s; fast: 1 x 0.5 s; idle: never asked for.
    assert ranked == ["slow", "busy", "fast", "idle"]
    assert [c.model for c in rank(candidates, None)] == list(models)  # no ledger: config order


def test_room_is_a_share_of_what_the_running_models_leave() -> None:
    gib = 1 << 30
    assert room(20 * gib, 4 * gib, None) == int(16 * gib * DEFAULT_BUDGET_SHARE)
    assert room(20 * gib, 4 * gib, 2 * gib) == 2 * gib
    assert room(20 * gib, 4 * gib, 100 * gib) == 16 * gib  # a budget never beyond the room
    assert room(2 * gib, 4 * gib, None) == 0
    assert room(None, 0, 2 * gib) == 0  # MemAvailable unknown: read nothing


def test_choose_fills_the_budget_in_rank_order() -> None:
    sizes: dict[str, int | None] = {"/a": 60, "/b": 50, "/c": 30, "/shared": 10, "/gone": None}
    ranked = [
        Candidate("a", ("/a",)),
        Candidate("b", ("/b",)),  # does not fit after a: skipped
        Candidate("c", ("/c", "/shared")),
        Candidate("d", ("/shared",)),  # shared with c: counted once, so it costs nothing
        Candidate("missing", ("/gone",)),
    ]
    assert [c.model for c in choose(ranked, sizes, 100)] == ["a", "c", "d"]
    assert [c.model for c in choose(ranked, sizes, 0)] == []


# --- the prefetcher, on a fake table of supervisors ----------------------------------


@dataclass
class FakeProcess:
    """What the prefetcher reads of a supervisor."""

    model: ModelConfig
    state: ProcessState = ProcessState.STOPPED


def table(*processes: FakeProcess) -> Callable[[], Mapping[str, ModelProcess]]:
    live = {p.model.id: cast(ModelProcess, p) for p in processes}
    return lambda: live


async def one_round(prefetcher: Prefetcher) -> RoundReport:
    """Wait for the prefetcher's next round and return its report."""
    rounds = prefetcher.rounds
    await rounds.wait()
    assert prefetcher.last is not None
    return prefetcher.last


async def test_a_round_warms_the_chosen_models_and_keeps_them_warm(tmp_path: Path) -> None:
    first = str(dropped(write_file(tmp_path / "first.gguf", 6 * MIB)))
    second = str(dropped(write_file(tmp_path / "second.gguf", 6 * MIB)))
    running = str(dropped(write_file(tmp_path / "running.gguf", 2 * MIB)))
    processes = table(
        FakeProcess(model("first", first)),
        FakeProcess(model("second", second)),  # does not fit beside first
        FakeProcess(model("off", second, prefetch=False)),
        FakeProcess(model("running", running), ProcessState.READY),
    )
    prefetcher = Prefetcher(
        processes, lambda: PrefetchConfig(budget=8 * MIB), memory=lambda: 1 << 40
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(prefetcher.run)
            report = await one_round(prefetcher)
            assert report.chosen == ["first"]
            assert resident_bytes(first) == 6 * MIB
            assert report.measured[first].resident == 6 * MIB
            assert resident_bytes(second) == 0
            assert resident_bytes(running) == 0  # a running model's files are not its business
            drop(first)  # the kernel evicted it
            prefetcher.stopped("other")  # any stop wakes it (no waiting for the recheck)
            report = await one_round(prefetcher)
            assert report.read > 0
            assert resident_bytes(first) == 6 * MIB
            nursery.cancel_scope.cancel()


async def test_a_model_whose_files_are_missing_is_not_chosen() -> None:
    called = threading.Event()

    def warmer(path: str, *, stop: Callable[[], bool], limit: int) -> WarmResult:
        called.set()
        return WarmResult(0, 0, "done")

    processes = table(FakeProcess(model("a", "/m/a.gguf")))  # disks get mounted late
    prefetcher = Prefetcher(processes, PrefetchConfig, memory=lambda: 1 << 40, warmer=warmer)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetcher.run)
            report = await one_round(prefetcher)
            nursery.cancel_scope.cancel()
    assert report.chosen == []
    assert not called.is_set()


async def test_pausing_stops_a_read_and_resumes_when_the_load_ends(tmp_path: Path) -> None:
    path = str(dropped(write_file(tmp_path / "a.gguf", 2 * MIB)))
    called = threading.Event()
    reads: list[str] = []

    def held(path: str, *, stop: Callable[[], bool], limit: int) -> WarmResult:
        reads.append(path)
        called.set()
        while not stop():
            threading.Event().wait(0.001)
        return WarmResult(0, 0, "stopped")

    processes = table(FakeProcess(model("a", path)), FakeProcess(model("b")))
    prefetcher = Prefetcher(processes, PrefetchConfig, memory=lambda: 1 << 40, warmer=held)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(prefetcher.run)
            await wait_for(called.is_set, what="the first read to begin")
            rounds = prefetcher.rounds
            prefetcher.starting("b")  # a load: the read stops within one block
            await rounds.wait()
            assert prefetcher.last is not None and prefetcher.last.stopped
            called.clear()
            rounds = prefetcher.rounds
            await trio.testing.wait_all_tasks_blocked()  # nothing happens while b loads
            assert not rounds.is_set() and not called.is_set()
            prefetcher.ready("b", 1.0)
            await wait_for(called.is_set, what="the read to resume once b is ready")
            nursery.cancel_scope.cancel()  # shutdown stops the held read too
    assert reads == [path, path]


async def test_shutdown_does_not_wait_for_a_read_stuck_in_the_kernel(tmp_path: Path) -> None:
    """The round's worker thread is abandoned at shutdown (a network disk that stopped
    answering); once it returns, its report is dropped."""
    path = str(dropped(write_file(tmp_path / "a.gguf", 2 * MIB)))
    called = threading.Event()
    release = threading.Event()
    returned = threading.Event()

    def stuck(path: str, *, stop: Callable[[], bool], limit: int) -> WarmResult:
        called.set()
        release.wait()
        returned.set()
        return WarmResult(0, 0, "stopped" if stop() else "done")

    prefetcher = Prefetcher(
        table(FakeProcess(model("a", path))), PrefetchConfig, memory=lambda: 1 << 40, warmer=stuck
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(prefetcher.run)
            await wait_for(called.is_set, what="the read to begin")
            nursery.cancel_scope.cancel()
        assert not returned.is_set()  # shut down while the read still hangs
        release.set()
        await wait_for(returned.is_set, what="the worker thread to end")
        await trio.testing.wait_all_tasks_blocked()
    assert prefetcher.last is None


def test_running_files_are_those_of_every_model_not_stopped() -> None:
    processes = table(
        FakeProcess(model("a", "/m/a", "/m/shared"), ProcessState.READY),
        FakeProcess(model("b", "/m/b"), ProcessState.STARTING),
        FakeProcess(model("c", "/m/shared", "/m/c"), ProcessState.READY),
        FakeProcess(model("d", "/m/d")),
    )
    assert running_files(processes()) == ["/m/a", "/m/shared", "/m/b", "/m/c"]


async def test_prefetch_false_reads_nothing(tmp_path: Path) -> None:
    path = str(dropped(write_file(tmp_path / "a.gguf", 2 * MIB)))
    processes = table(FakeProcess(model("a", path)))
    prefetcher = Prefetcher(
        processes, lambda: PrefetchConfig(enabled=False), memory=lambda: 1 << 40
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(prefetcher.run)
            await prefetcher.rounds.wait()
            nursery.cancel_scope.cancel()
    assert prefetcher.last is None
    assert resident_bytes(path) == 0


# --- end to end ----------------------------------------------------------------------


async def test_an_idle_server_warms_a_stopped_models_files(tmp_path: Path) -> None:
    """trio-swap with two responder models: the stopped one's file becomes resident, as
    ``/api/models`` shows; the other's too once it stops."""
    a_file = dropped(write_file(tmp_path / "a.gguf", 8 * MIB + 1))
    b_file = dropped(write_file(tmp_path / "b.gguf", 4 * MIB))
    a = responder_model("a", files=(str(a_file),))
    b = responder_model("b", files=(str(b_file),))
    config = msgspec.structs.replace(make_config(a, b), prefetch=PrefetchConfig(budget=64 * MIB))

    with trio.fail_after(30):
        async with running(config) as harness:

            async def resident(model_id: str, path: Path, size: int) -> bool:
                files = (await harness.models())[model_id]["files"]
                entry = {"path": str(path), "bytes": size, "resident_bytes": size}
                return entry in files  # type: ignore[operator]

            await wait_for(lambda: resident("a", a_file, 8 * MIB + 1), what="a's file warmed")
            await wait_for(lambda: resident("b", b_file, 4 * MIB), what="b's file warmed")


# --- config --------------------------------------------------------------------------


def load(text: str) -> tuple[dict[str, ModelConfig], PrefetchConfig, tuple[str, ...]]:
    config = load_config_text(text, "test.yaml", environ={})
    return config.models, config.prefetch, config.warnings


def test_files_and_prefetch_keys(tmp_path: Path) -> None:
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"x")
    models, prefetch, warnings = load(
        f"""
macros:
  dir: {tmp_path}
models:
  a:
    cmd: llama-server -m ${{dir}}/w.gguf --mmproj ${{dir}}/p.gguf --port ${{PORT}}
    files:
      - ${{dir}}/w.gguf
      - ${{dir}}/extra.bin
      - ${{dir}}/extra.bin
  b:
    cmd: server ${{PORT}}
    prefetch: false
"""
    )
    assert prefetch == PrefetchConfig()
    assert models["a"].files == (str(weights), f"{tmp_path}/extra.bin")
    assert weight_files(models["a"]) == (
        str(weights),
        f"{tmp_path}/p.gguf",
        f"{tmp_path}/extra.bin",
    )
    assert models["a"].prefetch and not models["b"].prefetch
    # A missing file in files: is a warning, located; the cmd's own files are not checked.
    assert warnings == (
        f"test.yaml:9: models.a.files[1]: '{tmp_path}/extra.bin' does not exist (yet); "
        "it is not read ahead until it is",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("false", PrefetchConfig(enabled=False)),
        ("true", PrefetchConfig()),
        ("{budget: 12GiB}", PrefetchConfig(budget=12 << 30)),
        ("{budget: 0}", PrefetchConfig(budget=0)),
        ("{}", PrefetchConfig()),
    ],
)
def test_top_level_prefetch(value: str, expected: PrefetchConfig) -> None:
    assert load(f"prefetch: {value}\nmodels: {{}}\n")[1] == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prefetch: sometimes\n", "test.yaml:1: prefetch: expected bool | mapping, got string"),
        ("prefetch: {budget: lots}\n", "test.yaml:1: prefetch.budget: expected a size"),
        ("prefetch: {size: 1GiB}\n", "test.yaml:1: prefetch: contains unknown field `size`"),
        (
            "models:\n  a:\n    cmd: s ${PORT}\n    files: ['']\n",
            "test.yaml:4: models.a.files[0]: a file path must not be empty",
        ),
        (
            "models:\n  a:\n    cmd: s ${PORT}\n    files: /one/path\n",
            "test.yaml:4: models.a.files: expected list, got string",
        ),
    ],
)
def test_prefetch_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    assert str(caught.value).startswith(message)
