"""``trio-swap gateway-config``: a LiteLLM config read from two real trio-swap nodes.

The nodes only list their models here (nothing is started); the LiteLLM proxy
that takes this output as is runs in the gateway lane (tests/gateway).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio
import yaml

from tests.conftest import Harness, free_port, running
from trio_swap.config.load import load_config_text
from trio_swap.gateway import (
    ROUTER_SETTINGS,
    GatewayError,
    Served,
    litellm_config,
    node_base,
)

RESPONDER = f"{sys.executable} -m trio_swap responder --port ${{PORT}}"


def node_text(models: Sequence[str], extra: str = "") -> str:
    lines = [f"startPort: {free_port()}", "logToStdout: none", "models:"]
    for model in models:
        lines += [f"  {model}:", f"    cmd: {RESPONDER} --model {model}"]
    return "\n".join(lines) + "\n" + extra


@asynccontextmanager
async def two_nodes(*, b_keys: Sequence[str] = ()) -> AsyncIterator[tuple[Harness, Harness]]:
    """Node A: alpha, shared (+ alias, selector, profile, a peer to B); node B: beta, shared."""
    keys = f"apiKeys: {list(b_keys)}\n" if b_keys else ""
    b_config = load_config_text(node_text(["beta", "shared"], keys), "<node B>")
    async with running(b_config) as b:
        peer_key = f"    apiKey: {b_keys[0]}\n" if b_keys else ""
        a_extra = (
            "includeAliasesInList: true\n"
            "selectors:\n  pick: {strategy: pin, targets: [alpha]}\n"
            "profiles:\n  night: {pins: {chat: alpha}}\n"
            f"peers:\n  gpu2:\n    proxy: {b.server.url}\n{peer_key}    models: [beta]\n"
        )
        a_text = node_text(["alpha", "shared"], a_extra).replace(
            "  shared:\n", "  shared:\n    aliases: [common]\n"
        )
        async with running(load_config_text(a_text, "<node A>")) as a:
            answer = await a.client.put("/api/profiles/active", json={"name": "night"})
            assert answer.status_code == 200, answer.text
            yield a, b


async def gateway_config(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the real command; (exit status, stdout, stderr)."""
    result = await trio.run_process(
        [sys.executable, "-m", "trio_swap", "gateway-config", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def deployments(config: dict[str, object]) -> list[tuple[str, str, str]]:
    """(model_name, litellm model, api_base) of each model_list entry, in order."""
    model_list = config["model_list"]
    assert isinstance(model_list, list)
    return [
        (e["model_name"], e["litellm_params"]["model"], e["litellm_params"]["api_base"])
        for e in model_list
    ]


async def test_one_deployment_per_model_and_node_peers_and_profiles_left_out() -> None:
    with trio.fail_after(60):
        async with two_nodes() as (a, b):
            listed = (await a.client.get("/v1/models")).json()["data"]
            kinds = {e["id"]: e["meta"]["llamaswap"]["type"] for e in listed}
            # What node A lists: its own names, B's model as a peer entry, a profile pin.
            assert kinds == {
                "alpha": "model",
                "shared": "model",
                "common": "alias",
                "pick": "selector",
                "gpu2/beta": "peer",
                "chat": "profile",
            }
            a_url, b_url = a.server.url, b.server.url
            status, out, err = await gateway_config("--node", a_url, "--node", b_url + "/v1/")
    assert status == 0, err
    assert f"{a_url}: left out its peer, profile entries" in err
    assert out.startswith("# LiteLLM proxy config written by trio-swap")
    config = yaml.safe_load(out)
    assert list(config) == ["model_list", "router_settings"]
    assert deployments(config) == [
        ("alpha", "openai/alpha", f"{a_url}/v1"),
        ("beta", "openai/beta", f"{b_url}/v1"),
        ("common", "openai/common", f"{a_url}/v1"),
        ("pick", "openai/pick", f"{a_url}/v1"),
        # Served by both nodes: two deployments under one name, which LiteLLM balances.
        ("shared", "openai/shared", f"{a_url}/v1"),
        ("shared", "openai/shared", f"{b_url}/v1"),
    ]
    # No key needed: a placeholder, since LiteLLM's OpenAI client insists on one.
    assert {e["litellm_params"]["api_key"] for e in config["model_list"]} == {"none"}
    assert config["router_settings"] == dict(ROUTER_SETTINGS)
    assert config["router_settings"]["enable_weighted_failover"] is True


async def test_a_node_that_needs_a_key_is_named_and_the_key_can_stay_out_of_the_file() -> None:
    with trio.fail_after(60):
        async with two_nodes(b_keys=["node-secret"]) as (a, b):
            nodes = ("--node", a.server.url, "--node", b.server.url)
            status, out, err = await gateway_config(*nodes)
            assert status == 1 and out == ""
            needs = f"error: node {b.server.url}: 401 Unauthorized: it needs an API key (--api-key)"
            assert err.endswith(needs + "\n")

            status, _, err = await gateway_config(*nodes, "--api-key", "wrong")
            assert status == 1
            assert f"node {b.server.url}: 401 Unauthorized: it refused the API key" in err

            status, out, err = await gateway_config(*nodes, "--api-key", "node-secret")
            assert status == 0, err
            keys = {e["litellm_params"]["api_key"] for e in yaml.safe_load(out)["model_list"]}
            assert keys == {"node-secret"}

            env = {"NODE_KEY": "node-secret"}
            status, out, err = await gateway_config(*nodes, "--api-key-env", "NODE_KEY", env=env)
            assert status == 0, err
            assert "node-secret" not in out  # LiteLLM reads it from its own environment
            keys = {e["litellm_params"]["api_key"] for e in yaml.safe_load(out)["model_list"]}
            assert keys == {"os.environ/NODE_KEY"}

            status, _, err = await gateway_config(*nodes, "--api-key-env", "UNSET_NODE_KEY")
            assert status == 2 and "$UNSET_NODE_KEY is not set" in err


async def test_a_node_that_is_down_or_not_trio_swap_is_a_clear_error() -> None:
    with trio.fail_after(60):
        down = f"http://127.0.0.1:{free_port()}"
        status, out, err = await gateway_config("--node", down)
        assert status == 1 and out == ""
        assert err.startswith(f"error: node {down}: cannot reach it (")

        async with two_nodes() as (a, _):
            # A URL whose /v1/models is not a model list (the web UI's page), or no page.
            status, _, err = await gateway_config("--node", a.server.url + "/ui")
            assert status == 1
            assert f"node {a.server.url}/ui: /v1/models is not an OpenAI model list" in err
            status, _, err = await gateway_config("--node", a.server.url + "/nowhere")
            assert status == 1
            assert f"node {a.server.url}/nowhere: /v1/models answered HTTP 404" in err
            status, _, err = await gateway_config("--node", a.server.url, "--node", a.server.url)
            assert status == 1 and "is given twice" in err

        status, _, err = await gateway_config("--node", "10.0.0.2:8080")
        assert status == 1 and "expected an http:// or https:// URL" in err


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://gpu1:8080", "http://gpu1:8080"),
        ("http://gpu1:8080/", "http://gpu1:8080"),
        ("http://gpu1:8080/v1", "http://gpu1:8080"),
        ("https://gpu1/llm/v1/", "https://gpu1/llm"),
        ("  http://[::1]:8080 ", "http://[::1]:8080"),
    ],
)
def test_node_urls_are_base_urls(given: str, base: str) -> None:
    assert node_base(given) == base


@pytest.mark.parametrize("bad", ["gpu1:8080", "ftp://gpu1", "http://", "http://gpu1/?x=1"])
def test_node_urls_that_are_not_http_bases_are_refused(bad: str) -> None:
    with pytest.raises(GatewayError, match=r"^node "):
        node_base(bad)


def test_an_untyped_entry_is_a_model_and_unknown_types_are_left_out() -> None:
    """A plain OpenAI-compatible server (no meta.llamaswap) may sit beside the nodes."""
    served = [
        Served("http://b", "m", ""),
        Served("http://a", "m", "model"),
        Served("http://a", "future", "something-new"),
    ]
    config = litellm_config(served, "k")
    # Nodes keep the order they were first seen in.
    assert deployments(config) == [
        ("m", "openai/m", "http://b/v1"),
        ("m", "openai/m", "http://a/v1"),
    ]
    assert msgspec.json.encode(config)  # plain data, nothing YAML-specific
