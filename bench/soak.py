"""Soak: many clients streaming from mutually exclusive real llama-server models.

Usage (from the repository root, after ``just test-real`` built llama-server once)::

    .venv/bin/python bench/soak.py [--seconds 90] [--clients 12] [--models 3]

Starts trio-swap (as the real lane does: ``tests/real``) with tiny random
models that may not run together (no groups: one at a time), then lets
``--clients`` threads stream short chat completions for ``--seconds``, each
picking a model at random, so nearly every few requests swap. Reports every
status (a 502 is a request sent on a connection the upstream had dropped), the
streams completed, and trio-swap's TCP sockets to the models' ports before the
run and after unloading everything (a socket left there sits in CLOSE-WAIT to
a stopped server). Run it against an older checkout with ``PYTHONPATH=<old>/src``
to compare (trio-swap is started with the same interpreter and environment).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "real"), str(ROOT)]  # the real lane's helpers
import build_llama_server  # noqa: E402
import tiny_gguf  # noqa: E402
from real_support import start_trio_swap  # noqa: E402


def sockets_to(pid: int, ports: set[int]) -> int:
    """``pid``'s TCP sockets whose remote port is one of ``ports``, any state (from /proc)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) in ports:
                    inodes.add(fields[9])
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                count += link.startswith("socket:[") and link[8:-1] in inodes
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trio-swap-soak-"))
    vocab = tiny_gguf.find_vocab_gguf()
    names = [f"tiny-{chr(ord('a') + i)}" for i in range(args.models)]
    models = {
        name: tiny_gguf.write_tiny_model(tmp / f"{name}.gguf", seed=seed, vocab_gguf=vocab)
        for seed, name in enumerate(names, start=1)
    }
    server = start_trio_swap(tmp, build_llama_server.ensure_llama_server(), models)
    statuses: collections.Counter[str] = collections.Counter()
    streams = 0
    errors: list[str] = []
    lock = threading.Lock()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as admin:
            rows = admin.get("/api/models").json()["models"]
            ports = {int(row["port"]) for row in rows}
            before = sockets_to(server.proc.pid, ports)
            deadline = time.monotonic() + args.seconds

            def client(index: int) -> None:
                nonlocal streams
                rng = random.Random(args.seed * 1000 + index)
                with httpx.Client(base_url=server.base_url, timeout=120) as http:
                    while time.monotonic() < deadline:
                        body = {
                            "model": rng.choice(names),
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 8,
                            "stream": True,
                        }
                        try:
                            with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                                text = b"".join(reply.iter_bytes())
                                key = str(reply.status_code)
                                if reply.status_code == 200 and b"[DONE]" not in text:
                                    key = "200 without [DONE]"
                                if reply.status_code >= 500:
                                    with lock:
                                        errors.append(text[:300].decode(errors="replace"))
                        except httpx.HTTPError as exc:
                            key = f"client error {type(exc).__name__}"
                        with lock:
                            statuses[key] += 1
                            streams += key == "200"

            threads = [
                threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            admin.post("/api/models/unload").raise_for_status()
            time.sleep(1.5)  # one sweep of idle connections
            after = sockets_to(server.proc.pid, ports)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(15)
        server.kill_everything()
    swaps = sum(1 for line in server.log.read_text().splitlines() if "ready in" in line)
    print(
        f"{args.seconds:g} s, {args.clients} clients, {args.models} models: "
        f"{streams} streams completed, statuses {dict(sorted(statuses.items()))}, "
        f"{swaps} loads; trio-swap's sockets to model ports: {before} before, "
        f"{after} after unloading"
    )
    for error in errors[:5]:
        print("  " + error)


if __name__ == "__main__":
    main()
