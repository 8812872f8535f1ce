"""Swap-back time to first token with and without keepCache, on a real llama-server.

Usage (from the repository root, after ``just test-real`` built llama-server once)::

    .venv/bin/python bench/keepcache.py [--rounds 5] [--mib 400] [--threads 2]

One trio-swap serves three models that may not run together: A with
``keepCache``, the same A without it, and a tiny B to swap to. Each round,
for each A in turn: a ~1,500-token conversation to A, a request to B (the
swap: keepCache saves A's slot), then the same conversation plus one message
back to A, timed to its first streamed token. Then the same again with A
started before the message is sent (``/api/models/load``: the restore happens
there), which times the prompt processing alone. The baseline is that same
message to an A that never left (no swap). A fresh server's first answer
also pays for mapping its weights, whatever the cache; a short message to a
fresh and to a warm A measures that part.

A is a random llama of ``--mib`` MiB (``tests/real/big_gguf.py``; 400 MiB is
one 2048-wide layer: its 1,500-token prefill takes seconds on two cores, as a
real model's does on a GPU with a longer context) or the lane's tiny model
(``--mib 0``). Prints medians and the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "real"), str(REPO)]  # the real lane's helpers
import big_gguf  # noqa: E402
import build_llama_server  # noqa: E402
import tiny_gguf  # noqa: E402
from keepcache_support import Turn, conversation, load, model_entry, streamed, whole  # noqa: E402
from readahead_support import start_with_config  # noqa: E402

KEEP, PLAIN, OTHER = "a-keep", "a-plain", "b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=400, help="size of A; 0: the tiny model")
    parser.add_argument("--threads", type=int, default=2, help="llama-server --threads for A")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trio-swap-keepcache-"))
    slots = tmp / "slots"
    slots.mkdir()
    vocab = tiny_gguf.find_vocab_gguf()
    b = tiny_gguf.write_tiny_model(tmp / "b.gguf", seed=2, vocab_gguf=vocab)
    if args.mib:
        a = big_gguf.write_big_model(tmp / "a.gguf", mib=args.mib, vocab_gguf=vocab)
    else:
        a = tiny_gguf.write_tiny_model(tmp / "a.gguf", seed=1, vocab_gguf=vocab)
    server = build_llama_server.ensure_llama_server()
    entries = [
        model_entry(KEEP, server, a, slots, keep=True, threads=args.threads),
        model_entry(PLAIN, server, a, slots, keep=False, threads=args.threads),
        model_entry(OTHER, server, b, slots, keep=False),
    ]
    handle = start_with_config(tmp, [], entries, {"a": a, "b": b})
    first, later = conversation()
    hello = [{"role": "user", "content": "hi"}]
    back: dict[str, list[Turn]] = {KEEP: [], PLAIN: []}
    started: dict[str, list[Turn]] = {KEEP: [], PLAIN: []}
    no_swap: list[Turn] = []
    fresh: list[Turn] = []  # a short message, first after a start
    warm: list[Turn] = []  # the same, to a server that already answered
    try:
        with httpx.Client(base_url=handle.base_url, timeout=600) as client:
            for round_ in range(args.rounds):
                order = (KEEP, PLAIN) if round_ % 2 == 0 else (PLAIN, KEEP)
                for model in order:
                    whole(client, model, first)  # the slot holds the conversation so far
                    whole(client, OTHER, hello)  # the swap (keepCache saves the slot)
                    back[model].append(streamed(client, model, later))
                    whole(client, OTHER, hello)
                    whole(client, model, first)  # the same slot again, then the same swap
                    whole(client, OTHER, hello)
                    load(client, model)  # started (and restored) before the message
                    started[model].append(streamed(client, model, later))
                whole(client, PLAIN, first)
                no_swap.append(streamed(client, PLAIN, later))  # never left
                whole(client, OTHER, hello)
                load(client, PLAIN)
                fresh.append(whole(client, PLAIN, hello))
                warm.append(whole(client, PLAIN, hello))
                _progress(f"round {round_ + 1}/{args.rounds}")
    finally:
        handle.proc.send_signal(signal.SIGTERM)
        handle.proc.wait(60)
        handle.kill_everything()
    print(_report(args, a, back, started, no_swap, (fresh, warm)))


def _report(
    args: argparse.Namespace,
    model: Path,
    back: dict[str, list[Turn]],
    started: dict[str, list[Turn]],
    no_swap: list[Turn],
    first_answer: tuple[list[Turn], list[Turn]],
) -> str:
    def ms(turns: list[Turn], of: Callable[[Turn], float] = lambda t: t.first_token) -> float:
        return statistics.median(of(t) for t in turns) * 1e3

    keep_back, plain_back = ms(back[KEEP]), ms(back[PLAIN])
    keep_ready, plain_ready, baseline = ms(started[KEEP]), ms(started[PLAIN]), ms(no_swap)
    overhead = ms(first_answer[0]) - ms(first_answer[1])
    reused = [t.cache_n / (t.cache_n + t.prompt_n) for t in back[KEEP]]
    prompt = statistics.median(t.prompt_n + t.cache_n for t in back[PLAIN])
    size = f"{model.stat().st_size / 2**20:.0f} MiB" if args.mib else "tiny"
    return "\n".join(
        [
            f"keepCache bench ({_revision()}): A {size}, --threads {args.threads}, "
            f"{args.rounds} rounds, swap-back message of {prompt:.0f} prompt tokens",
            f"- prompt reused on the swap back (cache_n / prompt): median "
            f"{statistics.median(reused):.1%}, lowest {min(reused):.1%}; "
            f"without keepCache: {max(t.cache_n for t in back[PLAIN])} tokens",
            f"- swap back, request to first token (start + restore + prompt): keepCache "
            f"{keep_back:.0f} ms, without {plain_back:.0f} ms: {keep_back / plain_back:.2f}x",
            f"- A started first, message to first token: keepCache {keep_ready:.0f} ms, "
            f"without {plain_ready:.0f} ms ({keep_ready / plain_ready:.2f}x), "
            f"no swap at all {baseline:.0f} ms (keepCache / no swap: {keep_ready / baseline:.2f}x)",
            f"- a fresh server's first short answer takes {overhead:.0f} ms longer than a warm "
            f"one's, whatever the cache (mapping its weights): part of any swap back",
        ]
    )


def _revision() -> str:
    """The commit measured, and whether src/ differed from it (others edit the tree too)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown commit"
    return f"commit {head or 'unknown'}" + (" with uncommitted changes in src/" if dirty else "")


def _progress(text: str) -> None:
    print(f"[keepcache] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
