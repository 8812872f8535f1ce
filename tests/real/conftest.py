"""Fixtures for the real-backend lane: a real llama-server behind a real trio-swap.

Synchronous and session-scoped where it is expensive (the llama-server build,
the tiny models), per-test where state matters: each test gets a fresh
trio-swap process, so no test sees another's upstreams.
Run with ``pytest -m real tests/real``; the default test run deselects it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the helpers are scripts, not a package
    sys.path.insert(0, str(HERE))

import build_llama_server  # noqa: E402
import tiny_gguf  # noqa: E402
from real_support import TrioSwapServer, start_trio_swap  # noqa: E402

MODEL_IDS = ("tiny-a", "tiny-b")


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The llama-server binary; the first run builds it (minutes), later runs reuse it."""
    return build_llama_server.ensure_llama_server()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny random models, keyed by model id."""
    out = tmp_path_factory.mktemp("tiny-models")
    vocab = tiny_gguf.find_vocab_gguf()
    return {
        model_id: tiny_gguf.write_tiny_model(out / f"{model_id}.gguf", seed=seed, vocab_gguf=vocab)
        for seed, model_id in enumerate(MODEL_IDS, start=1)
    }


@pytest.fixture
def trio_swap(
    tmp_path: Path, llama_server_bin: Path, tiny_models: dict[str, Path]
) -> Iterator[TrioSwapServer]:
    """A fresh trio-swap serving tiny-a and tiny-b; always torn down, group and all."""
    handle = start_trio_swap(tmp_path, llama_server_bin, tiny_models)
    try:
        yield handle
    finally:
        if handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.proc.wait(timeout=15)
        handle.kill_everything()
