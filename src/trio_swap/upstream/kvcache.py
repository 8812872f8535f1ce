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

Files are named per model *and command* (:func:`~trio_swap.fit.ledger.fingerprint`:
a cache saved by one ``cmd`` is never restored into another), so trio-swap
finds them again after its own restart. :class:`CacheDisk` keeps every
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
from trio_swap.config.kvcache import flag_value, slot_save_path
from trio_swap.config.model import ModelConfig
from trio_swap.config.sizes import format_size
from trio_swap.fit.ledger import fingerprint
from trio_swap.upstream.cache_disk import FILE_PREFIX, FILE_SUFFIX, CacheDisk, CacheHooks, Outcome
from trio_swap.upstream.slots import HttpSlotApi, SlotApi, SlotError, SlotFile

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
        #: File name stem shared by this model's files, for this command.
        self._stem = ""
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
        stem = _stem(model)
        if stem != self._stem or (model.keep_cache and not self._keep):
            if self.given_up:
                self._hooks.cache_off(self.model_id, False)
            self.given_up = False
            self._misses.clear()
            self._check = None
        self._keep = model.keep_cache
        self._stem = stem
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

    def filename(self, slot: int) -> str:
        """The file name (no directory: llama-server refuses a ``/``) for ``slot``."""
        return f"{self._stem}{slot}{FILE_SUFFIX}"

    # -- before the stop signal ----------------------------------------------------------

    async def save(self, upstream: Upstream, limit: float) -> None:
        """Save every slot holding a prompt, for at most ``limit`` seconds. Never raises
        (but for cancellation): what fails or runs out of time is logged and counted."""
        if not self.active:
            return
        started = trio.current_time()
        saved: list[SlotFile] = []
        # The file of the save in flight: half-written if the limit cuts it.
        writing: str | None = None
        with trio.move_on_after(limit) as scope:
            try:
                slots = await self._api.slots(upstream)
            except SlotError as exc:
                log.warning("model %s: KV cache not saved: %s", self.model_id, exc)
                self._hooks.slot_saved(self.model_id, Outcome.FAILED, 0)
                return
            for slot in slots:
                if not slot.holds_prompt:
                    continue
                name = writing = self.filename(slot.id)
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
        if not self.active or self.directory is None:
            return
        started = trio.current_time()
        directory, suspect = self.directory, frozenset(self._suspect)
        restored: list[tuple[_Saved, SlotFile]] = []
        errors: list[str] = []
        files: list[_Saved] = []
        with trio.move_on_after(limit) as scope:
            files = await trio.to_thread.run_sync(_prepare, directory, self._stem, suspect)
            self._suspect.clear()  # deleted by _prepare (or gone already)
            for saved in files:
                try:
                    file = await self._api.restore(
                        upstream, saved.slot, os.path.basename(saved.path)
                    )
                except SlotError as exc:
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


def _stem(model: ModelConfig) -> str:
    """``trio-swap-kv.<id, made safe>.<hash of id and command>.slot``."""
    try:
        port: int | None = Upstream(model.proxy).port
    except ValueError:
        port = None
    key = hashlib.sha256(f"{model.id}\0{fingerprint(model, port)}".encode()).hexdigest()[:12]
    safe = _UNSAFE.sub("_", model.id)[:60]
    return f"{FILE_PREFIX}{safe}.{key}.slot"


def _api_key(model: ModelConfig) -> str:
    """llama-server's ``--api-key`` (the first of a comma list), or its ``LLAMA_API_KEY``."""
    key = flag_value(model.cmd, "--api-key")
    if key is None:
        env = dict(model.env)
        key = env.get("LLAMA_API_KEY", os.environ.get("LLAMA_API_KEY", ""))
    return key.split(",", 1)[0].strip()


def _prepare(directory: str, stem: str, suspect: frozenset[str]) -> list[_Saved]:
    """Delete the suspect files, then list this model's saved slots (by slot number)."""
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
        return found
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
    return sorted(found, key=lambda saved: saved.slot)


def _touch(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # deleted meanwhile: nothing to keep
            os.utime(path)
