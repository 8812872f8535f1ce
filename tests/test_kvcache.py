"""keepCache: llama-server's slots saved before a stop and restored after the next start.

End to end against the responder's fake slot API (``responder/slots.py``):
a conversation resent after a swap back reuses its prompt, a save that hangs
or fails never holds the stop past ``unloadTimeout``, a restore that fails is
logged and the request served, restores that buy nothing are given up, and
the disk budget deletes the least recently used files first. The exact
timing of a cut save is checked on trio's virtual clock with fake children.
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from tests.conftest import Harness, make_config, responder_model, running, wait_for
from tests.fakes import Behaviour, FakeLauncher, fake_model
from trio_swap.config.address import Upstream
from trio_swap.config.errors import ConfigError
from trio_swap.config.load import load_config_text
from trio_swap.config.model import DEFAULT_CACHE_DISK_BUDGET, ModelConfig
from trio_swap.errors import ModelStartFailed
from trio_swap.upstream.cache_disk import FILE_PREFIX, CacheDisk
from trio_swap.upstream.kvcache import GIVE_UP_AFTER, SAVE_SHARE, ModelCache
from trio_swap.upstream.process import ModelProcess, ProcessState
from trio_swap.upstream.slots import HttpSlotApi, Slot, SlotConnectionError, SlotError, SlotFile

LONG_PROMPT = " ".join(f"w{i}" for i in range(1500))
FIRST = [{"role": "user", "content": LONG_PROMPT}]
#: The same conversation, one exchange later.
NEXT = [*FIRST, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
#: The responder's tokens: one per word, plus one per message for its role.
FIRST_TOKENS = 1 + 1500
NEXT_TOKENS = FIRST_TOKENS + 5  # <assistant> ok <user> and then?


def kept(model_id: str, directory: Path, *flags: str, **fields: object) -> ModelConfig:
    """A responder model with keepCache, saving its slots in ``directory``."""
    fields.setdefault("keep_cache", True)
    return responder_model(model_id, "--slot-save-path", str(directory), *flags, **fields)


async def chat(harness: Harness, model: str, messages: list[dict[str, str]]) -> dict[str, int]:
    """One non-streamed chat; returns its ``timings``."""
    response = await harness.client.post(
        "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 2}
    )
    assert response.status_code == 200, response.text
    timings: dict[str, int] = response.json()["timings"]
    return timings


async def metric(harness: Harness, line: str) -> float:
    """The value of one exposed sample (``name{labels}``), 0 when absent."""
    text = (await harness.client.get("/metrics")).text
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def saved_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(FILE_PREFIX))


# -- config ---------------------------------------------------------------------------------


def test_keep_cache_needs_a_slot_save_path_in_cmd() -> None:
    text = textwrap.dedent(
        """\
        models:
          a:
            cmd: llama-server -m a.gguf --port ${PORT}
            keepCache: true
        """
    )
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "c.yaml")
    message = str(caught.value)
    assert "c.yaml:4" in message and "models.a.keepCache" in message
    assert "--slot-save-path DIR" in message


def test_keep_cache_refuses_a_server_without_its_slots_endpoint() -> None:
    text = "models:\n  a:\n    cmd: s --port ${PORT} --slot-save-path=/tmp/x --no-slots\n"
    text += "    keepCache: true\n"
    with pytest.raises(ConfigError, match="--no-slots"):
        load_config_text(text, "c.yaml")


def test_keep_cache_needs_a_health_check() -> None:
    text = "models:\n  a:\n    cmd: s --port ${PORT} --slot-save-path /x\n"
    text += "    checkEndpoint: none\n    keepCache: true\n"
    with pytest.raises(ConfigError, match=r"c\.yaml:5.*needs a health check"):
        load_config_text(text, "c.yaml")


def test_keep_cache_and_the_disk_budget_load() -> None:
    text = "cacheDiskBudget: 2GiB\nmodels:\n  a:\n    cmd: s --port ${PORT} --slot-save-path /x\n"
    config = load_config_text(text + "    keepCache: true\n", "c.yaml")
    assert config.models["a"].keep_cache is True
    assert config.cache_disk_budget == 2 * 2**30
    plain = load_config_text("models:\n  a:\n    cmd: s --port ${PORT}\n", "c.yaml")
    assert plain.models["a"].keep_cache is False
    assert plain.cache_disk_budget == DEFAULT_CACHE_DISK_BUDGET == 20 * 2**30
    with pytest.raises(ConfigError, match="cacheDiskBudget"):
        load_config_text("cacheDiskBudget: lots\nmodels: {}\n", "c.yaml")


# -- the slot API client, against the responder ------------------------------------------


async def test_the_slot_client_lists_saves_and_restores_through_the_responder(
    tmp_path: Path,
) -> None:
    model = kept("a", tmp_path, "-np", "2")
    api = HttpSlotApi()
    with trio.fail_after(30):
        async with running(make_config(model)) as harness:
            await chat(harness, "a", FIRST)
            upstream = Upstream(model.proxy)
            slots = await api.slots(upstream)
            assert [(s.id, s.tokens, s.holds_prompt) for s in slots] == [
                (0, FIRST_TOKENS, True),
                (1, None, False),  # never used: llama-server leaves id_task out
            ]
            saved = await api.save(upstream, 0, "x.bin")
            assert (
                saved.tokens == FIRST_TOKENS and saved.bytes == (tmp_path / "x.bin").stat().st_size
            )
            restored = await api.restore(upstream, 1, "x.bin")
            assert restored == SlotFile(tokens=FIRST_TOKENS, bytes=saved.bytes)
            with pytest.raises(SlotError, match="400 Invalid filename"):
                await api.save(upstream, 0, "../x.bin")
            with pytest.raises(SlotError, match="400 Unable to restore slot"):
                await api.restore(upstream, 0, "missing.bin")


async def test_the_slot_client_quotes_a_server_without_slot_save_path() -> None:
    model = responder_model("a")
    with trio.fail_after(30):
        async with running(make_config(model)) as harness:
            await chat(harness, "a", FIRST)
            with pytest.raises(SlotError, match=r"501 .*Start it with `--slot-save-path`"):
                await HttpSlotApi().save(Upstream(model.proxy), 0, "x.bin")


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [True, False])
async def test_a_swap_back_reuses_the_prompt_only_with_keep_cache(
    tmp_path: Path, keep: bool
) -> None:
    a = kept("a", tmp_path, keep_cache=keep)
    with trio.fail_after(30):
        async with running(make_config(a, responder_model("b"))) as harness:
            assert (await chat(harness, "a", FIRST))["cache_n"] == 0
            await chat(harness, "b", FIRST)  # a swap: a is saved, then stopped
            await harness.wait_for_state("a", "stopped")
            again = await chat(harness, "a", NEXT)  # a swap back: restored before this
            if keep:
                assert again == again | {
                    "cache_n": FIRST_TOKENS,
                    "prompt_n": NEXT_TOKENS - FIRST_TOKENS,
                }
                reused = 'trio_swap_kv_cache_reused_tokens_total{model="a"}'

                async def counted() -> bool:
                    return await metric(harness, reused) == FIRST_TOKENS

                await wait_for(counted, what="the reused tokens counted")
                assert (
                    await metric(harness, 'trio_swap_kv_cache_saves_total{model="a",outcome="ok"}')
                    == 1
                )
                restores = 'trio_swap_kv_cache_restores_total{model="a",outcome="ok"}'
                assert await metric(harness, restores) == 1
                assert await metric(harness, "trio_swap_kv_cache_disk_bytes") > 0
                assert len(saved_files(tmp_path)) == 1
            else:
                assert again == again | {"cache_n": 0, "prompt_n": NEXT_TOKENS}
                assert saved_files(tmp_path) == []


@pytest.mark.parametrize("fault", ["--slot-save-delay=3600", "--slot-save-fails"])
async def test_a_hanging_or_failing_save_never_holds_the_stop(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = kept("a", tmp_path, fault, unload_timeout=2.0)
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="trio_swap.upstream"):
        async with running(make_config(a)) as harness:
            await chat(harness, "a", FIRST)
            pid = harness.pid("a")
            response = await harness.client.post("/api/models/unload/a")
            assert response.status_code == 200
            assert harness.server.processes["a"].state is ProcessState.STOPPED
            assert pid is not None and not _alive(pid)
            outcome = "timeout" if "delay" in fault else "failed"
            series = f'trio_swap_kv_cache_saves_total{{model="a",outcome="{outcome}"}}'
            assert await metric(harness, series) == 1
    messages = [r.getMessage() for r in caplog.records]
    if outcome == "timeout":
        assert any("saving its KV cache took longer than 1s" in m for m in messages), messages
    else:
        assert any(
            "KV cache slot 0 not saved: POST /slots/0?action=save: 500" in m for m in messages
        )
    stopping = next(i for i, m in enumerate(messages) if "model a: stopping pid" in m)
    cut = next(i for i, m in enumerate(messages) if "not saved" in m or "took longer" in m)
    assert cut < stopping  # the save ended (or was cut) before the stop signal


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_failing_restore_is_logged_and_the_request_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = kept("a", tmp_path, "--slot-restore-fails")
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="trio_swap.upstream"):
        async with running(make_config(a, responder_model("b"))) as harness:
            await chat(harness, "a", FIRST)
            await chat(harness, "b", FIRST)
            again = await chat(harness, "a", NEXT)  # served, without the cache
            assert again["cache_n"] == 0
            failed = 'trio_swap_kv_cache_restores_total{model="a",outcome="failed"}'
            assert await metric(harness, failed) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "model a: KV cache restore failed: POST /slots/0?action=restore: 400 Unable to restore slot"
        in m
        for m in messages
    ), messages


def judged(cache: ModelCache) -> bool:
    return not cache.checking


async def test_restores_that_reuse_nothing_are_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = kept("a", tmp_path, "--slot-restore-noop")  # restores "succeed" and do nothing
    saves_ok = 'trio_swap_kv_cache_saves_total{model="a",outcome="ok"}'
    with trio.fail_after(60), caplog.at_level(logging.INFO, logger="trio_swap.upstream"):
        async with running(make_config(a, responder_model("b"))) as harness:
            await chat(harness, "a", FIRST)
            for attempt in range(1, GIVE_UP_AFTER + 1):
                await chat(harness, "b", FIRST)
                assert (await chat(harness, "a", NEXT))["cache_n"] == 0
                cache = harness.server.processes["a"].cache
                assert cache is not None
                await wait_for(partial(judged, cache), what="the restore judged")
                assert cache.given_up is (attempt == GIVE_UP_AFTER)
            gauge = 'trio_swap_kv_cache_given_up{model="a"}'
            assert await metric(harness, gauge) == 1
            saves = await metric(harness, saves_ok)
            assert saves == GIVE_UP_AFTER
            await chat(harness, "b", FIRST)  # no save any more
            await chat(harness, "a", NEXT)  # no restore any more
            assert await metric(harness, saves_ok) == saves
            restores = 'trio_swap_kv_cache_restores_total{model="a",outcome="ok"}'
            assert await metric(harness, restores) == GIVE_UP_AFTER
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        re.search(r"model a: keepCache given up: 3 restores in a row reused no prompt token", m)
        for m in warnings
    ), warnings


async def test_the_disk_budget_deletes_the_least_recently_used_files_first(
    tmp_path: Path,
) -> None:
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    dir_a.mkdir()
    dir_b.mkdir()
    a, b = kept("a", dir_a), kept("b", dir_b)
    with trio.fail_after(30):
        # Room for one conversation's file (about 10 KB here), not two.
        config = msgspec.structs.replace(
            make_config(a, b, responder_model("c")), cache_disk_budget=15_000
        )
        async with running(config) as harness:
            await chat(harness, "a", FIRST)
            await chat(harness, "b", FIRST)  # a saved
            assert len(saved_files(dir_a)) == 1
            await chat(harness, "c", FIRST)  # b saved: a's file is the oldest and goes

            async def swept() -> bool:
                return saved_files(dir_a) == [] and len(saved_files(dir_b)) == 1

            await wait_for(swept, what="a's file deleted, b's kept")
            deleted = "trio_swap_kv_cache_deleted_files_total"
            assert await metric(harness, deleted) == 1


async def test_a_sweep_keeps_the_newest_files_within_the_budget(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    files = {
        one / f"{FILE_PREFIX}a.k.slot0.bin": 100,  # oldest
        two / f"{FILE_PREFIX}b.k.slot0.bin": 200,
        one / f"{FILE_PREFIX}a.k.slot1.bin": 300,
        two / f"{FILE_PREFIX}b.k.slot1.bin": 400,  # newest
    }
    for age, (path, size) in enumerate(files.items()):
        path.write_bytes(b"x" * size)
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    other = one / "not-ours.bin"
    other.write_bytes(b"x" * 5000)
    disk = CacheDisk(750)
    disk.watch(str(one))
    disk.watch(str(two))
    deleted = await disk.sweep()
    oldest_two = list(files)[:2]
    assert deleted == [str(p) for p in oldest_two]  # 1000 -> 700 bytes, oldest first
    assert disk.total_bytes == 700
    assert other.exists() and all(p.exists() for p in list(files)[2:])
    disk.budget = 0
    assert len(await disk.sweep()) == 2 and other.exists()


# -- the supervisor, on virtual time -------------------------------------------------------


class _HangingSlots:
    """A server whose slot 0 holds a prompt and whose saves never answer."""

    def __init__(self) -> None:
        self.saves: list[float] = []

    async def slots(self, upstream: Upstream) -> list[Slot]:
        return [Slot(id=0, tokens=1500, processing=False, unused=False)]

    async def save(self, upstream: Upstream, slot: int, filename: str) -> SlotFile:
        self.saves.append(trio.current_time())
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def restore(self, upstream: Upstream, slot: int, filename: str) -> SlotFile:
        raise SlotError("not in this test")


@pytest.mark.parametrize("ignores_sigterm", [False, True])
async def test_a_hanging_save_takes_half_the_unload_timeout_and_the_stop_ends_by_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, ignores_sigterm: bool
) -> None:
    grace = 8.0
    model = msgspec.structs.replace(
        fake_model("A", 0, unload_timeout=grace, keep_cache=True),
        cmd=("fake", "A", "--slot-save-path", str(tmp_path)),
    )
    slots = _HangingSlots()
    async with trio.open_nursery() as nursery:
        launcher = FakeLauncher(nursery, {"A": Behaviour(ignore_sigterm=ignores_sigterm)})
        launcher.register([model])
        process = ModelProcess(
            model,
            health_check_timeout=30,
            launcher=launcher,
            probe=launcher.probe,
            cache_disk=CacheDisk(10**9),
            slot_api=slots,
        )
        await nursery.start(process.run)
        await process.ensure_ready()  # nothing saved yet: nothing restored
        await trio.testing.wait_all_tasks_blocked()
        stop_at = trio.current_time()
        await process.stop()
        assert slots.saves == [stop_at]
        cut = stop_at + grace * SAVE_SHARE
        assert launcher.when("A", "SIGTERM") == [cut]  # the save had half of unloadTimeout
        if ignores_sigterm:
            assert launcher.when("A", "SIGKILL") == [stop_at + grace]  # and no more than it
        assert trio.current_time() == (stop_at + grace if ignores_sigterm else cut + 0.1)
        nursery.cancel_scope.cancel()


async def test_each_slot_holding_a_prompt_is_saved_and_restored(tmp_path: Path) -> None:
    a = kept("a", tmp_path, "-np", "2")
    other = [{"role": "user", "content": "a different conversation " * 50}]
    with trio.fail_after(30):
        async with running(make_config(a, responder_model("b"))) as harness:
            await chat(harness, "a", FIRST)
            await chat(harness, "a", other)  # the second slot
            await chat(harness, "b", FIRST)
            assert len(saved_files(tmp_path)) == 2
            later = [*other, {"role": "user", "content": "more"}]
            assert (await chat(harness, "a", later))["cache_n"] == 1 + 150
            assert (await chat(harness, "a", NEXT))["cache_n"] == FIRST_TOKENS


class _RecordingSlots:
    """A server that restores what it is told, refuses the files named in ``refuse``,
    and can hold a restore until ``release`` is set."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.restored: list[str] = []
        self.entered = trio.Event()
        self.release: trio.Event | None = None

    async def slots(self, upstream: Upstream) -> list[Slot]:
        return []

    async def save(self, upstream: Upstream, slot: int, filename: str) -> SlotFile:
        raise SlotError("not in this test")

    async def restore(self, upstream: Upstream, slot: int, filename: str) -> SlotFile:
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        if filename in self.refuse:
            raise SlotError(f"POST /slots/{slot}?action=restore: 400 invalid slot save file")
        self.restored.append(filename)
        return SlotFile(tokens=10, bytes=100)


def _cache_for(model_id: str, directory: Path, api: _RecordingSlots) -> ModelCache:
    model = ModelConfig(
        id=model_id,
        cmd=("llama-server", "--port", "1", "--slot-save-path", str(directory)),
        proxy="http://127.0.0.1:1",
        keep_cache=True,
    )
    return ModelCache(model, CacheDisk(10**9), api=api)


async def test_a_restore_counts_as_a_use_and_a_refused_file_is_never_restored_again(
    tmp_path: Path,
) -> None:
    api = _RecordingSlots()
    a, b = _cache_for("a", tmp_path, api), _cache_for("b", tmp_path, api)
    file_a = tmp_path / a.filename(0, await a.identify())
    file_b = tmp_path / b.filename(0, await b.identify())
    for age, path in enumerate((file_a, file_b)):
        path.write_bytes(b"x" * 100)
        os.utime(path, (1_000_000 + age, 1_000_000 + age))  # a's file is the older
    upstream = Upstream("http://127.0.0.1:1")
    await a.restore(upstream, 5.0)
    assert api.restored == [file_a.name] and a.checking
    disk = CacheDisk(150)  # room for one file: the least recently used goes
    disk.watch(str(tmp_path))
    assert await disk.sweep() == [str(file_b)]  # restoring a's file made it the newer
    api.refuse = frozenset({file_a.name})
    await a.restore(upstream, 5.0)  # refused: a miss, and the file is suspect
    assert not a.checking and file_a.exists()
    api.refuse = frozenset()
    await a.restore(upstream, 5.0)  # deleted first, so nothing is restored
    assert not file_a.exists() and api.restored == [file_a.name]


def _state(process: ModelProcess) -> ProcessState:
    """The state now (mypy keeps an attribute narrowed across an ``await``)."""
    return process.state


async def test_a_stop_during_the_restore_wins_and_no_request_is_told_ready(
    tmp_path: Path,
) -> None:
    model = msgspec.structs.replace(
        fake_model("A", 0, keep_cache=True),
        cmd=("fake", "A", "--slot-save-path", str(tmp_path)),
    )
    api = _RecordingSlots()
    api.release = trio.Event()  # the restore never ends by itself
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            launcher = FakeLauncher(nursery, {"A": Behaviour(ready_after=0.01)})
            launcher.register([model])
            process = ModelProcess(
                model,
                health_check_timeout=30,
                launcher=launcher,
                probe=launcher.probe,
                cache_disk=CacheDisk(10**9),
                slot_api=api,
            )
            await nursery.start(process.run)
            cache = process.cache
            assert cache is not None
            (tmp_path / cache.filename(0, await cache.identify())).write_bytes(b"saved")
            outcome: list[BaseException | None] = []

            async def request() -> None:
                try:
                    await process.ensure_ready()
                    outcome.append(None)
                except ModelStartFailed as exc:
                    outcome.append(exc)

            nursery.start_soon(request)
            await api.entered.wait()  # health passed, the restore is under way
            assert process.state is ProcessState.STARTING
            await process.stop()
            assert _state(process) is ProcessState.STOPPED
            await wait_for(lambda: outcome, what="the waiter answered")
            assert isinstance(outcome[0], ModelStartFailed)
            assert "stopped while starting" in str(outcome[0])
            nursery.cancel_scope.cancel()


# -- a server lost during the restore, replaced weights, saves that would be wasted ---------


def _restoring(harness: Harness, model: str) -> bool:
    cache = harness.server.processes[model].cache
    return cache is not None and cache.restoring


async def test_a_server_killed_during_the_restore_is_a_failed_start_never_ready(
    tmp_path: Path,
) -> None:
    a = kept("a", tmp_path, "--slot-restore-delay=3600", unload_timeout=30.0)
    with trio.fail_after(30):
        async with running(make_config(a, responder_model("b"))) as harness:
            await chat(harness, "a", FIRST)
            await chat(harness, "b", FIRST)  # a swap: a saved
            assert len(saved_files(tmp_path)) == 1
            answer: list[tuple[int, str]] = []

            async def request() -> None:
                response = await harness.client.post(
                    "/v1/chat/completions", json={"model": "a", "messages": NEXT}
                )
                answer.append((response.status_code, response.text))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(request)
                await wait_for(partial(_restoring, harness, "a"), what="a's restore under way")
                pid = harness.pid("a")
                assert pid is not None
                os.kill(pid, 9)
            status, text = answer[0]
            assert status == 503, text  # never a 502 from a dead server
            assert "process exited before becoming ready (killed by SIGKILL)" in text
            assert harness.server.processes["a"].state is ProcessState.STOPPED


class _UnansweredSlots(_RecordingSlots):
    """A restore whose connection is cut while the server lives on."""

    async def restore(self, upstream: Upstream, slot: int, filename: str) -> SlotFile:
        self.entered.set()
        raise SlotConnectionError(f"POST /slots/{slot}?action=restore: connection reset")


async def test_a_restore_that_lost_its_connection_checks_health_again_before_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = msgspec.structs.replace(
        fake_model("A", 0, keep_cache=True),
        cmd=("fake", "A", "--slot-save-path", str(tmp_path)),
    )
    api = _UnansweredSlots()
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="trio_swap.upstream"):
        async with trio.open_nursery() as nursery:
            launcher = FakeLauncher(nursery, {"A": Behaviour(ready_after=0.01)})
            launcher.register([model])
            process = ModelProcess(
                model,
                health_check_timeout=30,
                launcher=launcher,
                probe=launcher.probe,
                cache_disk=CacheDisk(10**9),
                slot_api=api,
            )
            await nursery.start(process.run)
            cache = process.cache
            assert cache is not None
            (tmp_path / cache.filename(0, await cache.identify())).write_bytes(b"saved")
            await process.ensure_ready()  # alive and healthy: served without the cache
            assert api.entered.is_set() and cache.lost_connection
            assert process.state is ProcessState.READY
            nursery.cancel_scope.cancel()
    assert any("checking its health again" in r.getMessage() for r in caplog.records)


async def test_a_cache_saved_with_other_weights_at_the_same_path_is_not_restored(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"old weights")
    slots = tmp_path / "slots"
    slots.mkdir()
    a = kept("a", slots, files=(str(weights),))
    with trio.fail_after(30):
        async with running(make_config(a, responder_model("b"))) as harness:
            await chat(harness, "a", FIRST)
            await chat(harness, "b", FIRST)  # a swap: a saved with the old weights
            old = saved_files(slots)
            assert len(old) == 1
            weights.write_bytes(b"new weights, another size")  # replaced at the same path
            again = await chat(harness, "a", NEXT)
            assert again["cache_n"] == 0  # not restored into the new weights
            restores = 'trio_swap_kv_cache_restores_total{model="a",outcome="ok"}'
            assert await metric(harness, restores) == 0
            await chat(harness, "b", FIRST)  # saved again, under the new weights' name
            assert len(saved_files(slots)) == 2
            assert (await chat(harness, "a", NEXT))["cache_n"] >= FIRST_TOKENS  # restored


async def test_a_reload_that_changes_the_command_saves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = kept("a", tmp_path)
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="trio_swap.upstream"):
        async with running(make_config(a)) as harness:
            await chat(harness, "a", FIRST)
            changed = msgspec.structs.replace(a, cmd=(*a.cmd, "-np", "2"))
            config = make_config(changed)
            await harness.server.reload(config)
            await harness.wait_for_state("a", "stopped")
            saves = 'trio_swap_kv_cache_saves_total{model="a",outcome="ok"}'
            assert await metric(harness, saves) == 0
            assert saved_files(tmp_path) == []
            await chat(harness, "a", FIRST)  # the new command
            await chat(harness, "a", FIRST)
            await harness.server.processes["a"].stop()  # same command: saved as before
            assert await metric(harness, saves) == 1
    assert any(
        "model a: KV cache not saved: the next start runs a reload's new settings" in m
        for m in (r.getMessage() for r in caplog.records)
    )


async def test_a_disk_budget_of_zero_saves_nothing(tmp_path: Path) -> None:
    a = kept("a", tmp_path)
    config = msgspec.structs.replace(make_config(a, responder_model("b")), cache_disk_budget=0)
    with trio.fail_after(30):
        async with running(config) as harness:
            await chat(harness, "a", FIRST)
            await chat(harness, "b", FIRST)
            await harness.wait_for_state("a", "stopped")
            for outcome in ("ok", "failed", "timeout"):
                series = f'trio_swap_kv_cache_saves_total{{model="a",outcome="{outcome}"}}'
                assert await metric(harness, series) == 0
            assert saved_files(tmp_path) == []


async def test_a_slot_call_the_server_hangs_up_on_says_so() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(
            SlotConnectionError,
            match=r"^GET /slots: the server closed the connection before answering$",
        ):
            await HttpSlotApi().slots(Upstream(f"http://127.0.0.1:{port}"))
        nursery.cancel_scope.cancel()
