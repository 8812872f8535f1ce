"""The validated, fully expanded configuration the rest of trio-swap runs on.

Everything here is final: macros are expanded, `${PORT}` is assigned, defaults
and inherited values (``globalTTL``, ``unloadTimeout``, ``concurrencyLimit``)
are resolved. Runtime code never looks at raw YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, final

import msgspec

# Compiled where the DSL is parsed; re-exported for RoutingConfig's readers.
from trio_swap.config.matrix_dsl import MatrixConfig as MatrixConfig

DEFAULT_CONCURRENCY_LIMIT: Final = 10
DEFAULT_HEALTH_CHECK_TIMEOUT: Final = 120.0
DEFAULT_UNLOAD_TIMEOUT: Final = 10.0
DEFAULT_START_PORT: Final = 5800
#: Seconds to wait for a TCP (and TLS) connection to a peer.
DEFAULT_PEER_CONNECT_TIMEOUT: Final = 30.0
#: Rows the in-memory activity log keeps (llama-swap's default).
DEFAULT_METRICS_MAX_IN_MEMORY: Final = 1000
#: MB (of 1024 * 1024 bytes) for request captures (``captureBuffer``; llama-swap's code's default).
DEFAULT_CAPTURE_BUFFER_MB: Final = 5
#: Bytes of saved KV cache files (``keepCache``) kept on disk, all models together.
DEFAULT_CACHE_DISK_BUDGET: Final = 20 * 2**30
#: Seconds a model may stay asleep (``sleep:``) before it is stopped (``sleepTTL``).
DEFAULT_SLEEP_TTL: Final = 3600.0
#: Seconds each sleep, wake, check or test request may take (``sleep.timeout``).
DEFAULT_SLEEP_CALL_TIMEOUT: Final = 120.0
#: Seconds between hardware samples (``performance.every``), and the least
#: llama-swap accepts.
DEFAULT_PERFORMANCE_EVERY: Final = 5.0
MIN_PERFORMANCE_EVERY: Final = 5.0

#: The literal placeholder kept in ``cmd_stop`` argv items, replaced by the PID at stop time.
PID_PLACEHOLDER: Final = "${PID}"


@final
class FilterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Request rewriting for JSON bodies (llama-swap's ``filters``); ``model`` is never touched."""

    #: Top-level keys removed from the body.
    strip_params: tuple[str, ...] = ()
    #: Keys set (or overridden) in the body, applied in sorted key order.
    set_params: dict[str, object] = msgspec.field(default_factory=dict)
    #: Requested name -> keys set when the client asked for that name (after set_params).
    set_params_by_id: dict[str, dict[str, object]] = msgspec.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.strip_params or self.set_params or self.set_params_by_id)


@final
class HttpCall(msgspec.Struct, frozen=True, kw_only=True):
    """One request trio-swap sends to a model's ``proxy`` itself (a sleep, a wake, a test)."""

    #: ``GET``, ``POST`` or ``PUT``.
    method: str
    #: Starts with ``/``; may carry a query (``/sleep?level=1``). Appended to ``proxy``.
    path: str
    #: Sent as JSON; None: no body.
    body: dict[str, object] | None = None


@final
class SleepConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``sleep:``: how to put a model's server to sleep and wake it (docs/sleep.md).

    A wake is every call of ``wake`` in order (vLLM level 2 needs its weights
    reloaded and its prefix cache reset after ``/wake_up``), then ``test``.
    """

    #: The preset it came from (``vllm``, ``vllm-2``, ``sglang``); None: written out.
    preset: str | None = None
    sleep: HttpCall
    #: At least one call.
    wake: tuple[HttpCall, ...]
    #: Asks whether the server is asleep (vLLM's ``GET /is_sleeping``); None: no such call.
    check: HttpCall | None = None
    #: Sent after a wake, before any client request, to catch a wake that left the
    #: server broken; None: no test.
    test: HttpCall | None = None
    #: Seconds each call (sleep, each wake call, check, test) may take; always > 0.
    timeout: float = DEFAULT_SLEEP_CALL_TIMEOUT


@final
class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """``capabilities:``: what a model accepts and produces, told to clients in
    ``/v1/models`` (config/capabilities.py). Nothing else reads it."""

    #: ``in``: modalities understood, each ``text``, ``audio`` or ``image``.
    inputs: tuple[str, ...] = ()
    #: ``out``: modalities produced.
    outputs: tuple[str, ...] = ()
    #: Function calling.
    tools: bool = False
    #: ``/v1/rerank``.
    reranker: bool = False
    #: Longest context in tokens; 0: not said.
    context: int = 0

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs or self.tools or self.reranker or self.context)


@final
class Compat(msgspec.Struct, frozen=True, kw_only=True):
    """``compat:``: llama-swap's compatibility switches (config/compat.py)."""

    #: Websocket upgrades never load the model nor hold it: 409 unless it is ready.
    ignore_websockets: bool = False


#: ``ui.activity.session_id``'s default: request headers that carry a session id.
DEFAULT_SESSION_ID_HEADERS: Final = ("X-Session-ID", "X-Litellm-Session-Id")
#: ``upstream.ignorePaths``'s default (llama-swap's): static files never load a model.
DEFAULT_IGNORE_PATHS: Final = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)


@final
class UpstreamTimeouts(msgspec.Struct, frozen=True, kw_only=True):
    """``timeouts:``: llama-swap's Go transport knobs, in seconds; 0 is no limit.

    Defaults are llama-swap's. trio-swap's upstream client applies ``connect``,
    ``tls_handshake``, ``response_header``, ``idle_conn`` and ``keepalive``
    (docs/configuration.md#timeouts); ``expect_continue`` has no effect.
    """

    #: Opening the TCP connection.
    connect: float = 30.0
    #: TCP keep-alive probe period on upstream connections.
    keepalive: float = 30.0
    #: From the request written to the response head (then 504).
    response_header: float = 0.0
    #: The TLS handshake of an ``https://`` proxy.
    tls_handshake: float = 10.0
    #: Go waits this long for ``100 Continue``; trio-swap never waits.
    expect_continue: float = 1.0
    #: Longest an idle keep-alive connection is kept (caps the server's own limit).
    idle_conn: float = 90.0


@final
class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One model: how to start its server, reach it, and when to stop it."""

    id: str
    #: argv of the server command (POSIX-split, no shell). Never empty after loading.
    cmd: tuple[str, ...]
    #: argv of the stop command; items may contain ``${PID}``. Empty: SIGTERM the process group.
    cmd_stop: tuple[str, ...] = ()
    #: Base URL requests are forwarded to, without a trailing slash.
    proxy: str
    #: Readiness path appended to ``proxy``; ``None`` when the config says ``none``.
    check_endpoint: str | None = "/health"
    aliases: tuple[str, ...] = ()
    #: Extra environment for the process, in config order (a later entry wins).
    env: tuple[tuple[str, str], ...] = ()
    #: Idle seconds before unloading, counted from the end of the last request. 0 = never.
    ttl: float = 0.0
    #: Grace period between the graceful stop and SIGKILL, in seconds.
    unload_timeout: float = DEFAULT_UNLOAD_TIMEOUT
    #: Replaces the ``model`` field sent upstream when non-empty.
    use_model_name: str = ""
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: dict[str, object] = msgspec.field(default_factory=dict)
    #: Most requests admitted at once for this model (queued + loading + in flight).
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    #: False pins the model once loaded: only an explicit unload stops it.
    swappable: bool = True
    #: Stream loading progress to streaming clients that wait for this model to load.
    send_loading_state: bool = False
    #: Save llama-server's slots before a stop, restore them after the next start.
    keep_cache: bool = False
    filters: FilterConfig = msgspec.field(default_factory=FilterConfig)
    #: Declared memory per resource, in bytes (``needs:``); what is not declared is learned.
    needs: dict[str, int] = msgspec.field(default_factory=dict)
    #: Weight files named by ``files:`` (macros expanded), beside those ``cmd`` names;
    #: :func:`trio_swap.config.files.weight_files` gives both.
    files: tuple[str, ...] = ()
    #: False: its files are never read ahead, on start or while idle.
    prefetch: bool = True
    #: Put to sleep instead of stopped (``sleep:``); None: stopped as usual.
    sleep: SleepConfig | None = None
    #: What the model accepts and produces, for ``/v1/models`` (``capabilities:``).
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    #: How its server is reached (``timeouts:``).
    timeouts: UpstreamTimeouts = msgspec.field(default_factory=UpstreamTimeouts)
    #: llama-swap's ``compat:`` switches (``ignoreWebsockets``).
    compat: Compat = msgspec.field(default_factory=Compat)


@final
class PeerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A remote OpenAI-compatible server (llama-swap's ``peers``): no process, no swapping."""

    id: str
    #: Base URL the request path is appended to, without a trailing slash.
    proxy: str
    #: Sent as ``Authorization: Bearer`` and ``x-api-key`` instead of the client's; "" = none.
    api_key: str = ""
    #: The peer's own model names, in config order, without duplicates.
    models: tuple[str, ...]
    filters: FilterConfig = msgspec.field(default_factory=FilterConfig)
    #: Seconds to wait for the connection to the peer.
    connect_timeout: float = DEFAULT_PEER_CONNECT_TIMEOUT
    #: Seconds to wait for the peer's response headers once the request is sent; 0 = no limit.
    response_header_timeout: float = 0.0

    def qualified(self, model: str) -> str:
        """The name clients use for ``model`` of this peer: ``<peer id>/<model>``."""
        return f"{self.id}/{model}"


def build_model_names(models: Mapping[str, ModelConfig]) -> dict[str, str]:
    """Every local name a client may send (model ID or alias) -> the model ID.

    An ID wins over an alias, and the first model listing an alias over later
    ones (the loader refuses both cases; a config built in code may not).
    """
    names: dict[str, str] = {}
    for model in models.values():
        for alias in model.aliases:
            names.setdefault(alias, model.id)
    names.update((model_id, model_id) for model_id in models)
    return names


def build_peer_names(
    models: dict[str, ModelConfig], peers: dict[str, PeerConfig]
) -> dict[str, tuple[str, str]]:
    """Every name that routes to a peer model -> (peer id, the peer's own model name).

    ``<peer id>/<model>`` always routes (the loader rejects one that is also a
    local name, or that two peers both produce). A bare ``<model>`` routes
    only when exactly one peer lists it, no local model id or alias has that
    name (local wins), and it is not itself some peer's qualified name.
    """
    local = set(models)
    for model in models.values():
        local.update(model.aliases)
    names: dict[str, tuple[str, str]] = {}
    listed_by: dict[str, list[str]] = {}
    for peer in peers.values():
        for name in peer.models:
            names.setdefault(peer.qualified(name), (peer.id, name))
            owners = listed_by.setdefault(name, [])
            if peer.id not in owners:
                owners.append(peer.id)
    for name, owners in listed_by.items():
        if len(owners) == 1 and name not in local and name not in names:
            names[name] = (owners[0], name)
    return {name: target for name, target in names.items() if name not in local}


@final
class ScopedKey(msgspec.Struct, frozen=True, kw_only=True):
    """An ``apiKeys`` entry written as a mapping: a key limited to what it may touch.

    A plain string entry stays a ``str`` in :attr:`Config.api_keys` (full access);
    docs/security.md has the rules, :mod:`trio_swap.config.keys` the matching.
    """

    key: str
    #: Shown in the activity log instead of the key (``apiKeys[<i>]`` when not written).
    name: str
    #: Local model ids (aliases resolved) and fnmatch globs over ids; ``*``: every one.
    models: tuple[str, ...] = ()
    #: Peer ids whose models it may use; ``*``: every peer.
    peers: tuple[str, ...] = ()
    #: May call the admin routes (``/logs``, ``/api/...``, unload, reload).
    admin: bool = False


@final
class GroupConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One swap group (llama-swap's ``groups``): how its members treat other models."""

    name: str
    #: Members evict each other (only one of them runs at a time).
    swap: bool = True
    #: Loading a member evicts models of other groups (unless those are persistent).
    exclusive: bool = True
    #: Members are never evicted by other groups' models.
    persistent: bool = False
    members: tuple[str, ...] = ()


#: The implicit group of every model not listed in a group (swap, exclusive).
DEFAULT_GROUP: Final = "(default)"


DEFAULT_MAX_WAIT: Final = 30.0


@final
class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``routing.scheduler.settings``: when waiting requests run."""

    #: Seconds the oldest waiting request may wait before the fast path onto a
    #: model it needs evicted closes (the starvation bound).
    max_wait: float = DEFAULT_MAX_WAIT
    #: Seconds a freshly loaded model is kept before another request may evict it.
    min_resident: float = 0.0
    #: Most requests waiting (queued or loading) at once, all models; 0 = no limit.
    max_queue: int = 0
    #: Model id -> priority; higher goes first, FIFO within a level (default 0).
    priority: dict[str, int] = msgspec.field(default_factory=dict)


@final
class RoutingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Which swap policy runs: ``group`` (the default, also for no groups) or ``matrix``."""

    router: str = "group"
    #: User groups in definition order; the implicit ``(default)`` group is not listed.
    groups: tuple[GroupConfig, ...] = ()
    matrix: MatrixConfig | None = None
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)


@final
class PrefetchConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``prefetch:``: model files read into the page cache on start and while idle."""

    #: False (``prefetch: false``): no read-ahead on start, no idle prefetching.
    enabled: bool = True
    #: Bytes of model files idle prefetching may keep warm; None: a share of
    #: MemAvailable (:data:`trio_swap.upstream.prefetch.DEFAULT_BUDGET_SHARE`).
    budget: int | None = None


@final
class PerformanceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``performance:``: sampling CPU, memory and GPUs (docs/metrics.md#hardware)."""

    #: False (``disabled: true``): no sampling, ``/api/performance`` answers 503.
    enabled: bool = True
    #: Seconds between samples (``every``, a duration such as ``15s``).
    every: float = DEFAULT_PERFORMANCE_EVERY


@final
class SelectorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``selectors.<id>``: a model name that picks one of its targets per request."""

    id: str
    #: ``warm`` | ``pin`` | ``spillover`` (docs/selectors.md).
    strategy: str
    #: Model ids, aliases or peer model names, as written (at least one).
    targets: tuple[str, ...]
    #: ``settings.spillover``: requests in flight on a target before the next is used.
    spillover: int = 1
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: dict[str, object] = msgspec.field(default_factory=dict)


@final
class ProfileConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``profiles.<name>``: pins applied to requested names while the profile is active."""

    name: str
    description: str = ""
    #: Requested name -> target (a model, alias, peer model or selector); "" turns it off.
    pins: dict[str, str] = msgspec.field(default_factory=dict)


@final
class Config(msgspec.Struct, frozen=True, kw_only=True):
    """A whole configuration, ready to run."""

    #: Where it came from (a file path, or ``<demo>`` for the built-in demo).
    source: str
    #: Models in the order the file lists them.
    models: dict[str, ModelConfig]
    health_check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT
    start_port: int = DEFAULT_START_PORT
    log_level: str = "info"
    #: ``proxy`` | ``upstream`` | ``both`` | ``none``: what is echoed to stdout.
    log_to_stdout: str = "proxy"
    #: ``logTimeFormat``: a :data:`trio_swap.gotime.LAYOUTS` name (lower case) for
    #: log timestamps; "": trio-swap's own timestamps.
    log_time_format: str = ""
    #: ``logRequests``: one proxy log line per model-routed request.
    log_requests: bool = False
    #: ``ui.activity.session_id``: request headers whose value the activity log
    #: records as the session id, first present wins; empty: none recorded.
    session_id_headers: tuple[str, ...] = DEFAULT_SESSION_ID_HEADERS
    #: ``upstream.ignorePaths``: regexes (Python ``re``, checked at load) over the
    #: path after ``/upstream/<model>``; a match never loads the model (409).
    ignore_paths: tuple[str, ...] = DEFAULT_IGNORE_PATHS
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    #: Models loaded at startup, in order, through the normal scheduling path.
    preload: tuple[str, ...] = ()
    #: Keys accepted as Bearer / x-api-key / basic-auth password; empty = no auth.
    #: A plain string opens everything; a :class:`ScopedKey` only its scope.
    api_keys: tuple[str | ScopedKey, ...] = ()
    #: ``allowedHosts``: ``Host`` names served beside the loopback names, IP
    #: literals and the listen host (normalised: lower case, no trailing dot;
    #: ``*.example.com`` suffix patterns; ``*`` turns the check off).
    allowed_hosts: tuple[str, ...] = ()
    #: List every alias as its own /v1/models entry.
    include_aliases_in_list: bool = False
    #: Bytes of saved KV cache files (``cacheDiskBudget``); the least recently used go first.
    cache_disk_budget: int = DEFAULT_CACHE_DISK_BUDGET
    #: Rows the in-memory activity log keeps (``metricsMaxInMemory``).
    metrics_max_in_memory: int = DEFAULT_METRICS_MAX_IN_MEMORY
    #: SQLite file of the activity log (``store.path``); None keeps it in memory.
    store_path: str | None = None
    #: Rows the activity file keeps (``store.maxRows``); 0 keeps them all.
    store_max_rows: int = 0
    #: Bytes of memory for request captures (``captureBuffer`` in MB); 0: captures off.
    capture_buffer: int = DEFAULT_CAPTURE_BUFFER_MB * 1024 * 1024
    #: What the box has for models, bytes per resource (``resources:``); empty: no fit.
    resources: dict[str, int] = msgspec.field(default_factory=dict)
    #: Reading model files ahead into the page cache (``prefetch:``).
    prefetch: PrefetchConfig = msgspec.field(default_factory=PrefetchConfig)
    #: Seconds a model may stay asleep before it is stopped (``sleepTTL``); 0 = never.
    sleep_ttl: float = DEFAULT_SLEEP_TTL
    #: Hardware sampling (``performance:``).
    performance: PerformanceConfig = msgspec.field(default_factory=PerformanceConfig)
    #: Remote servers by peer id, in config order.
    peers: dict[str, PeerConfig] = msgspec.field(default_factory=dict)
    #: Virtual model names by id (``selectors:``), in config order.
    selectors: dict[str, SelectorConfig] = msgspec.field(default_factory=dict)
    #: Profiles by name (``profiles:``); none is active at start or after a reload.
    profiles: dict[str, ProfileConfig] = msgspec.field(default_factory=dict)
    #: Computed from ``models`` and ``peers`` on construction (a value passed in is
    #: replaced): every name that routes to a peer -> (peer id, peer's model name).
    peer_names: dict[str, tuple[str, str]] = msgspec.field(default_factory=dict)
    #: Computed from ``models`` on construction (a value passed in is replaced):
    #: every model ID and alias -> model ID, so :meth:`resolve` is one lookup.
    model_names: dict[str, str] = msgspec.field(default_factory=dict)
    #: Human-readable notes about keys trio-swap read but does not support yet.
    warnings: tuple[str, ...] = ()
    #: Model id -> the ``${PORT}`` its ``cmd`` was given (only models whose cmd uses
    #: it). A reload passes these back to the loader so surviving models keep them.
    ports: dict[str, int] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = build_peer_names(self.models, self.peers) if self.peers else {}
        msgspec.structs.force_setattr(self, "peer_names", names)
        msgspec.structs.force_setattr(self, "model_names", build_model_names(self.models))

    def resolve(self, name: str) -> str | None:
        """Map a requested model name (an id or an alias) to a model id, or None."""
        return self.model_names.get(name)

    def resolve_peer(self, name: str) -> tuple[str, str] | None:
        """Map a requested name to (peer id, the peer's own model name), or None.

        Qualified ``<peer id>/<model>`` names always resolve; a bare model name
        only when exactly one peer lists it and no local model id or alias is
        called that (local names always give None; try :meth:`resolve` first).
        """
        return self.peer_names.get(name)
