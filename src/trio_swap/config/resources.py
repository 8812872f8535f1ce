"""``resources:`` (what the box has for models) and per-model ``needs:``, validated.

Sizes are parsed by :func:`trio_swap.config.sizes.parse_size`; every problem is a
located :class:`~trio_swap.config.errors.ConfigError`. Resource names are free
(``ram``, ``vram0``, ``slots``...); ``ram`` and ``vramN`` are the ones
trio-swap measures itself (docs/configuration.md#resources).
"""

from __future__ import annotations

from collections.abc import Mapping

from trio_swap.config.sizes import SizeError, format_size, parse_size
from trio_swap.config.validate import NOT_PRINTABLE
from trio_swap.config.yamlsource import Document, KeyPath

__all__ = ["check_needs", "check_resources"]


def check_resources(raw: Mapping[str, int | str], doc: Document) -> dict[str, int]:
    """``resources: {name: size}`` in bytes; a capacity of 0 is refused (nothing would fit)."""
    resources: dict[str, int] = {}
    for name, value in raw.items():
        path: KeyPath = ("resources", name)
        _check_name(name, path, doc)
        size = _size(value, path, doc)
        if size == 0:
            raise doc.error(path, "must be more than 0 bytes (remove the resource instead)")
        resources[name] = size
    return resources


def check_needs(
    model_id: str, raw: Mapping[str, int | str], resources: Mapping[str, int], doc: Document
) -> dict[str, int]:
    """``models.<id>.needs: {name: size}``: every name declared in ``resources``, within it."""
    needs: dict[str, int] = {}
    for name, value in raw.items():
        path: KeyPath = ("models", model_id, "needs", name)
        if name not in resources:
            if not resources:
                raise doc.error(path, "needs a top-level 'resources:' that declares it")
            known = ", ".join(sorted(resources))
            raise doc.error(path, f"unknown resource {name!r} (resources declares: {known})")
        size = _size(value, path, doc)
        if size > resources[name]:
            raise doc.error(
                path,
                f"{format_size(size)} is more than the whole {name} "
                f"({format_size(resources[name])} in resources)",
            )
        needs[name] = size
    return needs


def _check_name(name: str, path: KeyPath, doc: Document) -> None:
    if not name.strip():
        raise doc.error(path, "a resource name must not be empty")
    if not name.isprintable():
        raise doc.error(path, NOT_PRINTABLE.format(what="a resource name"))


def _size(value: object, path: KeyPath, doc: Document) -> int:
    try:
        return parse_size(value)
    except SizeError as exc:
        raise doc.error(path, str(exc)) from None
