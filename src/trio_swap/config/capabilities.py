"""``models.<id>.capabilities``, validated as llama-swap does::

    capabilities:
      in: [text, image]     # modalities understood: text, audio, image
      out: [text]           # modalities produced
      tools: true           # function calling
      reranker: false       # /v1/rerank
      context: 32768        # tokens, an int >= 0

Every key is optional and a key left empty means its default (``[]``,
``false``, ``0``). A wrong type, a modality other than the three, or a
negative context is a located :class:`~trio_swap.config.errors.ConfigError`.
An unknown key inside the block is a warning, as unknown keys are elsewhere
(llama-swap ignores it; a later llama-swap may add keys). The result only
shapes ``/v1/models`` (:mod:`trio_swap.http.capabilities`), so a reload
applies a change in place.
"""

from __future__ import annotations

from typing import Final

from trio_swap.config.model import Capabilities
from trio_swap.config.yamlsource import Document, KeyPath, type_name

__all__ = ["KEYS", "MODALITIES", "check_capabilities"]

#: What ``in`` and ``out`` may list.
MODALITIES: Final = ("text", "audio", "image")
KEYS: Final = ("in", "out", "tools", "reranker", "context")
_INT64_MAX: Final = 2**63 - 1


def check_capabilities(
    model_id: str, value: dict[str, object], doc: Document
) -> tuple[Capabilities, list[tuple[int, str]]]:
    """The validated block of ``model_id``, and warnings for keys it does not know.

    Raises:
        ConfigError: at the key path (and list position) of the first bad value.
    """
    path: KeyPath = ("models", model_id, "capabilities")
    warnings: list[tuple[int, str]] = []
    for key in value:
        if key not in KEYS:
            known = ", ".join(KEYS)
            warnings.append(doc.warning((*path, key), f"unknown key (known: {known}); ignored"))
    return (
        Capabilities(
            inputs=_modalities(value.get("in"), (*path, "in"), doc),
            outputs=_modalities(value.get("out"), (*path, "out"), doc),
            tools=_flag(value.get("tools"), (*path, "tools"), doc),
            reranker=_flag(value.get("reranker"), (*path, "reranker"), doc),
            context=_context(value.get("context"), (*path, "context"), doc),
        ),
        warnings,
    )


def _modalities(value: object, path: KeyPath, doc: Document) -> tuple[str, ...]:
    """A list of modalities, each listed once, in the order written."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise doc.error(path, f"must be a list of {', '.join(MODALITIES)} (got {type_name(value)})")
    seen: dict[str, None] = {}
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise doc.error((*path, index), f"must be a modality (got {type_name(item)})")
        if item not in MODALITIES:
            allowed = ", ".join(MODALITIES)
            raise doc.error((*path, index), f"unknown modality {item!r} (allowed: {allowed})")
        seen[item] = None
    return tuple(seen)


def _flag(value: object, path: KeyPath, doc: Document) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        shown = f" {value!r}" if isinstance(value, str | int | float) else ""
        raise doc.error(path, f"must be true or false (got {type_name(value)}{shown})")
    return value


def _context(value: object, path: KeyPath, doc: Document) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f" {value!r}" if isinstance(value, str | float) else ""
        raise doc.error(path, f"must be a whole number of tokens (got {type_name(value)}{shown})")
    if value < 0:
        raise doc.error(path, f"must be >= 0 (got {value})")
    if value > _INT64_MAX:  # as every int of the config (llama-swap's Go int)
        raise doc.error(path, f"number out of range: must fit in 64 bits (got {value})")
    return value
