"""Fit by memory end to end: real responders holding real RAM, measured from /proc.

Each responder holds ``--hold-memory`` of touched pages before it turns
healthy, so the footprint trio-swap measures (PSS of the process tree) is real
memory, and the test checks the sum of the running trees against ``ram``
throughout, with the same /proc reader an operator would trust.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import msgspec
import pytest
import trio

from tests.conftest import Harness, chat, make_config, responder_model, running, wait_for
from trio_swap import server as server_module
from trio_swap.config.model import Config, ModelConfig
from trio_swap.upstream.footprint import measure_footprint

MiB = 1 << 20
#: Each responder holds this much on top of its own ~30 MiB: two fit in RAM_BUDGET, three do not.
HOLD = "100MiB"
RAM_BUDGET = 360 * MiB


def fit_config(*models: ModelConfig, ram: int = RAM_BUDGET) -> Config:
    return msgspec.structs.replace(make_config(*models), resources={"ram": ram})


async def fit_rows(harness: Harness) -> dict[str, dict[str, object]]:
    response = await harness.client.get("/api/fit")
    response.raise_for_status()
    return {row["id"]: row for row in response.json()["models"]}


async def ask(harness: Harness, model: str) -> None:
    response = await harness.client.post("/v1/chat/completions", json=chat(model))
    assert response.status_code == 200, response.text


async def wait_measured(harness: Harness, model: str) -> dict[str, object]:
    async def measured() -> dict[str, object] | None:
        row = (await fit_rows(harness))[model]
        basis = row["basis"]
        assert isinstance(basis, dict)
        return row if basis["ram"] == "measured" else None

    return await wait_for(measured, what=f"{model} to be measured")


def cheapest(rows: dict[str, dict[str, object]], models: Sequence[str]) -> str:
    """The model the formula names: the lowest eviction cost /api/fit reports."""
    costs = {m: float(str(rows[m]["eviction_cost"])) for m in models}
    return min(models, key=costs.__getitem__)


def gauge(metrics: str, series: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {series} in /metrics")


def running_models(harness: Harness) -> set[str]:
    return {m for m, p in harness.server.processes.items() if p.state.value != "stopped"}


async def watch_ram(harness: Harness, peak: list[int], *, interval: float = 0.02) -> None:
    """The sum of the running trees' memory, sampled until cancelled."""
    while True:
        pids = [p.pid for p in harness.server.processes.values() if p.pid is not None]
        total = 0
        for pid in pids:
            total += (await trio.to_thread.run_sync(measure_footprint, pid, None))["ram"]
        peak[0] = max(peak[0], total)
        await trio.sleep(interval)


async def test_two_that_fit_share_the_box_and_a_third_evicts_the_cheapest(
    tmp_path: Path,
) -> None:
    models = [responder_model(m, "--hold-memory", HOLD) for m in ("a", "b", "c", "d")]
    async with running(fit_config(*models), state_dir=tmp_path) as harness:
        peak = [0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_ram, harness, peak)
            # First loads: nothing is known yet, so each needs the whole budget.
            for model in ("a", "b", "c", "d"):
                await ask(harness, model)
                row = await wait_measured(harness, model)
                assert running_models(harness) == {model}
                footprint = row["footprint"]
                assert isinstance(footprint, dict)
                assert footprint["ram"] >= 100 * MiB  # the held memory is in it
            # d runs; a fits beside it.
            await ask(harness, "a")
            assert running_models(harness) == {"a", "d"}
            # b does not fit beside both: one goes, the one with the lowest cost.
            await ask(harness, "a")  # a is wanted more than d
            expected = cheapest(await fit_rows(harness), ("a", "d"))
            await ask(harness, "b")
            assert running_models(harness) == {"a", "d", "b"} - {expected}
            pair = sorted(running_models(harness))
            starts = {m: harness.server.processes[m].start_count for m in pair}
            for _ in range(4):  # alternating between two that fit never reloads either
                for model in pair:
                    await ask(harness, model)
            assert {m: harness.server.processes[m].start_count for m in pair} == starts
            # a third model evicts exactly one: the one the formula names
            expected = cheapest(await fit_rows(harness), pair)
            await ask(harness, "c")
            assert running_models(harness) == {*pair, "c"} - {expected}
            nursery.cancel_scope.cancel()
        assert 0 < peak[0] <= RAM_BUDGET, f"the running trees held {peak[0] / MiB:.0f} MiB"

        async def both_measured() -> str | None:
            text = (await harness.client.get("/metrics")).text
            used = gauge(text, 'trio_swap_resource_used_bytes{resource="ram"}')
            return text if used >= 200 * MiB else None  # c's first measurement is on its way

        metrics = await wait_for(both_measured, what="the two running models to be measured")
        assert gauge(metrics, 'trio_swap_resource_capacity_bytes{resource="ram"}') == RAM_BUDGET
        reserved = gauge(metrics, 'trio_swap_resource_reserved_bytes{resource="ram"}')
        assert 200 * MiB < reserved <= RAM_BUDGET


async def test_an_overrun_is_measured_and_the_next_placement_accounts_for_it(
    tmp_path: Path,
) -> None:
    liar = responder_model("liar", "--hold-memory", "200MiB", needs={"ram": 50 * MiB})
    honest = responder_model("honest", needs={"ram": 150 * MiB})
    async with running(fit_config(liar, honest), state_dir=tmp_path) as harness:
        plan_before = await harness.client.get("/api/fit")
        assert plan_before.json()["resources"]["ram"]["capacity"] == RAM_BUDGET
        await ask(harness, "liar")
        row = await wait_measured(harness, "liar")  # over its declared need: measured wins
        needs = row["needs"]
        assert isinstance(needs, dict)
        assert needs["ram"] > 200 * MiB
        # Declared sizes (50 + 150 MiB) would fit; the measured ones do not.
        await ask(harness, "honest")
        assert running_models(harness) == {"honest"}


async def test_out_of_memory_at_start_evicts_more_and_retries_once(tmp_path: Path) -> None:
    flag = tmp_path / "second-start"
    resident = responder_model("resident", needs={"ram": 200 * MiB})
    port = resident.proxy.rsplit(":", 1)[1]
    base = responder_model("greedy", needs={"ram": 100 * MiB})
    script = (
        f'if [ -e "{flag}" ]; then exec "$@"; fi; touch "{flag}"; '
        'echo "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: '
        'cudaMalloc failed: out of memory" >&2; exit 1'
    )
    greedy = msgspec.structs.replace(base, cmd=("sh", "-c", script, "sh", *base.cmd))
    assert port not in greedy.proxy
    async with running(fit_config(resident, greedy), state_dir=tmp_path) as harness:
        await ask(harness, "resident")
        # Declared 100 MiB fits beside 200 MiB; the first start dies of OOM, the
        # second runs once resident is gone.
        await ask(harness, "greedy")
        assert running_models(harness) == {"greedy"}
        assert harness.server.processes["greedy"].start_count == 2
        assert harness.server.processes["resident"].start_count == 1
        row = (await fit_rows(harness))["greedy"]
        needs = row["needs"]
        assert isinstance(needs, dict)
        assert needs["ram"] > RAM_BUDGET - 200 * MiB  # no longer fits beside resident


async def test_out_of_memory_after_a_swap_with_victims_evicts_the_rest(tmp_path: Path) -> None:
    """The victims were gone before the start: only what stayed counts as resident."""
    flag = tmp_path / "second-start"
    a = responder_model("a", needs={"ram": 300 * MiB})
    b = responder_model("b", needs={"ram": 500 * MiB})
    base = responder_model("c", needs={"ram": 400 * MiB})
    script = (
        f'if [ -e "{flag}" ]; then exec "$@"; fi; touch "{flag}"; '
        'echo "CUDA error: out of memory" >&2; exit 1'
    )
    c = msgspec.structs.replace(base, cmd=("sh", "-c", script, "sh", *base.cmd))
    async with running(fit_config(a, b, c, ram=1024 * MiB), state_dir=tmp_path) as harness:
        await ask(harness, "a")
        await ask(harness, "b")
        assert running_models(harness) == {"a", "b"}
        # c (400) fits beside b (500) once a (300) goes; that start dies of OOM, so
        # b goes too and c is loaded once more.
        await ask(harness, "c")
        assert running_models(harness) == {"c"}
        assert harness.server.processes["c"].start_count == 2


async def test_out_of_memory_twice_is_one_clear_error(tmp_path: Path) -> None:
    resident = responder_model("resident", needs={"ram": 200 * MiB})
    doomed = responder_model(
        "doomed",
        "--fail-start",
        "--fail-start-message",
        "CUDA error: out of memory",
        needs={"ram": 100 * MiB},
    )
    async with running(fit_config(resident, doomed), state_dir=tmp_path) as harness:
        await ask(harness, "resident")
        response = await harness.client.post("/v1/chat/completions", json=chat("doomed"))
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_start_failed"
        assert "out of memory" in error["message"]
        assert harness.server.processes["doomed"].start_count == 2  # retried once, no more
        assert "resident" not in running_models(harness)  # the retry made room first
        ok = await harness.client.post("/v1/chat/completions", json=chat("resident"))
        assert ok.status_code == 200  # the server keeps serving


async def test_a_restart_keeps_learned_footprints_and_load_times(tmp_path: Path) -> None:
    config = fit_config(responder_model("a", "--hold-memory", "64MiB"))
    async with running(config, state_dir=tmp_path) as harness:
        await ask(harness, "a")
        before = await wait_measured(harness, "a")
    assert (tmp_path / "learned.json").exists()
    async with running(config, state_dir=tmp_path) as harness:
        row = (await fit_rows(harness))["a"]
        assert row["state"] == "stopped"
        assert row["basis"] == {"ram": "measured"}
        assert row["needs"] == before["needs"]
        assert row["load_seconds"] == before["load_seconds"]
        assert row["load_seconds"] is not None


async def test_serve_measures_gpu_memory_through_the_detected_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve() asks for NVML itself (the fake stands in for a GPU with two devices)."""

    class FakeNvml:
        def used_by(self, pids: Collection[int]) -> dict[int, int]:
            return {0: 3 * len(pids) * MiB, 1: 0}

    monkeypatch.setattr(server_module, "detect_gpu_reader", FakeNvml)
    config = msgspec.structs.replace(
        make_config(responder_model("a")),
        resources={"ram": RAM_BUDGET, "vram0": 8192 * MiB, "vram1": 8192 * MiB},
    )
    async with running(config, state_dir=tmp_path) as harness:
        await ask(harness, "a")
        row = await wait_measured(harness, "a")
        assert row["footprint"] == {"ram": row["footprint"]["ram"], "vram0": 3 * MiB, "vram1": 0}  # type: ignore[index]
        assert row["basis"] == {"ram": "measured", "vram0": "measured", "vram1": "measured"}
        assert row["needs"]["vram1"] == 0  # type: ignore[index]  # a measured 0: needs none


async def test_without_resources_nothing_changes_but_rows_have_the_fields(
    tmp_path: Path,
) -> None:
    async with running(make_config(responder_model("a")), state_dir=tmp_path) as harness:
        await ask(harness, "a")
        fit = (await harness.client.get("/api/fit")).json()
        assert fit["enabled"] is False
        row = (await harness.models())["a"]
        assert row["needs"] == {}
        assert row["load_seconds"] is not None and row["load_seconds"] > 0
        assert (
            "trio_swap_resource_capacity_bytes" not in (await harness.client.get("/metrics")).text
        )
