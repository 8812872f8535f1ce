"""DESIGN.md invariants that are about structure, plus slot release on early disconnect."""

from __future__ import annotations

import ast
import inspect
from functools import partial
from pathlib import Path

import trio

from tests.conftest import chat, make_config, responder_model, running, wait_for
from trio_swap.scheduling import FifoScheduler

SRC = Path(__file__).parent.parent / "src" / "trio_swap"


def test_scheduler_decisions_cannot_yield_mid_decision() -> None:
    """Invariant 1: the router's decisions run as plain functions (no await inside)."""
    handlers = [
        (name, fn)
        for name, fn in inspect.getmembers(FifoScheduler, inspect.isfunction)
        if name.startswith("on_")
    ]
    assert len(handlers) >= 7
    for name, fn in handlers:
        assert not inspect.iscoroutinefunction(fn), f"{name} must stay synchronous"


def test_no_locks_in_the_routing_path() -> None:
    """Invariant 1: single writers instead of locks in router, scheduler and policy."""
    paths = [
        SRC / "router.py",
        *(SRC / "scheduling").rglob("*.py"),
        *(SRC / "policy").rglob("*.py"),
    ]
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in {"Lock", "StrictFIFOLock", "RLock"}:
                raise AssertionError(f"{path.name}:{node.lineno} uses a lock")


async def test_client_leaving_while_its_model_loads_releases_its_slot() -> None:
    """Invariant 4: a request cancelled before it was granted leaves nothing behind."""
    config = make_config(responder_model("A", "--load-delay", "1", concurrency_limit=1))
    with trio.fail_after(30):
        async with running(config) as h:
            scheduler = h.server.router.scheduler
            async with trio.open_nursery() as client:
                client.start_soon(partial(h.client.post, "/v1/chat/completions", json=chat("A")))
                await h.wait_for_state("A", "starting")  # the request waits for the load
                client.cancel_scope.cancel()  # the client leaves
            await wait_for(
                lambda: not scheduler.pending_requests(), what="the cancelled request to be gone"
            )
            # concurrencyLimit is 1: a leaked slot would make this a 429
            response = await h.client.post("/v1/chat/completions", json=chat("A"))
            assert response.status_code == 200
            await wait_for(  # and that one is released once its response is sent
                lambda: not scheduler.pending_requests(), what="the served request to be released"
            )
            assert scheduler.in_flight("A") == 0
