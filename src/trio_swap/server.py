"""``serve()``: the runtime tree of one trio-swap instance.

::

    serve
    ├─ OrphanGuard process            kills upstream groups if trio-swap dies (SIGKILL included)
    └─ supervisors nursery            outermost: outlives the HTTP drain
       ├─ ModelProcess.run() (one per model)      one owner per model's process
       ├─ Router.run()                the one owner of routing state
       ├─ ActivityLog.run()           writes the per-request activity rows in batches
       ├─ PerformanceMonitor.run()    hardware samples (performance:) for /api/performance
       ├─ Watchdog.run()              asks the router for ticks; it pings systemd's watchdog
       │                              (and /livez reads when the router last handled one)
       ├─ Notifier.publish_status()   STATUS= for `systemctl status` (only under systemd)
       ├─ Reloader.run()              config reloads asked for by SIGHUP and --watch-config
       ├─ OrphanReaper.run()          as PID 1 (or a subreaper): reaps inherited orphans
       ├─ watch_config_file()         --watch-config: polls the file, asks for reloads
       └─ web nursery
          ├─ HttpServer.serve(app)    hypercorn, HTTP/1.1: AccessControl → InferenceRoutes →
          │                           Quart admin app; handlers talk to the router's channel
          └─ signal watcher           SIGTERM/SIGINT: graceful stop; SIGHUP: reload

Shutdown: the router rejects what still waits; HTTP stops accepting and drains
(up to ``shutdown_timeout``), then every connection still open is cut, whatever
its client does; then every model stops in parallel, then the supervisors are
cancelled (any process still alive is killed on the way out). A second
SIGTERM/SIGINT skips the waiting: connections are cut and everything is
cancelled at once, the supervisors still stopping their processes.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Final, final

import trio
from hypercorn.config import Config as HypercornConfig

from trio_swap.config.address import Upstream
from trio_swap.config.files import weight_files
from trio_swap.config.model import Config, ModelConfig
from trio_swap.errors import SwapError
from trio_swap.fit.ledger import FitLedger
from trio_swap.fit.state import STATE_FILE, estimates, keep_saved, read_learned
from trio_swap.http.access import AccessControl
from trio_swap.http.app import DEFAULT_MAX_BODY_BYTES, build_app
from trio_swap.http.inference import InferenceRoutes
from trio_swap.http.listener import HttpServer
from trio_swap.http.peers import PeerForwarder
from trio_swap.http.performance import register_performance_route
from trio_swap.http.probes import DEFAULT_LIVENESS_TIMEOUT, Probes, register_probe_routes
from trio_swap.http.profiles import make_selection
from trio_swap.http.reload_route import register_reload_route
from trio_swap.http.selection import Selection
from trio_swap.http.state import AppState
from trio_swap.http.upstream_client import ConnectionRetirer, UpstreamClient
from trio_swap.observe.activity import ActivityLog
from trio_swap.observe.captures import CaptureStore
from trio_swap.observe.hooks import HookFanout
from trio_swap.observe.metrics import Metrics
from trio_swap.observe.performance import HardwareCollector, PerformanceMonitor
from trio_swap.observe.record import Observer
from trio_swap.observe.session import header_names
from trio_swap.observe.timeline import Timeline
from trio_swap.observe.usage import Usage
from trio_swap.policy import build_policy
from trio_swap.reaper import OrphanReaper, should_reap
from trio_swap.reload import Reloader, ReloadReport, ReloadUnavailable, watch_config_file
from trio_swap.router import Router
from trio_swap.systemd import Notifier, Watchdog, status_line
from trio_swap.upstream.cache_disk import CacheDisk
from trio_swap.upstream.footprint import FootprintProbe, detect_gpu_reader, footprint_probe
from trio_swap.upstream.launcher import OrphanGuard
from trio_swap.upstream.logs import LogBook
from trio_swap.upstream.prefetch import Prefetcher, running_files
from trio_swap.upstream.process import ModelProcess
from trio_swap.upstream.proxy_log import ProxyLogCapture
from trio_swap.upstream.readahead import ReadAhead
from trio_swap.upstream.residency import FileResidency

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
        processes: Mapping[str, ModelProcess],
        shutdown: trio.Event,
        *,
        logs: LogBook,
        notifier: Notifier | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.binds = binds
        self.router = router
        #: Every model's supervisor (the router's live table: reloads change it).
        self.processes = processes
        self._reloader = reloader
        self._shutdown = shutdown
        #: The proxy, upstream and per-model log rings (``/logs``).
        self.logs = logs
        #: sd_notify to systemd (a no-op outside systemd); reloads call reloading()/ready().
        self.notifier = notifier if notifier is not None else Notifier(None)
        #: Profiles and selectors at run time (the active profile, spillover reservations).
        self.selection: Selection | None = None

    @property
    def url(self) -> str:
        return self.binds[0]

    @property
    def stopping(self) -> bool:
        return self._shutdown.is_set()

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._shutdown.set()

    async def reload(self, config: Config | None = None) -> ReloadReport:
        """Reload the config file (or switch to ``config``), restarting only what changed.

        Returns once the new config serves (docs/reload.md).

        Raises:
            ConfigError: the file does not load; the running config keeps serving.
            ReloadUnavailable: not started from a file, and no ``config`` given.
        """
        if self._reloader is None:
            raise ReloadUnavailable("this server cannot reload")
        return await self._reloader.reload(config)

    def request_reload(self, reason: str) -> None:
        """Reload soon, in the background (SIGHUP); the outcome is logged."""
        if self._reloader is not None:
            self._reloader.request(reason)

    async def wait_for_stop(self) -> None:
        await self._shutdown.wait()


async def serve(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    handle_signals: bool = True,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    activity_db: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    watch_config: bool = False,
    h2c: bool = False,
    state_dir: str | os.PathLike[str] | None = None,
    footprint: FootprintProbe | None = None,
    liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT,
    reap_orphans: bool | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run trio-swap until SIGTERM/SIGINT (or :meth:`RunningServer.stop`).

    ``activity_db``: an SQLite file for the activity log (overrides ``store.path``).
    ``config_path``: the file ``config`` was loaded from; reloads (SIGHUP,
    ``POST /api/config/reload``) read it again. ``watch_config``: also reload
    when it changes (polled every second). ``h2c``: also serve cleartext
    HTTP/2 (off by default: docs/security.md). ``state_dir``: where what was
    learned about the models (memory, load times) is kept across restarts; None
    keeps it in memory only. ``footprint``: how a running model's memory is
    measured (a fake in tests; /proc and NVML by default). ``liveness_timeout``:
    how long the router may leave a tick unanswered before ``/livez`` answers
    503 (systemd's ``WatchdogSec`` wins when set). ``reap_orphans``: reap the
    zombies of orphans reparented to trio-swap (None: when it is PID 1 or a
    child subreaper, where they end up; :mod:`trio_swap.reaper`).

    Shutdown has a hard deadline: requests get ``shutdown_timeout`` to finish,
    then every connection still open is cut, whatever its client does
    (:class:`~trio_swap.http.listener.HttpServer`), and the models stop.
    """
    if watch_config and config_path is None:
        raise ValueError("watch_config needs config_path")
    logs = LogBook()
    proxy_log = ProxyLogCapture(logs.proxy, config.log_level, time_format=config.log_time_format)
    guard = OrphanGuard.start()
    notifier = Notifier.from_environment()
    try:
        proxy_log.install()
        async with trio.open_nursery() as supervisors:
            echo_upstream = config.log_to_stdout in ("upstream", "both")
            router_box: list[Router] = []

            def on_stopped(model: str) -> None:
                router_box[0].model_stopped(model)

            metrics = Metrics()
            # performance: CPU, memory and GPU samples (/api/performance, /metrics).
            performance = PerformanceMonitor(config.performance)
            metrics.registry.register(HardwareCollector(performance))
            # keepCache: saved slot files within cacheDiskBudget (docs/faster-swaps.md).
            cache_disk = CacheDisk(config.cache_disk_budget, hooks=metrics)
            timeline = Timeline()
            upstream_client = UpstreamClient()

            def upstream_of(model: str) -> Upstream | None:
                process = router_box[0].processes.get(model) if router_box else None
                return process.upstream if process is not None else None

            # Pooled connections to a model are closed whenever its process changes.
            retirer = ConnectionRetirer(upstream_client, upstream_of)
            # Model files read into the page cache on start and while idle (faster-swaps.md).
            prefetch_box = [config.prefetch]  # a reload replaces it (switch_http)

            def live_processes() -> Mapping[str, ModelProcess]:
                return router_box[0].processes if router_box else {}

            def files_to_read_ahead(model_id: str) -> tuple[str, ...]:
                process = live_processes().get(model_id)
                if process is None or not (prefetch_box[0].enabled and process.model.prefetch):
                    return ()
                return weight_files(process.model)

            residency = FileResidency(
                lambda: [path for p in live_processes().values() for path in weight_files(p.model)]
            )
            read_ahead = ReadAhead(
                files_to_read_ahead,
                # its memory bound leaves room for the running models' weights
                running_files=lambda: running_files(live_processes()),
                residency=residency,
            )
            prefetcher = Prefetcher(
                live_processes,
                lambda: prefetch_box[0],
                ledger=lambda: router_box[0].ledger if router_box else None,
                residency=residency,
            )

            sleep_ttl_box = [config.sleep_ttl]  # sleepTTL: a reload changes it in place

            def spawn(model: ModelConfig, health_check_timeout: float) -> ModelProcess:
                """A supervised process for ``model``: at startup, and for models a reload adds."""
                process = ModelProcess(
                    model,
                    health_check_timeout=health_check_timeout,
                    log_ring=logs.add_model(model.id, echo=echo_upstream),
                    guard=guard,
                    on_stopped=on_stopped,
                    cache_disk=cache_disk,
                    hooks=HookFanout(metrics, timeline, retirer, read_ahead, prefetcher),
                    sleep_ttl=lambda: sleep_ttl_box[0],
                )
                supervisors.start_soon(process.run)
                return process

            # Ticks even outside systemd: /livez reads when the router last handled one.
            watchdog = Watchdog(notifier, interval=liveness_timeout / 2)
            state_file = Path(state_dir) / STATE_FILE if state_dir is not None else None
            ledger = FitLedger(
                config.resources,
                config.models,
                ports=config.ports,
                estimates=estimates(config),
                learned=read_learned(state_file) if state_file is not None else None,
            )
            router = Router(
                {m.id: spawn(m, config.health_check_timeout) for m in config.models.values()},
                build_policy(config, ledger),
                config.routing.scheduler,
                on_tick=watchdog.on_tick,
                ledger=ledger,
                footprint=footprint if footprint is not None else default_footprint_probe(),
                on_evict=lambda victim, target, why: timeline.evicted(victim, by=target, why=why),
            )
            processes = router.processes  # live: a reload adds to it and retires from it
            router_box.append(router)
            if reap_orphans or (reap_orphans is None and should_reap()):
                log.info("pid %d: reaping orphaned processes that end up here", os.getpid())
                supervisors.start_soon(OrphanReaper().run)
            supervisors.start_soon(cache_disk.run)
            supervisors.start_soon(performance.run)
            metrics.watch(processes, router)
            await supervisors.start(read_ahead.run)  # before any model can start
            await supervisors.start(router.run)
            await supervisors.start(prefetcher.run)
            await supervisors.start(residency.run)
            if state_file is not None:
                supervisors.start_soon(keep_saved, ledger, state_file)
            supervisors.start_soon(watchdog.run, router.tick)  # pings come from the router task

            activity = _activity_log(config, activity_db)
            await supervisors.start(activity.run)  # the last rows are written when cancelled

            def restore_feedback(model: str, usage: Usage) -> None:
                """keepCache: an answer's reused prompt tokens say what a restore bought."""
                process = processes.get(model)
                if process is not None and usage.cached_tokens is not None:
                    process.response_seen(usage.cached_tokens)

            captures = CaptureStore(config.capture_buffer)  # captureBuffer; 0: off
            activity.captures = captures  # the rows' has_capture
            observer = Observer(metrics, activity, on_usage=restore_feedback, captures=captures)
            observer.session_headers = header_names(config.session_id_headers)
            observer.log_requests = config.log_requests
            supervisors.start_soon(upstream_client.run)  # expired idle connections closed
            peers = PeerForwarder() if config.peers else None
            state = AppState(
                config=config,
                router=router,
                processes=processes,
                upstream_client=upstream_client,
                observer=observer,
                timeline=timeline,
                residency=residency,
            )
            state.selection = make_selection(state)  # profiles and selectors
            admin = build_app(state, max_body_bytes=max_body_bytes, logs=logs)
            routes = InferenceRoutes(
                admin,
                config=config,
                router=router,
                client=upstream_client,
                peers=peers,
                max_body_bytes=max_body_bytes,
                observer=observer,
                selection=state.selection,
            )
            app = AccessControl(
                routes,
                api_keys=config.api_keys,
                allowed_hosts=config.allowed_hosts,
                listen_host=host,  # its name is allowed in Host (docs/security.md)
            )

            def switch_http(new: Config) -> None:
                """A reload's switch, in the router's step: every HTTP reader of the config."""
                routes.swap_config(new)
                state.config = new
                cache_disk.budget = new.cache_disk_budget
                prefetch_box[0] = new.prefetch
                sleep_ttl_box[0] = new.sleep_ttl
                performance.reconfigure(new.performance)
                observer.session_headers = header_names(new.session_id_headers)
                observer.log_requests = new.log_requests
                captures.resize(new.capture_buffer)
                app.set_api_keys(new.api_keys)
                app.set_allowed_hosts(new.allowed_hosts)

            reloader = Reloader(
                config,
                path=config_path,
                router=router,
                switch_config=switch_http,
                spawn=spawn,
                notifier=notifier,
            )
            register_reload_route(admin, reloader)
            register_performance_route(admin, performance)
            hyper = HypercornConfig()
            hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
            hyper.accesslog = None
            hyper.errorlog = logging.getLogger("hypercorn.error")
            hyper.graceful_timeout = shutdown_timeout
            hyper.keep_alive_timeout = 75  # clients (and benchmarks) reuse connections
            hyper.keep_alive_max_requests = 1_000_000  # hypercorn closes after 1000 by default
            http = HttpServer(app, hyper, h2c=h2c)  # HTTP/1.1 only unless asked (docs/security.md)

            shutdown = trio.Event()
            probes = Probes(watchdog, shutdown)  # /livez, /readyz
            register_probe_routes(admin, probes)

            async def begin_shutdown() -> None:
                """hypercorn's trigger: stop admitting first, then let it drain."""
                await shutdown.wait()
                notifier.stopping("shutting down: draining requests, then stopping models")
                logs.end_followers()  # log streams never end by themselves
                routes.close_websockets()  # they would hold the drain until its deadline
                log.info(
                    "shutting down: requests still waiting get 503; draining HTTP (up to %gs)",
                    shutdown_timeout,
                )
                await router.shutdown()

            async with trio.open_nursery() as web:
                binds = await web.start(partial(http.serve, shutdown_trigger=begin_shutdown))
                server = RunningServer(
                    binds,
                    router,
                    processes,
                    shutdown,
                    logs=logs,
                    notifier=notifier,
                    reloader=reloader,
                )
                server.selection = state.selection
                await supervisors.start(reloader.run)
                if watch_config:
                    assert config_path is not None
                    # started once it has its first look: an edit made as soon as serve()
                    # has started is a change (start_soon could take the edit as the baseline)
                    await supervisors.start(watch_config_file, config_path, reloader.request)
                if handle_signals:
                    stop_now = partial(_stop_now, http, supervisors.cancel_scope)
                    await supervisors.start(_watch_signals, server, stop_now)
                # Listening, and SIGTERM now means a graceful stop: tell systemd.
                probes.started()
                notifier.ready(_status_line(server))
                supervisors.start_soon(notifier.publish_status, partial(_status_line, server))
                if config.preload:
                    web.start_soon(_preload, router, config.preload)
                task_status.started(server)
            # Every connection is closed, or was cut at the drain deadline.
            log.info("stopping all models")
            longest_grace = max((p.model.unload_timeout for p in processes.values()), default=0.0)
            with trio.move_on_after(longest_grace + 5):
                await router.stop_all()
            await upstream_client.aclose()
            if routes.peers is not None:  # a reload may have added peers
                await routes.peers.aclose()
            supervisors.cancel_scope.cancel(reason="trio-swap shutdown")
    finally:
        proxy_log.remove()
        notifier.close()
        with trio.CancelScope(shield=True):
            await guard.aclose()
    log.info("stopped")


def default_footprint_probe() -> FootprintProbe:
    """RAM from /proc, and GPU memory through NVML when the ``gpu`` extra and a GPU are there."""
    return footprint_probe(detect_gpu_reader())


def _status_line(server: RunningServer) -> str:
    """systemd's ``STATUS=``, from where the server listens and its models' states now."""
    states = {name: process.state for name, process in server.processes.items()}
    return status_line(server.binds, states, stopping=server.stopping)


def _activity_log(config: Config, path: str | None) -> ActivityLog:
    """``--activity-db`` wins over ``store.path``; memory and file keep their own row limits."""
    path = path or config.store_path
    if path is None:
        return ActivityLog(max_rows=config.metrics_max_in_memory)
    return ActivityLog(path, max_rows=config.store_max_rows)


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


async def _watch_signals(
    server: RunningServer,
    stop_now: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """First SIGTERM/SIGINT: graceful stop. A second one: ``stop_now`` (upstreams still stopped)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()  # from here on SIGTERM no longer kills the process outright
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                server.request_reload("SIGHUP")
            elif not server.stopping:
                log.info("%s received: shutting down", name)
                server.stop()
            else:
                log.warning("%s received again: stopping now", name)
                stop_now(f"second {name}")


def _stop_now(http: HttpServer, everything: trio.CancelScope, reason: str) -> None:
    """No more draining: cut every HTTP connection and cancel every task.

    Model processes are still stopped: each supervisor terminates its process
    group when cancelled (shielded and deadline-bounded).
    """
    http.cut()
    everything.cancel(reason=reason)
