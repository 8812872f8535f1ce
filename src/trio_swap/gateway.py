"""``trio-swap gateway-config``: a LiteLLM proxy config read from the nodes themselves.

One trio-swap per GPU box, LiteLLM in front (docs/scaling.md). The gateway's
``model_list`` must name, for each model, every node that serves it; written by
hand it drifts as soon as a node's config changes. This asks each node's
``/v1/models`` instead and prints the config, so regenerating it is one command.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import httpx
import yaml

from trio_swap import __version__

__all__ = [
    "GatewayError",
    "Served",
    "fetch_node",
    "litellm_config",
    "main",
    "node_base",
    "render",
]

#: ``meta.llamaswap.type`` values that are this node's own, stable names.
#: ``peer`` entries are another node's models (that node is listed itself, or
#: is not part of this gateway); ``profile`` entries exist only while a profile
#: is active, so a gateway routing to them would break when it changes.
KEPT_TYPES: Final = frozenset({"model", "alias", "selector"})

#: Seconds to wait for one node's listing (connect and read).
FETCH_TIMEOUT: Final = 10.0

#: Written as ``api_key`` when the nodes need none: LiteLLM's OpenAI client
#: refuses to send a request without some key, and trio-swap without
#: ``apiKeys`` ignores whatever it gets.
NO_KEY: Final = "none"

#: How LiteLLM's router treats the nodes (docs/scaling.md#router-settings).
ROUTER_SETTINGS: Final[Mapping[str, object]] = {
    # Spread the requests for a model over the nodes that serve it, at random.
    "routing_strategy": "simple-shuffle",
    # A call that fails on one node (trio-swap's 429 over concurrencyLimit, its 503
    # for a model that cannot start, maxQueue or a node shutting down, a node that
    # is down) is sent again to another node that serves the model, never the same.
    "enable_weighted_failover": True,
    # Before that, one more try wherever the router picks: a model on one node
    # only gets a second chance there (after the 429's Retry-After).
    "num_retries": 1,
    # A (model, node) that failed twice within cooldown_time seconds gets no
    # requests for cooldown_time seconds: a model that cannot start on a node
    # is not started again for every request.
    "allowed_fails": 1,
    "cooldown_time": 10,
}


class GatewayError(Exception):
    """A node that cannot be listed: unreachable, refused the key, or not an OpenAI listing."""


@dataclass(frozen=True)
class Served:
    """One name a node answers to, as its ``/v1/models`` lists it."""

    node: str  # the node's base URL, without a trailing slash or /v1
    model: str
    kind: str  # meta.llamaswap.type, or "" for a server that does not say


def node_base(url: str) -> str:
    """``http(s)://host[:port][/prefix]``: the URL as given, less a trailing ``/`` or ``/v1``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GatewayError(f"node {url!r}: expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise GatewayError(f"node {url!r}: a node URL has no query or fragment")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def fetch_node(client: httpx.Client, node: str, api_key: str | None) -> list[Served]:
    """Every entry of ``node``'s ``/v1/models``; a clear error naming the node if it fails."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = client.get(f"{node}/v1/models", headers=headers)
    except httpx.TimeoutException:
        raise GatewayError(f"node {node}: no answer within {FETCH_TIMEOUT:g} s") from None
    except httpx.HTTPError as exc:
        raise GatewayError(f"node {node}: cannot reach it ({exc or type(exc).__name__})") from None
    if response.status_code == 401:
        why = "refused the API key" if api_key else "needs an API key (--api-key)"
        raise GatewayError(f"node {node}: 401 Unauthorized: it {why}")
    if response.status_code != 200:
        raise GatewayError(f"node {node}: /v1/models answered HTTP {response.status_code}")
    try:
        data = response.json()["data"]
        assert isinstance(data, list)
        return [_served(node, entry) for entry in data]
    except (ValueError, KeyError, TypeError, AssertionError):
        raise GatewayError(f"node {node}: /v1/models is not an OpenAI model list") from None


def _served(node: str, entry: object) -> Served:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        raise TypeError("an entry without an id")
    meta = entry.get("meta")
    llamaswap = meta.get("llamaswap") if isinstance(meta, dict) else None
    kind = llamaswap.get("type") if isinstance(llamaswap, dict) else None
    return Served(node, entry["id"], kind if isinstance(kind, str) else "")


def routable(served: Served) -> bool:
    """A node's own stable names; entries of a server that gives no type are its models."""
    return served.kind in KEPT_TYPES or served.kind == ""


def litellm_config(served: Iterable[Served], api_key: str) -> dict[str, object]:
    """LiteLLM's proxy config: one ``model_list`` deployment per (model, node).

    A model served by several nodes gets one deployment per node under the
    same ``model_name``: that is what LiteLLM load-balances and fails over.
    Deployments are sorted by model, then in the order the nodes were given.
    """
    nodes: dict[str, int] = {}
    kept = [s for s in served if routable(s)]
    for s in kept:
        nodes.setdefault(s.node, len(nodes))
    kept.sort(key=lambda s: (s.model, nodes[s.node]))
    model_list = [
        {
            "model_name": s.model,
            "litellm_params": {
                # openai/: LiteLLM's OpenAI-compatible provider; it sends `model`
                # without the prefix, so the node sees its own name.
                "model": f"openai/{s.model}",
                "api_base": f"{s.node}/v1",
                "api_key": api_key,
            },
        }
        for s in kept
    ]
    return {"model_list": model_list, "router_settings": dict(ROUTER_SETTINGS)}


def render(config: Mapping[str, object], nodes: Sequence[str]) -> str:
    """The config as YAML, under a comment saying where it came from."""
    header = [
        f"# LiteLLM proxy config written by trio-swap {__version__} gateway-config from:",
        *(f"#   {node}" for node in nodes),
        "# Regenerate it when a node's models change. Run it with:",
        "#   LITELLM_MASTER_KEY=sk-... litellm --config THIS_FILE --port 4000",
        "",
    ]
    body = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + body


def main(nodes: Sequence[str], api_key: str | None, api_key_env: str | None) -> int:
    """Print the config for ``nodes`` to stdout; 1 with an error on stderr if a node fails."""
    import os

    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            print(f"error: --api-key-env: ${api_key_env} is not set", file=sys.stderr)
            return 2
        written = f"os.environ/{api_key_env}"  # LiteLLM reads it when it loads the file
    else:
        key = api_key
        written = api_key or NO_KEY
    try:
        bases = [node_base(node) for node in nodes]
        repeated = {base for base in bases if bases.count(base) > 1}
        if repeated:
            raise GatewayError(f"node {sorted(repeated)[0]} is given twice")
        served: list[Served] = []
        with httpx.Client(timeout=FETCH_TIMEOUT) as client:
            for base in bases:
                found = fetch_node(client, base, key)
                skipped = sorted({s.kind for s in found if not routable(s)})
                if skipped:
                    print(
                        f"note: {base}: left out its {', '.join(skipped)} entries "
                        "(another node's models, or names that come and go)",
                        file=sys.stderr,
                    )
                served.extend(found)
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    config = litellm_config(served, written)
    if not config["model_list"]:
        print("error: the nodes list no models", file=sys.stderr)
        return 1
    sys.stdout.write(render(config, bases))
    return 0
