"""Cold starts with and without read-ahead, and swaps after idle prefetch, real llama-server.

Usage (from the repository root, after ``just test-real`` built llama-server once)::

    .venv/bin/python bench/readahead.py [--runs 8] [--mib 800]

Writes a random llama of about ``--mib`` MiB (deleted at the end) and a tiny
one, then:

1. one trio-swap (``prefetch: {budget: 0}``: no idle prefetching) with two
   models on the big file, ``ahead`` (read-ahead on start) and ``plain``
   (``prefetch: false``): ``--runs`` cold starts of each, alternating, the
   file's pages dropped (``POSIX_FADV_DONTNEED``) before each; then warm
   starts (the file cached);
2. one trio-swap with default prefetching, ``tiny-a`` running: the big file is
   dropped, idle prefetching reads it back (timed until ``/api/models`` shows
   it all resident: up to one recheck, 5 s), a request to the big model swaps
   to it (timed), then the big model is restarted at once (a warm start in
   the same trio-swap, for comparison).

Prints medians and the ratios to the warm start; the time ``/api/models``
takes and what one residency measurement of the file costs.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "real"), str(ROOT)]  # the real lane's helpers
import build_llama_server  # noqa: E402
import tiny_gguf  # noqa: E402
from big_gguf import write_big_model  # noqa: E402
from readahead_support import (  # noqa: E402
    model_lines,
    start_with_config,
    timed_load,
    unload_all,
)
from real_support import TrioSwapServer  # noqa: E402

from trio_swap.upstream.pagecache import drop, resident_bytes  # noqa: E402
from trio_swap.upstream.residency import measure  # noqa: E402

MIB = 1 << 20


def stop(handle: TrioSwapServer) -> None:
    handle.proc.send_signal(signal.SIGTERM)
    handle.proc.wait(30)
    handle.kill_everything()


def cold(client: httpx.Client, model: str, path: Path) -> float:
    drop(str(path))
    assert resident_bytes(str(path)) == 0, "the page cache cannot be dropped here"
    seconds = timed_load(client, model)
    unload_all(client)
    return seconds


def read_ahead_runs(
    tmp: Path, server: Path, big: Path, runs: int
) -> tuple[list[float], list[float], list[float], list[str]]:
    """(cold with read-ahead, cold without, warm) spawn-to-ready seconds, and the read lines."""
    handle = start_with_config(
        tmp,
        ["prefetch: {budget: 0}"],
        [
            model_lines("ahead", server, big),
            model_lines("plain", server, big, "prefetch: false"),
        ],
        {"ahead": big},
    )
    ahead: list[float] = []
    plain: list[float] = []
    warm: list[float] = []
    try:
        with httpx.Client(base_url=handle.base_url, timeout=120) as client:
            timed_load(client, "plain")  # the first start warms the binary and the libraries
            unload_all(client)
            for index in range(runs):
                order = [("ahead", ahead), ("plain", plain)]
                for model, samples in order if index % 2 == 0 else order[::-1]:
                    samples.append(cold(client, model, big))
            for _ in range(runs):
                warm.append(timed_load(client, "plain"))
                unload_all(client)
    finally:
        stop(handle)
    lines = [line for line in handle.log.read_text().splitlines() if "read ahead" in line]
    return ahead, plain, warm, lines


def prefetch_runs(
    tmp: Path, server: Path, big: Path, tiny: Path, runs: int
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """(seconds until prefetched, big's spawn-to-ready after it, the swap request, big's
    warm restart right after, /api/models)."""
    size = big.stat().st_size
    handle = start_with_config(
        tmp,
        [],
        [model_lines("tiny-a", server, tiny), model_lines("big", server, big)],
        {"tiny-a": tiny, "big": big},
    )
    warmed: list[float] = []
    ready: list[float] = []
    swaps: list[float] = []
    warm: list[float] = []
    listing: list[float] = []
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        with httpx.Client(base_url=handle.base_url, timeout=120) as client:
            for _ in range(runs):
                unload_all(client)
                timed_load(client, "tiny-a")
                drop(str(big))
                started = time.perf_counter()
                while resident_bytes(str(big)) != size:  # the truth, not the row (2 s old)
                    time.sleep(0.02)
                warmed.append(time.perf_counter() - started)
                for _ in range(20):
                    started = time.perf_counter()
                    client.get("/api/models").raise_for_status()
                    listing.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.post("/v1/chat/completions", json=body).raise_for_status()
                swaps.append(time.perf_counter() - started)
                seconds = client.get("/api/models").json()["models"][1]["last_ready_seconds"]
                ready.append(float(seconds))
                unload_all(client)
                warm.append(timed_load(client, "big"))  # the same start, its file just used
    finally:
        stop(handle)
    return warmed, ready, swaps, warm, listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--mib", type=int, default=800)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trio-swap-readahead-"))
    server = build_llama_server.ensure_llama_server()
    big = write_big_model(tmp / "big.gguf", mib=args.mib)
    tiny = tiny_gguf.write_tiny_model(tmp / "tiny-a.gguf", seed=1)
    size = big.stat().st_size
    try:
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        ahead, plain, warm, lines = read_ahead_runs(tmp / "a", server, big, args.runs)
        warmed, ready, swaps, rewarm, listing = prefetch_runs(
            tmp / "b", server, big, tiny, args.runs
        )
        started = time.perf_counter()
        measure([str(big)])
        measuring = time.perf_counter() - started
    finally:
        big.unlink(missing_ok=True)
    w = statistics.median(warm)
    print(f"model file {size / MIB:.0f} MiB, {args.runs} runs each, medians (min-max):")

    def show(name: str, samples: list[float]) -> None:
        median = statistics.median(samples)
        print(
            f"  {name:<38} {median:6.3f} s ({min(samples):.3f}-{max(samples):.3f})"
            f"  {median / w:4.2f}x warm"
        )

    show("cold start, no read-ahead", plain)
    show("cold start, read-ahead", ahead)
    show("warm start (file cached)", warm)
    show("start after idle prefetch", ready)
    show("warm restart right after it", rewarm)
    show("swap request to it (tiny-a running)", swaps)
    print(
        f"  read-ahead / no read-ahead: {statistics.median(ahead) / statistics.median(plain):.2f}"
        f"; idle prefetch of the dropped file took {statistics.median(warmed):.2f} s"
    )
    print(f"  last read-ahead: {lines[-1] if lines else '-'}")
    print(
        f"  GET /api/models median {statistics.median(listing) * 1e3:.1f} ms; one residency "
        f"measurement of the file {measuring * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
