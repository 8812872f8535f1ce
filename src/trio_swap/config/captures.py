"""``captureBuffer``: megabytes of memory for request captures (docs/metrics.md).

As in llama-swap: a whole number of MB of 1024 * 1024 bytes, 5 when unset,
0 turns captures off. Unlike llama-swap, a negative value is a located
error (llama-swap treats it as off).
"""

from __future__ import annotations

from typing import Final

from trio_swap.config.yamlsource import Document

__all__ = ["CAPTURE_MB", "check_capture_buffer"]

#: llama-swap's unit for ``captureBuffer``.
CAPTURE_MB: Final = 1024 * 1024


def check_capture_buffer(megabytes: int, doc: Document) -> int:
    """The buffer in bytes (0: off). ``megabytes`` is already an int (``convert``)."""
    if megabytes < 0:
        raise doc.error(
            ("captureBuffer",), f"must be >= 0 MB (got {megabytes}); 0 turns captures off"
        )
    return megabytes * CAPTURE_MB
