"""Swap time by sleep and wake against stop and cold start, with the responder's delays.

Usage (from the repository root)::

    .venv/bin/python bench/sleep.py [--swaps 10] [--startup-delay 2] [--wake-delay 0.2]

Two responder models speaking vLLM's sleep API that may not run together (one
at a time), each starting in ``--startup-delay`` seconds (a process start and a
weight load) and waking in ``--wake-delay`` seconds. The same alternating
requests run twice, with ``sleep: vllm`` and without it; the table shows the
median time of a request that swaps, and how many processes were started.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from procs import ProcessSet, TrioSwap, free_ports


def config(path: Path, ports: list[int], args: argparse.Namespace, *, sleep: bool) -> Path:
    lines = ["logToStdout: none", "models:"]
    for name, port in zip(("a", "b"), ports, strict=True):
        cmd = [sys.executable, "-m", "trio_swap", "responder", "--port", str(port)]
        cmd += ["--model", name, "--sleep-api", "vllm", "--startup-delay", str(args.startup_delay)]
        cmd += ["--wake-delay", str(args.wake_delay)]
        lines += [f"  {name}:", f"    cmd: {' '.join(cmd)}", f"    proxy: http://127.0.0.1:{port}"]
        if sleep:
            lines.append("    sleep: vllm")
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args: argparse.Namespace, *, sleep: bool) -> tuple[float, int]:
    processes = ProcessSet()
    with tempfile.TemporaryDirectory() as tmp:
        ports = free_ports(3)
        path = config(Path(tmp) / "config.yaml", ports[:2], args, sleep=sleep)
        try:
            return _swaps(processes, path, ports[2], Path(tmp) / "trio-swap.log", args)
        finally:
            processes.kill_all()


def _swaps(
    processes: ProcessSet, path: Path, port: int, log: Path, args: argparse.Namespace
) -> tuple[float, int]:
    TrioSwap(processes, config=path, port=port, log=log)
    swaps: list[float] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        client.post("/v1/chat/completions", json={**body, "model": "a"}).raise_for_status()
        client.post("/v1/chat/completions", json={**body, "model": "b"}).raise_for_status()
        for index in range(args.swaps):
            model = "ab"[index % 2]
            start = time.perf_counter()
            answer = client.post("/v1/chat/completions", json={**body, "model": model})
            answer.raise_for_status()
            swaps.append(time.perf_counter() - start)
        rows = client.get("/api/models").json()["models"]
    return statistics.median(swaps), sum(int(row["start_count"]) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--startup-delay", type=float, default=2.0)
    parser.add_argument("--wake-delay", type=float, default=0.2)
    args = parser.parse_args()
    stopped, stop_starts = run(args, sleep=False)
    slept, sleep_starts = run(args, sleep=True)
    print(
        f"`bench/sleep.py --swaps {args.swaps} --startup-delay {args.startup_delay:g} "
        f"--wake-delay {args.wake_delay:g}`\n"
    )
    print("| swap by | median request that swaps | processes started | ratio |")
    print("| --- | --: | --: | --: |")
    print(f"| stop + cold start | {stopped * 1e3:.0f} ms | {stop_starts} | 1.00 |")
    print(f"| sleep + wake | {slept * 1e3:.0f} ms | {sleep_starts} | {slept / stopped:.2f} |")


if __name__ == "__main__":
    main()
