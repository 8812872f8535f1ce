"""The raw YAML shape, key for key as llama-swap spells it.

These Structs describe what a user writes, after macro expansion and before
normalisation (``ttl: -1`` still means "inherit", ``concurrencyLimit: 0``
still means "default"). ``load.py`` turns them into the final
:class:`~trio_swap.config.model.Config`. They are also the single source of
the keys trio-swap supports: anything else is reported as a warning, never
silently dropped (see :data:`LLAMA_SWAP_ONLY_TOP_KEYS`).
"""

from __future__ import annotations

from typing import Final

import msgspec

from trio_swap.config.model import (
    DEFAULT_CACHE_DISK_BUDGET,
    DEFAULT_CAPTURE_BUFFER_MB,
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_METRICS_MAX_IN_MEMORY,
    DEFAULT_PEER_CONNECT_TIMEOUT,
    DEFAULT_SLEEP_TTL,
    DEFAULT_START_PORT,
    DEFAULT_UNLOAD_TIMEOUT,
    UpstreamTimeouts,
)

#: llama-swap's defaults for ``timeouts:`` (models and peers), in seconds.
_TIMEOUTS: Final = UpstreamTimeouts()

#: A macro value: only scalars may be declared (lists and maps are errors).
MacroValue = str | int | float | bool

#: Used when a model sets no ``proxy``; it is why ``cmd`` then needs ``${PORT}``.
DEFAULT_PROXY: Final = "http://localhost:${PORT}"
DEFAULT_CHECK_ENDPOINT: Final = "/health"
#: ``ttl: -1`` (the default) means "use globalTTL".
INHERIT_TTL: Final = -1.0


class RawFilters(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``models.<id>.filters`` as written (``strip_params`` is llama-swap's old spelling)."""

    strip_params: str = msgspec.field(default="", name="stripParams")
    strip_params_legacy: str = msgspec.field(default="", name="strip_params")
    set_params: dict[str, object] = msgspec.field(default_factory=dict, name="setParams")
    set_params_by_id: dict[str, dict[str, object]] = msgspec.field(
        default_factory=dict, name="setParamsByID"
    )


class RawModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One entry under ``models:``, as written."""

    cmd: str
    cmd_stop: str = msgspec.field(default="", name="cmdStop")
    proxy: str = DEFAULT_PROXY
    check_endpoint: str = msgspec.field(default=DEFAULT_CHECK_ENDPOINT, name="checkEndpoint")
    aliases: list[str] = msgspec.field(default_factory=list)
    env: list[str] = msgspec.field(default_factory=list)
    ttl: float = INHERIT_TTL
    unload_timeout: float = msgspec.field(default=0.0, name="unloadTimeout")
    use_model_name: str = msgspec.field(default="", name="useModelName")
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: dict[str, object] = msgspec.field(default_factory=dict)
    concurrency_limit: int = msgspec.field(default=0, name="concurrencyLimit")
    swappable: bool = True
    #: trio-swap's own: keep llama-server's KV cache across a swap (docs/faster-swaps.md).
    keep_cache: bool = msgspec.field(default=False, name="keepCache")
    #: None: inherit the top-level ``sendLoadingState``.
    send_loading_state: bool | None = msgspec.field(default=None, name="sendLoadingState")
    filters: RawFilters = msgspec.field(default_factory=RawFilters)
    macros: dict[str, MacroValue] = msgspec.field(default_factory=dict)
    #: Resource name -> size (``21GiB`` or bytes); trio-swap's own (docs/configuration.md).
    needs: dict[str, int | str] = msgspec.field(default_factory=dict)
    #: More weight files to read ahead, beside those ``cmd`` names (docs/faster-swaps.md).
    files: list[str] = msgspec.field(default_factory=list)
    #: False: never read this model's files ahead (on start or while idle).
    prefetch: bool = True
    #: A preset name or a mapping of calls: sleep instead of stop (config/sleep.py).
    sleep: str | dict[str, object] | None = None
    #: ``in``, ``out``, ``tools``, ``reranker``, ``context`` (config/capabilities.py).
    capabilities: dict[str, object] | None = None
    #: How the upstream is reached (config/timeouts.py); None: llama-swap's defaults.
    timeouts: RawTimeouts | None = None
    #: Read only to warn: llama-swap overwrites it with the top-level value.
    health_check_timeout: float | None = msgspec.field(default=None, name="healthCheckTimeout")
    #: ``ignoreWebsockets`` (config/compat.py).
    compat: dict[str, object] | None = None


class RawPeerTimeouts(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``peers.<id>.timeouts`` as written, in seconds."""

    connect: float = DEFAULT_PEER_CONNECT_TIMEOUT
    #: 0: no limit (llama-swap's default for peers is 60).
    response_header: float = msgspec.field(default=0.0, name="responseHeader")
    #: Checked (>= 0) but without effect on peers (docs/configuration.md#timeouts).
    keepalive: float = _TIMEOUTS.keepalive
    tls_handshake: float = msgspec.field(default=_TIMEOUTS.tls_handshake, name="tlsHandshake")
    expect_continue: float = msgspec.field(default=_TIMEOUTS.expect_continue, name="expectContinue")
    idle_conn: float = msgspec.field(default=_TIMEOUTS.idle_conn, name="idleConn")


class RawTimeouts(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``models.<id>.timeouts`` as written, in seconds (llama-swap's Go transport knobs)."""

    connect: float = _TIMEOUTS.connect
    keepalive: float = _TIMEOUTS.keepalive
    response_header: float = msgspec.field(default=_TIMEOUTS.response_header, name="responseHeader")
    tls_handshake: float = msgspec.field(default=_TIMEOUTS.tls_handshake, name="tlsHandshake")
    expect_continue: float = msgspec.field(default=_TIMEOUTS.expect_continue, name="expectContinue")
    idle_conn: float = msgspec.field(default=_TIMEOUTS.idle_conn, name="idleConn")


class RawUiActivity(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``ui.activity`` as written."""

    #: Request headers holding a session id; None: the default pair, []: none.
    session_id: list[str] | None = None


class RawUi(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``ui:`` as written: what the web UI shows."""

    activity: RawUiActivity | None = None


class RawUpstream(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``upstream:`` as written: the ``/upstream/<model>/`` passthrough."""

    #: Regexes over the path after the model; empty: llama-swap's default one.
    ignore_paths: list[str] = msgspec.field(default_factory=list, name="ignorePaths")


class RawPeer(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One entry under ``peers:``, as written."""

    proxy: str
    api_key: str = msgspec.field(default="", name="apiKey")
    models: list[str]
    filters: RawFilters = msgspec.field(default_factory=RawFilters)
    timeouts: RawPeerTimeouts = msgspec.field(default_factory=RawPeerTimeouts)


class RawStore(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``store:`` as written: where the activity log is kept."""

    path: str = ""
    #: trio-swap's own: rows the file keeps (0, llama-swap's behaviour: all).
    max_rows: int = msgspec.field(default=0, name="maxRows")


class RawPrefetch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``prefetch:`` as a mapping: how much page cache idle prefetching may fill."""

    #: A size; unset: a share of MemAvailable (docs/faster-swaps.md).
    budget: int | str | None = None


class RawPerformance(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``performance:`` as written: hardware sampling (config/performance.py)."""

    disabled: bool = False
    #: A Go duration (``15s``, ``1m30s``) as in llama-swap, or a number of seconds.
    every: str | float = "5s"


class RawApiKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An ``apiKeys`` entry written as a mapping: a scoped key (docs/security.md)."""

    key: str
    #: Unset: ``apiKeys[<index>]``.
    name: str | None = None
    #: Model ids, aliases or globs over ids; unset: none.
    models: list[str] = msgspec.field(default_factory=list)
    #: Peer ids (or ``*``); unset: none.
    peers: list[str] = msgspec.field(default_factory=list)
    admin: bool = False


class RawConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The top level of a config file, as written."""

    models: dict[str, RawModel] = msgspec.field(default_factory=dict)
    health_check_timeout: float = msgspec.field(
        default=DEFAULT_HEALTH_CHECK_TIMEOUT, name="healthCheckTimeout"
    )
    start_port: int = msgspec.field(default=DEFAULT_START_PORT, name="startPort")
    macros: dict[str, MacroValue] = msgspec.field(default_factory=dict)
    global_ttl: float = msgspec.field(default=0.0, name="globalTTL")
    unload_timeout: float = msgspec.field(default=DEFAULT_UNLOAD_TIMEOUT, name="unloadTimeout")
    log_level: str = msgspec.field(default="info", name="logLevel")
    log_to_stdout: str = msgspec.field(default="proxy", name="logToStdout")
    #: A Go layout name (``rfc3339``, ``kitchen``...) for log timestamps (gotime.py).
    log_time_format: str = msgspec.field(default="", name="logTimeFormat")
    #: One proxy log line per model-routed request.
    log_requests: bool = msgspec.field(default=False, name="logRequests")
    #: ``ui.activity.session_id`` (config/session_ids.py).
    ui: RawUi | None = None
    #: ``upstream.ignorePaths`` (config/ignore_paths.py).
    upstream: RawUpstream | None = None
    send_loading_state: bool = msgspec.field(default=False, name="sendLoadingState")
    #: A plain string opens everything; a mapping is a scoped key.
    api_keys: list[str | RawApiKey] = msgspec.field(default_factory=list, name="apiKeys")
    #: ``Host`` names served beside the built-in ones (the DNS rebinding check).
    allowed_hosts: list[str] = msgspec.field(default_factory=list, name="allowedHosts")
    include_aliases_in_list: bool = msgspec.field(default=False, name="includeAliasesInList")
    #: A size: saved KV cache files (``keepCache``) kept on disk, all models together.
    cache_disk_budget: int | str = msgspec.field(
        default=DEFAULT_CACHE_DISK_BUDGET, name="cacheDiskBudget"
    )
    peers: dict[str, RawPeer] = msgspec.field(default_factory=dict)
    metrics_max_in_memory: int = msgspec.field(
        default=DEFAULT_METRICS_MAX_IN_MEMORY, name="metricsMaxInMemory"
    )
    store: RawStore | None = None
    #: MB of memory for request captures; 0 turns them off.
    capture_buffer: int = msgspec.field(default=DEFAULT_CAPTURE_BUFFER_MB, name="captureBuffer")
    #: Resource name -> size: what the box has for models (fit by memory).
    resources: dict[str, int | str] = msgspec.field(default_factory=dict)
    #: Checked in config/selectors.py, where the models and peers are known.
    selectors: object = None
    profiles: object = None
    #: ``false`` turns every read-ahead off; a mapping sets the idle prefetch budget.
    prefetch: bool | RawPrefetch = True
    #: Seconds a model may stay asleep before it is stopped; 0 = never.
    sleep_ttl: float = msgspec.field(default=DEFAULT_SLEEP_TTL, name="sleepTTL")
    #: Sampling CPU, memory and GPUs; None: the defaults.
    performance: RawPerformance | None = None


def _keys(struct: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(field.encode_name for field in msgspec.structs.fields(struct))


#: Top-level keys trio-swap reads.
TOP_KEYS: Final = _keys(RawConfig)
#: Per-model keys trio-swap reads.
MODEL_KEYS: Final = _keys(RawModel)
#: Per-peer keys trio-swap reads.
PEER_KEYS: Final = _keys(RawPeer)
#: ``peers.<id>.timeouts`` keys trio-swap reads.
PEER_TIMEOUT_KEYS: Final = _keys(RawPeerTimeouts)
#: ``performance`` keys trio-swap reads.
PERFORMANCE_KEYS: Final = _keys(RawPerformance)

#: llama-swap top-level keys trio-swap does not implement yet, with a hint for
#: the warning. Remove a key from here when support lands in RawConfig.
LLAMA_SWAP_ONLY_TOP_KEYS: Final[dict[str, str]] = {}

#: llama-swap per-model keys trio-swap does not implement yet.
LLAMA_SWAP_ONLY_MODEL_KEYS: Final[dict[str, str]] = {}


#: llama-swap per-peer keys trio-swap does not implement yet.
LLAMA_SWAP_ONLY_PEER_KEYS: Final[dict[str, str]] = {}

#: llama-swap ``peers.<id>.timeouts`` keys trio-swap does not implement yet.
LLAMA_SWAP_ONLY_PEER_TIMEOUT_KEYS: Final[dict[str, str]] = {}


def _schema_hook(kind: type) -> dict[str, object]:
    if kind is object:
        return {"description": "any YAML value"}
    raise NotImplementedError


def json_schema() -> dict[str, object]:
    """A JSON Schema for the config file (editors use it to complete and lint YAML)."""
    schema: dict[str, object] = msgspec.json.schema(RawConfig, schema_hook=_schema_hook)
    return schema
