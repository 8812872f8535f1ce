"""``serve()``: the runtime tree of one trio-swap instance.

::

    serve
    ├─ OrphanGuard process            kills upstream groups if trio-swap dies (SIGKILL included)
    └─ supervisors nursery            outermost: outlives the HTTP drain
       ├─ ModelProcess.run() (one per model)      one owner per model's process
       ├─ Router.run()                the one owner of routing state
       └─ web nursery
          ├─ hypercorn serve(app)     AccessControl → InferenceRoutes → Quart admin app;
          │                           handlers talk to the router through its channel
          └─ signal watcher           SIGTERM/SIGINT: graceful stop; SIGHUP: logged

Shutdown: stop accepting and drain HTTP (up to ``shutdown_timeout``), then the
router rejects what still waits and stops every model in parallel, then the
supervisors are cancelled (any process still alive is killed on the way out).
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from typing import Final, final

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from trio_swap.config.model import Config
from trio_swap.errors import SwapError
from trio_swap.http.access import AccessControl
from trio_swap.http.app import DEFAULT_MAX_BODY_BYTES, AppState, build_app
from trio_swap.http.inference import InferenceRoutes
from trio_swap.http.peers import PeerForwarder
from trio_swap.http.upstream_client import UpstreamClient
from trio_swap.policy import build_policy
from trio_swap.router import Router
from trio_swap.upstream.launcher import OrphanGuard
from trio_swap.upstream.logs import LogBook
from trio_swap.upstream.process import ModelProcess
from trio_swap.upstream.proxy_log import ProxyLogCapture

__all__ = ["RunningServer", "serve"]

log = logging.getLogger("trio_swap")

DEFAULT_SHUTDOWN_TIMEOUT: Final = 10.0


@final
class RunningServer:
    """Handed to the caller of ``nursery.start(serve, ...)`` once trio-swap is listening."""

    def __init__(
        self,
        binds: list[str],
        router: Router,
        processes: dict[str, ModelProcess],
        shutdown: trio.Event,
        *,
        logs: LogBook,
    ) -> None:
        self.binds = binds
        self.router = router
        self.processes = processes
        self._shutdown = shutdown
        #: The proxy, upstream and per-model log rings (``/logs``).
        self.logs = logs

    @property
    def url(self) -> str:
        return self.binds[0]

    @property
    def stopping(self) -> bool:
        return self._shutdown.is_set()

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._shutdown.set()

    async def wait_for_stop(self) -> None:
        await self._shutdown.wait()


def _http_client() -> httpx.AsyncClient:
    # No read/write/pool timeouts: generations can take minutes and must never be cut.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=30.0, read=None, write=None, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
        trust_env=False,
        follow_redirects=False,
    )


async def serve(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    handle_signals: bool = True,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run trio-swap until SIGTERM/SIGINT (or :meth:`RunningServer.stop`)."""
    logs = LogBook()
    proxy_log = ProxyLogCapture(logs.proxy, config.log_level)
    guard = OrphanGuard.start()
    try:
        proxy_log.install()
        async with _http_client() as client, trio.open_nursery() as supervisors:
            echo_upstream = config.log_to_stdout in ("upstream", "both")
            router_box: list[Router] = []

            def on_stopped(model: str) -> None:
                router_box[0].model_stopped(model)

            processes: dict[str, ModelProcess] = {}
            for model in config.models.values():
                process = ModelProcess(
                    model,
                    health_check_timeout=config.health_check_timeout,
                    http=client,
                    log_ring=logs.add_model(model.id, echo=echo_upstream),
                    guard=guard,
                    on_stopped=on_stopped,
                )
                await supervisors.start(process.run)
                processes[model.id] = process
            router = Router(processes, build_policy(config), config.routing.scheduler)
            router_box.append(router)
            await supervisors.start(router.run)

            upstream_client = UpstreamClient()
            peers = PeerForwarder() if config.peers else None
            state = AppState(
                config=config,
                router=router,
                processes=processes,
                upstream_client=upstream_client,
            )
            app = AccessControl(
                InferenceRoutes(
                    build_app(state, max_body_bytes=max_body_bytes, logs=logs),
                    config=config,
                    router=router,
                    client=upstream_client,
                    peers=peers,
                    max_body_bytes=max_body_bytes,
                ),
                api_keys=config.api_keys,
            )
            hyper = HypercornConfig()
            hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
            hyper.accesslog = None
            hyper.errorlog = logging.getLogger("hypercorn.error")
            hyper.graceful_timeout = shutdown_timeout
            hyper.keep_alive_timeout = 75  # clients (and benchmarks) reuse connections
            hyper.keep_alive_max_requests = 1_000_000  # hypercorn closes after 1000 by default

            shutdown = trio.Event()

            async def begin_shutdown() -> None:
                """hypercorn's trigger: stop admitting first, then let it drain."""
                await shutdown.wait()
                logs.end_followers()  # log streams never end by themselves
                log.info(
                    "shutting down: requests still waiting get 503; draining HTTP (up to %gs)",
                    shutdown_timeout,
                )
                await router.shutdown()

            async with trio.open_nursery() as web:
                binds = await web.start(
                    partial(hypercorn_serve, app, hyper, shutdown_trigger=begin_shutdown)
                )
                server = RunningServer(binds, router, processes, shutdown, logs=logs)
                if handle_signals:
                    supervisors.start_soon(_watch_signals, server, supervisors.cancel_scope)
                if config.preload:
                    web.start_soon(_preload, router, config.preload)
                task_status.started(server)
            # hypercorn returned: every connection is closed or was cut at the deadline.
            log.info("stopping all models")
            longest_grace = max((m.unload_timeout for m in config.models.values()), default=0.0)
            with trio.move_on_after(longest_grace + 5):
                await router.stop_all()
            await upstream_client.aclose()
            if peers is not None:
                await peers.aclose()
            supervisors.cancel_scope.cancel(reason="trio-swap shutdown")
    finally:
        proxy_log.remove()
        with trio.CancelScope(shield=True):
            await guard.aclose()
    log.info("stopped")


async def _preload(router: Router, models: tuple[str, ...]) -> None:
    """``hooks.on_startup.preload``: load each model in turn through the normal scheduling.

    Sequential on purpose, as in llama-swap: two models that cannot run together
    leave the last one loaded.
    """
    for model in models:
        try:
            lease = await router.acquire(model)
        except SwapError as exc:
            log.warning("preload of %s failed: %s", model, exc.message)
            continue
        router.release(lease)
        log.info("preloaded %s", model)


async def _watch_signals(server: RunningServer, everything: trio.CancelScope) -> None:
    """First SIGTERM/SIGINT: graceful stop. A second one: stop now (upstreams still killed)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.warning("SIGHUP received: config reload is not supported yet; ignoring")
            elif not server.stopping:
                log.info("%s received: shutting down", name)
                server.stop()
            else:
                log.warning("%s received again: stopping now", name)
                everything.cancel(reason=f"second {name}")
