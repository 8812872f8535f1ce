"""Sleep under fit by memory (issue 12): a sleeper's host memory is counted, really measured.

Real responders speaking vLLM's sleep API, holding real RAM. The GPU is a
declared ``vram0`` (no GPU here): each model's ``needs`` takes most of it,
so only one runs at a time and a swap must free the GPU; ``ram`` is
measured from /proc. ``--asleep-memory`` makes a responder hold RAM while
asleep, as vLLM's level 1 does with the weights it moves off the GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from tests.conftest import Harness, free_port, running, wait_for
from tests.test_sleep_swaps import answer
from trio_swap.config.load import load_config_text
from trio_swap.config.model import Config

MiB = 1 << 20


def config(models: dict[str, tuple[str, str, bool]], *, ram: str = "700MiB") -> Config:
    """``models``: id -> (declared needs, extra responder flags, has ``sleep: vllm``)."""
    lines = [
        f"startPort: {free_port()}",
        "logToStdout: none",
        f"resources: {{ram: {ram}, vram0: 400MiB}}",
        "models:",
    ]
    for model, (needs, flags, sleeps) in models.items():
        cmd = [sys.executable, "-m", "trio_swap", "responder", "--port", "${PORT}"]
        cmd += ["--model", model, "--sleep-api", "vllm", "--hold-memory", "32MiB", flags]
        lines += [f"  {model}:", f"    cmd: {' '.join(cmd)}", f"    needs: {needs}"]
        if sleeps:
            lines.append("    sleep: vllm")
    return load_config_text("\n".join(lines) + "\n", "<test>")


GPU_MODEL = "{ram: 100MiB, vram0: 300MiB}"


async def fit(harness: Harness) -> dict[str, object]:
    response = await harness.client.get("/api/fit")
    response.raise_for_status()
    document = response.json()
    assert isinstance(document, dict)
    return document


async def asleep_measured(harness: Harness, model: str) -> dict[str, int]:
    """``model``'s asleep need once it comes from a measurement (below its estimate)."""

    async def measured() -> dict[str, int] | None:
        rows = {row["id"]: row for row in (await fit(harness))["models"]}  # type: ignore[attr-defined]
        need = rows[model]["asleep_need"]
        # The estimate before a measurement is ram + vram0 = 400 MiB; measured is real.
        return need if need["ram"] != 400 * MiB else None

    return await wait_for(measured, what=f"{model}'s asleep footprint")


async def test_a_swap_sleeps_the_victim_counts_its_host_memory_and_stops_sleepers_for_room(
    tmp_path: Path,
) -> None:
    models = {
        "a": (GPU_MODEL, "", True),
        "b": (GPU_MODEL, "", True),
        # No GPU, most of the RAM: the sleepers' host memory is in its way.
        "c": ("{ram: 690MiB, vram0: 0}", "", False),
    }
    with trio.fail_after(90):
        async with running(config(models), state_dir=tmp_path) as harness:
            await answer(harness, "a")
            pid_a = harness.pid("a")
            # b needs the GPU: a sleeps (asleep it fits beside b in ram, by its estimate).
            await answer(harness, "b")
            rows = await harness.models()
            assert rows["a"]["state"] == "sleeping"
            assert rows["a"]["pid"] == pid_a
            asleep_a = await asleep_measured(harness, "a")
            assert asleep_a["vram0"] == 0
            assert asleep_a["ram"] < 100 * MiB  # it gave its --hold-memory back
            document = await fit(harness)
            ram = document["resources"]["ram"]  # type: ignore[index]
            # Counted: b awake (declared 100 MiB) and a asleep (measured).
            assert ram["reserved"] == 100 * MiB + asleep_a["ram"]
            # Back to a: a wake (same process), and b sleeps.
            await answer(harness, "a")
            rows = await harness.models()
            assert (rows["a"]["state"], rows["a"]["pid"]) == ("ready", pid_a)
            assert rows["b"]["state"] == "sleeping"
            await asleep_measured(harness, "b")
            fit_rows = {row["id"]: row for row in (await fit(harness))["models"]}  # type: ignore[attr-defined]
            assert fit_rows["a"]["wake_seconds"] is not None  # the wake was timed
            # c needs 690 of 700 MiB of ram: a (awake) and b (asleep) must both go; a
            # sleep of a frees too little, so both stop.
            await answer(harness, "c")
            rows = await harness.models()
            assert rows["a"]["state"] == "stopped"
            assert rows["b"]["state"] == "stopped"
            timeline = (await harness.client.get("/api/timeline")).json()
            lanes = {lane["model"]: lane["bands"] for lane in timeline["lanes"]}
            last_b = lanes["b"][-1]
            assert (last_b["state"], last_b["evicted_by"], last_b["asleep"]) == (
                "stopping",
                "c",
                True,
            )
            assert "asleep" in last_b["why"]
            assert any(band["state"] == "sleeping" for band in lanes["a"])


async def test_a_model_too_big_to_sleep_beside_the_target_is_stopped_instead(
    tmp_path: Path,
) -> None:
    models = {
        # Asleep, a holds 600 MiB of RAM more (as vLLM's level 1 holds the weights).
        "a": (GPU_MODEL, "--asleep-memory 600MiB", True),
        "b": (GPU_MODEL, "", True),
    }
    with trio.fail_after(90):
        async with running(config(models), state_dir=tmp_path) as harness:
            await answer(harness, "a")
            pid_a = harness.pid("a")
            await answer(harness, "b")  # by its estimate a fits asleep: it sleeps
            assert (await harness.models())["a"]["state"] == "sleeping"
            asleep_a = await asleep_measured(harness, "a")
            assert asleep_a["ram"] > 600 * MiB  # measured: more than the estimate
            await answer(harness, "a")  # a wakes; b sleeps (it fits asleep)
            rows = await harness.models()
            assert (rows["a"]["state"], rows["a"]["pid"]) == ("ready", pid_a)
            assert rows["b"]["state"] == "sleeping"
            # Now a asleep (its measured 600+ MiB) and b (100 MiB) exceed 700 MiB: a stops.
            await answer(harness, "b")
            rows = await harness.models()
            assert rows["a"]["state"] == "stopped"
            assert rows["b"]["state"] == "ready"
            await answer(harness, "a")  # a cold start this time
            rows = await harness.models()
            assert rows["a"]["pid"] != pid_a
            assert rows["a"]["start_count"] == 2
