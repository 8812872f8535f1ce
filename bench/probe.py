"""The readiness probe's HTTP stack: h11 on a fresh connection vs httpx with a pool.

Usage (from the repository root)::

    .venv/bin/python bench/probe.py [--count 2000]

Starts one responder and times ``count`` health probes each way, alternating
in rounds: trio-swap's probe (``upstream/probe.py``: dial, one ``GET`` with
``Connection: close``, hang up) and the httpx client it replaced (a pooled
keep-alive connection). Prints the median and p90 per probe and the CPU
seconds each side used. The probe runs every 10 ms while a model loads, so
what matters is that it is no slower than the interval by a margin, and
that it leaves no idle connection behind (which the pooled one did).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import httpx
import trio

sys.path.insert(0, os.path.dirname(__file__))
from procs import free_ports, responder_argv
from trio_swap.config.address import Upstream
from trio_swap.upstream.probe import http_health_probe


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(url: str, count: int) -> dict[str, tuple[list[float], float]]:
    upstream = Upstream(url)
    results: dict[str, tuple[list[float], float]] = {"h11": ([], 0.0), "httpx": ([], 0.0)}
    async with httpx.AsyncClient() as client:
        while not await http_health_probe(upstream, "/health", timeout=5):
            await trio.sleep(0.01)
        rounds = 20
        for _ in range(rounds):
            for name in ("h11", "httpx"):
                samples, cpu = results[name]
                before = _cpu()
                for _ in range(count // rounds):
                    start = time.perf_counter()
                    if name == "h11":
                        ok = await http_health_probe(upstream, "/health", timeout=5)
                    else:
                        ok = (await client.get(url + "/health", timeout=5)).status_code == 200
                    samples.append(time.perf_counter() - start)
                    assert ok
                results[name] = (samples, cpu + _cpu() - before)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    (port,) = free_ports(1)
    proc = subprocess.Popen(responder_argv(port, "probe"), stdout=subprocess.DEVNULL)
    try:
        results = trio.run(_measure, f"http://127.0.0.1:{port}", args.count)
    finally:
        proc.terminate()
        proc.wait()
    print("| probe | median | p90 | CPU per probe |")
    print("| --- | --- | --- | --- |")
    for name, (samples, cpu) in results.items():
        samples.sort()
        p90 = samples[int(len(samples) * 0.9)]
        print(
            f"| {name} | {statistics.median(samples) * 1e3:.3f} ms | {p90 * 1e3:.3f} ms "
            f"| {cpu / len(samples) * 1e6:.0f} µs |"
        )


if __name__ == "__main__":
    main()
