"""Live config reload: load the config again and apply only what changed (docs/reload.md).

"The config" is the ``--config`` file, or with ``--config-dir`` every file of
the directory too (:class:`~trio_swap.config.sources.ConfigSources`): each
reload reads them all again, and the watcher looks at all of them.

Three triggers end up in :meth:`Reloader.reload`: ``SIGHUP`` and
``--watch-config`` through :meth:`Reloader.request` (queued, coalesced, run
by :meth:`Reloader.run`), and ``POST /api/config/reload``, which awaits the
answer. A reload runs in two steps, one reload at a time:

1. load and validate the file (in a worker thread), passing the running
   config so surviving models keep their ``${PORT}``; any
   :class:`~trio_swap.config.ConfigError` ends the reload there, and the
   running config is untouched;
2. send it to the router (:meth:`~trio_swap.router.Router.reconfigure`): in
   one router step the process table, the scheduler's limits and settings,
   the swap policy and the HTTP layer's config (names, aliases, filters,
   peers, API keys: the ``switch_config`` callback the server hands the
   :class:`Reloader`, so this module knows nothing of HTTP) all switch, so
   the next request sees all of it and no decision sees half of it. Models
   the diff calls unchanged are not touched, and no request in flight is
   ever cut.

llama-swap instead builds a whole new server and stops every model on any
change; here a reload that adds one model costs the others nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final, NoReturn, final
from urllib.parse import urlsplit

import msgspec
import trio

from trio_swap.config import Config, ConfigError, ModelConfig, load_config
from trio_swap.config.diff import NOT_RELOADED, ConfigDiff, diff_configs
from trio_swap.config.sources import ConfigSources, load_sources, yaml_files
from trio_swap.fit.ledger import FitLedger
from trio_swap.fit.state import estimates
from trio_swap.policy import build_policy
from trio_swap.router import Router
from trio_swap.systemd import Notifier
from trio_swap.upstream.process import ModelProcess, ProcessState

__all__ = [
    "WATCH_INTERVAL",
    "ReloadReport",
    "ReloadUnavailable",
    "Reloader",
    "watch_config_file",
]

log = logging.getLogger("trio_swap.reload")

#: Seconds between two looks at the config file under ``--watch-config``.
WATCH_INTERVAL: Final = 1.0

Spawn = Callable[[ModelConfig, float], ModelProcess]
#: Switches everything outside the router that reads the config (the HTTP layer).
SwitchConfig = Callable[[Config], None]


class ReloadUnavailable(Exception):
    """There is no file to reload from: the built-in demo, or a config given in code."""


@final
class ReloadReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a reload did (the body of ``POST /api/config/reload``'s answer).

    Model ids by what happened to them; see :class:`~trio_swap.config.diff.ConfigDiff`.
    """

    msg: str = "ok"
    #: The file the new config came from (with ``--config-dir``: every file).
    source: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    restart: tuple[str, ...]
    unchanged: tuple[str, ...]
    #: Top-level keys that changed (``apiKeys``, ``peers``, ``groups``, ...).
    settings: tuple[str, ...]
    #: The new config's warnings (unknown keys) and settings a reload cannot apply.
    warnings: tuple[str, ...]

    @classmethod
    def of(cls, diff: ConfigDiff, config: Config) -> ReloadReport:
        notes = (NOT_RELOADED[key] for key in diff.settings if key in NOT_RELOADED)
        return cls(
            source=config.source,
            added=diff.added,
            removed=diff.removed,
            changed=diff.changed,
            restart=diff.restart,
            unchanged=diff.unchanged,
            settings=diff.settings,
            warnings=(*config.warnings, *notes),
        )


@final
class Reloader:
    """Applies new configs to one running trio-swap, and owns "the config serving now"."""

    def __init__(
        self,
        config: Config,
        *,
        path: str | os.PathLike[str] | ConfigSources | None,
        router: Router,
        switch_config: SwitchConfig,
        spawn: Spawn,
        notifier: Notifier | None = None,
    ) -> None:
        """``switch_config(new)`` runs in the router's step that applies ``new``.

        It must switch every reader of the config outside the router (the HTTP
        layer: inference routes, admin state, API keys) at once, and must not
        block or raise. ``spawn`` makes the supervised process of a model a
        reload adds. ``path``: the config file, or :class:`ConfigSources` (a
        ``--config-dir``, whose every file a reload reads again).
        """
        self._config = config
        self._path: str | ConfigSources | None = (
            path if path is None or isinstance(path, ConfigSources) else os.fspath(path)
        )
        self._router = router
        self._switch_config = switch_config
        self._spawn = spawn
        self._notifier = notifier if notifier is not None else Notifier(None)
        # Not the routing path: a reload may wait for the one before it.
        self._lock = trio.Lock()
        self._send, self._receive = trio.open_memory_channel[str](math.inf)

    @property
    def config(self) -> Config:
        """The config serving now."""
        return self._config

    def request(self, reason: str) -> None:
        """Reload soon (SIGHUP, the file watcher). Never blocks; :meth:`run` does the work."""
        self._send.send_nowait(reason)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry out requested reloads: one reload for all requests that queued up meanwhile."""
        task_status.started()
        async for reason in self._receive:
            with contextlib.suppress(trio.WouldBlock):
                while True:
                    self._receive.receive_nowait()
            log.info("reloading the config (%s)", reason)
            with contextlib.suppress(ConfigError, ReloadUnavailable):  # reload() logged it
                await self.reload()

    async def reload(self, config: Config | None = None) -> ReloadReport:
        """Load the config file again (or take ``config``) and apply what changed.

        Returns once the new config is in effect: requests arriving after it
        see it. Models it stops go when their requests in flight are done, in
        the background.

        Raises:
            ConfigError: the file does not load; the running config is untouched.
            ReloadUnavailable: no file to reload from (and no ``config`` given).
        """
        async with self._lock:
            self._notifier.reloading()
            #: Set by the router's step that switched to the new config: a caller
            #: cancelled while waiting for it does not undo the switch.
            outcome: list[str] = []
            try:
                new = config if config is not None else await self._load()
                diff = await self._apply(new, outcome)
            finally:
                failed = "config reload failed; serving the previous config"
                self._notifier.ready(outcome[0] if outcome else failed)
        return ReloadReport.of(diff, new)

    async def _load(self) -> Config:
        if self._path is None:
            log.warning(
                "cannot reload: trio-swap was not started from a config file (serve --config FILE)"
            )
            raise ReloadUnavailable(
                "trio-swap was not started from a config file: start it with --config FILE"
            )
        path = self._path
        ports = self._ports_in_use()
        load = (
            partial(load_sources, path, previous=self._config, ports_in_use=ports)
            if isinstance(path, ConfigSources)
            else partial(load_config, path, previous=self._config, ports_in_use=ports)
        )
        try:
            return await trio.to_thread.run_sync(load)
        except ConfigError as exc:
            log.error("config reload failed; still serving the previous config: %s", exc)
            raise
        except Exception as exc:
            # A loader bug (issue 9: "http://[::1" raised ValueError) must never stop
            # the server: logged here with its traceback, then a failed reload like any other.
            log.exception("config reload failed (a loader bug); still serving the previous config")
            reason = f"cannot be loaded (a bug in trio-swap's loader): {type(exc).__name__}: {exc}"
            raise ConfigError(reason, source=os.fspath(path)) from exc

    def _ports_in_use(self) -> dict[int, str]:
        """Port -> model for every process still running or stopping (docs/reload.md).

        A new config never hands these to another model: the old process may
        still be serving its last requests there.
        """
        held: dict[int, str] = {}
        for name, process in self._router.processes.items():
            if process.state is ProcessState.STOPPED and process.child is None:
                continue
            port = urlsplit(process.model.proxy).port
            if port is not None:
                held[port] = name
        return held

    async def _apply(self, new: Config, outcome: list[str]) -> ConfigDiff:
        try:
            diff = diff_configs(self._config, new)
            ledger = self._router.ledger
            policy = build_policy(new, ledger)
        except Exception as exc:  # a bug, as in _load: a failed reload, never a dead server
            log.exception("config reload failed (a bug); still serving the previous config")
            reason = f"cannot be applied (a bug in trio-swap): {type(exc).__name__}: {exc}"
            raise ConfigError(reason, source=new.source) from exc

        def switch_http() -> None:
            """In the router's step: names resolve to new models exactly when it knows them.

            The reload has succeeded from here on, even if its caller is cancelled
            before the router's answer reaches it, so the outcome is logged here.
            """
            self._switch_config(new)
            self._config = new
            outcome.append(f"config reloaded ({diff.describe()})")
            log.info("config reloaded from %s: %s", new.source, diff.describe())
            for warning in new.warnings:
                log.warning("%s", warning)
            for key in diff.settings:
                if key in NOT_RELOADED:
                    log.warning("%s", NOT_RELOADED[key])

        # Shielded: once sent, the router applies it whether or not we still wait
        # (and fails the reply if it stops first), so wait for the real outcome.
        with trio.CancelScope(shield=True):
            # A stat per weight file, off the event loop and bounded: a hung network
            # mount must neither stall the server nor the reload (no estimate then).
            sizes: dict[str, int] = {}
            with trio.move_on_after(ESTIMATE_TIMEOUT):
                sizes = await trio.to_thread.run_sync(estimates, new, abandon_on_cancel=True)
            await self._router.reconfigure(
                new.models,
                policy,
                new.routing.scheduler,
                health_check_timeout=new.health_check_timeout,
                restart=frozenset(diff.restart),
                spawn=self._spawn,
                prepare=partial(_learn_config, ledger, new, sizes),
                applied=switch_http,
            )
        return diff


#: Longest a reload waits for the sizes of the model files (fit's first estimates).
ESTIMATE_TIMEOUT: Final = 5.0


def _learn_config(ledger: FitLedger | None, config: Config, sizes: dict[str, int]) -> None:
    """In the router's step, before the new policy decides: the ledger's new config."""
    if ledger is not None:
        ledger.reconfigure(config.resources, config.models, ports=config.ports, estimates=sizes)


async def watch_config_file(
    path: str | os.PathLike[str] | ConfigSources,
    request: Callable[[str], None],
    *,
    interval: float = WATCH_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """``--watch-config``: poll the config; ask for a reload once an edit has settled.

    ``path`` is the config file, or :class:`ConfigSources` (the file and the
    ``--config-dir`` directory): then a file added to or removed from the
    directory is a change too, as is an edit of any of its files.

    A change is noticed by each file's mtime, size or inode (polling, not
    inotify, so it works on bind mounts and Kubernetes ConfigMaps, which swap
    the file by rename). It counts once the files have stayed the same for one
    whole interval, so a file half-way through being written is never read,
    and only if their content (SHA-256 of the names and contents) differs from
    what was last seen: a ``touch`` reloads nothing. A missing file, or a
    missing or empty directory, is waited for (a ConfigMap being swapped).
    Started (``nursery.start``) once it has taken its first look: an edit from
    then on is seen.
    """
    watched: str | ConfigSources = path if isinstance(path, ConfigSources) else os.fspath(path)
    seen = await trio.to_thread.run_sync(_stat_key, watched)
    loaded = await trio.to_thread.run_sync(_digest, watched)
    settling = False
    task_status.started()
    while True:
        await trio.sleep(interval)
        key = await trio.to_thread.run_sync(_stat_key, watched)
        if key != seen:  # (still) changing: look again after one more interval
            seen, settling = key, key is not None
            continue
        if not settling:
            continue
        settling = False
        digest = await trio.to_thread.run_sync(_digest, watched)
        if digest is not None and digest != loaded:
            loaded = digest
            request(f"{_describe(watched)} changed")


#: The look of the watched files: (path, mtime, size, inode) for each.
StatKey = tuple[tuple[str, int, int, int], ...]


def _watched_files(watched: str | ConfigSources) -> list[str] | None:
    """The files a reload would read now; None while a directory is missing or empty."""
    if not isinstance(watched, ConfigSources):
        return [watched]
    files = [] if watched.file is None else [watched.file]
    if watched.directory is not None:
        try:
            files.extend(yaml_files(watched.directory))
        except ConfigError:
            return None
    return files


def _describe(watched: str | ConfigSources) -> str:
    return watched if isinstance(watched, str) else watched.describe()


def _stat_key(watched: str | ConfigSources) -> StatKey | None:
    files = _watched_files(watched)
    if files is None:
        return None
    key: list[tuple[str, int, int, int]] = []
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        key.append((path, stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(key)


def _digest(watched: str | ConfigSources) -> bytes | None:
    files = _watched_files(watched)
    if files is None:
        return None
    digest = hashlib.sha256()
    for path in files:
        try:
            content = Path(path).read_bytes()
        except OSError:
            return None
        digest.update(path.encode(errors="surrogateescape") + b"\0")
        digest.update(hashlib.sha256(content).digest())
    return digest.digest()
