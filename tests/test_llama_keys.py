"""The last llama-swap keys: logTimeFormat, logRequests, ui.activity.session_id,
upstream.ignorePaths and timeouts (models and peers), as config and as units.

The served behaviour (409, 504, session ids in /api/activity, log lines) is in
tests/test_llama_keys_e2e.py.
"""

from __future__ import annotations

import datetime
import logging
import socket
import sqlite3
import textwrap
from pathlib import Path

import pytest
import trio

from trio_swap.config.diff import NOT_RELOADED, diff_configs
from trio_swap.config.errors import ConfigError
from trio_swap.config.load import load_config_text
from trio_swap.config.model import (
    DEFAULT_IGNORE_PATHS,
    DEFAULT_SESSION_ID_HEADERS,
    Config,
    UpstreamTimeouts,
)
from trio_swap.gotime import LAYOUTS, format_time, layout_of
from trio_swap.http.passthrough import PathNotLoading, ignored_path_refusal
from trio_swap.http.upstream_client import _Connection, _keep_alive
from trio_swap.observe.activity import ActivityLog, ActivityRow
from trio_swap.observe.session import MAX_SESSION_ID, header_names, session_id_of
from trio_swap.upstream.logs import LogRing
from trio_swap.upstream.proxy_log import LayoutFormatter, ProxyLogCapture

MODEL = "models:\n  m:\n    cmd: s ${PORT}\n"


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "c.yaml", environ={})


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value


# --- Go time layouts ------------------------------------------------------------------

#: 2006-01-02 15:04:05.123456 at -07:00 ("MST"): Go's reference time, so each
#: layout must print as itself (with the fraction and zone of this moment).
REFERENCE = datetime.datetime(
    2006, 1, 2, 15, 4, 5, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=-7), "MST")
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ansic", "Mon Jan  2 15:04:05 2006"),
        ("unixdate", "Mon Jan  2 15:04:05 MST 2006"),
        ("rubydate", "Mon Jan 02 15:04:05 -0700 2006"),
        ("rfc822", "02 Jan 06 15:04 MST"),
        ("rfc822z", "02 Jan 06 15:04 -0700"),
        ("rfc850", "Monday, 02-Jan-06 15:04:05 MST"),
        ("rfc1123", "Mon, 02 Jan 2006 15:04:05 MST"),
        ("rfc1123z", "Mon, 02 Jan 2006 15:04:05 -0700"),
        ("rfc3339", "2006-01-02T15:04:05-07:00"),
        ("rfc3339nano", "2006-01-02T15:04:05.123456-07:00"),
        ("kitchen", "3:04PM"),
        ("stamp", "Jan  2 15:04:05"),
        ("stampmilli", "Jan  2 15:04:05.123"),
        ("stampmicro", "Jan  2 15:04:05.123456"),
        ("stampnano", "Jan  2 15:04:05.123456000"),
    ],
)
def test_each_layout_prints_what_go_prints(name: str, expected: str) -> None:
    assert format_time(LAYOUTS[name], REFERENCE) == expected


def test_go_layout_details_at_utc_midnight_and_two_digit_days() -> None:
    moment = datetime.datetime(2024, 11, 23, 0, 7, 8, 500000, tzinfo=datetime.UTC)
    assert format_time(LAYOUTS["rfc3339"], moment) == "2024-11-23T00:07:08Z"
    assert format_time(LAYOUTS["rfc3339nano"], moment) == "2024-11-23T00:07:08.5Z"
    assert format_time(LAYOUTS["kitchen"], moment) == "12:07AM"
    assert format_time(LAYOUTS["ansic"], moment) == "Sat Nov 23 00:07:08 2024"
    whole = moment.replace(microsecond=0, hour=12)
    assert format_time(LAYOUTS["rfc3339nano"], whole) == "2024-11-23T12:07:08Z"
    assert format_time(LAYOUTS["kitchen"], whole) == "12:07PM"
    india = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    assert format_time(LAYOUTS["rfc3339"], whole.replace(tzinfo=india)) == (
        "2024-11-23T12:07:08+05:30"
    )


def test_layout_names_are_trimmed_and_compared_in_any_case() -> None:
    assert layout_of(" RFC3339 ") == "2006-01-02T15:04:05Z07:00"
    assert layout_of("StampMilli") == "Jan _2 15:04:05.000"
    assert layout_of("iso8601") is None


# --- logTimeFormat and logRequests --------------------------------------------------


def test_log_time_format_is_read_in_any_case_and_unknown_names_warn() -> None:
    assert load(f"logTimeFormat: ' Kitchen '\n{MODEL}").log_time_format == "kitchen"
    assert load(MODEL).log_time_format == ""
    config = load(f"logTimeFormat: iso8601\n{MODEL}")
    assert config.log_time_format == ""
    (warning,) = config.warnings
    assert warning.startswith("c.yaml:1: logTimeFormat: unknown time format 'iso8601'; ignored")
    assert "rfc3339nano" in warning
    assert "not supported" not in warning


def test_log_time_format_needs_a_restart_and_a_reload_says_so() -> None:
    old = load(MODEL)
    new = load(f"logTimeFormat: rfc3339\n{MODEL}")
    assert "logTimeFormat" in diff_configs(old, new).settings
    assert "restart" in NOT_RELOADED["logTimeFormat"]


def test_log_requests_is_a_bool() -> None:
    assert load(f"logRequests: true\n{MODEL}").log_requests is True
    assert load(MODEL).log_requests is False
    err = error_of(f"logRequests: lots\n{MODEL}")
    assert (err.key_path, err.line) == ("logRequests", 1)


def test_layout_formatter_stamps_records_in_the_layout_or_the_default() -> None:
    record = logging.LogRecord("trio_swap", logging.INFO, __file__, 1, "hello", None, None)
    record.created = REFERENCE.timestamp()
    stamped = LayoutFormatter("rfc3339", "%H:%M:%S").format(record)
    local = REFERENCE.astimezone()  # shown in this machine's zone, as Go's time.Now()
    assert stamped == f"{format_time(LAYOUTS['rfc3339'], local)} [INFO] hello"
    plain = LayoutFormatter("", "%H:%M:%S").format(record)
    assert plain == f"{local.strftime('%H:%M:%S')} [INFO] hello"


async def test_proxy_log_lines_carry_the_configured_timestamp() -> None:
    ring = LogRing("proxy")
    other = LogRing("proxy")
    logger = logging.getLogger("trio_swap.test_llama_keys")
    # Two captures at once (two servers in one process): each with its own format.
    with ProxyLogCapture(ring, "info", time_format="kitchen"), ProxyLogCapture(other, "info"):
        logger.info("swapped %s", "m")
    (line,) = ring.lines()
    assert line.endswith(" [INFO] swapped m")
    stamp = line.removesuffix(" [INFO] swapped m")
    assert stamp[-2:] in ("AM", "PM") and ":" in stamp and len(stamp) <= 7
    (plain,) = other.lines()
    datetime.datetime.strptime(plain.removesuffix(" [INFO] swapped m"), "%Y-%m-%d %H:%M:%S")


# --- ui.activity.session_id ---------------------------------------------------------


def test_session_id_headers_are_trimmed_deduplicated_and_may_be_turned_off() -> None:
    assert load(MODEL).session_id_headers == DEFAULT_SESSION_ID_HEADERS
    config = load(
        f"ui:\n  activity:\n    session_id: [' X-Conv ', '', x-conv, X-Other, X-OTHER]\n{MODEL}"
    )
    assert config.session_id_headers == ("X-Conv", "X-Other")
    assert load(f"ui: {{activity: {{session_id: []}}}}\n{MODEL}").session_id_headers == ()
    assert load(f"ui: {{activity: {{}}}}\n{MODEL}").session_id_headers == (
        DEFAULT_SESSION_ID_HEADERS
    )


def test_a_session_id_header_must_be_a_header_name() -> None:
    err = error_of(f"ui:\n  activity:\n    session_id:\n      - X-Ok\n      - 'bad name'\n{MODEL}")
    assert (err.key_path, err.line) == ("ui.activity.session_id[1]", 5)
    err = error_of(f"ui:\n  activity:\n    session: [X]\n{MODEL}")
    assert err.key_path == "ui.activity"
    assert "unknown field `session`" in err.message


def test_the_first_configured_header_present_gives_the_session_id() -> None:
    names = header_names(["X-Session-ID", "X-Litellm-Session-Id"])
    headers = [(b"x-litellm-session-id", b"lite"), (b"x-session-id", b" abc ")]
    assert session_id_of(headers, names) == "abc"
    assert session_id_of(headers[:1], names) == "lite"
    assert session_id_of([(b"x-session-id", b"  ")], names) is None
    assert session_id_of(headers, ()) is None
    long = session_id_of([(b"x-session-id", b"a\x01b" + b"c" * 500)], names)
    assert long is not None and long.startswith("abc") and len(long) == MAX_SESSION_ID


# --- upstream.ignorePaths -------------------------------------------------------------


def test_ignore_paths_default_to_llama_swaps_and_compile_at_load() -> None:
    assert load(MODEL).ignore_paths == DEFAULT_IGNORE_PATHS
    assert load(f"upstream: {{ignorePaths: []}}\n{MODEL}").ignore_paths == DEFAULT_IGNORE_PATHS
    custom = load(f"upstream:\n  ignorePaths: ['^/static/', '\\.map$']\n{MODEL}")
    assert custom.ignore_paths == ("^/static/", r"\.map$")
    err = error_of(f"upstream:\n  ignorePaths:\n    - ok\n    - '(unclosed'\n{MODEL}")
    assert (err.key_path, err.line) == ("upstream.ignorePaths[1]", 4)
    assert "not a valid regular expression" in err.message


def test_an_ignored_path_is_refused_only_while_the_model_is_not_ready() -> None:
    patterns = DEFAULT_IGNORE_PATHS

    def refusal(path: bytes, ready: bool, request: str = "/upstream/m") -> PathNotLoading | None:
        return ignored_path_refusal(request + path.decode(), path, "m", patterns, lambda _: ready)

    refused = refusal(b"/favicon.ico", ready=False)
    assert refused is not None and refused.status == 409
    assert "upstream.ignorePaths" in refused.message
    assert refusal(b"/static/app%2Ejs", ready=False) is not None  # the decoded path is searched
    assert refusal(b"/favicon.ico", ready=True) is None
    assert refusal(b"/v1/models", ready=False) is None
    assert refusal(b"/x.js", ready=False, request="/v1/chat/completions") is None


# --- timeouts -------------------------------------------------------------------------


def test_model_timeouts_take_llama_swaps_defaults() -> None:
    assert load(MODEL).models["m"].timeouts == UpstreamTimeouts(
        connect=30,
        keepalive=30,
        response_header=0,
        tls_handshake=10,
        expect_continue=1,
        idle_conn=90,
    )
    config = load(
        f"""{MODEL}    timeouts:
      connect: 0
      keepalive: 15
      responseHeader: 120
      tlsHandshake: 5
      expectContinue: 0
      idleConn: 2.5
"""
    )
    assert config.models["m"].timeouts == UpstreamTimeouts(
        connect=0,
        keepalive=15,
        response_header=120,
        tls_handshake=5,
        expect_continue=0,
        idle_conn=2.5,
    )
    assert config.warnings == ()


@pytest.mark.parametrize(
    "key", ["connect", "keepalive", "responseHeader", "tlsHandshake", "expectContinue", "idleConn"]
)
def test_a_negative_timeout_is_a_located_error(key: str) -> None:
    err = error_of(f"{MODEL}    timeouts:\n      {key}: -1\n")
    assert (err.key_path, err.line) == (f"models.m.timeouts.{key}", 5)
    assert "must be a number of seconds >= 0" in err.message
    peer = f"peers:\n  p:\n    proxy: http://h\n    models: [x]\n    timeouts:\n      {key}: -1\n"
    err = error_of(peer + MODEL)
    assert (err.key_path, err.line) == (f"peers.p.timeouts.{key}", 6)


def test_a_timeout_must_be_a_number() -> None:
    err = error_of(f"{MODEL}    timeouts:\n      idleConn: soon\n")
    assert (err.key_path, err.line) == ("models.m.timeouts.idleConn", 5)
    err = error_of(f"{MODEL}    timeouts:\n      idle: 3\n")
    assert "unknown field `idle`" in err.message


def test_changed_timeouts_apply_without_restarting_the_model() -> None:
    old = load(MODEL)
    new = load(f"{MODEL}    timeouts: {{responseHeader: 5}}\n")
    diff = diff_configs(old, new)
    assert diff.changed == ("m",)
    assert diff.restart == ()


def test_idle_conn_caps_the_keep_alive_time_the_server_announces() -> None:
    capped = _Connection(trio.testing.MemoryReceiveStream(), 0, idle_cap=2.0)  # type: ignore[arg-type]
    assert capped.expiry == 2.0
    capped.learn([(b"keep-alive", b"timeout=60")])
    assert capped.expiry == 2.0
    free = _Connection(trio.testing.MemoryReceiveStream(), 0)  # type: ignore[arg-type]
    free.learn([(b"keep-alive", b"timeout=60")])
    assert free.expiry == 59.0


async def test_keepalive_sets_tcp_keep_alive_probes_on_the_connection() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        _keep_alive(stream, 7)
        assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
    finally:
        await stream.aclose()
        for listener in listeners:
            await listener.aclose()


# --- every llama-swap key at once -----------------------------------------------------

#: Every top-level and per-model key of llama-swap's config (the reference's tables,
#: shaped like its config.example.yaml). ``groups`` and ``matrix`` are the legacy
#: spellings of ``routing.router``: each has its own variant below.
EVERY_KEY = """\
healthCheckTimeout: 90
logLevel: info
logTimeFormat: rfc3339
logToStdout: proxy
logRequests: true
metricsMaxInMemory: 500
captureBuffer: 10
store:
  path: {store}
ui:
  activity:
    session_id: [X-Session-ID, X-Litellm-Session-Id]
performance:
  disabled: false
  every: 15s
startPort: 10001
sendLoadingState: true
includeAliasesInList: true
globalTTL: 300
unloadTimeout: 10
macros:
  MODEL_DIR: /models
  ctx: 4096
apiKeys:
  - sk-local-key
hooks:
  on_startup:
    preload: [llama]
peers:
  openrouter:
    proxy: https://openrouter.ai/api
    apiKey: sk-peer-key
    models: [meta/llama-3-70b]
    filters:
      stripParams: temperature
      setParams: {{top_p: 0.9}}
    timeouts:
      connect: 30
      keepalive: 30
      responseHeader: 60
      tlsHandshake: 10
      expectContinue: 1
      idleConn: 90
upstream:
  ignorePaths: ['.*\\.(js|css|ico)$']
profiles:
  fast:
    description: the small model for everything
    pins: {{llama: qwen}}
selectors:
  chat:
    strategy: warm
    targets: [llama, qwen]
    name: Chat
    description: whichever is loaded
    unlisted: false
{routing}
models:
  llama:
    cmd: |
      # the big one
      llama-server --port ${{PORT}} -m ${{MODEL_DIR}}/llama.gguf -c ${{ctx}}
    cmdStop: kill -TERM ${{PID}}
    proxy: http://127.0.0.1:${{PORT}}
    aliases: [gpt-4o]
    env: [CUDA_VISIBLE_DEVICES=0]
    checkEndpoint: /health
    ttl: 600
    unloadTimeout: 5
    useModelName: llama-3
    name: Llama 3
    description: the big model
    unlisted: false
    metadata: {{port: "${{PORT}}", family: llama}}
    concurrencyLimit: 4
    sendLoadingState: false
    filters:
      stripParams: "seed, logit_bias"
      setParams: {{temperature: 0.7}}
      setParamsByID:
        "${{MODEL_ID}}:creative": {{temperature: 1.2}}
    macros:
      quant: Q4_K_M
    timeouts:
      connect: 30
      keepalive: 30
      responseHeader: 0
      tlsHandshake: 10
      expectContinue: 1
      idleConn: 90
    compat:
      ignoreWebsockets: false
    capabilities:
      in: [text, image]
      out: [text]
      tools: true
      reranker: false
      context: 8192
    healthCheckTimeout: 60
  qwen:
    cmd: llama-server --port ${{PORT}} -m ${{MODEL_DIR}}/qwen-${{ctx}}.gguf
"""

ROUTING = {
    "routing": """\
routing:
  router:
    use: group
    settings:
      groups:
        main: {swap: true, exclusive: true, persistent: false, members: [llama, qwen]}
  scheduler:
    use: fifo
    settings:
      fifo:
        priority: {llama: 1}""",
    "groups": """\
groups:
  main:
    swap: true
    exclusive: true
    members: [llama, qwen]""",
    "matrix": """\
matrix:
  vars: {l: llama, q: qwen}
  evict_costs: {l: 5}
  sets:
    big: "l"
    small: "q\"""",
}


@pytest.mark.parametrize("routing", sorted(ROUTING))
def test_a_config_with_every_llama_swap_key_has_no_unsupported_key(
    tmp_path: Path, routing: str
) -> None:
    text = EVERY_KEY.format(store=tmp_path / "activity.db", routing=ROUTING[routing])
    config = load_config_text(text, "every.yaml", environ={})
    # The only warning is about a key llama-swap reads and then ignores.
    line = text.splitlines().index("    healthCheckTimeout: 60") + 1
    assert config.warnings == (
        f"every.yaml:{line}: models.llama.healthCheckTimeout: has no effect, as in llama-swap "
        "(it uses the top-level healthCheckTimeout); set it there",
    )
    assert not any("not supported" in warning for warning in config.warnings)
    assert config.log_time_format == "rfc3339"
    assert config.log_requests is True
    assert config.ignore_paths == (r".*\.(js|css|ico)$",)
    llama = config.models["llama"]
    assert llama.timeouts == UpstreamTimeouts()
    assert llama.capabilities.context == 8192
    assert config.peers["openrouter"].response_header_timeout == 60
    assert set(config.selectors) == {"chat"}
    assert set(config.profiles) == {"fast"}


# --- the activity file gains the session_id column --------------------------------------


async def test_an_older_activity_file_gets_the_session_id_column(tmp_path: Path) -> None:
    path = tmp_path / "activity.db"
    with sqlite3.connect(path) as db:  # a file written before session ids were kept
        db.execute(
            "CREATE TABLE activity (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, "
            "model TEXT NOT NULL, endpoint TEXT NOT NULL, method TEXT NOT NULL, "
            "status INTEGER NOT NULL, duration_ms REAL NOT NULL, wait_ms REAL, "
            "upstream_ms REAL, stream INTEGER NOT NULL, prompt_tokens INTEGER, "
            "completion_tokens INTEGER, cached_tokens INTEGER, prompt_per_second REAL, "
            "tokens_per_second REAL, error TEXT, key_name TEXT)"
        )
        db.execute(
            "INSERT INTO activity (time, model, endpoint, method, status, duration_ms, stream) "
            "VALUES (1, 'old', '/v1/completions', 'POST', 200, 5, 0)"
        )
    log = ActivityLog(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.add(
            ActivityRow(
                time=2,
                model="new",
                endpoint="/v1/completions",
                method="POST",
                status=200,
                duration_ms=1,
                session_id="conv-1",
            )
        )
        page = await log.page(limit=10)
        nursery.cancel_scope.cancel()
    assert [(row.model, row.session_id) for row in page.data] == [("new", "conv-1"), ("old", None)]
