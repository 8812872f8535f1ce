"""Load a llama-swap style ``config.yaml`` into a validated :class:`Config`.

The pipeline, each stage in its own module:

1. ``${env.NAME}`` substitution on the raw text (:mod:`.macros`);
2. YAML parsing that remembers the line of every key (:mod:`.yamlsource`);
3. sorting keys into supported, llama-swap-only (warned: not supported yet)
   and unknown (warned: probably a typo, or a ``defs:`` block of anchors);
4. macro expansion and ``${PORT}`` assignment (:mod:`.macros`);
5. strict type conversion into the raw Structs (:mod:`.schema`);
6. validation and defaults (:mod:`.validate`).

Every failure is a :class:`ConfigError` naming file, key path and line. A
config that loads may still carry :attr:`Config.warnings`; callers should
print them, since they describe keys that change nothing yet.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Final, final

import msgspec

from trio_swap.config.capabilities import check_capabilities
from trio_swap.config.captures import check_capture_buffer
from trio_swap.config.compat import apply_comfyui, check_compat
from trio_swap.config.errors import ConfigError
from trio_swap.config.files import check_files, check_prefetch
from trio_swap.config.ignore_paths import check_ignore_paths
from trio_swap.config.keys import check_allowed_hosts, scope_api_keys
from trio_swap.config.kvcache import check_cache_budget, check_keep_cache
from trio_swap.config.logtime import check_log_time_format
from trio_swap.config.macros import (
    ExpansionBudget,
    MacroList,
    assign_ports,
    check_model_leftovers,
    expand_globals,
    expand_model,
    read_macros,
    substitute_env,
)
from trio_swap.config.model import Config, ModelConfig, PeerConfig, build_model_names
from trio_swap.config.performance import check_performance
from trio_swap.config.resources import check_needs, check_resources
from trio_swap.config.routing import ROUTING_TOP_KEYS, load_routing
from trio_swap.config.schema import (
    LLAMA_SWAP_ONLY_MODEL_KEYS,
    LLAMA_SWAP_ONLY_PEER_KEYS,
    LLAMA_SWAP_ONLY_PEER_TIMEOUT_KEYS,
    LLAMA_SWAP_ONLY_TOP_KEYS,
    MODEL_KEYS,
    PEER_KEYS,
    PEER_TIMEOUT_KEYS,
    PERFORMANCE_KEYS,
    TOP_KEYS,
    RawConfig,
    RawModel,
    RawPeer,
)
from trio_swap.config.selectors import check_profiles, check_selectors
from trio_swap.config.session_ids import check_session_id_headers
from trio_swap.config.sleep import check_sleep, check_sleep_ttl
from trio_swap.config.store import check_store
from trio_swap.config.timeouts import check_timeouts
from trio_swap.config.validate import (
    NOT_PRINTABLE,
    check_aliases,
    check_model,
    check_peers,
    check_settings,
    convert,
)
from trio_swap.config.yamlsource import Document, KeyPath, parse_document, type_name

#: Largest config file read (the loader's other limits: docs/configuration.md#limits).
MAX_FILE_BYTES: Final = 16 << 20
#: YAML 1.1 booleans that llama-swap's Go YAML library still accepts for bool fields.
_YAML11_BOOLS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


def load_config(
    path: str | os.PathLike[str],
    *,
    previous: Config | None = None,
    ports_in_use: Mapping[int, str] | None = None,
) -> Config:
    """Read and load a config file; errors name the path as given.

    ``previous`` is the config being replaced by a reload: its models keep
    their ``${PORT}``; ``ports_in_use`` maps the ports that running processes
    still hold to their model, and none goes to another model (see
    :func:`~trio_swap.config.macros.assign_ports`).

    Raises:
        ConfigError: unreadable file (``line`` is None), or anything
            :func:`load_config_text` rejects.
    """
    source = os.fspath(path)
    text = read_config_file(source)
    return load_config_text(text, source, previous=previous, ports_in_use=ports_in_use)


def read_config_file(source: str) -> str:
    """The text of one config file (also each file of ``--config-dir``).

    Raises:
        ConfigError: unreadable, larger than :data:`MAX_FILE_BYTES`, not UTF-8.
    """
    try:
        with open(source, "rb") as file:
            # One byte over the limit is enough to refuse it (--config pointed at a log file).
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot read the config file: {reason}", source=source) from exc
    if len(data) > MAX_FILE_BYTES:
        message = f"is larger than {MAX_FILE_BYTES >> 20} MiB; a config file is a few KiB"
        raise ConfigError(message, source=source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError("is not valid UTF-8", source=source, line=line) from exc
    return text


def load_config_text(
    text: str,
    source: str,
    *,
    environ: Mapping[str, str] | None = None,
    previous: Config | None = None,
    ports_in_use: Mapping[int, str] | None = None,
) -> Config:
    """Load a config from text; ``source`` is only used in messages.

    Args:
        text: The YAML document.
        source: What to call it in errors and warnings (usually its path).
        environ: Variables for ``${env.NAME}``; ``os.environ`` when None.
        previous: On a reload, the running config: models keep its ``${PORT}``
            numbers, unless ``startPort`` changed (then all are numbered afresh).
        ports_in_use: On a reload, port -> model of every process still running
            (or stopping): no such port is given to a different model.

    Raises:
        ConfigError: the first problem found, located by key path and line.
    """
    text = substitute_env(text.removeprefix("\ufeff"), source, environ)
    return load_document(parse_document(text, source), previous=previous, ports_in_use=ports_in_use)


def load_document(
    doc: Document,
    *,
    previous: Config | None = None,
    ports_in_use: Mapping[int, str] | None = None,
) -> Config:
    """Load a parsed document (one file's, or several merged by :mod:`.merge`).

    Raises:
        ConfigError: the first problem found, located by file, key path and line.
    """
    return _Loader(doc, previous, ports_in_use).load()


@final
class _Loader:
    """One load: the parsed document plus the warnings collected on the way."""

    def __init__(
        self,
        doc: Document,
        previous: Config | None = None,
        ports_in_use: Mapping[int, str] | None = None,
    ) -> None:
        self.doc = doc
        self.previous = previous
        self.ports_in_use = ports_in_use
        #: (line, message): sorted by line when the load succeeds.
        self.warnings: list[tuple[int, str]] = []
        #: What macro expansion may still produce in this load.
        self.budget = ExpansionBudget(doc)

    def load(self) -> Config:
        doc = self.doc
        top = {} if doc.value is None else doc.value
        if not isinstance(top, dict):
            raise doc.error((), f"the top level must be a mapping of keys (got {type_name(top)})")
        routing_values = {key: top.pop(key) for key in ROUTING_TOP_KEYS if key in top}
        hooks = top.pop("hooks", None)
        top = self._supported(top, (), TOP_KEYS, LLAMA_SWAP_ONLY_TOP_KEYS)
        performance = top.get("performance")
        if isinstance(performance, dict):  # llama-swap ignores unknown keys there: warn
            top["performance"] = self._supported(
                performance, ("performance",), PERFORMANCE_KEYS, {}
            )
        models_value = top.pop("models", None)
        peers_value = top.pop("peers", None)
        global_macros = read_macros(top.pop("macros", None), ("macros",), doc)
        budget = self.budget
        raw_settings = convert(expand_globals(top, global_macros, doc, budget), RawConfig, (), doc)
        settings = check_settings(raw_settings, doc)
        in_memory, store_path, store_rows = check_store(raw_settings, doc)
        resources = check_resources(raw_settings.resources, doc)
        log_time_format, time_warnings = check_log_time_format(raw_settings.log_time_format, doc)
        self.warnings.extend(time_warnings)

        expanded: dict[str, dict[str, object]] = {}
        for model_id, value in self._models(models_value).items():
            path: KeyPath = ("models", model_id)
            model = self._supported(value, path, MODEL_KEYS, LLAMA_SWAP_ONLY_MODEL_KEYS)
            if "cmd" not in model:
                raise doc.error((*path, "cmd"), "required key is missing")
            expanded[model_id] = expand_model(model_id, model, global_macros, doc, budget)
        previous = self.previous
        keep = previous.ports if previous and previous.start_port == settings.start_port else None
        ports = assign_ports(
            expanded, settings.start_port, doc, keep=keep, in_use=self.ports_in_use
        )

        models: dict[str, ModelConfig] = {}
        for model_id, model in expanded.items():
            check_model_leftovers(model_id, model, doc)
            raw = convert(_yaml11_bools(model), RawModel, ("models", model_id), doc)
            model_config = check_model(model_id, raw, settings, doc)
            if raw.keep_cache:
                check_keep_cache(model_config, doc)
                model_config = msgspec.structs.replace(model_config, keep_cache=True)
            if raw.needs:
                needs = check_needs(model_id, raw.needs, resources, doc)
                model_config = msgspec.structs.replace(model_config, needs=needs)
            if raw.files or not raw.prefetch:
                files, file_warnings = check_files(model_id, raw.files, doc)
                self.warnings.extend(file_warnings)
                model_config = msgspec.structs.replace(
                    model_config, files=files, prefetch=raw.prefetch
                )
            if raw.sleep is not None:
                sleep = check_sleep(model_config, raw.sleep, doc)
                model_config = msgspec.structs.replace(model_config, sleep=sleep)
            if raw.timeouts is not None:
                timeouts = check_timeouts(raw.timeouts, ("models", model_id, "timeouts"), doc)
                model_config = msgspec.structs.replace(model_config, timeouts=timeouts)
            if raw.health_check_timeout is not None:
                self.warnings.append(_per_model_health_check(model_id, doc))
            if raw.capabilities is not None:
                caps, caps_warnings = check_capabilities(model_id, raw.capabilities, doc)
                self.warnings.extend(caps_warnings)
                model_config = msgspec.structs.replace(model_config, capabilities=caps)
            if raw.compat is not None:
                compat, compat_warnings = check_compat(model_id, raw.compat, doc)
                self.warnings.extend(compat_warnings)
                model_config = msgspec.structs.replace(model_config, compat=compat)
            models[model_id] = apply_comfyui(model_config)
        check_aliases(models, doc)
        peers = self._peers(peers_value, global_macros, models)
        routing, routing_warnings = load_routing(
            expand_globals(routing_values, global_macros, doc, budget), models, doc
        )
        self.warnings.extend(routing_warnings)
        api_keys, key_warnings = scope_api_keys(
            settings.api_keys, models, peers, doc, selectors=raw_settings.selectors
        )
        self.warnings.extend(key_warnings)
        preload = _preload(
            expand_globals({"hooks": hooks}, global_macros, doc, budget)["hooks"], models, doc
        )
        config = Config(
            source=doc.source,
            models=models,
            health_check_timeout=settings.health_check_timeout,
            start_port=settings.start_port,
            log_level=settings.log_level,
            log_to_stdout=settings.log_to_stdout,
            log_time_format=log_time_format,
            log_requests=raw_settings.log_requests,
            session_id_headers=check_session_id_headers(raw_settings.ui, doc),
            ignore_paths=check_ignore_paths(raw_settings.upstream, doc),
            routing=routing,
            preload=preload,
            api_keys=api_keys,
            allowed_hosts=check_allowed_hosts(raw_settings.allowed_hosts, doc),
            include_aliases_in_list=settings.include_aliases_in_list,
            cache_disk_budget=check_cache_budget(raw_settings.cache_disk_budget, doc),
            metrics_max_in_memory=in_memory,
            store_path=store_path,
            store_max_rows=store_rows,
            capture_buffer=check_capture_buffer(raw_settings.capture_buffer, doc),
            resources=resources,
            prefetch=check_prefetch(raw_settings.prefetch, doc),
            sleep_ttl=check_sleep_ttl(raw_settings.sleep_ttl, doc),
            performance=check_performance(raw_settings.performance, doc),
            peers=peers,
            ports=ports,
        )
        # Selectors and profiles name models, aliases and peer models: checked last.
        selectors, selector_warnings = check_selectors(raw_settings.selectors, config, doc)
        profiles, profile_warnings = check_profiles(raw_settings.profiles, config, selectors, doc)
        self.warnings.extend([*selector_warnings, *profile_warnings])
        return msgspec.structs.replace(
            config,
            selectors=selectors,
            profiles=profiles,
            warnings=tuple(text for _, text in sorted(self.warnings, key=lambda w: w[0])),
        )

    def _models(self, value: object) -> dict[str, dict[str, object]]:
        """The ``models:`` mapping, checking its shape and its IDs."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.doc.error(
                ("models",), f"must be a mapping of model IDs (got {type_name(value)})"
            )
        models: dict[str, dict[str, object]] = {}
        for model_id, model in value.items():
            path: KeyPath = ("models", model_id)
            if not model_id.strip():
                raise self.doc.error(path, "a model ID must not be empty")
            if not model_id.isprintable():
                raise self.doc.error(path, NOT_PRINTABLE.format(what="a model ID"))
            if not isinstance(model, dict):
                raise self.doc.error(path, f"must be a mapping of keys (got {type_name(model)})")
            models[model_id] = model
        return models

    def _peers(
        self, value: object, global_macros: MacroList, models: dict[str, ModelConfig]
    ) -> dict[str, PeerConfig]:
        """The ``peers:`` mapping: shape, key warnings, global macros, then validation."""
        doc = self.doc
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise doc.error(("peers",), f"must be a mapping of peer IDs (got {type_name(value)})")
        kept: dict[str, object] = {}
        for peer_id, peer in value.items():
            path: KeyPath = ("peers", peer_id)
            if not peer_id.strip():
                raise doc.error(path, "a peer ID must not be empty")
            if not peer_id.isprintable():
                raise doc.error(path, NOT_PRINTABLE.format(what="a peer ID"))
            if not isinstance(peer, dict):
                raise doc.error(path, f"must be a mapping of keys (got {type_name(peer)})")
            peer = self._supported(peer, path, PEER_KEYS, LLAMA_SWAP_ONLY_PEER_KEYS)
            timeouts = peer.get("timeouts")
            if isinstance(timeouts, dict):
                peer["timeouts"] = self._supported(
                    timeouts,
                    (*path, "timeouts"),
                    PEER_TIMEOUT_KEYS,
                    LLAMA_SWAP_ONLY_PEER_TIMEOUT_KEYS,
                )
            kept[peer_id] = peer
        expanded = expand_globals({"peers": kept}, global_macros, doc, self.budget)["peers"]
        assert isinstance(expanded, dict)
        raw = {
            peer_id: convert(peer, RawPeer, ("peers", peer_id), doc)
            for peer_id, peer in expanded.items()
        }
        peers, warnings = check_peers(raw, models, doc)
        self.warnings.extend(warnings)
        return peers

    def _supported(
        self,
        mapping: dict[str, object],
        path: KeyPath,
        supported: frozenset[str],
        llama_swap_only: Mapping[str, str],
    ) -> dict[str, object]:
        """The supported keys of ``mapping`` (null values dropped); warn about the rest.

        A null value (``ttl:`` with nothing after it) means "use the default",
        as it does for llama-swap.
        """
        kept: dict[str, object] = {}
        for key, value in mapping.items():
            if key in supported:
                if value is not None:
                    kept[key] = value
                continue
            where = (*path, key)
            if key in llama_swap_only:
                hint = llama_swap_only[key]
                suffix = f" ({hint})" if hint else ""
                message = f"not supported yet by trio-swap; ignored{suffix}"
            else:
                close = _close_match(key, supported | set(llama_swap_only))
                suggestion = f" (did you mean '{close}'?)" if close else ""
                message = f"unknown key{suggestion}; ignored"
            self.warnings.append(self.doc.warning(where, message))
        return kept


def _preload(value: object, models: dict[str, ModelConfig], doc: Document) -> tuple[str, ...]:
    """``hooks.on_startup.preload``: model ids or aliases, resolved to ids, in order.

    llama-swap silently drops names it does not know; a typo there would mean a
    model quietly not preloaded, so it is an error here.
    """
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise doc.error(("hooks",), f"must be a mapping (got {type_name(value)})")
    for key in value:
        if key != "on_startup":
            raise doc.error(("hooks", key), "unknown hook (the only one is 'on_startup')")
    startup = value.get("on_startup") or {}
    if not isinstance(startup, dict):
        raise doc.error(("hooks", "on_startup"), f"must be a mapping (got {type_name(startup)})")
    for key in startup:
        if key != "preload":
            raise doc.error(("hooks", "on_startup", key), "unknown key (expected 'preload')")
    names = startup.get("preload") or []
    if not isinstance(names, list):
        raise doc.error(("hooks", "on_startup", "preload"), "must be a list of model ids")
    known = build_model_names(models)
    resolved: dict[str, None] = {}
    for index, name in enumerate(names):
        where: KeyPath = ("hooks", "on_startup", "preload", index)
        if not isinstance(name, str):
            raise doc.error(where, f"must be a model id (got {type_name(name)})")
        model = name if name in models else known.get(name.strip())
        if model is None:
            raise doc.error(where, f"unknown model {name!r} (not an id or alias)")
        resolved[model] = None
    return tuple(resolved)


def _per_model_health_check(model_id: str, doc: Document) -> tuple[int, str]:
    """llama-swap reads ``models.<id>.healthCheckTimeout``, then uses the top-level one."""
    return doc.warning(
        ("models", model_id, "healthCheckTimeout"),
        "has no effect, as in llama-swap (it uses the top-level healthCheckTimeout); set it there",
    )


def _close_match(key: str, known: AbstractSet[str]) -> str | None:
    """The known key a typo most likely meant (``cmdstop`` → ``cmdStop``)."""
    for candidate in sorted(known):
        if candidate.lower() == key.lower():
            return candidate
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.65)
    return close[0] if close else None


def _yaml11_bools(model: dict[str, object]) -> dict[str, object]:
    """Accept ``unlisted: yes`` like llama-swap does; YAML 1.2 reads it as a string."""
    unlisted = model.get("unlisted")
    if isinstance(unlisted, str) and unlisted.lower() in _YAML11_BOOLS:
        return model | {"unlisted": _YAML11_BOOLS[unlisted.lower()]}
    return model
