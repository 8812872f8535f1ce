"""Figure 5 of DESIGN.md "How we measure": time to ready, cold start and swap.

Process start-up (Python imports) varies by tens of milliseconds from one
process to the next on a shared machine, more than the +30 ms target. So
besides comparing medians of separate starts, every model command is wrapped
by :func:`procs.stamped`, and each start through trio-swap is split on the
*same* process into what trio-swap added and the upstream's own
exec-to-healthy time (seen by our own 1 ms ``/health`` poller).
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from common import (
    COLD_DELTA_MS,
    HEALTH_POLL_S,
    READINESS_MS,
    Bench,
    Row,
    check_status,
    ms,
    signed_ms,
    timed,
)
from procs import (
    LOAD_DELAY,
    ProcessSet,
    cpu_seconds,
    model_options,
    read_stamp,
    responder_argv,
    stamp_file,
    stamped,
)
from rawhttp import Connection, ResponseReader, chat_request, get_request

__all__ = ["cold_start"]


def _poll_health(probe: Connection | None, port: int) -> tuple[Connection | None, bool]:
    """One ``GET /health``: (the connection to reuse, whether it answered 200)."""
    reader = ResponseReader()
    try:
        if probe is None:
            probe = Connection(port, timeout=5)
        return probe, probe.exchange(get_request(port, "/health"), reader).status == 200
    except OSError:  # not listening yet, or it closed the connection
        if probe is not None:
            probe.close()
        return None, False


@dataclass
class _Starts:
    """Samples of one kind of start, one entry per repeat (seconds).

    ``direct_*``: the responder spawned by us; ``lag``: spawn call to exec
    stamp; ``own``: exec stamp to the first 200 our 1 ms poller saw. Proxied:
    ``total``: request sent to response, minus a warm request; ``overhead``:
    ``total`` minus the same process's ``own`` (and, in a swap, minus the
    victim's ``victim_stop``), i.e. everything trio-swap added;
    ``detection``: response minus warm minus the first 200.
    """

    direct_total: list[float] = field(default_factory=list)
    direct_lag: list[float] = field(default_factory=list)
    direct_own: list[float] = field(default_factory=list)
    direct_stop: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    own: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    detection: list[float] = field(default_factory=list)
    swap_cpu: list[float] = field(default_factory=list)  # trio-swap's share of a core meanwhile
    victim_stop: list[float] = field(default_factory=list)  # swap request sent to victim's exit
    lag: list[float] = field(default_factory=list)  # request sent to the exec stamp


def _direct_start(bench: Bench, model: str, starts: _Starts | None) -> None:
    """Spawn ``model``'s responder ourselves: time to healthy (1 ms polls) and SIGTERM to exit."""
    port = bench.ports.direct
    stamp = stamp_file(bench.workdir, "direct")
    argv = stamped(responder_argv(port, "direct", *model_options(model)), stamp)
    probe: Connection | None = None
    start = time.time()
    popen = bench.processes.spawn(argv)
    try:
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"direct responder exited with {popen.returncode}")
            if time.time() - start > 30:
                raise TimeoutError("direct responder not healthy after 30 s")
            probe, healthy = _poll_health(probe, port)
            if healthy:
                healthy_at = time.time()
                break
            time.sleep(HEALTH_POLL_S)
        assert probe is not None
        # Leave one served keep-alive connection open, as a proxy's pool does:
        # the upstream's shutdown then has a connection to close, as in a swap.
        check_status(
            probe.exchange(chat_request(port, model="direct", max_tokens=1), ResponseReader()),
            "direct request",
        )
        pidfd = os.pidfd_open(popen.pid)  # exact exit time; Popen.wait(timeout) polls
        try:
            stopping = time.time()
            popen.send_signal(signal.SIGTERM)
            if not select.select([pidfd], [], [], 30.0)[0]:
                raise TimeoutError("direct responder still running 30 s after SIGTERM")
            stopped = time.time() - stopping
        finally:
            os.close(pidfd)
    finally:
        if probe is not None:
            probe.close()
        ProcessSet.kill(popen)
    if starts is not None:
        exec_at = read_stamp(stamp)
        starts.direct_total.append(healthy_at - start)
        starts.direct_lag.append(exec_at - start)
        starts.direct_own.append(healthy_at - exec_at)
        starts.direct_stop.append(stopped)


def _proxied_start(
    bench: Bench, conn: Connection, model: str, starts: _Starts, *, victim: str | None = None
) -> None:
    """A request that makes trio-swap start ``model``, while we poll the new upstream ourselves.

    The request and our 1 ms ``/health`` poller run in one loop (``select``
    on the request's socket between polls), so the first 200 and the answer
    are timed on the same process start as the exec stamp. For a swap, the
    running ``victim`` model's exit is watched through a pidfd too, and its
    shutdown (request sent to exit) is not counted as trio-swap's time.
    """
    port = getattr(bench.ports, model)
    sock = conn.sock
    reader = ResponseReader()
    probe: Connection | None = None
    healthy_at: float | None = None
    victim_fd: int | None = None
    victim_gone: float | None = None
    if victim is not None:
        victim_fd = os.pidfd_open(int(str(bench.swap.models()[victim]["pid"])))
    cpu_before = cpu_seconds(bench.swap.pid)
    start = time.time()
    sock.sendall(chat_request(conn.port, model=model, max_tokens=1))
    try:
        while True:
            if healthy_at is None:
                probe, healthy = _poll_health(probe, port)
                if healthy:
                    healthy_at = time.time()
            wait = HEALTH_POLL_S if healthy_at is None else 30.0
            watched = [sock.fileno()]
            if victim_fd is not None and victim_gone is None:
                watched.append(victim_fd)
            ready = select.select(watched, [], [], wait)[0]
            if victim_fd is not None and victim_fd in ready:
                victim_gone = time.time()
            if sock.fileno() in ready:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError(f"trio-swap closed the request for {model}")
                if reader.feed(data):
                    answered_at = time.time()
                    starts.swap_cpu.append(
                        (cpu_seconds(bench.swap.pid) - cpu_before) / (answered_at - start)
                    )
                    break
            if time.time() - start > 60:
                raise TimeoutError(f"request for {model} unanswered after 60 s")
    finally:
        if probe is not None:
            probe.close()
        if victim_fd is not None:
            os.close(victim_fd)
    check_status(reader, f"request for {model}")
    warm = statistics.median(
        timed(conn, chat_request(conn.port, model=model, max_tokens=1), 15, "warm")
    )
    total = answered_at - start - warm
    starts.total.append(total)
    if healthy_at is None:  # the answer beat our poller: no split for this sample
        return
    exec_at = read_stamp(stamp_file(bench.workdir, model))
    own = healthy_at - exec_at
    starts.lag.append(exec_at - start)
    upstreams = own  # the time the upstreams themselves took
    if victim is not None:
        if victim_gone is None:
            raise RuntimeError(f"swap to {model} answered but {victim} still runs")
        starts.victim_stop.append(victim_gone - start)
        upstreams += victim_gone - start
    starts.own.append(own)
    starts.overhead.append(total - upstreams)
    starts.detection.append(answered_at - warm - healthy_at)


def _spread(samples: Sequence[float]) -> str:
    return f"{ms(min(samples))} .. {ms(max(samples))}" if samples else "no samples"


def cold_start(bench: Bench) -> list[Row]:
    """Cold start, swap and readiness detection against the responder's own start time.

    Per repeat, direct and proxied run back to back, so slow spells hit both:
    (a) we spawn the responder, poll ``/health`` every 1 ms, SIGTERM it and
    time its exit; (b) unload all, then a request for the cold model through
    trio-swap, timed while we poll the new upstream ourselves; (c) a request
    for another model: a swap (stop one, start the other). Every command is
    :func:`~procs.stamped`, so (b) and (c) split into what trio-swap added and
    the upstream's own exec-to-healthy time *on the same process*, free of the
    process-to-process spread of Python start-up. The ``--load-delay``
    variant stages an upstream that answers 503 while "loading".
    """
    swap = bench.swap
    _direct_start(bench, "cold", None)  # warm the page cache
    plain, swapped, loading = _Starts(), _Starts(), _Starts()
    for _ in range(bench.plan.cold_repeats):
        _direct_start(bench, "cold", plain)
        swap.unload()
        with Connection(swap.port) as conn:
            _proxied_start(bench, conn, "cold", plain)
            _proxied_start(bench, conn, "bench", swapped, victim="cold")
        _direct_start(bench, "loading", loading)
        swap.unload()
        with Connection(swap.port) as conn:
            _proxied_start(bench, conn, "loading", loading)
    med = statistics.median
    bench.notes.append(
        f"time to ready, {bench.plan.cold_repeats} repeats, spread (min .. max) of "
        f"spawn-to-healthy: direct {_spread(plain.direct_total)}, "
        f"--load-delay {_spread(loading.direct_total)}; through trio-swap, request - warm: "
        f"cold {_spread(plain.total)}, swap {_spread(swapped.total)}, "
        f"--load-delay {_spread(loading.total)}"
    )
    bench.notes.append(
        "upstream's own exec-to-healthy, median: "
        f"{ms(med(plain.direct_own))} spawned by us, {ms(med(plain.own))} by trio-swap; "
        f"spawn-to-exec (sh + date) {ms(med(plain.direct_lag))} by us, request-to-exec "
        f"{ms(med(plain.lag))} through trio-swap; "
        f"responder exit after our SIGTERM {ms(med(plain.direct_stop))}, in a swap "
        f"(request to the victim's exit) {ms(med(swapped.victim_stop))}; trio-swap's CPU "
        f"during a cold start {med(plain.swap_cpu):.0%} of a core (spawn, probes, log pump)"
    )
    rows: list[Row] = []

    def add(figure: str, ours: list[float], theirs: list[float], target_ms: float) -> None:
        if not ours or not theirs:
            bench.notes.append(f"{figure}: no samples")
            return
        delta = med(ours) - med(theirs)
        rows.append(
            Row(
                figure,
                ms(med(theirs)),
                ms(med(ours)),
                signed_ms(delta),
                f"≤ +{target_ms:g} ms",
                delta * 1000 <= target_ms,
                {"direct_s": med(theirs), "proxied_s": med(ours), "delta_s": delta},
            )
        )

    add(
        "5. cold start: request - warm vs our spawn-to-healthy (medians)",
        plain.total,
        plain.direct_total,
        COLD_DELTA_MS,
    )
    add(
        "5. cold start, same process: added time vs our spawn-to-exec",
        plain.overhead,
        plain.direct_lag,
        COLD_DELTA_MS,
    )
    add(
        "5. swap, same processes: added beyond the victim's exit, vs our spawn-to-exec",
        swapped.overhead,
        plain.direct_lag,
        COLD_DELTA_MS,
    )
    add(
        f"5. cold start --load-delay {LOAD_DELAY:g}, same process: added vs spawn-to-exec",
        loading.overhead,
        loading.direct_lag,
        COLD_DELTA_MS,
    )
    for figure, samples in (
        ("5. readiness detected after the upstream's first 200", plain.detection),
        (f"5. readiness detected, --load-delay {LOAD_DELAY:g} (503, then 200)", loading.detection),
    ):
        if not samples:
            bench.notes.append(f"{figure}: no samples (answers beat our poller)")
            continue
        rows.append(
            Row(
                figure,
                "first 200 at 0",
                ms(med(samples)),
                f"max {ms(max(samples))}",
                f"≤ {READINESS_MS:g} ms",
                med(samples) * 1000 <= READINESS_MS,
                {"detection_s": med(samples), "detection_max_s": max(samples)},
            )
        )
    return rows
