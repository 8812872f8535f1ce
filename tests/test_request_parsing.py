"""Pure parsing on the request path: multipart fields, passthrough paths, forwarded headers."""

from __future__ import annotations

import httpx
import pytest

from trio_swap.errors import BadRequest, ModelNotFound
from trio_swap.http.multipart import boundary_of, find_field
from trio_swap.http.passthrough import split_passthrough
from trio_swap.http.relay import forward_header_bytes

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
