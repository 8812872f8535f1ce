"""Pure parsing on the request path: multipart fields, passthrough paths, forwarded headers,
and request resolution (which model or peer, and exactly what goes there)."""

from __future__ import annotations

import json

import httpx
import pytest

from trio_swap.config.model import Config, FilterConfig, ModelConfig, PeerConfig
from trio_swap.errors import BadRequest, ModelNotFound
from trio_swap.http.multipart import boundary_of, find_field
from trio_swap.http.passthrough import split_passthrough
from trio_swap.http.relay import forward_header_bytes
from trio_swap.http.resolve import (
    LocalModel,
    Lookup,
    Outbound,
    PeerModel,
    Redirect,
    lookup,
    resolve,
)
from trio_swap.http.routes import Route, classify

B = b"XyZ"


def form(*parts: bytes, preamble: bytes = b"", close: bool = True) -> bytes:
    body = preamble + b"".join(b"--" + B + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + B + b"--\r\n" if close else b"")


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def file_part(name: str, data: bytes) -> bytes:
    head = f'Content-Disposition: form-data; name="{name}"; filename="f.bin"\r\n'
    return (head + "Content-Type: application/octet-stream\r\n\r\n").encode() + data


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (form(field("model", b"whisper"), file_part("file", b"abc")), "whisper"),
        # after the file, whose data looks like a delimiter without the CRLF before it
        (form(file_part("file", b"--XyZ fake\r\n--XyZo"), field("model", b"m2")), "m2"),
        (form(field("model", b"m3"), preamble=b"ignored preamble\r\n"), "m3"),
        # a file part called "model" is not the field
        (form(file_part("model", b"nope"), field("model", b"real")), "real"),
        # a part whose header block is too large for a field is skipped, not fatal
        (form(b"X-Big: " + b"a" * 20_000 + b"\r\n\r\ndata", field("model", b"m4")), "m4"),
        (form(field("other", b"x")), None),
        (form(field("model", b"m5"), close=False)[:-2], None),  # no delimiter after the value
    ],
)
def test_find_field(body: bytes, value: str | None) -> None:
    span = find_field(body, B, "model")
    assert (span.value if span else None) == value
    if span is not None:
        assert body[span.start : span.end].decode() == value
        renamed = b"".join(span.replaced(body, "renamed"))
        assert renamed == body[: span.start] + b"renamed" + body[span.end :]


def test_find_field_agrees_with_httpx_encoding() -> None:
    request = httpx.Request(
        "POST", "http://x/", data={"a": "1", "model": "wh"}, files={"file": ("x.wav", b"\0" * 999)}
    )
    body = request.read()
    boundary = boundary_of(request.headers["content-type"])
    span = find_field(body, boundary, "model")
    assert span is not None and span.value == "wh"


@pytest.mark.parametrize(
    "content_type", ["application/json", "", "multipart/form-data", "multipart/form-data; x=1"]
)
def test_boundary_of_refuses_what_is_not_a_form(content_type: str) -> None:
    with pytest.raises(BadRequest):
        boundary_of(content_type)


MODELS = {"A", "org/m", "org"}


@pytest.mark.parametrize(
    ("raw", "model", "rest"),
    [
        (b"/upstream/A/v1/models", "A", b"/v1/models"),
        (b"/upstream/org/m/x", "org/m", b"/x"),  # the longest name wins
        (b"/upstream/org%2Fm/x%20y", "org/m", b"/x%20y"),  # escaping kept in the rest
        (b"/upstream/org/x", "org", b"/x"),
        (b"/upstream/A/", "A", b"/"),
        (b"/upstream/A", "A", None),
    ],
)
def test_split_passthrough(raw: bytes, model: str, rest: bytes | None) -> None:
    target = split_passthrough(raw, MODELS.__contains__)
    assert (target.model, target.rest) == (model, rest)


@pytest.mark.parametrize(
    "raw",
    [
        b"/upstream/A/../x",
        b"/upstream/A/%2e%2e/x",
        b"/upstream/A/x/..%2fy",
        b"/upstream/A/x/..%5cy",
        b"/upstream/A/./x",
    ],
)
def test_split_passthrough_refuses_dot_segments(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        split_passthrough(raw, MODELS.__contains__)


def test_split_passthrough_unknown_model() -> None:
    with pytest.raises(ModelNotFound):
        split_passthrough(b"/upstream/nope/x", MODELS.__contains__)


def test_forwarded_headers_drop_hop_by_hop_and_what_connection_names() -> None:
    headers = [
        (b"connection", b"close, X-Private"),
        (b"x-private", b"secret"),
        (b"keep-alive", b"5"),
        (b"host", b"trio-swap"),
        (b"content-length", b"3"),
        (b"authorization", b"Bearer k"),
        (b"x-trace", b"t"),
    ]
    assert forward_header_bytes(headers) == [(b"authorization", b"Bearer k"), (b"x-trace", b"t")]


# --- request resolution (http/resolve.py) -----------------------------------------------

PEER = PeerConfig(
    id="gpu2",
    proxy="http://gpu2:8080",
    models=("big", "A"),
    filters=FilterConfig(set_params={"seed": 7}),
)
CONFIG = Config(
    source="<test>",
    models={
        "A": ModelConfig(id="A", cmd=("a",), proxy="http://127.0.0.1:9001"),
        "B": ModelConfig(
            id="B",
            cmd=("b",),
            proxy="http://127.0.0.1:9002",
            aliases=("b-alias",),
            use_model_name="served-b",
            filters=FilterConfig(strip_params=("drop",)),
        ),
        "org/m": ModelConfig(id="org/m", cmd=("m",), proxy="http://127.0.0.1:9003"),
    },
    peers={"gpu2": PEER},
)


def route_of(method: str, path: str) -> Route:
    route = classify(method, path)
    assert route is not None
    return route


def resolve_request(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Outbound | Redirect:
    return resolve(
        CONFIG,
        route_of(method, path),
        method=method,
        raw_path=path.encode(),
        query=query,
        headers=headers or [],
        body=body,
    )


def resolve_outbound(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Outbound:
    outbound = resolve_request(method, path, body, query=query, headers=headers)
    assert isinstance(outbound, Outbound)
    return outbound


def test_lookup_names_local_models_and_peer_models() -> None:
    assert lookup(CONFIG, "A") == Lookup(
        target=LocalModel(id="A"), rename=None, filters=FilterConfig()
    )
    b = lookup(CONFIG, "b-alias")
    assert (b.target, b.rename) == (LocalModel(id="B"), "served-b")
    assert b.filters.strip_params == ("drop",)
    big = lookup(CONFIG, "big")
    assert (big.target, big.rename) == (PeerModel(peer=PEER, name="big"), None)
    assert big.filters == PEER.filters
    qualified = lookup(CONFIG, "gpu2/big")
    assert (qualified.target, qualified.rename) == (PeerModel(peer=PEER, name="big"), "big")
    # the peer lists "A" too: the local model wins, and the qualified name reaches the peer
    assert lookup(CONFIG, "gpu2/A").target == PeerModel(peer=PEER, name="A")
    with pytest.raises(ModelNotFound):
        lookup(CONFIG, "ghost")


def test_lookup_of_a_use_model_name_the_client_already_sent_renames_nothing() -> None:
    config = Config(
        source="<test>",
        models={"C": ModelConfig(id="C", cmd=("c",), proxy="http://h:1", use_model_name="C")},
    )
    assert lookup(config, "C").rename is None


def test_json_body_goes_on_byte_for_byte_when_nothing_rewrites_it() -> None:
    body = b'{"model": "A",  "messages": [], "stream": true, "x": 1.50}'
    outbound = resolve_outbound("POST", "/v1/chat/completions", body, query=b"delay=1")
    assert outbound.body is body  # not even copied
    assert outbound == Outbound(
        target=LocalModel(id="A"),
        requested="A",
        body=body,
        path=b"/v1/chat/completions",
        query=b"delay=1",
        stream=True,
    )


def test_json_body_is_renamed_and_filtered() -> None:
    body = b'{"model": "b-alias", "drop": 1, "keep": 2}'
    outbound = resolve_outbound("POST", "/v1/chat/completions", body)
    assert outbound.target == LocalModel(id="B")
    assert outbound.requested == "b-alias"
    assert isinstance(outbound.body, bytes)
    assert json.loads(outbound.body) == {"model": "served-b", "keep": 2}


def test_json_body_for_a_peer_gets_the_peers_name_and_filters() -> None:
    outbound = resolve_outbound("POST", "/v1/embeddings", b'{"model": "gpu2/big", "input": "x"}')
    assert outbound.target == PeerModel(peer=PEER, name="big")
    assert outbound.requested == "gpu2/big"
    assert isinstance(outbound.body, bytes)
    assert json.loads(outbound.body) == {"model": "big", "input": "x", "seed": 7}
    assert outbound.stream is False


def test_versionless_route_sends_the_path_without_its_prefix() -> None:
    outbound = resolve_outbound("POST", "/v/chat/completions", b'{"model": "A"}')
    assert outbound.path == b"/chat/completions"


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        ("true", True),
        ("1", True),
        ('"true"', True),
        ("false", False),
        ("0", False),
        ('"false"', False),
        ('""', False),
        ("null", False),
    ],
)
def test_json_stream_field_is_only_tested_for_truth(stream: str, expected: bool) -> None:
    body = b'{"model": "A", "stream": %s}' % stream.encode()
    assert resolve_outbound("POST", "/v1/chat/completions", body).stream is expected


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"{not json", BadRequest, "not valid JSON"),
        (b'{"model": 7}', BadRequest, "invalid request body"),
        (b'{"messages": []}', BadRequest, "no 'model' field"),
        (b'{"model": ""}', BadRequest, "no 'model' field"),
        (b"[1]", BadRequest, "invalid request body"),
        (b'{"model": "ghost"}', ModelNotFound, "ghost"),
    ],
)
def test_json_bodies_that_name_no_model(body: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        resolve_request("POST", "/v1/chat/completions", body)


def test_multipart_model_field_is_renamed_in_place() -> None:
    headers = [(b"content-type", b"multipart/form-data; boundary=" + B)]
    body = form(field("model", b"b-alias"), file_part("file", b"\0" * 10))
    outbound = resolve_outbound("POST", "/v1/audio/transcriptions", body, headers=headers)
    assert outbound.target == LocalModel(id="B")
    assert outbound.requested == "b-alias"
    assert not isinstance(outbound.body, bytes)  # pieces around the new value, not a copy
    sent = b"".join(outbound.body)
    assert sent == body.replace(b"b-alias", b"served-b")
    plain = resolve_outbound(
        "POST", "/v1/audio/transcriptions", form(field("model", b"A")), headers=headers
    )
    assert plain.target == LocalModel(id="A")
    with pytest.raises(BadRequest, match="no 'model' field"):
        resolve_request("POST", "/v1/audio/transcriptions", form(field("x", b"A")), headers=headers)


def test_query_model_is_renamed_in_the_query() -> None:
    outbound = resolve_outbound("GET", "/props", query=b"model=gpu2/big&x=1")
    assert outbound.target == PeerModel(peer=PEER, name="big")
    assert outbound.query == b"model=big&x=1"
    kept = resolve_outbound("GET", "/props", query=b"x=%2F&model=A")
    assert kept.query == b"x=%2F&model=A"  # nothing renamed: the client's escaping kept
    with pytest.raises(BadRequest, match=r"\?model=<name>"):
        resolve_request("GET", "/props", query=b"x=1")


def test_passthrough_forwards_the_rest_of_the_path_unchanged() -> None:
    outbound = resolve_outbound("POST", "/upstream/org/m/v1/x", b"raw", query=b"stream=true")
    assert outbound == Outbound(
        target=LocalModel(id="org/m"),
        requested="org/m",
        body=b"raw",
        path=b"/v1/x",
        query=b"stream=true",
        stream=True,
    )
    peer = resolve_outbound("GET", "/upstream/gpu2/big/health")
    assert (peer.target, peer.path, peer.stream) == (
        PeerModel(peer=PEER, name="big"),
        b"/health",
        False,
    )
    # the passthrough never renames: the model's server gets the path as the client wrote it
    alias = resolve_outbound("GET", "/upstream/b-alias/props")
    assert (alias.target, alias.body) == (LocalModel(id="B"), b"")


@pytest.mark.parametrize(("method", "status"), [("GET", 301), ("HEAD", 301), ("POST", 308)])
def test_passthrough_without_the_slash_is_a_redirect(method: str, status: int) -> None:
    assert resolve_request(method, "/upstream/A", query=b"a=1") == Redirect(
        location=b"/upstream/A/?a=1", status=status
    )
    assert resolve_request(method, "/upstream/A") == Redirect(
        location=b"/upstream/A/", status=status
    )
