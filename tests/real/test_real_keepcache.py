"""keepCache with a real llama-server: a conversation's KV cache survives a swap.

A ~1,500-token conversation goes to model A, a request to B swaps A out, and
the same conversation plus one message goes back to A. With ``keepCache``
trio-swap saved A's slot before stopping it and restored it after the next
start, so llama-server reuses the prompt (``timings.cache_n``) and processes
only the new message (``timings.prompt_n``); without it the whole prompt is
processed again. Both variants run the same model file in one trio-swap.
Times to first token are printed (run with ``-s``); with the tiny models the
prefill is tens of milliseconds, so they are not asserted (``bench/keepcache.py``
measures a model big enough for the difference to matter).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from keepcache_support import Turn, conversation, load, model_entry, streamed
from readahead_support import start_with_config

from trio_swap.upstream.cache_disk import FILE_PREFIX

pytestmark = pytest.mark.real

KEEP, PLAIN, OTHER = "tiny-a", "tiny-a-plain", "tiny-b"


def test_a_swap_back_reuses_the_conversation_only_with_keep_cache(
    tmp_path: Path, llama_server_bin: Path, tiny_models: dict[str, Path]
) -> None:
    slots = tmp_path / "slots"
    slots.mkdir()
    a, b = tiny_models["tiny-a"], tiny_models["tiny-b"]
    entries = [
        model_entry(KEEP, llama_server_bin, a, slots, keep=True),
        model_entry(PLAIN, llama_server_bin, a, slots, keep=False),
        model_entry(OTHER, llama_server_bin, b, slots, keep=False),
    ]
    handle = start_with_config(tmp_path, [], entries, {"tiny-a": a, "tiny-b": b})
    first, later = conversation()
    back: dict[str, Turn] = {}
    ready_then: dict[str, Turn] = {}
    try:
        with httpx.Client(base_url=handle.base_url, timeout=120) as client:
            for model in (KEEP, PLAIN):
                opening = streamed(client, model, first)
                assert opening.cache_n == 0, opening  # a fresh server: nothing cached
                streamed(client, OTHER, first)  # the swap: A's slot saved (keepCache), A stopped
                back[model] = streamed(client, model, later)  # the swap back
                # Again, with A started (and restored) before the request is sent: the
                # first token then costs only the prompt processing.
                streamed(client, OTHER, first)
                load(client, model)
                ready_then[model] = streamed(client, model, later)
            metrics = client.get("/metrics").text
    finally:
        handle.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle.proc.wait(timeout=30)
        handle.kill_everything()
    prompt = opening.prompt_n  # the first turn's tokens, all processed
    assert 1400 <= prompt <= 1600, opening
    log = handle.log.read_text()
    for name, turns in (("swap back", back), ("started first", ready_then)):
        keep, plain = turns[KEEP], turns[PLAIN]
        print(
            f"\n{name}: keepCache prompt_n {keep.prompt_n} cache_n {keep.cache_n}, first token "
            f"{keep.first_token * 1e3:.0f} ms; without: prompt_n {plain.prompt_n} cache_n "
            f"{plain.cache_n}, first token {plain.first_token * 1e3:.0f} ms"
        )
        assert keep.cache_n >= prompt - 2, (keep, log[-3000:])  # the whole first prompt reused
        assert keep.prompt_n <= 0.05 * (keep.prompt_n + keep.cache_n), keep  # only the new message
        assert plain.cache_n == 0, plain
        assert plain.prompt_n > prompt, plain  # everything processed again
    assert re.search(rf"model {KEEP}: saved the KV cache of 1 slot", log), log[-3000:]
    assert re.search(rf"model {KEEP}: restored the KV cache of 1 slot", log), log[-3000:]
    assert re.search(rf"model {KEEP}: the first request after the restore reused \d+", log)
    assert f"model {PLAIN}: saved" not in log and f"model {PLAIN}: restored" not in log
    assert sorted(slots.iterdir()) == sorted(slots.glob(FILE_PREFIX + "tiny-a.*"))  # A only
    reused = re.search(rf'trio_swap_kv_cache_reused_tokens_total{{model="{KEEP}"}} (\S+)', metrics)
    assert reused is not None and float(reused[1]) >= 2 * (prompt - 2), metrics
