"""A llama-server model's KV cache kept across a swap (``keepCache: true``).

Before trio-swap stops such a model (a swap, a TTL, an unload, shutdown), its
supervisor calls :meth:`ModelCache.save`: ``GET /slots``, then one
``POST /slots/{id}?action=save`` per slot that holds a prompt, into the
server's ``--slot-save-path`` directory, under a time limit the supervisor
takes out of ``unloadTimeout`` (so the stop still ends by then). After the
next start passes its health check, and before any request is forwarded,
:meth:`ModelCache.restore` puts those files back (``action=restore``).

Whether a restore bought anything is read from the first response after it
(:meth:`ModelCache.response_seen`: llama.cpp's ``timings.cache_n``, the prompt
tokens reused from the cache). llama.cpp has restores that succeed and reuse
nothing; after :data:`GIVE_UP_AFTER` restores in a row that bought nothing,
the model's slots are no longer saved or restored, and the log says why.

Files are named per model, *command* (:func:`~trio_swap.fit.ledger.fingerprint`)
*and weights* (each weight file's device, inode, size and modification time,
read in a worker thread after the health check): a cache saved by one
``cmd``, or by the weights a file held before it was replaced, is never
restored into another, and trio-swap finds the files again after its own
restart. A stop whose next start runs another command (a reload's) saves
nothing, and neither does any stop while ``cacheDiskBudget`` is 0. :class:`CacheDisk` keeps every
model's files within ``cacheDiskBudget``, deleting the least recently used
(saved or restored) first.

Failures never fail a request or a stop: a save or restore that errs or runs
out of time is logged and counted, and the model is stopped or served
without it. A file a cut save may have left half-written, or that failed to
restore, is never restored and is deleted before the next restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from typing import Final, final

import msgspec
import trio

from trio_swap.config.address import Upstream
from trio_swap.config.files import weight_files
from trio_swap.config.kvcache import flag_value, slot_save_path
from trio_swap.config.model import ModelConfig
from trio_swap.config.sizes import format_size
from trio_swap.fit.ledger import fingerprint
from trio_swap.upstream.cache_disk import FILE_PREFIX, FILE_SUFFIX, CacheDisk, CacheHooks, Outcome
from trio_swap.upstream.slots import (
    HttpSlotApi,
    SlotApi,
    SlotConnectionError,
    SlotError,
    SlotFile,
)

__all__ = ["GIVE_UP_AFTER", "SAVE_SHARE", "ModelCache"]

log = logging.getLogger("trio_swap.upstream")

#: Restores in a row whose next response reused no prompt token before giving up on a model.
GIVE_UP_AFTER: Final = 3
#: The share of ``unloadTimeout`` a save may take before the stop signal; the
#: server has the rest to exit, so the stop still ends by ``unloadTimeout``.
SAVE_SHARE: Final = 0.5
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@final
class _Saved(msgspec.Struct, frozen=True):
    """A saved slot file of this model, found in its directory."""

    slot: int
    path: str
    bytes: int


@final
class _Check(msgspec.Struct, frozen=True):
    """A restore waiting for the first response to say what it bought."""

    tokens: int
    slots: int


@final
class ModelCache:
    """One model's saved slots: what its supervisor calls around each stop and start.

    Owned by the model's :class:`~trio_swap.upstream.process.ModelProcess`: every
    method runs in one of that supervisor's tasks, one at a time (responses
    reach :meth:`response_seen` as a message to the supervisor).
    """

    def __init__(
        self,
        model: ModelConfig,
        disk: CacheDisk,
        *,
        api: SlotApi | None = None,
        hooks: CacheHooks | None = None,
    ) -> None:
        self._disk = disk
        self._fixed_api = api
        self._api: SlotApi = api if api is not None else HttpSlotApi()
        self._hooks = hooks if hooks is not None else CacheHooks()
        self.model_id = model.id
        self._keep = False
        #: The server's --slot-save-path, absolute; None: not set (keepCache refused).
        self.directory: str | None = None
        #: Hash of the id, command and weight paths: the settings part of the file names.
        self._key = ""
        #: The weight files whose identity the file names carry.
        self._weights: tuple[str, ...] = ()
        #: The running server's file name stem (its weights as its health check
        #: passed); None: not read for this server yet.
        self._server_stem: str | None = None
        #: The last restore's slot calls got no answer (the server may be gone).
        self.lost_connection = False
        #: A restore is under way (for views and tests).
        self.restoring = False
        #: Restores in a row that bought nothing, and why (for the give-up message).
        self._misses: list[str] = []
        #: Given up on this command (GIVE_UP_AFTER misses): no more saves or restores.
        self.given_up = False
        # Invariant: set from a restore that restored tokens until the first
        # response that reports cache_n (or the next restore).
        self._check: _Check | None = None
        #: Files never to restore, deleted before the next restore: a save cut
        #: mid-write, or a restore the server refused. A later good save clears one.
        self._suspect: set[str] = set()
        self.configure(model)

    def __repr__(self) -> str:
        state = "given up" if self.given_up else ("on" if self.active else "off")
        return f"<ModelCache {self.model_id}: {state} {self.directory}>"

    def configure(self, model: ModelConfig) -> None:
        """The model's settings (at creation and when a reload's settings apply).

        A new command, or keepCache turned back on, forgets a give-up: the new
        server may restore where the old one did not.
        """
        directory = slot_save_path(model.cmd)
        key = _key(model)
        if key != self._key:
            self._server_stem = None  # a new command: read its weights at its start
        if key != self._key or (model.keep_cache and not self._keep):
            if self.given_up:
                self._hooks.cache_off(self.model_id, False)
            self.given_up = False
            self._misses.clear()
            self._check = None
        self._keep = model.keep_cache
        self._key = key
        self._weights = weight_files(model)
        self.directory = os.path.abspath(directory) if directory is not None else None
        if self._fixed_api is None:
            self._api = HttpSlotApi(_api_key(model))
        if self.active and self.directory is not None:
            self._disk.watch(self.directory)

    @property
    def active(self) -> bool:
        """keepCache is on, the command names a save directory, and it was not given up."""
        return self._keep and self.directory is not None and not self.given_up

    @property
    def checking(self) -> bool:
        """A restore waits for the next response's ``timings`` to say what it bought."""
        return self._check is not None

    def restored_by(self, model: ModelConfig) -> bool:
        """A server started with ``model`` (a reload's pending settings) would restore
        what this one saves: keepCache still on, same command, weights and directory."""
        directory = slot_save_path(model.cmd)
        return (
            model.keep_cache
            and _key(model) == self._key
            and directory is not None
            and os.path.abspath(directory) == self.directory
        )

    def server_started(self) -> None:
        """A new server passed its health check: its weights are read by the restore
        (or, with keepCache off at its start, by its save)."""
        self._server_stem = None

    async def identify(self) -> str:
        """The file name stem for the weights on disk now (read in a worker thread)."""
        return await trio.to_thread.run_sync(_stem, self.model_id, self._key, self._weights)

    def filename(self, slot: int, stem: str) -> str:
        """The file name (no directory: llama-server refuses a ``/``) for ``slot``."""
        return f"{stem}{slot}{FILE_SUFFIX}"

    # -- before the stop signal ----------------------------------------------------------

    async def save(self, upstream: Upstream, limit: float) -> None:
        """Save every slot holding a prompt, for at most ``limit`` seconds. Never raises
        (but for cancellation): what fails or runs out of time is logged and counted."""
        if not self.active:
            return
        if self._disk.budget == 0:  # it would be deleted at once
            log.info("model %s: KV cache not saved: cacheDiskBudget is 0", self.model_id)
            return
        started = trio.current_time()
        saved: list[SlotFile] = []
        # The file of the save in flight: half-written if the limit cuts it.
        writing: str | None = None
        with trio.move_on_after(limit) as scope:
            if self._server_stem is None:  # keepCache was off when this server started
                self._server_stem = await self.identify()
            stem = self._server_stem
            try:
                slots = await self._api.slots(upstream)
            except SlotError as exc:
                log.warning("model %s: KV cache not saved: %s", self.model_id, exc)
                self._hooks.slot_saved(self.model_id, Outcome.FAILED, 0)
                return
            for slot in slots:
                if not slot.holds_prompt:
                    continue
                name = writing = self.filename(slot.id, stem)
                try:
                    file = await self._api.save(upstream, slot.id, name)
                except SlotError as exc:
                    writing = None
                    log.warning(
                        "model %s: KV cache slot %d not saved: %s", self.model_id, slot.id, exc
                    )
                    self._hooks.slot_saved(self.model_id, Outcome.FAILED, 0)
                    self._suspect.add(name)
                    continue
                writing = None
                if file.tokens == 0:  # a slot that held nothing after all: not worth a restore
                    self._suspect.add(name)
                    continue
                self._suspect.discard(name)
                saved.append(file)
                self._hooks.slot_saved(self.model_id, Outcome.OK, file.bytes)
        seconds = trio.current_time() - started
        if scope.cancelled_caught:
            if writing is not None:
                self._suspect.add(writing)
            self._hooks.slot_saved(self.model_id, Outcome.TIMEOUT, 0)
            log.warning(
                "model %s: saving its KV cache took longer than %gs (%g%% of unloadTimeout); "
                "stopping it with %d slot(s) saved",
                self.model_id,
                limit,
                SAVE_SHARE * 100,
                len(saved),
            )
        if saved:
            log.info(
                "model %s: saved the KV cache of %d slot(s) (%d tokens, %s) in %.3fs",
                self.model_id,
                len(saved),
                sum(f.tokens for f in saved),
                format_size(sum(f.bytes for f in saved)),
                seconds,
            )
            self._disk.request_sweep()

    # -- after the health check, before the first request --------------------------------

    async def restore(self, upstream: Upstream, limit: float) -> None:
        """Restore this model's saved slots, for at most ``limit`` seconds. Never raises
        (but for cancellation); the model is served with whatever was restored."""
        self._check = None
        self.lost_connection = False
        if not self.active or self.directory is None:
            return
        self.restoring = True
        try:
            await self._restore(upstream, limit, self.directory)
        finally:
            self.restoring = False

    async def _restore(self, upstream: Upstream, limit: float, directory: str) -> None:
        started = trio.current_time()
        suspect = frozenset(self._suspect)
        restored: list[tuple[_Saved, SlotFile]] = []
        errors: list[str] = []
        files: list[_Saved] = []
        with trio.move_on_after(limit) as scope:
            stem, files = await trio.to_thread.run_sync(
                _prepare, directory, self.model_id, self._key, self._weights, suspect
            )
            self._server_stem = stem
            self._suspect.clear()  # deleted by _prepare (or gone already)
            for saved in files:
                try:
                    file = await self._api.restore(
                        upstream, saved.slot, os.path.basename(saved.path)
                    )
                except SlotError as exc:
                    if isinstance(exc, SlotConnectionError):
                        self.lost_connection = True
                    errors.append(str(exc))
                    self._suspect.add(os.path.basename(saved.path))
                    self._hooks.slot_restored(self.model_id, Outcome.FAILED, 0)
                    continue
                restored.append((saved, file))
                self._hooks.slot_restored(self.model_id, Outcome.OK, file.bytes)
            if restored:  # recency for the budget: a restored file was just used
                await trio.to_thread.run_sync(_touch, [saved.path for saved, _ in restored])
        if scope.cancelled_caught:
            self._hooks.slot_restored(self.model_id, Outcome.TIMEOUT, 0)
            log.warning(
                "model %s: restoring its KV cache took longer than %gs (unloadTimeout); "
                "serving it with %d of %d slot(s) restored",
                self.model_id,
                limit,
                len(restored),
                len(files),
            )
        for error in errors:
            log.warning("model %s: KV cache restore failed: %s", self.model_id, error)
        tokens = sum(file.tokens for _, file in restored)
        if tokens > 0:
            log.info(
                "model %s: restored the KV cache of %d slot(s) (%d tokens, %s) in %.3fs",
                self.model_id,
                len(restored),
                tokens,
                format_size(sum(file.bytes for _, file in restored)),
                trio.current_time() - started,
            )
            self._check = _Check(tokens=tokens, slots=len(restored))
        elif files:
            why = errors[0] if errors else "it restored 0 tokens"
            self._miss(f"the restore failed ({why})")

    # -- the first response after a restore ----------------------------------------------

    def response_seen(self, cached_tokens: int) -> None:
        """A response of this model reported ``cached_tokens`` (``timings.cache_n``)."""
        check = self._check
        if check is None:
            return
        self._check = None
        if cached_tokens > 0:
            self._misses.clear()
            self._hooks.tokens_reused(self.model_id, cached_tokens)
            log.info(
                "model %s: the first request after the restore reused %d prompt tokens "
                "from the cache (of %d restored)",
                self.model_id,
                cached_tokens,
                check.tokens,
            )
            return
        self._miss(f"restored {check.tokens} tokens, the next request reused none (cache_n 0)")

    def _miss(self, why: str) -> None:
        self._misses.append(why)
        log.info("model %s: a KV cache restore bought nothing: %s", self.model_id, why)
        if len(self._misses) < GIVE_UP_AFTER or self.given_up:
            return
        self.given_up = True
        self._hooks.cache_off(self.model_id, True)
        log.warning(
            "model %s: keepCache given up: %d restores in a row reused no prompt token (%s). "
            "llama.cpp restores some models' caches without effect, and each save and "
            "restore costs disk time, so its slots are no longer saved or restored. A "
            "reload that changes its cmd, or a restart of trio-swap, tries again.",
            self.model_id,
            len(self._misses),
            "; ".join(self._misses[-GIVE_UP_AFTER:]),
        )


# -- file names and the file system (worker threads) ---------------------------------------


def _key(model: ModelConfig) -> str:
    """A hash of the id, the command (:func:`fingerprint`) and the weight paths. No I/O."""
    try:
        port: int | None = Upstream(model.proxy).port
    except ValueError:
        port = None
    text = msgspec.json.encode([model.id, fingerprint(model, port), weight_files(model)])
    return hashlib.sha256(text).hexdigest()


def _stem(model_id: str, key: str, weights: tuple[str, ...]) -> str:
    """``trio-swap-kv.<id, made safe>.<hash of key and weights>.slot`` (stats: a worker thread).

    Each weight file counts by ``(st_dev, st_ino, st_size, st_mtime_ns)``: one
    replaced at the same path (a new download, a re-quantisation) names other
    files, so a cache computed with the old weights is never restored into
    the new ones. A file that cannot be read counts as missing.
    """
    identity: list[object] = [key]
    for path in weights:
        try:
            info = os.stat(path)
        except OSError:
            identity.append(None)
            continue
        identity.append([info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns])
    digest = hashlib.sha256(msgspec.json.encode(identity)).hexdigest()[:12]
    safe = _UNSAFE.sub("_", model_id)[:60]
    return f"{FILE_PREFIX}{safe}.{digest}.slot"


def _api_key(model: ModelConfig) -> str:
    """llama-server's ``--api-key`` (the first of a comma list), or its ``LLAMA_API_KEY``."""
    key = flag_value(model.cmd, "--api-key")
    if key is None:
        env = dict(model.env)
        key = env.get("LLAMA_API_KEY", os.environ.get("LLAMA_API_KEY", ""))
    return key.split(",", 1)[0].strip()


def _prepare(
    directory: str, model_id: str, key: str, weights: tuple[str, ...], suspect: frozenset[str]
) -> tuple[str, list[_Saved]]:
    """Read the weights' identity (the file name stem), delete the suspect files, then
    list this model's saved slots (by slot number)."""
    stem = _stem(model_id, key, weights)
    for name in suspect:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("KV cache: cannot delete %s: %s", name, exc)
    found: list[_Saved] = []
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        log.warning("KV cache: cannot list %s: %s", directory, exc)
        return stem, found
    for entry in entries:
        name = entry.name
        if not (name.startswith(stem) and name.endswith(FILE_SUFFIX)):
            continue
        number = name[len(stem) : -len(FILE_SUFFIX)]
        if not number.isdigit() or name in suspect:
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
        if size > 0:
            found.append(_Saved(slot=int(number), path=entry.path, bytes=size))
    return stem, sorted(found, key=lambda saved: saved.slot)


def _touch(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # deleted meanwhile: nothing to keep
            os.utime(path)
