"""Scoped API keys: ``apiKeys`` entries limited to some models, some peers, and the admin routes.

Three parts: the config (every malformed entry is a located error), the
matching alone (:class:`~trio_swap.config.keys.Grant`, the constant-time
comparison), and end to end: a real trio-swap in front of responder models
and a second trio-swap as its peer, with a matrix of keys x routes, streaming
and peer routes included, and the activity log naming the key.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from tests.conftest import chat, make_config, responder_model, running, sse_data
from trio_swap.config import ConfigError, load_config_text
from trio_swap.config.keys import Grant
from trio_swap.config.model import Config, PeerConfig, ScopedKey, SelectorConfig
from trio_swap.http import access
from trio_swap.observe.activity import ActivityLog, ActivityRow

# ---------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------

MODELS = """\
models:
  small:
    cmd: serve --port ${PORT}
  big:
    cmd: serve --port ${PORT}
    aliases: [large]
  big-2:
    cmd: serve --port ${PORT}
peers:
  gpu2:
    proxy: http://gpu2.example:8080
    models: [remote, org/other]
"""


def load(keys: str) -> Config:
    return load_config_text("apiKeys:\n" + keys + MODELS, "c.yaml")


def test_plain_strings_and_mappings_load() -> None:
    config = load(
        "  - plain-key\n"
        "  - key: ci-key\n"
        "    name: ci\n"
        "    models: [small, large, 'big-*']\n"
        "    peers: [gpu2]\n"
        "  - key: ops-key\n"
        "    name: ops\n"
        "    admin: true\n"
        "  - {key: all-key, models: ['*'], peers: ['*']}\n"
    )
    assert config.api_keys == (
        "plain-key",
        # the alias 'large' is its model's id; globs stay globs
        ScopedKey(key="ci-key", name="ci", models=("small", "big", "big-*"), peers=("gpu2",)),
        ScopedKey(key="ops-key", name="ops", admin=True),
        ScopedKey(key="all-key", name="apiKeys[3]", models=("*",), peers=("*",)),
    )
    assert config.warnings == ()


def test_a_glob_matching_nothing_and_a_key_that_may_do_nothing_are_warnings() -> None:
    config = load("  - {key: ka, name: a, models: ['qwen-*']}\n  - {key: kb, name: b}\n")
    assert config.warnings == (
        "c.yaml:2: apiKeys[0].models[0]: the glob 'qwen-*' matches no model id",
        "c.yaml:3: apiKeys[1]: this key may use no model, no peer and no admin route",
    )


#: (the second ``apiKeys`` entry, key path, message part); the first entry is ``plain-key``.
MALFORMED = [
    ("''", "apiKeys[1]", "must not be empty"),
    ("'a b'", "apiKeys[1]", "cannot contain spaces"),
    ("plain-key", "apiKeys[1]", "the same key as apiKeys[0]"),
    ("5", "apiKeys[1]", "expected string | mapping, got int 5"),
    ("[a]", "apiKeys[1]", "expected string | mapping, got list"),
    ("{name: ci}", "apiKeys[1].key", "required key is missing"),
    ("{key: ''}", "apiKeys[1].key", "must not be empty"),
    ("{key: 'a\tb'}", "apiKeys[1].key", "cannot contain spaces"),
    ("{key: plain-key, name: x}", "apiKeys[1].key", "the same key as apiKeys[0]"),
    ("{key: k, modles: [small]}", "apiKeys[1]", "unknown field `modles`"),
    ("{key: k, name: ''}", "apiKeys[1].name", "must not be blank"),
    ("{key: k, name: ' ci'}", "apiKeys[1].name", "must not be blank"),
    ('{key: k, name: "a\\nb"}', "apiKeys[1].name", "control characters"),
    ("{key: k, name: " + "n" * 65 + "}", "apiKeys[1].name", "at most 64 characters"),
    ("{key: k, name: k}", "apiKeys[1].name", "must not be the key itself"),
    ("{key: k, name: 'apiKeys[0]'}", "apiKeys[1].name", "also the name of apiKeys[0]"),
    ("{key: k, name: 5}", "apiKeys[1].name", "expected string | null, got int 5"),
    ("{key: k, models: small}", "apiKeys[1].models", "expected list, got string"),
    ("{key: k, models: ['']}", "apiKeys[1].models[0]", "must not be empty"),
    ("{key: k, models: [small, small]}", "apiKeys[1].models[1]", "'small' is listed twice"),
    ("{key: k, models: [tiny]}", "apiKeys[1].models[0]", "unknown model 'tiny'"),
    ("{key: k, models: [gpu2/remote]}", "apiKeys[1].models[0]", "list its peer ('gpu2')"),
    ("{key: k, models: [remote]}", "apiKeys[1].models[0]", "is a peer's model"),
    ("{key: k, models: [5]}", "apiKeys[1].models[0]", "expected string, got int 5"),
    ("{key: k, peers: gpu2}", "apiKeys[1].peers", "expected list, got string"),
    ("{key: k, peers: [gpu3]}", "apiKeys[1].peers[0]", "unknown peer 'gpu3' (peers: gpu2)"),
    ("{key: k, peers: [gpu2, gpu2]}", "apiKeys[1].peers[1]", "'gpu2' is listed twice"),
    ("{key: k, admin: 'yes'}", "apiKeys[1].admin", "expected bool, got string"),
]


@pytest.mark.parametrize(("entry", "key_path", "message"), MALFORMED)
def test_a_malformed_key_entry_is_a_located_error(entry: str, key_path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(f"  - plain-key\n  - {entry}\n")
    error = caught.value
    assert (error.source, error.key_path, error.line) == ("c.yaml", key_path, 3), error
    assert message in error.message, error.message


def test_a_selector_in_models_is_an_error_that_says_to_list_its_targets() -> None:
    text = (
        "apiKeys:\n  - {key: k, models: [fast]}\n"
        + MODELS
        + "selectors:\n  fast:\n    strategy: pin\n    targets: [small]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "c.yaml")
    assert (caught.value.key_path, caught.value.line) == ("apiKeys[0].models[0]", 2)
    assert "'fast' is a selector: list the models it may choose" in caught.value.message


def test_two_mappings_with_one_name_are_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load("  - {key: a, name: ci, models: [small]}\n  - {key: b, name: ci, models: [big]}\n")
    assert caught.value.key_path == "apiKeys[1].name"
    assert caught.value.line == 3
    assert "'ci' is also the name of apiKeys[0]" in caught.value.message


def test_check_exits_2_on_a_bad_key_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiKeys:\n  - key: k\n    models: [tiny]\n" + MODELS)
    result = subprocess.run(
        [sys.executable, "-m", "trio_swap", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{bad}:3: apiKeys[0].models[0]: unknown model 'tiny'" in result.stderr


def test_the_config_schema_offers_both_forms() -> None:
    from trio_swap.config.schema import json_schema

    text = json.dumps(json_schema())
    assert '"apiKeys"' in text and '"RawApiKey"' in text and '"allowedHosts"' in text


# ---------------------------------------------------------------------------
# Matching, and the constant-time comparison
# ---------------------------------------------------------------------------


def test_grants_match_ids_globs_and_peers() -> None:
    full = Grant.of("k", 3)
    assert full.full and full.name == "apiKeys[3]"
    assert full.allows_model("anything") and full.allows_peer("anything")
    scoped = Grant.of(ScopedKey(key="k", name="ci", models=("small", "qwen-*"), peers=("p",)), 1)
    assert not scoped.full and not scoped.admin and scoped.name == "ci"
    assert scoped.allows_model("small") and scoped.allows_model("qwen-7b")
    assert not scoped.allows_model("smaller") and not scoped.allows_model("big-qwen-7b")
    assert scoped.allows_peer("p") and not scoped.allows_peer("q")
    nothing = Grant.of(ScopedKey(key="k", name="n"), 0)
    assert not nothing.allows_model("small") and not nothing.allows_peer("p")
    every = Grant.of(ScopedKey(key="k", name="e", models=("*",), peers=("*",)), 0)
    assert every.allows_model("x") and every.allows_peer("y") and not every.full


@pytest.mark.parametrize("presented", [b"key-0", b"key-3", b"key-7", b"nope", b"k"])
def test_every_configured_key_is_compared_whatever_matches(
    monkeypatch: pytest.MonkeyPatch, presented: bytes
) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    keys = [f"key-{i}" if i % 2 else ScopedKey(key=f"key-{i}", name=f"n{i}") for i in range(8)]
    table = access._key_table(keys)
    grant, _ = access._authenticate(table, None, presented)
    assert calls == [32] * 8  # SHA-256 digests: same length, every one compared
    if presented.startswith(b"key-"):
        index = int(presented[4:])
        assert grant is not None and grant.name == (
            f"n{index}" if index % 2 == 0 else f"apiKeys[{index}]"
        )
    else:
        assert grant is None


# ---------------------------------------------------------------------------
# The activity log: the key's name in a new column, old files still readable
# ---------------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, model TEXT NOT NULL,
    endpoint TEXT NOT NULL, method TEXT NOT NULL, status INTEGER NOT NULL,
    duration_ms REAL NOT NULL, wait_ms REAL, upstream_ms REAL, stream INTEGER NOT NULL,
    prompt_tokens INTEGER, completion_tokens INTEGER, cached_tokens INTEGER,
    prompt_per_second REAL, tokens_per_second REAL, error TEXT
);
INSERT INTO activity (time, model, endpoint, method, status, duration_ms, stream)
VALUES (1.0, 'old', '/v1/chat/completions', 'POST', 200, 5.0, 0);
"""


async def test_an_activity_file_of_an_older_trio_swap_gains_the_key_column(tmp_path: Path) -> None:
    path = tmp_path / "activity.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    db.close()
    log = ActivityLog(str(path))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            (old,) = (await log.page(limit=10)).data
            assert (old.model, old.key_name) == ("old", None)
            log.add(
                ActivityRow(
                    time=2.0,
                    model="m",
                    endpoint="/v1/chat/completions",
                    method="POST",
                    status=200,
                    duration_ms=1.0,
                    key_name="ci",
                )
            )
            new, _ = (await log.page(limit=10)).data
            assert (new.model, new.key_name) == ("m", "ci")
            nursery.cancel_scope.cancel()


def test_a_foreign_activity_table_is_still_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE activity (id INTEGER PRIMARY KEY, what TEXT)")
    db.close()
    with pytest.raises(OSError, match=r"cannot open the activity database|not trio-swap's"):
        ActivityLog(str(path))._open()  # what run() does first
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(activity)")]
    db.close()
    assert columns == ["id", "what"]


# ---------------------------------------------------------------------------
# End to end: keys x routes against two real trio-swaps
# ---------------------------------------------------------------------------

ROOT = "root-key"
KEYS: tuple[str | ScopedKey, ...] = (
    ROOT,
    ScopedKey(key="ci-key", name="ci", models=("small",)),
    ScopedKey(key="glob-key", name="globber", models=("b*",)),
    ScopedKey(key="cloud-key", name="cloud", peers=("gpu2",)),
    ScopedKey(key="ops-key", name="ops", admin=True),
    ScopedKey(key="all-key", name="everything", models=("*",), peers=("*",)),
)
#: Who is who in the matrix; None: no key at all.
WHO = {
    "root": ROOT,
    "ci": "ci-key",
    "glob": "glob-key",
    "cloud": "cloud-key",
    "ops": "ops-key",
    "all": "all-key",
    "none": None,
    "wrong": "not-a-key",
}


def front_door(remote_url: str) -> Config:
    base = make_config(responder_model("small"), responder_model("big", aliases=("large",)))
    return Config(
        source="<front door>",
        models=base.models,
        health_check_timeout=base.health_check_timeout,
        start_port=base.start_port,
        log_to_stdout="none",
        peers={"gpu2": PeerConfig(id="gpu2", proxy=remote_url, models=("remote",))},
        api_keys=KEYS,
    )


@asynccontextmanager
async def two_instances() -> AsyncIterator[httpx.AsyncClient]:
    remote_config = make_config(responder_model("remote", "--tokens", "5"))
    async with running(remote_config) as remote, running(front_door(remote.server.url)) as h:
        yield h.client


def headers_of(who: str) -> dict[str, str]:
    key = WHO[who]
    return {} if key is None else {"Authorization": f"Bearer {key}"}


#: route name -> (method, path, JSON body)
ROUTES: dict[str, tuple[str, str, object]] = {
    "chat small": ("POST", "/v1/chat/completions", chat("small")),
    "chat alias large": ("POST", "/v1/chat/completions", chat("large")),
    "stream big": ("POST", "/v1/chat/completions", chat("big", stream=True)),
    "messages small": (
        "POST",
        "/v1/messages",
        {"model": "small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    ),
    "props small": ("GET", "/props?model=small", None),
    "upstream small": ("GET", "/upstream/small/health", None),
    "peer qualified": ("POST", "/v1/chat/completions", chat("gpu2/remote")),
    "peer bare stream": ("POST", "/v1/chat/completions", chat("remote", stream=True)),
    "upstream peer": ("GET", "/upstream/gpu2/remote/v1/models", None),
    "model list": ("GET", "/v1/models", None),
    "logs": ("GET", "/logs", None),
    "activity": ("GET", "/api/activity", None),
    "api models": ("GET", "/api/models", None),
    "running": ("GET", "/running", None),
    "metrics": ("GET", "/metrics", None),
    "unload": ("POST", "/api/models/unload", None),
    "reload": ("POST", "/api/config/reload", None),  # 409: no config file; past the key
    "health": ("GET", "/health", None),
    "ui": ("GET", "/ui/", None),
}

ADMIN_ROUTES = ("logs", "activity", "api models", "running", "metrics", "unload", "reload")
OPEN_ROUTES = ("health", "ui")
OK = {"reload": 409}


def expected(who: str, route: str) -> int:
    """The status ``who`` gets on ``route`` (the rules of docs/security.md)."""
    if route in OPEN_ROUTES:
        return 200
    if who in ("none", "wrong"):
        return 401
    ok = OK.get(route, 200)
    if who in ("root",):
        return ok
    admin = who == "ops"
    if route in ADMIN_ROUTES:
        return ok if admin else 403
    if route == "model list":
        return 200
    local = {
        "chat small": "small",
        "messages small": "small",
        "props small": "small",
        "upstream small": "small",
        "chat alias large": "big",
        "stream big": "big",
    }
    if route in local:
        model = local[route]
        allowed = {"ci": {"small"}, "glob": {"big"}, "all": {"small", "big"}}.get(who, set())
        return ok if model in allowed else 403
    return ok if who in ("cloud", "all") else 403  # the peer routes


async def test_keys_times_routes() -> None:
    failures: list[str] = []
    with trio.fail_after(120):
        async with two_instances() as client:
            for who in WHO:
                for route, (method, path, body) in ROUTES.items():
                    response = await client.request(
                        method, path, json=body, headers=headers_of(who)
                    )
                    want = expected(who, route)
                    if response.status_code != want:
                        failures.append(
                            f"{who} {route}: {response.status_code}, expected {want}: "
                            f"{response.text[:200]}"
                        )
                    elif want == 403:
                        problem = _refusal_problem(response, path)
                        if problem:
                            failures.append(f"{who} {route}: {problem}")
                    elif route in ("stream big", "peer bare stream") and want == 200:
                        data = sse_data(response.text.splitlines())
                        if not data or data[-1] != "[DONE]":
                            failures.append(f"{who} {route}: not a whole stream: {data[-3:]}")
    assert not failures, "\n".join(failures)


def _refusal_problem(response: httpx.Response, path: str) -> str | None:
    body = response.json()
    if path.startswith("/v1/messages"):
        if body.get("type") != "error" or body["error"]["type"] != "permission_error":
            return f"not an Anthropic permission error: {body}"
        return None
    error = body.get("error", {})
    if error.get("type") != "permission_error" or error.get("code") not in (
        "model_not_allowed",
        "admin_key_required",
    ):
        return f"not an OpenAI permission error: {body}"
    return None


async def test_the_model_list_shows_only_what_the_key_may_use() -> None:
    lists = {
        "root": ["big", "gpu2/remote", "small"],
        "all": ["big", "gpu2/remote", "small"],
        "ci": ["small"],
        "glob": ["big"],
        "cloud": ["gpu2/remote"],
        "ops": [],
    }
    with trio.fail_after(90):
        async with two_instances() as client:
            for who, ids in lists.items():
                response = await client.get("/v1/models", headers=headers_of(who))
                assert response.status_code == 200
                assert [m["id"] for m in response.json()["data"]] == ids, who


async def test_a_refused_model_never_loads_and_a_refused_peer_is_never_called() -> None:
    with trio.fail_after(90):
        remote_config = make_config(responder_model("remote"))
        async with (
            running(remote_config) as remote,
            running(front_door(remote.server.url)) as h,
        ):
            for body in (chat("big"), chat("large"), chat("gpu2/remote"), chat("remote")):
                response = await h.client.post(
                    "/v1/chat/completions", json=body, headers=headers_of("ci")
                )
                assert response.status_code == 403, response.text
                assert "'ci' may not use model" in response.json()["error"]["message"]
            assert h.server.processes["big"].start_count == 0
            assert remote.server.processes["remote"].start_count == 0
            assert (await remote.client.get("/api/activity")).json()["data"] == []


async def test_the_activity_log_names_the_key_never_the_key_itself() -> None:
    with trio.fail_after(90):
        async with two_instances() as client:
            for who, body in (
                ("ci", chat("small")),
                ("root", chat("small")),
                ("cloud", chat("gpu2/remote")),
                ("ci", chat("big")),  # refused: logged with the model it asked for
            ):
                await client.post("/v1/chat/completions", json=body, headers=headers_of(who))
            response = await client.get("/api/activity", headers=headers_of("ops"))
            rows = response.json()["data"]
            seen = [(row["key_name"], row["model"], row["status"]) for row in reversed(rows)]
            assert seen == [
                ("ci", "small", 200),
                ("apiKeys[0]", "small", 200),
                ("cloud", "gpu2/remote", 200),
                ("ci", "big", 403),
            ]
            for key in (k if isinstance(k, str) else k.key for k in KEYS):
                assert key not in response.text


async def test_scoped_keys_through_the_sdks() -> None:
    """The OpenAI SDK raises PermissionDeniedError, the Anthropic SDK its own."""
    import anthropic
    import openai

    with trio.fail_after(90):
        async with running(front_door("http://127.0.0.1:9")) as h:
            base = h.server.url

            def story() -> tuple[str, str, list[str]]:
                with (
                    openai.OpenAI(base_url=base + "/v1", api_key="ci-key", max_retries=0) as oa,
                    anthropic.Anthropic(base_url=base, api_key="ci-key", max_retries=0) as an,
                ):
                    listed = [m.id for m in oa.models.list()]
                    try:
                        oa.chat.completions.create(
                            model="big", messages=[{"role": "user", "content": "hi"}]
                        )
                    except openai.PermissionDeniedError as exc:
                        openai_error = str(exc)
                    else:
                        raise AssertionError("a scoped key reached a model outside its scope")
                    try:
                        an.messages.create(
                            model="big", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                        )
                    except anthropic.PermissionDeniedError as exc:
                        anthropic_error = str(exc)
                    else:
                        raise AssertionError("a scoped key reached a model outside its scope")
                return openai_error, anthropic_error, listed

            openai_error, anthropic_error, listed = await trio.to_thread.run_sync(story)
            assert listed == ["small"]
            assert "may not use model 'big'" in openai_error
            assert "may not use model 'big'" in anthropic_error


async def test_a_reload_changes_what_a_key_may_do(tmp_path: Path) -> None:
    from tests.conftest import free_port
    from tests.test_reload import config_text, reload, serving, write

    start = free_port()
    narrow = "apiKeys:\n  - key: k\n    name: tester\n    models: [a]\n  - ops\n"
    path = write(
        tmp_path / "c.yaml", config_text({"a": "", "b": ""}, start_port=start, extra=narrow)
    )
    key = {"Authorization": "Bearer k"}
    with trio.fail_after(60):
        async with serving(path) as h:
            h.client.headers["x-api-key"] = "ops"  # for reload(); Bearer wins where both are sent
            assert (
                await h.client.post("/v1/chat/completions", json=chat("b"), headers=key)
            ).status_code == 403
            wide = "apiKeys:\n  - key: k\n    name: tester\n    models: [a, b]\n  - ops\n"
            write(path, config_text({"a": "", "b": ""}, start_port=start, extra=wide))
            assert (await reload(h))["settings"] == ["apiKeys"]
            response = await h.client.post("/v1/chat/completions", json=chat("b"), headers=key)
            assert response.status_code == 200, response.text


async def test_selectors_are_checked_on_the_target_they_choose() -> None:
    """A selector resolves first; the key must be allowed the target it picks, and
    /v1/models lists a selector only when every target is in the key's scope."""
    config = msgspec.structs.replace(
        front_door("http://127.0.0.1:9"),
        selectors={
            "fast": SelectorConfig(id="fast", strategy="pin", targets=("small",)),
            "pin-big": SelectorConfig(id="pin-big", strategy="pin", targets=("large",)),
            "either": SelectorConfig(id="either", strategy="warm", targets=("small", "big")),
        },
    )
    with trio.fail_after(60):
        async with running(config) as h:
            listed = await h.client.get("/v1/models", headers=headers_of("ci"))
            assert [m["id"] for m in listed.json()["data"]] == ["fast", "small"]
            listed = await h.client.get("/v1/models", headers=headers_of("glob"))
            assert [m["id"] for m in listed.json()["data"]] == ["big", "pin-big"]
            response = await h.client.post(
                "/v1/chat/completions", json=chat("fast"), headers=headers_of("ci")
            )
            assert response.status_code == 200, response.text
            response = await h.client.post(
                "/v1/chat/completions", json=chat("pin-big"), headers=headers_of("ci")
            )
            assert response.status_code == 403, response.text
            message = response.json()["error"]["message"]
            assert "may not use model 'large', which selector 'pin-big' chose," in message
            assert h.server.processes["big"].start_count == 0
