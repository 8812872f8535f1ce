"""Audio and image endpoints: uploads, transcripts, pictures and speech.

trio-swap forwards multipart uploads (whisper's /v1/audio/transcriptions, image
edits) and binary answers (speech), which are easy to truncate or re-encode by
mistake; so these answers describe exactly what arrived (file names, byte
counts, the `model` form field) and carry bytes a test can predict.

Multipart bodies are parsed with werkzeug's sans-io decoder (werkzeug comes
with Quart), from the body the app already holds in memory.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from typing import Final, final

import msgspec
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from trio_swap.responder.payloads import BadRequest, JSONObject

__all__ = [
    "PNG",
    "Form",
    "Upload",
    "edits_body",
    "generations_body",
    "parse_multipart",
    "sdapi_body",
    "speech_bytes",
    "transcription_body",
]

_encode: Final = msgspec.json.Encoder().encode
_MAX_IMAGES: Final = 10  # a client's `n` beyond this is cut, not refused


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _tiny_png() -> bytes:
    """A valid 1x1 grey PNG: signature, IHDR, IDAT, IEND."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1x1, 8-bit greyscale
    pixels = zlib.compress(b"\x00\x80")  # filter byte 0, one grey pixel
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )


PNG: Final = _tiny_png()
"""The picture every image endpoint returns."""
_PNG_B64: Final = base64.b64encode(PNG).decode("ascii")


@final
class Upload:
    """One file part of a multipart form."""

    __slots__ = ("content_type", "data", "field", "filename")

    def __init__(self, field: str, filename: str, content_type: str, data: bytes) -> None:
        self.field = field
        self.filename = filename
        self.content_type = content_type
        self.data = data

    def describe(self) -> str:
        """`name.wav (123 bytes, sha256 ab12…)`: what a test compares with what it sent."""
        digest = hashlib.sha256(self.data).hexdigest()[:16]
        return f"{self.filename} ({len(self.data)} bytes, sha256 {digest})"


@final
class Form:
    """A decoded multipart form: text fields (the last value wins) and file parts."""

    __slots__ = ("fields", "files")

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.files: list[Upload] = []

    def model(self, default: str) -> str:
        """The `model` field, else `default` (the --model option)."""
        return self.fields.get("model", default)

    def files_named(self, *names: str) -> list[Upload]:
        """The file parts whose field is one of `names`, in order."""
        return [upload for upload in self.files if upload.field in names]


def parse_multipart(content_type: str, body: bytes) -> Form:
    """Decode a whole `multipart/form-data` body.

    Raises:
        BadRequest: (code `invalid_multipart`) for another content type, a
            missing boundary or a malformed body.
    """
    mimetype, params = parse_options_header(content_type)
    boundary = params.get("boundary")
    if mimetype != "multipart/form-data" or not boundary:
        raise BadRequest(
            f"expected a multipart/form-data body with a boundary, got {content_type!r}",
            code="invalid_multipart",
        )
    decoder = MultipartDecoder(boundary.encode("latin-1"))
    decoder.receive_data(body)
    decoder.receive_data(None)
    form = Form()
    part: Field | File | None = None
    chunks: list[bytes] = []
    try:
        while True:
            event = decoder.next_event()
            if isinstance(event, Field | File):
                part, chunks = event, []
            elif isinstance(event, Data):
                chunks.append(event.data)
                if not event.more_data and part is not None:
                    _add_part(form, part, b"".join(chunks))
            elif isinstance(event, Epilogue | NeedData):
                break  # NeedData cannot follow complete input; the decoder raises instead
    except ValueError as exc:
        raise BadRequest(f"invalid multipart body: {exc}", code="invalid_multipart") from exc
    return form


def _add_part(form: Form, part: Field | File, data: bytes) -> None:
    if isinstance(part, File):
        content_type = part.headers.get("content-type", "application/octet-stream")
        form.files.append(Upload(part.name, part.filename, content_type, data))
    else:
        form.fields[part.name] = data.decode("utf-8", "replace")


def _require_file(uploads: list[Upload], field: str) -> list[Upload]:
    if not uploads:
        raise BadRequest(f"the form has no {field!r} file part", code="missing_file")
    return uploads


def transcription_body(form: Form, *, default_model: str) -> bytes:
    """`{"text": "transcript of speech.wav (123456 bytes) by whisper"}`, from the `file` part.

    Raises:
        BadRequest: if the form has no `file` part.
    """
    [upload, *_] = _require_file(form.files_named("file"), "file")
    return _encode({"text": f"transcript of {upload.describe()} by {form.model(default_model)}"})


def generations_body(request: JSONObject) -> bytes:
    """`/v1/images/generations`: `n` copies of `PNG`, the prompt as revised prompt.

    Raises:
        BadRequest: if `prompt` is not a string.
    """
    prompt = request.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    return _images_body(prompt, request.get("n", 1), request.get("response_format"))


def edits_body(form: Form) -> bytes:
    """`/v1/images/edits`: as generations, the revised prompt naming each image received.

    The SDK sends one image as the `image` field, several as `image[]`.

    Raises:
        BadRequest: if the form has no image file part.
    """
    uploads = _require_file(form.files_named("image", "image[]"), "image")
    described = ", ".join(upload.describe() for upload in uploads)
    prompt = f"{form.fields.get('prompt', '')} (edited {described})"
    n = form.fields.get("n", "1")
    return _images_body(prompt, int(n) if n.isdecimal() else 1, form.fields.get("response_format"))


def _images_body(prompt: str, n: object, response_format: object) -> bytes:
    """`n` (1 to _MAX_IMAGES) copies of `PNG`, base64 or, for "url", a `data:` URL.

    A `data:` URL because there is nowhere to host a picture.
    """
    count = n if isinstance(n, int) and not isinstance(n, bool) else 1
    count = max(1, min(count, _MAX_IMAGES))
    image: JSONObject
    if response_format == "url":
        image = {"url": f"data:image/png;base64,{_PNG_B64}", "revised_prompt": prompt}
    else:
        image = {"b64_json": _PNG_B64, "revised_prompt": prompt}
    return _encode({"created": int(time.time()), "data": [image] * count})


def speech_bytes(request: JSONObject) -> bytes:
    """`/v1/audio/speech`: an ID3 tag's magic, then the `input` text as UTF-8.

    Not playable, but a test can check the exact bytes survived the proxy.

    Raises:
        BadRequest: if `input` is not a string.
    """
    text = request.get("input")
    if not isinstance(text, str):
        raise BadRequest("input must be a string")
    return b"ID3" + text.encode("utf-8", "surrogatepass")


def sdapi_body(request: JSONObject) -> bytes:
    """AUTOMATIC1111's txt2img/img2img answer: one image and the parameters echoed."""
    return _encode({"images": [_PNG_B64], "parameters": request, "info": "{}"})
