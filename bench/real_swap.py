"""Swap time between two tiny real llama-server models through trio-swap.

Usage (from the repository root, after ``just test-real`` built llama-server once)::

    .venv/bin/python bench/real_swap.py [--swaps 12]

Starts trio-swap (as the real lane does: ``tests/real``) with two tiny random
models that may not run together, then alternates requests between them.
Prints the median time of a request that swaps and of a warm request to the
same model right after it, and the models' own load times from trio-swap's log.
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
from real_support import start_trio_swap  # noqa: E402

MODELS = ("tiny-a", "tiny-b")


def _body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=12)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trio-swap-real-swap-"))
    vocab = tiny_gguf.find_vocab_gguf()
    models = {
        name: tiny_gguf.write_tiny_model(tmp / f"{name}.gguf", seed=seed, vocab_gguf=vocab)
        for seed, name in enumerate(MODELS, start=1)
    }
    server = start_trio_swap(tmp, build_llama_server.ensure_llama_server(), models)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            client.post("/v1/chat/completions", json=_body(MODELS[0])).raise_for_status()
            swaps: list[float] = []
            warm: list[float] = []
            for index in range(args.swaps):
                model = MODELS[(index + 1) % 2]
                for samples in (swaps, warm):
                    start = time.perf_counter()
                    client.post("/v1/chat/completions", json=_body(model)).raise_for_status()
                    samples.append(time.perf_counter() - start)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(15)
        server.kill_everything()
    loads = [line for line in server.log.read_text().splitlines() if "ready in" in line]
    print(
        f"swap request median {statistics.median(swaps) * 1e3:.0f} ms, "
        f"warm request median {statistics.median(warm) * 1e3:.1f} ms; last loads: {loads[-2:]}"
    )


if __name__ == "__main__":
    main()
