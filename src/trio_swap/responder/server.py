"""Run the responder: one trio run, one hypercorn server, and the process-level acts.

The process-level flags (--hold-memory, --startup-delay, --fail-start,
--exit-after, --ignore-sigterm) are what a supervisor sees, so they live here,
around the app; the app only knows about requests.

    trio.run(serve)
    └─ nursery                  cancelled by a signal or --exit-after
       ├─ signal watcher        SIGTERM/SIGINT → "received SIGTERM, exiting", exit 0
       ├─ exit timer            --exit-after S → exit 0
       └─ hypercorn serve(app)  started after --hold-memory and --startup-delay;
                                binds, then prints
                                "responder <model> listening on http://HOST:PORT pid=N"

--hold-memory comes first and is fully resident before the socket binds, so a
supervisor that sees the model healthy measures its whole footprint at once,
as with a real server whose weights are loaded before it listens. With
--sleep-api a sleep releases it and a wake holds it again (``memory``,
``sleep``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from typing import Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from trio_swap.responder.app import ResponderApp, log
from trio_swap.responder.memory import HeldMemory, hold_memory
from trio_swap.responder.options import ResponderOptions, parse_options

__all__ = ["hold_memory", "hypercorn_config", "main", "serve"]

# After a signal, cancellation normally ends the run in milliseconds. But
# hypercorn writes to sockets under a shield, so a client that stopped reading
# can hold the run open forever; a supervisor sending SIGTERM expects an exit.
_EXIT_GRACE_S: Final = 2.0


def main(argv: list[str] | None = None) -> int:
    """`trio-swap responder [options]`: serve until a signal; return the exit status."""
    options = parse_options(argv)
    if options.ignore_sigterm:
        # Until trio installs its handler, ignore SIGTERM the plain way too, so a
        # supervisor testing SIGKILL escalation cannot kill us during startup.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return trio.run(serve, options)


def hypercorn_config(options: ResponderOptions) -> Config:
    """Hypercorn tuned for a benchmark upstream: keep-alive, no access log."""
    config = Config()
    host = options.host
    if ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    config.bind = [f"{host}:{options.port}"]
    config.accesslog = None
    config.loglevel = "WARNING"  # hides "Running on ..."; we print our own line
    config.keep_alive_timeout = 75.0
    config.keep_alive_max_requests = sys.maxsize
    config.graceful_timeout = 0.0  # a signal means exit now, streams included
    return config


async def serve(
    options: ResponderOptions,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve `options` until SIGTERM/SIGINT or --exit-after; return the exit status.

    Reports the bound URL (`http://HOST:PORT`) through `task_status` once the
    socket listens. Returns 1 for --fail-start or a bind error without ever
    calling `started()`, so a caller using `nursery.start` should expect that.
    """
    with contextlib.ExitStack() as held:  # --hold-memory, released after the nursery
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, options, nursery.cancel_scope)
            if options.exit_after is not None:
                nursery.start_soon(_exit_after, options.exit_after, nursery.cancel_scope)
            memory: HeldMemory | None = None
            if options.hold_memory:
                memory = await _hold(options.hold_memory)
                if memory is None:
                    nursery.cancel_scope.cancel(reason="--hold-memory failed")
                    return 1
                held.callback(memory.release)
            await trio.sleep(options.startup_delay)
            if options.fail_start:
                if options.fail_start_message is not None:
                    print(options.fail_start_message, file=sys.stderr)
                print(
                    f"error: failed to load model '{options.model}': simulated failure",
                    file=sys.stderr,
                    flush=True,
                )
                nursery.cancel_scope.cancel(reason="--fail-start")
                return 1
            url = await _start_server(nursery, options, memory)
            if url is None:
                nursery.cancel_scope.cancel(reason="bind failed")
                return 1
            log(f"responder {options.model} listening on {url} pid={os.getpid()}")
            task_status.started(url)
        return 0


async def _hold(size: int) -> HeldMemory | None:
    """--hold-memory: the held block, or None after printing why the kernel refused it."""
    memory = HeldMemory(size)
    try:
        await memory.hold()
    except (OSError, OverflowError) as error:
        message = f"error: cannot hold {size / (1 << 20):.0f} MiB: {error}"
        print(message, file=sys.stderr, flush=True)
        return None
    log(f"holding {size / (1 << 20):.0f} MiB (--hold-memory)")
    return memory


async def _start_server(
    nursery: trio.Nursery, options: ResponderOptions, memory: HeldMemory | None
) -> str | None:
    """Start hypercorn in `nursery`; return its URL, or None after printing a bind error."""
    app = ResponderApp(options, memory)
    start = functools.partial(hypercorn_serve, app, hypercorn_config(options))
    binds: list[str] = []
    try:
        binds = await nursery.start(start)
    except* OSError as group:  # hypercorn's nurseries wrap the error in groups
        where = f"{options.host}:{options.port}"
        print(f"error: cannot listen on {where}: {group.exceptions[0]}", file=sys.stderr)
        sys.stderr.flush()
    return binds[0] if binds else None


async def _watch_signals(options: ResponderOptions, stop: trio.CancelScope) -> None:
    """SIGTERM and SIGINT end the run with status 0, unless --ignore-sigterm.

    --ignore-sigterm ignores SIGTERM only: SIGINT (Ctrl+C) still exits, so a
    person can always stop a responder they started by hand.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM and options.ignore_sigterm:
                log(f"ignoring {name}")
                continue
            log(f"received {name}, exiting")
            _exit_soon_regardless(0)
            stop.cancel(reason=f"received {name}")
            return


async def _exit_after(seconds: float, stop: trio.CancelScope) -> None:
    """--exit-after: end the run on our own, as a server that dies while idle."""
    await trio.sleep(seconds)
    log(f"exiting after {seconds:g} s (--exit-after)")
    _exit_soon_regardless(0)
    stop.cancel(reason="--exit-after")


def _exit_soon_regardless(status: int) -> None:
    """Exit with `status` in _EXIT_GRACE_S even if shielded socket writes hang."""
    timer = threading.Timer(_EXIT_GRACE_S, os._exit, args=(status,))
    timer.daemon = True
    timer.start()
