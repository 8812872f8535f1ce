"""Finding (and replacing) one form field in a ``multipart/form-data`` body, without copying it.

Uploads (audio to transcribe, images to edit) can be tens of MiB. trio-swap
needs one small field out of them, ``model``, and sometimes needs to replace
it (``useModelName``, a peer's own name). So instead of decoding the form, the
body is scanned for part delimiters with ``bytes.find`` (C speed), and the
rewritten body is sent upstream as three slices of the original buffer
(before, new value, after): the upload is held once, never re-encoded.

The scan is linear in the body and bounded per part, whatever the client sends:
each part's delimiter is found first, and its header block is looked for only
inside that part (at most :data:`_MAX_PART_HEADER` bytes of it). An earlier
version looked for the header end up to 16 KiB past every delimiter, so a body
of empty parts (``--x\\r\\n`` repeated) cost 16 KiB of search per 5 bytes sent:
3.5 s of blocked event loop for 2 MiB, minutes at the 64 MiB body limit. And
since every part costs some Python work, the scan gives up after
:data:`MAX_PARTS` parts (werkzeug's default form limit) with a 400.
"""

from __future__ import annotations

from typing import Final, final

from werkzeug.http import parse_options_header

from trio_swap.errors import BadRequest

__all__ = ["MAX_PARTS", "FieldSpan", "boundary_of", "find_field"]

#: A field's header block is small; anything larger is a file part's, not a field's.
_MAX_PART_HEADER: Final = 16 * 1024
#: Parts scanned for the field before the form is refused (werkzeug's ``max_form_parts``).
MAX_PARTS: Final = 1000


@final
class FieldSpan:
    """Where a field's value lies in the body: ``body[start:end]``."""

    __slots__ = ("end", "start", "value")

    def __init__(self, start: int, end: int, value: str) -> None:
        self.start = start
        self.end = end
        self.value = value

    def replaced(self, body: bytes, value: str) -> list[memoryview]:
        """The body with this field's value replaced, as slices of ``body`` plus the new value."""
        view = memoryview(body)
        return [view[: self.start], memoryview(value.encode()), view[self.end :]]


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type.

    Raises:
        BadRequest: not multipart/form-data, or no usable boundary.
    """
    kind, options = parse_options_header(content_type)
    if kind.lower() != "multipart/form-data":
        raise BadRequest(
            f"this endpoint takes multipart/form-data, not {kind or 'a body without Content-Type'}"
        )
    boundary = options.get("boundary", "")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")
    try:
        # The header was read as latin-1, so this gives back its bytes; but
        # ``boundary*=UTF-8''...`` (RFC 2231) decodes to any text.
        return boundary.encode("latin-1")
    except UnicodeEncodeError:
        raise BadRequest("the multipart boundary is not ASCII") from None


def find_field(
    body: bytes, boundary: bytes, name: str, *, max_parts: int = MAX_PARTS
) -> FieldSpan | None:
    """The first non-file part named ``name``, or None when there is none.

    Raises:
        BadRequest: more than ``max_parts`` parts come before the field.
    """
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    position = body.find(delimiter)
    parts = 0
    while position >= 0:
        header_start = position + len(delimiter)
        if body.startswith(b"--", header_start):
            return None  # the closing delimiter
        next_delimiter = body.find(separator, header_start)
        if next_delimiter < 0:
            return None  # an unterminated part
        parts += 1
        if parts > max_parts:
            raise BadRequest(f"the multipart form has more than {max_parts} parts before '{name}'")
        # The header block lies inside this part; a block too large for a plain field
        # (or none at all) is not the one we want: skip the part.
        header_end = body.find(
            b"\r\n\r\n", header_start, min(next_delimiter, header_start + _MAX_PART_HEADER)
        )
        if header_end >= 0 and _part_name(body[header_start:header_end]) == name:
            value_start = header_end + 4
            value = body[value_start:next_delimiter].decode("utf-8", "replace")
            return FieldSpan(value_start, next_delimiter, value)
        position = next_delimiter + 2
    return None


def _part_name(header_block: bytes) -> str | None:
    """The ``name`` of a part that is a plain field (file parts have a filename)."""
    for line in header_block.decode("latin-1").split("\r\n"):
        header, _, value = line.partition(":")
        if header.strip().lower() == "content-disposition":
            disposition, options = parse_options_header(value.strip())
            if disposition.lower() != "form-data" or "filename" in options:
                return None
            return options.get("name")
    return None
