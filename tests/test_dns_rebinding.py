"""DNS rebinding: requests whose ``Host`` names a foreign host are refused on every route.

An attacker's page on ``http://attacker.example:8080`` rebinds its name to
127.0.0.1, and its scripts then call trio-swap as their own origin. The only
trace of that is ``Host: attacker.example:8080``. These tests send such
requests to a real trio-swap (in-process, and once the ``trio-swap serve``
command) in front of a responder model, as a browser would after the rebind
(same origin: no ``Origin``, no ``Sec-Fetch-Site: cross-site``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from tests.conftest import chat, free_port, make_config, responder_model, running, wait_for
from tests.test_cli import trio_swap
from tests.test_reload import config_text, reload, serving, write
from trio_swap.config import ConfigError, load_config_text
from trio_swap.config.model import Config
from trio_swap.http.hosts import HostPolicy, host_name

FOREIGN = (
    "attacker.example:8080",
    "attacker.example",
    "ATTACKER.Example:8080",
    "attacker.example.",
    "attacker.example.:8080",
    "localhost.attacker.example",
    "[2001:db8::1]:8080",
    "[2001:db8::1]",
    "[2001:DB8::1]",
    "192.0.2.7:8080",
    "[::ffff:192.0.2.7]",
    "evil.example:",
)
ALLOWED = (
    "localhost",
    "LocalHost:8080",
    "localhost.",
    "localhost.:8080",
    "app.localhost:8080",
    "127.0.0.1",
    "127.0.0.1:8080",
    "127.8.9.10:1",
    "[::1]",
    "[::1]:8080",
    "[::ffff:127.0.0.1]:8080",
)


# ---------------------------------------------------------------------------
# The allowlist, alone
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (b"localhost", "localhost"),
        (b"LocalHost:8080", "localhost"),
        (b"localhost.", "localhost"),
        (b"localhost.:80", "localhost"),
        (b"Models.Example.COM", "models.example.com"),
        (b"[::1]", "::1"),
        (b"[::1]:8080", "::1"),
        (b"[2001:DB8::1]:80", "2001:db8::1"),
        (b"::1", "::1"),  # not valid HTTP, but unambiguous
        (b"127.0.0.1:", "127.0.0.1"),  # an empty port is allowed (RFC 3986)
        (b"[::1", None),
        (b"[::1]x", None),
        (b"[::1]:http", None),
        (b"host:port", None),
        (b"a:b:c", None),
    ],
)
def test_host_name_strips_port_brackets_case_and_the_trailing_dot(
    value: bytes, name: str | None
) -> None:
    assert host_name(value) == name


def test_default_policy_allows_loopback_the_listen_address_and_this_machine() -> None:
    policy = HostPolicy(listen_host="127.0.0.1", machine_name="GPU-Box.home.arpa")
    for value in ALLOWED:
        assert policy.allows(value.encode()), value
    for value in FOREIGN:
        assert not policy.allows(value.encode()), value
    for value in (b"gpu-box", b"GPU-BOX:8080", b"gpu-box.home.arpa."):
        assert policy.allows(value), value
    assert not policy.allows(b"gpu-box.attacker.example")
    assert not policy.allows(b"home.arpa")


def test_listen_host_name_and_address_are_allowed() -> None:
    named = HostPolicy(listen_host="models.lan", machine_name="")
    assert named.allows(b"models.lan:8080") and named.allows(b"MODELS.LAN.")
    assert not named.allows(b"other.lan")
    addressed = HostPolicy(listen_host="192.168.1.5", machine_name="")
    assert addressed.allows(b"192.168.1.5:8080")
    assert not addressed.allows(b"192.168.1.6:8080")
    v6 = HostPolicy(listen_host="fd00::5", machine_name="")
    assert v6.allows(b"[fd00:0::5]:8080")  # compared as addresses, not as text
    assert not v6.allows(b"[fd00::6]:8080")


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_on_every_interface_any_address_literal_is_allowed_but_no_foreign_name(
    wildcard: str,
) -> None:
    policy = HostPolicy(listen_host=wildcard, machine_name="")
    for value in (
        b"10.1.2.3:8080",
        b"[2001:db8::1]:8080",
        b"203.0.113.9",
        *map(str.encode, ALLOWED),
    ):
        assert policy.allows(value), value
    for value in (b"attacker.example:8080", b"ATTACKER.example.", b"[::1", b"a:b:c"):
        assert not policy.allows(value), value


def test_allowed_hosts_exact_names_patterns_addresses_and_star() -> None:
    policy = HostPolicy(
        ["models.example.com", "*.corp.example", "203.0.113.9"],
        listen_host="127.0.0.1",
        machine_name="",
    )
    for value in (
        b"models.example.com",
        b"MODELS.example.com.:443",
        b"a.corp.example",
        b"a.b.corp.example:8080",
        b"203.0.113.9:8080",
    ):
        assert policy.allows(value), value
    for value in (b"example.com", b"corp.example", b"xcorp.example", b"models.example.com.evil"):
        assert not policy.allows(value), value
    everything = HostPolicy(["*"], machine_name="")
    assert everything.disabled
    assert everything.allows(b"attacker.example:8080") and everything.allows(b"[::1")


def test_a_policy_remembers_only_what_it_allowed() -> None:
    policy = HostPolicy(machine_name="")
    assert not policy.allows(b"attacker.example")
    assert policy.allows(b"localhost:1")
    assert not policy.allows(b"attacker.example")  # the remembered value is the allowed one


# ---------------------------------------------------------------------------
# allowedHosts in the config file
# ---------------------------------------------------------------------------

MODEL = "models:\n  m:\n    cmd: serve --port ${PORT}\n"


def test_allowed_hosts_are_normalised() -> None:
    text = (
        "allowedHosts:\n"
        "  - Models.Example.COM.\n"
        "  - '*.Corp.Example'\n"
        "  - '[2001:DB8::1]'\n"
        "  - 192.0.2.7\n"
        "  - bücher.example\n"
        "  - models.example.com\n" + MODEL
    )
    config = load_config_text(text, "c.yaml")
    assert config.allowed_hosts == (
        "models.example.com",
        "*.corp.example",
        "2001:db8::1",
        "192.0.2.7",
        "xn--bcher-kva.example",
    )
    assert load_config_text("allowedHosts: ['*']\n" + MODEL, "c.yaml").allowed_hosts == ("*",)
    assert load_config_text(MODEL, "c.yaml").allowed_hosts == ()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("''", "must not be empty"),
        ("'  '", "must not be empty"),
        ("http://models.example.com", "without scheme or path"),
        ("models.example.com/v1", "without scheme or path"),
        ("'a b.example'", "without scheme or path"),
        ("models.example.com:8080", "must not carry a port"),
        ("'*example.com'", "'*' may only stand alone"),
        ("'a.*.example.com'", "'*' may only stand alone"),
        ("'*.*.example.com'", "'*' may only stand alone"),
        ("'*.192.0.2.7'", "cannot be a '*.' pattern"),
        ("a..b", "not a valid host name"),
        ("'.example.com'", "not a valid host name"),
        ("x" * 64 + ".example", "not a valid host name"),
        ("'.'", "not a valid host name"),
        ("5", "expected string, got int 5"),
    ],
)
def test_a_malformed_allowed_host_is_a_located_error(entry: str, message: str) -> None:
    text = f"allowedHosts:\n  - localhost\n  - {entry}\n" + MODEL
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "c.yaml")
    error = caught.value
    assert (error.source, error.key_path, error.line) == ("c.yaml", "allowedHosts[1]", 3)
    assert message in error.message


def test_allowed_hosts_must_be_a_list_of_strings() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text("allowedHosts: models.example.com\n" + MODEL, "c.yaml")
    assert caught.value.key_path == "allowedHosts"
    assert "expected list" in caught.value.message


# ---------------------------------------------------------------------------
# End to end: every route family, as a rebinding page would call it
# ---------------------------------------------------------------------------

#: (method, path, body): model, admin, UI, health, metrics, passthrough routes.
ROUTES = (
    ("POST", "/v1/chat/completions", chat("A")),
    ("POST", "/v1/messages", {"model": "A", "max_tokens": 5, "messages": []}),
    ("GET", "/props?model=A", None),
    ("GET", "/upstream/A/health", None),
    ("GET", "/v1/models", None),
    ("GET", "/logs", None),
    ("GET", "/logs/stream", None),
    ("GET", "/api/models", None),
    ("GET", "/api/activity", None),
    ("GET", "/api/events", None),
    ("POST", "/api/models/unload", None),
    ("POST", "/api/models/load/A", None),
    ("POST", "/api/config/reload", None),
    ("GET", "/unload", None),
    ("GET", "/running", None),
    ("GET", "/metrics", None),
    ("GET", "/", None),
    ("GET", "/ui/", None),
    ("GET", "/ui/models", None),
    ("GET", "/health", None),
    ("OPTIONS", "/v1/chat/completions", None),
)


def assert_host_refused(response: httpx.Response, path: str) -> None:
    assert response.status_code == 403, (path, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error"
        assert body["error"]["type"] == "permission_error"
        assert "is not allowed" in body["error"]["message"]
    else:
        assert body["error"]["code"] == "host_not_allowed", body
        assert body["error"]["type"] == "permission_error"
        assert "DNS rebinding" in body["error"]["message"]


async def test_foreign_hosts_are_refused_on_model_admin_and_ui_routes() -> None:
    with trio.fail_after(60):
        async with running(make_config(responder_model("A"))) as h:
            for method, path, body in ROUTES:
                for host in FOREIGN:
                    response = await h.client.request(
                        method, path, json=body, headers={"Host": host}
                    )
                    assert_host_refused(response, path)
            # Nothing got through: A never started, nothing was unloaded or logged.
            assert h.server.processes["A"].start_count == 0
            activity = (await h.client.get("/api/activity")).json()
            assert activity["data"] == []


async def test_allowed_hosts_are_served_on_model_admin_and_ui_routes() -> None:
    with trio.fail_after(60):
        async with running(make_config(responder_model("A"))) as h:
            for host in ALLOWED:
                headers = {"Host": host}
                response = await h.client.post(
                    "/v1/chat/completions", json=chat("A"), headers=headers
                )
                assert response.status_code == 200, (host, response.text)
                for path in ("/logs", "/api/models", "/ui/", "/health", "/v1/models"):
                    response = await h.client.get(path, headers=headers)
                    assert response.status_code == 200, (host, path, response.text)
            # A request without Host (HTTP/1.0) passes.
            port = int(h.server.url.rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /api/models HTTP/1.0\r\n\r\n")
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") or answer.startswith(b"HTTP/1.0 200"), answer


async def test_the_check_stays_on_with_api_keys() -> None:
    config = msgspec.structs.replace(make_config(responder_model("A")), api_keys=("sesame",))
    with trio.fail_after(60):
        async with running(config) as h:
            keyed = {"Authorization": "Bearer sesame"}
            for method, path, body in ROUTES:
                response = await h.client.request(
                    method, path, json=body, headers={**keyed, "Host": "attacker.example:8080"}
                )
                assert_host_refused(response, path)
            # Without a key either: the Host is refused before the key is asked for.
            response = await h.client.get("/logs", headers={"Host": "attacker.example"})
            assert_host_refused(response, "/logs")
            response = await h.client.get("/logs", headers={**keyed, "Host": "localhost:1"})
            assert response.status_code == 200


def with_hosts(*hosts: str) -> Config:
    return msgspec.structs.replace(make_config(responder_model("A")), allowed_hosts=hosts)


async def test_allowed_hosts_are_honoured() -> None:
    with trio.fail_after(60):
        async with running(with_hosts("models.example.com", "*.corp.example")) as h:
            for host in ("models.example.com", "Models.Example.Com.:443", "ai.corp.example:80"):
                response = await h.client.post(
                    "/v1/chat/completions", json=chat("A"), headers={"Host": host}
                )
                assert response.status_code == 200, (host, response.text)
                response = await h.client.get("/logs", headers={"Host": host})
                assert response.status_code == 200, (host, response.text)
            for host in ("corp.example", "example.com", "attacker.example:8080"):
                response = await h.client.get("/logs", headers={"Host": host})
                assert_host_refused(response, "/logs")
        async with running(with_hosts("*")) as h:
            for host in FOREIGN:
                response = await h.client.get("/api/models", headers={"Host": host})
                assert response.status_code == 200, (host, response.text)


async def test_a_reload_switches_the_allowlist(tmp_path: Path) -> None:
    start = free_port()
    first = config_text({"m": ""}, start_port=start, extra="allowedHosts: [a.example]")
    path = write(tmp_path / "c.yaml", first)
    with trio.fail_after(60):
        async with serving(path) as h:
            assert (await h.client.get("/logs", headers={"Host": "a.example"})).status_code == 200
            assert_host_refused(await h.client.get("/logs", headers={"Host": "b.example"}), "/logs")
            second = config_text({"m": ""}, start_port=start, extra="allowedHosts: [b.example]")
            write(path, second)
            assert (await reload(h))["settings"] == ["allowedHosts"]
            assert (await h.client.get("/logs", headers={"Host": "b.example"})).status_code == 200
            assert_host_refused(await h.client.get("/logs", headers={"Host": "a.example"}), "/logs")
            write(path, config_text({"m": ""}, start_port=start))  # back to the defaults
            assert (await reload(h))["settings"] == ["allowedHosts"]
            for host in ("a.example", "b.example"):
                assert_host_refused(await h.client.get("/logs", headers={"Host": host}), "/logs")
            assert (await h.client.get("/logs", headers={"Host": "localhost"})).status_code == 200


async def test_trio_swap_serve_refuses_a_rebound_host_and_reloads_its_list(tmp_path: Path) -> None:
    """The command as users run it, reloaded with SIGHUP as systemd does."""
    start = free_port()
    path = write(tmp_path / "c.yaml", config_text({"m": ""}, start_port=start))
    attacker = {"Host": "attacker.example:8080"}
    with trio.fail_after(60):
        async with (
            trio_swap("--config", str(path)) as (process, url),
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            for method, path_, body in (
                ("GET", "/logs", None),
                ("POST", "/api/models/unload", None),
                ("POST", "/v1/chat/completions", chat("m")),
            ):
                response = await client.request(method, path_, json=body, headers=attacker)
                assert_host_refused(response, path_)
            extra = "allowedHosts: [attacker.example]"
            write(path, config_text({"m": ""}, start_port=start, extra=extra))
            os.kill(process.pid, signal.SIGHUP)

            async def switched() -> bool:
                return (await client.get("/logs", headers=attacker)).status_code == 200

            await wait_for(switched, what="the reload to allow attacker.example")
            response = await client.post("/v1/chat/completions", json=chat("m"), headers=attacker)
            assert response.status_code == 200, response.text
