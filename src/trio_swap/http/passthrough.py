"""Splitting ``/upstream/<model>/<path>`` into the model name and the path sent upstream.

Model ids may contain ``/`` (``org/model``), written plainly or as ``%2F``, so
the model is the *longest* run of leading path segments that names a model,
of at most :data:`MAX_NAME_SEGMENTS` segments (trying every run of a path of
thousands of segments cost time quadratic in its length: seconds for one
60 KB request line).
The rest is forwarded with the client's own escaping, but it may not climb out
of the upstream's base URL: a ``.`` or ``..`` segment (``%2e`` included) is refused.

A passthrough request loads its model like any other, except where the rest
matches ``upstream.ignorePaths`` (by default static files: ``.js``, ``.png``,
``.ico``...) while the model is not ready: that is a 409 and nothing loads
(:func:`ignored_path_refusal`), so a browser fetching a page's favicon after
the model was unloaded does not start it again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final, final
from urllib.parse import unquote

from trio_swap.errors import BadRequest, Forbidden, ModelNotFound, SwapError

__all__ = [
    "CONTROL_ENDPOINTS",
    "MAX_NAME_SEGMENTS",
    "PassthroughTarget",
    "PathNotLoading",
    "ignored_path_refusal",
    "split_passthrough",
]

PREFIX: Final = b"/upstream/"
#: Most leading segments a model name may span (``peer/org/model`` spans three).
MAX_NAME_SEGMENTS: Final = 32
#: An upstream's own control endpoints, which only trio-swap may call: vLLM's
#: sleep mode and weight updates (dev-only in vLLM), SGLang's memory release
#: and weight updates. Passed through, a client could put a model to sleep
#: behind trio-swap's back or swap its weights; they answer 403 (issue 12).
CONTROL_ENDPOINTS: Final = frozenset(
    {
        "sleep",
        "wake_up",
        "is_sleeping",
        "collective_rpc",
        "reset_prefix_cache",
        "reset_mm_cache",
        "release_memory_occupation",
        "resume_memory_occupation",
        "update_weights_from_disk",
        "update_weights_from_tensor",
        "update_weights_from_distributed",
        "init_weights_update_group",
        "flush_cache",
    }
)


@final
class PassthroughTarget:
    """A parsed passthrough path."""

    __slots__ = ("model", "rest")

    def __init__(self, model: str, rest: bytes | None) -> None:
        #: The model name as the client wrote it (decoded).
        self.model = model
        #: The raw path to send upstream, starting with ``/``; None when the
        #: client wrote ``/upstream/<model>`` with nothing after it.
        self.rest = rest


def split_passthrough(raw_path: bytes, is_model: Callable[[str], bool]) -> PassthroughTarget:
    """Find the model in ``raw_path`` (which starts with ``/upstream/``).

    Raises:
        ModelNotFound: no leading run of segments names a model.
        BadRequest: the rest of the path has a dot segment.
    """
    segments = raw_path[len(PREFIX) :].split(b"/")
    decoded = [unquote(s.decode("latin-1"), errors="replace") for s in segments]
    for count in range(min(len(segments), MAX_NAME_SEGMENTS), 0, -1):
        name = "/".join(decoded[:count])
        if name and is_model(name):
            break
    else:
        raise ModelNotFound(decoded[0] if decoded else "")
    rest_segments = segments[count:]
    if not rest_segments:
        return PassthroughTarget(name, None)
    # A decoded segment may hold more separators (``..%2f``): check every piece of it.
    pieces = (piece for segment in decoded[count:] for piece in re.split(r"[/\\]", segment))
    if any(piece in (".", "..") for piece in pieces):
        raise BadRequest("the path after /upstream/<model> may not contain '.' or '..' segments")
    _refuse_control(decoded[count:])
    return PassthroughTarget(name, b"/" + b"/".join(rest_segments))


def _refuse_control(decoded: list[str]) -> None:
    """403 for an upstream control endpoint, however the path spells it.

    Compared on the decoded path with empty segments dropped and case folded,
    so ``//sleep``, ``/Sleep/``, ``/%73leep`` and ``/v1/../sleep`` (refused
    above anyway) all count: servers normalise paths in different ways.
    """
    pieces = [p for segment in decoded for p in re.split(r"[/\\]", segment) if p]
    if pieces and pieces[0].split("?")[0].casefold() in CONTROL_ENDPOINTS:
        raise Forbidden(
            f"/{pieces[0]} controls the model's server itself (sleep, wake, weights): "
            "only trio-swap calls it"
        )


class PathNotLoading(SwapError):
    """409: a path of ``upstream.ignorePaths`` never loads its model (llama-swap's rule)."""

    status = 409
    error_type = "invalid_request_error"
    code = "conflict"

    def __init__(self, model: str, path: str) -> None:
        super().__init__(
            f"model {model!r} is not loaded, and {path!r} matches upstream.ignorePaths, "
            "which never loads a model; load it first (GET /upstream/<model>/)"
        )
        self.model = model


def ignored_path_refusal(
    request_path: str,
    rest: bytes,
    model: str,
    patterns: Sequence[str],
    is_ready: Callable[[str], bool],
) -> PathNotLoading | None:
    """The 409 for a passthrough request that must not load ``model``, or None.

    ``request_path`` is the client's (only ``/upstream/...`` ones are checked),
    ``rest`` the raw path after the model. The patterns search the decoded
    rest, as llama-swap's RE2 ``MatchString`` does; ``re`` caches them compiled.
    """
    if not request_path.startswith("/upstream/") or is_ready(model):
        return None
    path = unquote(rest.decode("latin-1"), errors="replace")
    if any(re.search(pattern, path) for pattern in patterns):
        return PathNotLoading(model, path)
    return None
