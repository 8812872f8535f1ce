"""``GET /metrics`` as Prometheus scrapes it: real upstreams, real swaps, parsed exposition."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    Harness,
    chat,
    make_config,
    responder_model,
    running,
    sse_data,
    wait_for,
)
from trio_swap.observe.metrics import EVICTION_REASONS

CHAT = "/v1/chat/completions"
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(h: Harness) -> Samples:
    response = await h.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def wait_for_sample(h: Harness, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until the sample has the value (events land just after responses)."""

    async def reached() -> Samples | None:
        samples = await scrape(h)
        return samples if samples.get((name, frozenset(labels.items()))) == expected else None

    return await wait_for(reached, what=f"{name}{labels} == {expected}")


async def test_a_swap_counts_loads_evictions_requests_and_tokens() -> None:
    config = make_config(responder_model("A"), responder_model("B", "--tokens", "5"))
    with trio.fail_after(60):
        async with running(config) as h:
            answer_a = await h.client.post(CHAT, json=chat("A", "one two three"))
            assert answer_a.status_code == 200
            async with h.client.stream("POST", CHAT, json=chat("B", stream=True)) as response:
                assert response.status_code == 200
                events = sse_data([line async for line in response.aiter_lines()])
            usage_b = json.loads(events[-2])["usage"]  # the last event before [DONE]
            assert (await h.client.post(CHAT, json=chat("no-such-model"))).status_code == 404

            samples = await wait_for_sample(
                h, "trio_swap_requests_total", 1, model="", endpoint=CHAT, status="404"
            )
            for model in ("A", "B"):
                assert value(samples, "trio_swap_model_loads_total", model=model) == 1
                assert value(samples, "trio_swap_model_load_failures_total", model=model) == 0
                count = "trio_swap_model_time_to_ready_seconds_count"
                assert value(samples, count, model=model) == 1
                ok = {"model": model, "endpoint": CHAT, "status": "200"}
                assert value(samples, "trio_swap_requests_total", **ok) == 1
                assert value(samples, "trio_swap_upstream_response_seconds_count", model=model) == 1
                assert value(samples, "trio_swap_model_in_flight_requests", model=model) == 0
                assert value(samples, "trio_swap_model_queued_requests", model=model) == 0
            evictions = "trio_swap_model_evictions_total"
            assert value(samples, evictions, model="A", reason="swap") == 1
            assert value(samples, evictions, model="B", reason="swap") == 0
            assert value(samples, "trio_swap_swaps_total") == 2  # A's cold start, then B
            assert value(samples, "trio_swap_queue_wait_seconds_count") == 2  # the 404 never waited
            assert value(samples, "trio_swap_model_state", model="A", state="stopped") == 1
            assert value(samples, "trio_swap_model_state", model="B", state="ready") == 1
            assert value(samples, "trio_swap_model_state", model="B", state="stopped") == 0

            # Tokens are what the upstreams told the client, JSON body and SSE stream alike.
            usage_a = answer_a.json()["usage"]
            prompt, completion = (
                "trio_swap_prompt_tokens_total",
                "trio_swap_completion_tokens_total",
            )
            assert value(samples, prompt, model="A") == usage_a["prompt_tokens"] == 3
            assert value(samples, completion, model="A") == usage_a["completion_tokens"] == 16
            assert value(samples, prompt, model="B") == usage_b["prompt_tokens"]
            assert value(samples, completion, model="B") == usage_b["completion_tokens"] == 5
            speed = "trio_swap_generation_tokens_per_second_count"
            assert value(samples, speed, model="A") == value(samples, speed, model="B") == 1

            assert value(samples, "trio_swap_resident_memory_bytes") > 0
            assert value(samples, "process_resident_memory_bytes") > 0


async def test_in_flight_and_queued_gauges_follow_a_request_waiting_for_a_busy_model() -> None:
    config = make_config(responder_model("A"), responder_model("B"))
    with trio.fail_after(60):
        async with running(config) as h:
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            hold = trio.CancelScope()
            statuses: list[int] = []

            async def hold_a() -> None:
                with hold:  # ?delay: the upstream answers after 30 s
                    await h.client.post(CHAT + "?delay=30", json=chat("A"))

            async def ask_b() -> None:
                statuses.append((await h.client.post(CHAT, json=chat("B"))).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold_a)
                await wait_for_sample(h, "trio_swap_model_in_flight_requests", 1, model="A")
                nursery.start_soon(ask_b)  # B waits: swapping now would cut A's request off
                samples = await wait_for_sample(h, "trio_swap_model_queued_requests", 1, model="B")
                assert value(samples, "trio_swap_model_in_flight_requests", model="A") == 1
                assert value(samples, "trio_swap_model_in_flight_requests", model="B") == 0
                hold.cancel()  # A's client gives up; B's swap goes ahead
            assert statuses == [200]
            samples = await wait_for_sample(h, "trio_swap_model_queued_requests", 0, model="B")
            assert value(samples, "trio_swap_model_in_flight_requests", model="A") == 0
            # The client that left before any answer is counted as 499 (nginx's convention).
            gone = {"model": "A", "endpoint": CHAT, "status": "499"}
            await wait_for_sample(h, "trio_swap_requests_total", 1, **gone)


async def test_evictions_by_ttl_unload_and_crash_and_a_failed_load() -> None:
    config = make_config(
        responder_model("short", ttl=0.3),
        responder_model("unloaded"),
        responder_model("crashy", "--crash-after-tokens", "2", "--tokens", "10"),
        responder_model("broken", "--fail-start"),
    )
    evictions = "trio_swap_model_evictions_total"
    with trio.fail_after(60):
        async with running(config) as h:
            assert (await h.client.post(CHAT, json=chat("short"))).status_code == 200
            samples = await wait_for_sample(h, evictions, 1, model="short", reason="ttl")

            assert (await h.client.post(CHAT, json=chat("unloaded"))).status_code == 200
            assert (await h.client.post("/api/models/unload/unloaded")).status_code == 200
            samples = await wait_for_sample(h, evictions, 1, model="unloaded", reason="unload")

            async with h.client.stream("POST", CHAT, json=chat("crashy", stream=True)) as response:
                assert response.status_code == 200
                await response.aread()
            samples = await wait_for_sample(h, evictions, 1, model="crashy", reason="crash")

            assert (await h.client.post(CHAT, json=chat("broken"))).status_code == 503
            samples = await wait_for_sample(
                h, "trio_swap_model_load_failures_total", 1, model="broken"
            )
            assert value(samples, "trio_swap_model_loads_total", model="broken") == 0
            failed = {"model": "broken", "endpoint": CHAT, "status": "503"}
            assert value(samples, "trio_swap_requests_total", **failed) == 1

            # Each model left once, for its own reason only: the swaps that followed listed
            # models still stopping (TTL waits for the process to exit) as victims too.
            for model, reason in (("short", "ttl"), ("unloaded", "unload"), ("crashy", "crash")):
                for other in EVICTION_REASONS:
                    expected = 1 if other == reason else 0
                    assert value(samples, evictions, model=model, reason=other) == expected, (
                        model,
                        other,
                    )


async def test_passthrough_requests_share_one_endpoint_label() -> None:
    config = make_config(responder_model("A"))
    with trio.fail_after(30):
        async with running(config) as h:
            for path in ("/upstream/A/v1/models", "/upstream/A/props", "/upstream/A/nothing-here"):
                await h.client.get(path)
            samples = await wait_for_sample(
                h, "trio_swap_requests_total", 2, model="A", endpoint="/upstream", status="200"
            )
            labels = {"model": "A", "endpoint": "/upstream", "status": "404"}
            assert value(samples, "trio_swap_requests_total", **labels) == 1
            assert not any(
                "/upstream/A" in dict(labels).get("endpoint", "") for _, labels in samples
            )


async def test_two_servers_in_one_process_count_separately() -> None:
    with trio.fail_after(60):
        async with (
            running(make_config(responder_model("A"))) as first,
            running(make_config(responder_model("A"))) as second,
        ):
            assert (await first.client.post(CHAT, json=chat("A"))).status_code == 200
            await wait_for_sample(first, "trio_swap_model_loads_total", 1, model="A")
            samples = await scrape(second)
            assert value(samples, "trio_swap_model_loads_total", model="A") == 0
            assert value(samples, "trio_swap_swaps_total") == 0


async def test_grafana_dashboard_is_valid_json_and_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs, "the dashboard has no queries"
    used = {name for expr in exprs for name in re.findall(r"\btrio_swap_[a-z_]+", expr)}
    assert used

    config = make_config(responder_model("A"))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            await wait_for_sample(h, "trio_swap_model_loads_total", 1, model="A")
            exported = {name for name, _ in await scrape(h)}
    assert used <= exported, f"not exported: {sorted(used - exported)}"
