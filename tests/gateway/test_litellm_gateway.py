"""LiteLLM's proxy in front of two trio-swap nodes, driven with the ``openai`` SDK.

Which node answered is read from each node's own activity log
(``/api/activity?model=``), never guessed from timing. The SDK's own retries
are off (``max_retries=0``): every retry seen here is LiteLLM's.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from tests.gateway.cluster import MASTER_KEY, poll
from tests.gateway.conftest import Cluster

pytestmark = pytest.mark.gateway

#: Requests sent at most while waiting for the random router to pick a node:
#: each pick is a coin toss, so 40 misses in a row do not happen.
TOSSES = 40


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{cluster.gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60
    ) as sdk:
        yield sdk


def ask(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    content = answer.choices[0].message.content
    assert answer.model == model and content, answer
    return content


def test_litellm_runs_the_generated_config_as_is(cluster: Cluster) -> None:
    config = yaml.safe_load(cluster.gateway.config.read_text())
    assert cluster.gateway.config.read_text() == cluster.config_text
    assert [(e["model_name"], e["litellm_params"]["api_base"]) for e in config["model_list"]] == [
        ("alpha", f"{cluster.a.url}/v1"),
        ("beta", f"{cluster.b.url}/v1"),
        ("flaky", f"{cluster.a.url}/v1"),
        ("flaky", f"{cluster.b.url}/v1"),
        ("shared", f"{cluster.a.url}/v1"),
        ("shared", f"{cluster.b.url}/v1"),
        ("twin", f"{cluster.a.url}/v1"),
        ("twin", f"{cluster.b.url}/v1"),
    ]
    listed = httpx.get(
        f"{cluster.gateway.url}/v1/models",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        timeout=30,
    )
    assert listed.status_code == 200, listed.text
    assert sorted(m["id"] for m in listed.json()["data"]) == [
        "alpha",
        "beta",
        "flaky",
        "shared",
        "twin",
    ]
    # Any other key is refused. Without a database LiteLLM 1.108.7 says so oddly:
    # 400 "No connected db." for a wrong key (it would look it up there), 500 for
    # none (its error page imports prisma, which its database extra installs).
    wrong = {"Authorization": "Bearer sk-wrong"}
    refused = httpx.get(f"{cluster.gateway.url}/v1/models", headers=wrong, timeout=30)
    assert refused.status_code == 400 and "No connected db" in refused.text
    assert httpx.get(f"{cluster.gateway.url}/v1/models", timeout=30).status_code >= 400


def test_each_model_goes_to_the_node_that_serves_it(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    a, b = cluster.a, cluster.b
    before = {(node.name, m): len(node.answered(m)) for node in (a, b) for m in ("alpha", "beta")}
    assert ask(client, "alpha").startswith("tok0")
    assert ask(client, "beta").startswith("tok0")
    assert ask(client, "alpha")
    assert a.answered("alpha")[before["a", "alpha"] :] == [200, 200]
    assert b.answered("beta")[before["b", "beta"] :] == [200]
    # Neither node was asked for the other's model.
    assert len(a.answered("beta")) == before["a", "beta"] == 0
    assert len(b.answered("alpha")) == before["b", "alpha"] == 0


def test_a_stream_passes_through_token_by_token(cluster: Cluster, client: openai.OpenAI) -> None:
    b = cluster.b
    finished = len(b.answered("beta"))
    # beta's responder sends 100 tokens 50 ms apart (node B's config): 5 s in all.
    stream = client.chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"max_tokens": 100},
    )
    pieces: list[str] = []
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not pieces:
                    # The first token reached the client while node B is still
                    # generating: LiteLLM relays the stream, it does not collect it.
                    assert len(b.answered("beta")) == finished
                pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "".join(f"tok{i} " for i in range(100))
    assert len(pieces) > 1
    poll(lambda: b.answered("beta")[finished:] == [200], what="node B to log the stream")


def test_a_model_on_both_nodes_is_spread_over_both(cluster: Cluster, client: openai.OpenAI) -> None:
    a, b = cluster.a, cluster.b
    start_a, start_b = len(a.answered("shared")), len(b.answered("shared"))
    sent = 0
    while sent < TOSSES and not (
        len(a.answered("shared")) > start_a and len(b.answered("shared")) > start_b
    ):
        ask(client, "shared")
        sent += 1
    new_a, new_b = a.answered("shared")[start_a:], b.answered("shared")[start_b:]
    assert new_a and new_b, f"{sent} requests: A answered {len(new_a)}, B {len(new_b)}"
    assert set(new_a + new_b) == {200} and len(new_a) + len(new_b) == sent


def test_a_503_from_one_node_is_retried_on_the_other(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    """Node B's flaky cannot start: trio-swap answers 503, LiteLLM sends the request to A."""
    a, b = cluster.a, cluster.b
    start_a, start_b = len(a.answered("flaky")), len(b.answered("flaky"))
    sent = 0
    while sent < TOSSES and len(b.answered("flaky")) == start_b:
        ask(client, "flaky")  # every one succeeds, wherever it was sent first
        sent += 1
    refused = b.answered("flaky")[start_b:]
    assert refused and set(refused) == {503}, f"{sent} requests never reached node B"
    # Every request was answered once, by A: the ones B refused included.
    assert a.answered("flaky")[start_a:] == [200] * sent


def test_a_429_from_a_busy_node_is_retried_on_the_other(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    """Node B's shared takes one request at a time; a stream sent to B directly holds it."""
    a, b = cluster.a, cluster.b
    start_a, start_b = len(a.answered("shared")), len(b.answered("shared"))
    hold = chat_body("shared", max_tokens=400)  # 20 s of tokens: longer than the test
    with (
        httpx.Client(base_url=b.url, timeout=60) as direct,
        direct.stream("POST", "/v1/chat/completions", json=hold) as held,
    ):
        assert held.status_code == 200
        # Keep the iterator: dropping it would close the stream (httpx closes the
        # connection when the generator is collected) and free B's slot.
        lines = held.iter_lines()
        next(lines)  # the stream runs: B's one slot for shared is taken
        sent = 0
        while sent < TOSSES and len(b.answered("shared")) == start_b:
            ask(client, "shared")
            sent += 1
        busy = b.answered("shared")[start_b:]
        assert busy and set(busy) == {429}, f"{sent} requests never reached node B"
        assert a.answered("shared")[start_a:] == [200] * sent
        assert next(lines) is not None  # still held


def chat_body(model: str, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        **extra,
    }


def test_a_node_that_dies_is_failed_over_and_used_again_when_back(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    """``twin`` is on both nodes and asked only here: no earlier failure cooled it down."""
    a, b = cluster.a, cluster.b
    b.kill()
    try:
        start_a = len(a.answered("twin"))
        sent = tried_b = 0
        while sent < TOSSES and not tried_b:
            # A request that picked B first met a refused port; LiteLLM says it
            # tried again (a retry or a failover), and A answered.
            answer = client.chat.completions.with_raw_response.create(
                model="twin", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert answer.parse().choices[0].message.content
            sent += 1
            again = ("x-litellm-attempted-retries", "x-litellm-attempted-fallbacks")
            tried_b = sum(int(answer.headers.get(name) or 0) for name in again)
        assert tried_b, f"none of {sent} requests was sent to node B first"
        assert a.answered("twin")[start_a:] == [200] * sent
        # A model only B serves has nowhere to go: a clear error, not a hang.
        with pytest.raises(openai.APIStatusError) as failed:
            ask(client, "beta")
        assert failed.value.status_code >= 500
    finally:
        b.start()  # the other tests share the cluster
    # Back on the same address: LiteLLM sends to it again, no reload needed.
    assert ask(client, "beta")
    assert b.answered("beta")[-1:] == [200]
