"""What each hop in front of a model adds: trio-swap, a trio-swap peer, LiteLLM.

Usage (from the repository root)::

    .venv/bin/python bench/hops.py               # about a minute, LiteLLM's start included
    .venv/bin/python bench/hops.py --requests 100 --rounds 2

The same responder model is asked on one keep-alive connection per path:

* direct: the responder itself;
* trio-swap: one trio-swap in front of it (the node);
* peer: a second trio-swap whose ``peers:`` entry points at the node;
* LiteLLM: LiteLLM's proxy on the config ``trio-swap gateway-config`` printed
  for the node (needs ``pip install -e '.[gateway]'``; skipped without it).

Each round sends ``--requests`` small requests (``max_tokens: 1``) down each
path in turn, then as many short streams (4 tokens). Printed: the median and
p90 of each path, and what each hop adds (the difference of the medians). One
run on one machine: compare the rows with each other, not with another run.
Progress goes to stderr; the table (markdown) to stdout (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from common import ms, quantile, signed_ms
from procs import ProcessSet, TrioSwap, free_ports, responder_argv
from rawhttp import Connection, ResponseReader

MASTER_KEY: Final = "sk-bench-hops"
LITELLM_STARTUP: Final = 180.0
WARMUP: Final = 30


@dataclass
class Route:
    """One way to the model: where to connect, what to send, what it took."""

    name: str
    port: int
    model: str
    key: str | None = None
    small: list[float] = field(default_factory=list)  # seconds per request
    first_token: list[float] = field(default_factory=list)  # seconds to the first event


def chat(port: int, model: str, key: str | None, *, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4 if stream else 1,
            "stream": stream,
        }
    ).encode()
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def measure(path: Route, count: int, *, stream: bool) -> None:
    request = chat(path.port, path.model, path.key, stream=stream)
    reader = ResponseReader(count_events=stream)
    clock = time.perf_counter
    with Connection(path.port, timeout=60) as conn:
        for _ in range(WARMUP):
            conn.exchange(request, reader)
        for _ in range(count):
            start = clock()
            conn.exchange(request, reader)
            if reader.status != 200:
                raise RuntimeError(f"{path.name}: HTTP {reader.status}")
            if stream:
                assert reader.first_event_at is not None, f"{path.name}: no event"
                path.first_token.append(reader.first_event_at - start)
            else:
                path.small.append(clock() - start)


def write_node_config(directory: Path, model_port: int) -> Path:
    argv = responder_argv(model_port, "bench", "--token-delay", "0")
    config = directory / "node.yaml"
    config.write_text(
        "logToStdout: none\nmodels:\n  bench:\n"
        f"    cmd: {json.dumps(shlex.join(argv))}\n"
        f"    proxy: http://127.0.0.1:{model_port}\n"
        "    concurrencyLimit: 128\n"
    )
    return config


def write_front_config(directory: Path, node_port: int, spare_port: int) -> Path:
    """A front door with the node as a peer (and one local model, never started)."""
    argv = responder_argv(spare_port, "local")
    config = directory / "front.yaml"
    config.write_text(
        "logToStdout: none\nmodels:\n  local:\n"
        f"    cmd: {json.dumps(shlex.join(argv))}\n"
        f"    proxy: http://127.0.0.1:{spare_port}\n"
        f"peers:\n  node:\n    proxy: http://127.0.0.1:{node_port}\n    models: [bench]\n"
    )
    return config


def start_litellm(
    processes: ProcessSet, directory: Path, node_port: int, port: int
) -> Route | None:
    litellm = Path(sys.executable).with_name("litellm")
    if not litellm.exists():
        print(
            "LiteLLM is not installed (pip install -e '.[gateway]'): no LiteLLM row",
            file=sys.stderr,
        )
        return None
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_swap",
            "gateway-config",
            "--node",
            f"http://127.0.0.1:{node_port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    config = directory / "litellm.yaml"
    config.write_text(generated.stdout)
    os.environ.update(LITELLM_MASTER_KEY=MASTER_KEY, LITELLM_LOCAL_MODEL_COST_MAP="True")
    argv = [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    popen = processes.spawn(argv, log=directory / "litellm.log")
    deadline = time.monotonic() + LITELLM_STARTUP
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"LiteLLM exited; see {directory / 'litellm.log'}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/health/readiness")
                if conn.getresponse().status == 200:
                    return Route("LiteLLM", port, "bench", MASTER_KEY)
            finally:
                conn.close()
        time.sleep(0.2)
    raise TimeoutError("LiteLLM did not start")


def report(paths: Sequence[Route], args: argparse.Namespace) -> str:
    by_name = {p.name: p for p in paths}
    lines = [
        f"hops: {args.requests} requests x {args.rounds} rounds per path, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs",
        "",
        "| path | small request, median | p90 | stream, first token, median | p90 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in paths:
        lines.append(
            f"| {p.name} | {ms(quantile(p.small, 0.5))} | {ms(quantile(p.small, 0.9))} "
            f"| {ms(quantile(p.first_token, 0.5))} | {ms(quantile(p.first_token, 0.9))} |"
        )
    lines += ["", "| hop | adds (small request) | adds (first token) |", "| --- | --- | --- |"]
    hops = [("trio-swap", "direct", "trio-swap"), ("peer", "trio-swap", "trio-swap peer hop")]
    hops.append(("LiteLLM", "trio-swap", "LiteLLM"))
    for name, base, label in hops:
        if name in by_name:
            over, under = by_name[name], by_name[base]
            small = quantile(over.small, 0.5) - quantile(under.small, 0.5)
            first = quantile(over.first_token, 0.5) - quantile(under.first_token, 0.5)
            lines.append(f"| {label} | {signed_ms(small)} | {signed_ms(first)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM row")
    args = parser.parse_args(argv)
    processes = ProcessSet()
    with tempfile.TemporaryDirectory(prefix="trio-swap-hops-") as tmp:
        directory = Path(tmp)
        direct_port, model_port, spare, node_port, front_port, gw_port = free_ports(6)
        try:
            print("starting the responder, the node and the front door", file=sys.stderr)
            processes.spawn(responder_argv(direct_port, "bench", "--token-delay", "0"))
            node = TrioSwap(
                processes,
                config=write_node_config(directory, model_port),
                port=node_port,
                log=directory / "node.log",
            )
            node.load("bench")
            TrioSwap(
                processes,
                config=write_front_config(directory, node_port, spare),
                port=front_port,
                log=directory / "front.log",
            )
            paths = [
                Route("direct", direct_port, "bench"),
                Route("trio-swap", node_port, "bench"),
                Route("peer", front_port, "node/bench"),
            ]
            if not args.no_litellm:
                print("starting LiteLLM (15-20 s of imports)", file=sys.stderr)
                gateway = start_litellm(processes, directory, node_port, gw_port)
                if gateway is not None:
                    paths.append(gateway)
            _wait_direct(direct_port)
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
                for path in paths:
                    measure(path, args.requests, stream=False)
                    measure(path, args.requests, stream=True)
            node.stop()
        finally:
            processes.kill_all()
    print(report(paths, args))
    return 0


def _wait_direct(port: int) -> None:
    """The directly spawned responder listens (the node's own was loaded by a request)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), Connection(port, timeout=5):
            return
        time.sleep(0.02)
    raise TimeoutError("the direct responder did not start")


if __name__ == "__main__":
    sys.exit(main())
