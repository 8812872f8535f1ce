"""Read-ahead and idle prefetch with a real llama-server and a model of several hundred MB.

The tiny models load in milliseconds, so this lane writes one ~850 MB random
llama (``big_gguf.py``, a few seconds) and drops its pages from the page cache
(``POSIX_FADV_DONTNEED``) before each cold start. The numbers are printed (run
with ``-s`` to see them); what is asserted is what must hold on any disk: the
read-ahead ran beside the load and never made it slower, and idle prefetching
leaves the whole file resident and the swap to it as fast as a warm start.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from big_gguf import write_big_model
from readahead_support import (
    model_lines,
    resident,
    start_with_config,
    timed_load,
    unload_all,
)
from real_support import TrioSwapServer

from trio_swap.upstream.pagecache import drop, resident_bytes

pytestmark = pytest.mark.real

#: Cold starts timed per variant (alternating, in one trio-swap).
PAIRS = 4
MIB = 1 << 20


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One ~850 MB random llama, deleted after the module (disk space is shared)."""
    path = write_big_model(tmp_path_factory.mktemp("big-model") / "big.gguf", mib=800)
    drop(str(path))
    if resident_bytes(str(path)) != 0:
        path.unlink()
        pytest.skip("this file system's page cache cannot be dropped (tmpfs?)")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def serving(handle: TrioSwapServer) -> Iterator[httpx.Client]:
    try:
        with httpx.Client(base_url=handle.base_url, timeout=120) as client:
            yield client
    finally:
        handle.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle.proc.wait(timeout=30)
        handle.kill_everything()


def cold_load(client: httpx.Client, model: str, path: Path) -> float:
    drop(str(path))
    assert resident_bytes(str(path)) == 0
    seconds = timed_load(client, model)
    unload_all(client)
    return seconds


def test_read_ahead_beside_a_cold_start(
    tmp_path: Path, llama_server_bin: Path, big_model: Path
) -> None:
    """Two models on the same file, one with read-ahead and one without (``prefetch:
    false``), started cold in turn; no idle prefetching (``budget: 0``) in between."""
    handle = start_with_config(
        tmp_path,
        ["prefetch: {budget: 0}"],
        [
            model_lines("ahead", llama_server_bin, big_model),
            model_lines("plain", llama_server_bin, big_model, "prefetch: false"),
        ],
        {"ahead": big_model},
    )
    with serving(handle) as client:
        timed_load(client, "plain")  # the first start pays for what is not the model
        unload_all(client)
        ahead: list[float] = []
        plain: list[float] = []
        for index in range(PAIRS):
            order = [("ahead", ahead), ("plain", plain)]
            for model, samples in order if index % 2 == 0 else order[::-1]:
                samples.append(cold_load(client, model, big_model))
        warm = [timed_load(client, "plain")]
        unload_all(client)
        warm.append(timed_load(client, "plain"))
    log = handle.log.read_text()
    read_lines = [line for line in log.splitlines() if "model ahead: read ahead" in line]
    print(
        f"\ncold start of a {big_model.stat().st_size / MIB:.0f} MiB model, median of {PAIRS}: "
        f"with read-ahead {statistics.median(ahead):.3f} s {sorted(ahead)}, "
        f"without {statistics.median(plain):.3f} s {sorted(plain)}, "
        f"warm {min(warm):.3f} s; {read_lines[-1] if read_lines else 'no read-ahead line'}"
    )
    assert len(read_lines) == PAIRS, handle.log_tail()
    assert "model plain: read ahead" not in log
    # On a disk slower than memory the read-ahead helps; it must never hurt beyond noise.
    assert statistics.median(ahead) <= statistics.median(plain) * 1.1 + 0.05


def test_idle_prefetch_makes_the_swap_as_fast_as_a_warm_start(
    tmp_path: Path, llama_server_bin: Path, big_model: Path, tiny_models: dict[str, Path]
) -> None:
    """While tiny-a runs, the stopped big model's file is read back into the page cache;
    the swap to it then starts as fast as a warm restart of it does."""
    size = big_model.stat().st_size
    drop(str(big_model))
    handle = start_with_config(
        tmp_path,
        [],
        [
            model_lines("tiny-a", llama_server_bin, tiny_models["tiny-a"]),
            model_lines("big", llama_server_bin, big_model),
        ],
        {"tiny-a": tiny_models["tiny-a"], "big": big_model},
    )
    with serving(handle) as client:
        timed_load(client, "tiny-a")
        deadline = time.monotonic() + 60
        while resident(client, "big", big_model) != (size, size):
            assert time.monotonic() < deadline, (
                f"not prefetched: {resident(client, 'big', big_model)}"
            )
            time.sleep(0.1)
        assert resident_bytes(str(big_model)) == size
        started = time.perf_counter()
        prefetched = timed_load(client, "big")  # a swap: tiny-a stops, big starts
        swap = time.perf_counter() - started
        unload_all(client)
        warm = timed_load(client, "big")  # its file is cached: a warm start
    print(
        f"\nafter idle prefetch: big ready in {prefetched:.3f} s (the swap request "
        f"{swap:.3f} s); warm start {warm:.3f} s"
    )
    assert "prefetch: read" in handle.log.read_text()
    assert prefetched <= warm * 1.5 + 0.1
