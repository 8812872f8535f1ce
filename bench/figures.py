"""Figures 1-4 and 6 of DESIGN.md "How we measure": trio-swap vs the same responder called directly.

Every function measures both sides in the same run, alternating them in
rounds where it can, so a noisy neighbour on the shared machine hits both
sides alike; the verdicts use the ratio or the difference, never an absolute
time of one side. Each returns table rows and appends free-text observations
(CPU split, event counts) to ``Bench.notes``. Figure 5 lives in ``startup.py``.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from common import (
    ADDED_P50_MS,
    CONNECTIONS,
    IDLE_RSS_MB,
    PACED_RATIO,
    RPS_32,
    SSE_EVENTS_PER_S,
    STREAMS,
    Bench,
    Row,
    check_status,
    ms,
    quantile,
    rate,
    signed_ms,
    timed,
)
from procs import cpu_seconds, memory_kib, model_options
from rawhttp import (
    Connection,
    LoadResult,
    ResponseReader,
    chat_request,
    closed_loop,
    run_streams,
)

__all__ = [
    "bulk_stream",
    "idle_memory",
    "latency",
    "paced_streams",
    "throughput",
    "wrk_crosscheck",
]


def _note_reconnects(bench: Bench, figure: str, direct: int, proxied: int) -> None:
    if direct or proxied:
        bench.notes.append(
            f"{figure}: the server closed keep-alive connections (Connection: close) "
            f"{direct} times direct, {proxied} times proxied; each cost a reconnect"
        )


# -- 1. small non-streaming request, one connection ---------------------------


def latency(bench: Bench) -> list[Row]:
    """p50/p99 of a ``max_tokens: 1`` chat request on one keep-alive connection."""
    bench.swap.load("bench")
    plan = bench.plan
    port_d, port_p = bench.ports.bench, bench.swap.port
    req_d = chat_request(port_d, model="bench", max_tokens=1)
    req_p = chat_request(port_p, model="bench", max_tokens=1)
    direct: list[float] = []
    proxied: list[float] = []
    with Connection(port_d) as conn_d, Connection(port_p) as conn_p:
        timed(conn_d, req_d, 200, "direct warm-up")
        timed(conn_p, req_p, 200, "proxied warm-up")
        for _ in range(plan.latency_rounds):
            direct += timed(conn_d, req_d, plan.latency_requests, "direct")
            proxied += timed(conn_p, req_p, plan.latency_requests, "proxied")
        _note_reconnects(bench, "1 conn", conn_d.reconnects, conn_p.reconnects)
    p50_d, p50_p = quantile(direct, 0.5), quantile(proxied, 0.5)
    p99_d, p99_p = quantile(direct, 0.99), quantile(proxied, 0.99)
    added = p50_p - p50_d
    return [
        Row(
            f"1. small request, 1 conn: p50 latency ({len(direct)} req/side)",
            ms(p50_d),
            ms(p50_p),
            f"{signed_ms(added)} added",
            f"≤ +{ADDED_P50_MS:g} ms added",
            added * 1000 <= ADDED_P50_MS,
            {"p50_direct_s": p50_d, "p50_proxied_s": p50_p, "added_p50_s": added},
        ),
        Row(
            "1. small request, 1 conn: p99 latency",
            ms(p99_d),
            ms(p99_p),
            f"{signed_ms(p99_p - p99_d)} added",
            "(info)",
            None,
            {"p99_direct_s": p99_d, "p99_proxied_s": p99_p},
        ),
    ]


# -- 2. small non-streaming request, 32 connections ----------------------------


def _cpu_split(pids: dict[str, int], run: Callable[[], LoadResult]) -> tuple[LoadResult, str]:
    """Run ``run`` and say what share of a core each process used meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = run()
    shares = {
        name: (cpu_seconds(pid) - before[name]) / result.elapsed for name, pid in pids.items()
    }
    shares["client"] = result.client_cpu / result.elapsed
    return result, ", ".join(f"{name} {share:.0%}" for name, share in shares.items())


def throughput(bench: Bench) -> list[Row]:
    """Requests/s with 32 connections in a closed loop, alternating sides per round."""
    bench.swap.load("bench")
    plan = bench.plan
    port_d, port_p = bench.ports.bench, bench.swap.port
    req_d = chat_request(port_d, model="bench", max_tokens=1)
    req_p = chat_request(port_p, model="bench", max_tokens=1)
    responder_pid = int(str(bench.swap.models()["bench"]["pid"]))
    pids = {"trio-swap": bench.swap.pid, "responder": responder_pid}
    closed_loop(port_d, req_d, connections=CONNECTIONS, duration=0.5)  # warm-up
    closed_loop(port_p, req_p, connections=CONNECTIONS, duration=0.5)
    direct: list[LoadResult] = []
    proxied: list[LoadResult] = []
    split_d = split_p = ""
    for _ in range(plan.load_rounds):
        result, split_d = _cpu_split(
            pids,
            lambda: closed_loop(port_d, req_d, connections=CONNECTIONS, duration=plan.load_seconds),
        )
        direct.append(result)
        result, split_p = _cpu_split(
            pids,
            lambda: closed_loop(port_p, req_p, connections=CONNECTIONS, duration=plan.load_seconds),
        )
        proxied.append(result)
    errors: dict[str, dict[int, int]] = {"direct": {}, "proxied": {}}
    for side, results in (("direct", direct), ("proxied", proxied)):
        for result in results:
            for status, count in result.errors.items():
                errors[side][status] = errors[side].get(status, 0) + count
    rate_d = sum(r.completed for r in direct) / sum(r.elapsed for r in direct)
    rate_p = sum(r.completed for r in proxied) / sum(r.elapsed for r in proxied)
    bench.notes.append(f"32 conns, CPU share of one core, direct run: {split_d}")
    bench.notes.append(f"32 conns, CPU share of one core, proxied run: {split_p}")
    _note_reconnects(
        bench,
        f"{CONNECTIONS} conns",
        sum(r.reconnects for r in direct),
        sum(r.reconnects for r in proxied),
    )
    if errors["direct"] or errors["proxied"]:
        bench.notes.append(f"32 conns: non-200 responses by status (not counted): {errors}")
    return [
        Row(
            f"2. small request, {CONNECTIONS} conns: requests/s",
            rate(rate_d, "req/s"),
            rate(rate_p, "req/s"),
            f"{rate_p / rate_d:.2f}x",
            f"≥ {RPS_32:,.0f} req/s via trio-swap",
            rate_p >= RPS_32,
            {"rps_direct": rate_d, "rps_proxied": rate_p},
        )
    ]


# -- 2b. the same with wrk, when installed -------------------------------------

_WRK_RPS: Final = re.compile(rb"Requests/sec:\s+([\d.]+)")
_WRK_P50: Final = re.compile(rb"\s50%\s+([\d.]+)(us|ms|s)\b")
_WRK_NON_2XX: Final = re.compile(rb"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_UNITS: Final = {b"us": 1e-6, b"ms": 1e-3, b"s": 1.0}


def _wrk(script: Path, port: int, connections: int, seconds: float) -> tuple[float, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    argv += ["-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions"]
    output = subprocess.run(argv, capture_output=True, check=True, timeout=120).stdout
    rps, p50 = _WRK_RPS.search(output), _WRK_P50.search(output)
    if rps is None or p50 is None:
        raise RuntimeError(f"unexpected wrk output:\n{output.decode(errors='replace')}")
    if (bad := _WRK_NON_2XX.search(output)) is not None:
        raise RuntimeError(f"wrk got {int(bad.group(1))} non-2xx responses from port {port}")
    return float(rps.group(1)), float(p50.group(1)) * _WRK_UNITS[p50.group(2)]


def wrk_crosscheck(bench: Bench) -> list[Row]:
    """Figures 1 and 2 again with ``wrk`` (C, one thread), if it is installed.

    The raw-socket client is the reference because CI machines lack wrk; this
    row shows whether that client was a bottleneck (the numbers should agree).
    """
    if shutil.which("wrk") is None:
        bench.notes.append("wrk not installed: cross-check skipped (apt-get install wrk)")
        return []
    bench.swap.load("bench")
    script = bench.workdir / "chat.lua"
    body = '{"model":"bench","messages":[{"role":"user","content":"hello"}],"max_tokens":1}'
    script.write_text(
        f"wrk.method = \"POST\"\nwrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    seconds = bench.plan.load_seconds
    port_d, port_p = bench.ports.bench, bench.swap.port
    _, lat_d = _wrk(script, port_d, 1, seconds)
    _, lat_p = _wrk(script, port_p, 1, seconds)
    rps_d, _ = _wrk(script, port_d, CONNECTIONS, seconds)
    rps_p, _ = _wrk(script, port_p, CONNECTIONS, seconds)
    return [
        Row(
            "1. (wrk) small request, 1 conn: p50 latency",
            ms(lat_d),
            ms(lat_p),
            f"{signed_ms(lat_p - lat_d)} added",
            f"≤ +{ADDED_P50_MS:g} ms added",
            (lat_p - lat_d) * 1000 <= ADDED_P50_MS,
            {"wrk_p50_direct_s": lat_d, "wrk_p50_proxied_s": lat_p},
        ),
        Row(
            f"2. (wrk) small request, {CONNECTIONS} conns: requests/s",
            rate(rps_d, "req/s"),
            rate(rps_p, "req/s"),
            f"{rps_p / rps_d:.2f}x",
            f"≥ {RPS_32:,.0f} req/s via trio-swap",
            rps_p >= RPS_32,
            {"wrk_rps_direct": rps_d, "wrk_rps_proxied": rps_p},
        ),
    ]


# -- 3. one fast bulk SSE stream -----------------------------------------------


def _one_stream(port: int, tokens: int) -> tuple[int, float, int]:
    """Events, seconds and payload bytes of one bulk stream, request sent to last byte."""
    request = chat_request(port, model="bench", max_tokens=tokens, stream=True)
    reader = ResponseReader(count_events=True)
    with Connection(port) as conn:
        start = time.perf_counter()
        conn.exchange(request, reader)
        elapsed = time.perf_counter() - start
    check_status(reader, f"stream on port {port}")
    return reader.events, elapsed, reader.body_bytes


def bulk_stream(bench: Bench) -> list[Row]:
    """SSE events/s relayed for one stream the responder writes as fast as it can."""
    bench.swap.load("bench")
    plan = bench.plan
    port_d, port_p = bench.ports.bench, bench.swap.port
    _one_stream(port_d, 2000)  # warm-up
    _one_stream(port_p, 2000)
    rates_d: list[float] = []
    rates_p: list[float] = []
    counts: set[tuple[int, int]] = set()
    mb_p = 0.0
    for _ in range(plan.bulk_repeats):
        events_d, seconds_d, _ = _one_stream(port_d, plan.bulk_tokens)
        events_p, seconds_p, bytes_p = _one_stream(port_p, plan.bulk_tokens)
        rates_d.append(events_d / seconds_d)
        rates_p.append(events_p / seconds_p)
        mb_p = bytes_p / seconds_p / 1e6
        counts.add((events_d, events_p))
    if any(d != p for d, p in counts):
        bench.notes.append(f"bulk stream: event counts differ direct vs proxied: {counts}")
    rate_d, rate_p = statistics.median(rates_d), statistics.median(rates_p)
    bench.notes.append(
        f"bulk stream: {plan.bulk_tokens:,} tokens, median of {plan.bulk_repeats}; "
        f"proxied payload {mb_p:.1f} MB/s"
    )
    return [
        Row(
            "3. SSE bulk stream (1 stream, token-delay 0): events/s",
            rate(rate_d, "ev/s"),
            rate(rate_p, "ev/s"),
            f"{rate_p / rate_d:.2f}x",
            f"≥ {SSE_EVENTS_PER_S:,.0f} ev/s via trio-swap",
            rate_p >= SSE_EVENTS_PER_S,
            {"events_per_s_direct": rate_d, "events_per_s_proxied": rate_p},
        )
    ]


# -- 4. eight paced streams ------------------------------------------------------


def paced_streams(bench: Bench) -> list[Row]:
    """Aggregate tokens/s of 8 concurrent streams at an LLM-like pace."""
    bench.swap.load("paced")
    plan = bench.plan
    port_d, port_p = bench.ports.paced, bench.swap.port
    req_d = chat_request(port_d, model="paced", max_tokens=plan.paced_tokens, stream=True)
    req_p = chat_request(port_p, model="paced", max_tokens=plan.paced_tokens, stream=True)
    rates_d: list[float] = []
    rates_p: list[float] = []
    ttft_d: list[float] = []
    ttft_p: list[float] = []
    for _ in range(plan.paced_repeats):
        for port, request, rates, ttft in (
            (port_d, req_d, rates_d, ttft_d),
            (port_p, req_p, rates_p, ttft_p),
        ):
            result = run_streams(port, request, streams=STREAMS)
            if any(status != 200 for status in result.statuses):
                raise RuntimeError(f"paced streams on port {port}: {result.statuses}")
            rates.append(result.total_events / result.wall)
            ttft += result.first_event
    rate_d, rate_p = statistics.median(rates_d), statistics.median(rates_p)
    bench.notes.append(
        f"paced streams: {STREAMS} x {plan.paced_tokens} tokens at "
        f"{model_options('paced')[1]} s/token; median first event "
        f"{ms(statistics.median(ttft_d))} direct, {ms(statistics.median(ttft_p))} proxied"
    )
    return [
        Row(
            f"4. {STREAMS} paced streams: aggregate tokens/s",
            rate(rate_d, "tok/s"),
            rate(rate_p, "tok/s"),
            f"{rate_p / rate_d:.3f}x",
            f"≥ {PACED_RATIO}x direct",
            rate_p / rate_d >= PACED_RATIO,
            {"tokens_per_s_direct": rate_d, "tokens_per_s_proxied": rate_p},
        )
    ]


# -- 6. idle memory ------------------------------------------------------------


def idle_memory(bench: Bench, at_start: dict[str, int], guard_kib: int | None) -> list[Row]:
    """VmRSS of the trio-swap process at startup (before any request) and after the runs."""
    bench.swap.unload()
    time.sleep(1.0)
    now = memory_kib(bench.swap.pid)
    bench.notes.append(
        f"trio-swap peak RSS (VmHWM) {now['VmHWM'] / 1024:.1f} MB"
        + (f"; orphan-guard process {guard_kib / 1024:.1f} MB RSS" if guard_kib else "")
    )
    rows = []
    for label, kib in (("after startup", at_start["VmRSS"]), ("after the runs", now["VmRSS"])):
        mb = kib / 1024
        rows.append(
            Row(
                f"6. idle RSS of trio-swap, {label}",
                "—",
                f"{mb:.1f} MB",
                "—",
                f"≤ {IDLE_RSS_MB:g} MB",
                mb <= IDLE_RSS_MB,
                {"rss_mb": mb},
            )
        )
    return rows
