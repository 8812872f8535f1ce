"""``selectors:`` and ``profiles:``: virtual model names, checked against the loaded config.

A **selector** is a model name that stands for several targets and picks one
per request (``warm``, ``pin``, ``spillover``); a **profile** is a named set
of pins that rewrite requested names while it is active (docs/selectors.md).
Both are checked after the models, peers and routing are known, with
llama-swap's rules, every mistake a located error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from trio_swap.config.matrix_dsl import MatrixError
from trio_swap.config.model import Config, ProfileConfig, SelectorConfig
from trio_swap.config.yamlsource import Document, KeyPath, type_name

__all__ = ["STRATEGIES", "check_profiles", "check_selectors"]

#: ``strategy`` values, in the words of docs/selectors.md.
STRATEGIES: Final = ("warm", "pin", "spillover")
_SELECTOR_KEYS: Final = frozenset(
    {"strategy", "targets", "settings", "name", "description", "unlisted", "metadata"}
)
_PROFILE_KEYS: Final = frozenset({"description", "pins"})
#: Combinations of one matrix set listed when checking spillover targets.
_MATRIX_LIMIT: Final = 100_000


def check_selectors(
    value: object, config: Config, doc: Document
) -> tuple[dict[str, SelectorConfig], list[tuple[int, str]]]:
    """``selectors:``, each target resolved and every rule checked; and the warnings."""
    if value is None:
        return {}, []
    if not isinstance(value, dict):
        raise doc.error(
            ("selectors",), f"must be a mapping of selector IDs (got {type_name(value)})"
        )
    warnings: list[tuple[int, str]] = []
    ids = {selector_id for selector_id in value if isinstance(selector_id, str)}
    selectors: dict[str, SelectorConfig] = {}
    for selector_id, raw in value.items():
        path: KeyPath = ("selectors", selector_id)
        if not selector_id.strip():
            raise doc.error(path, "a selector ID must not be blank")
        if not selector_id.isprintable():
            raise doc.error(path, "a selector ID must not contain control characters")
        if config.resolve(selector_id) is not None:
            raise doc.error(path, f"'{selector_id}' is already a model ID or alias")
        if config.resolve_peer(selector_id) is not None:  # allowed, as in llama-swap
            message = (
                f"'{selector_id}' shadows the peer model of that name: selectors are read "
                "first, so requests for it go to this selector"
            )
            warnings.append(doc.warning(path, message))
        if not isinstance(raw, dict):
            raise doc.error(path, f"must be a mapping of keys (got {type_name(raw)})")
        for key in raw:
            if key not in _SELECTOR_KEYS:
                warnings.append(doc.warning((*path, key), "unknown key; ignored"))
        strategy = raw.get("strategy")
        if strategy is None:
            raise doc.error((*path, "strategy"), "required key is missing")
        if strategy not in STRATEGIES:
            choices = ", ".join(STRATEGIES)
            raise doc.error((*path, "strategy"), f"must be one of {choices} (got {strategy!r})")
        targets = _targets(raw.get("targets"), (*path, "targets"), config, ids, doc)
        spillover = _settings(raw.get("settings"), (*path, "settings"), strategy, doc, warnings)
        if strategy == "warm":
            for index, target in enumerate(targets):
                if config.resolve(target) is None:
                    message = f"'{target}' is a peer model: a warm selector picks local models"
                    raise doc.error((*path, "targets", index), message)
        if strategy == "spillover":
            _check_spillover(targets, (*path, "targets"), config, doc)
        selectors[selector_id] = SelectorConfig(
            id=selector_id,
            strategy=strategy,
            targets=targets,
            spillover=spillover,
            name=_text(raw.get("name"), (*path, "name"), doc),
            description=_text(raw.get("description"), (*path, "description"), doc),
            unlisted=_flag(raw.get("unlisted"), (*path, "unlisted"), doc),
            metadata=_mapping(raw.get("metadata"), (*path, "metadata"), doc),
        )
    return selectors, warnings


def check_profiles(
    value: object, config: Config, selectors: dict[str, SelectorConfig], doc: Document
) -> tuple[dict[str, ProfileConfig], list[tuple[int, str]]]:
    """``profiles:``, each pin's target resolved; and the warnings."""
    if value is None:
        return {}, []
    if not isinstance(value, dict):
        raise doc.error(
            ("profiles",), f"must be a mapping of profile names (got {type_name(value)})"
        )
    warnings: list[tuple[int, str]] = []
    profiles: dict[str, ProfileConfig] = {}
    for name, raw in value.items():
        path: KeyPath = ("profiles", name)
        if not name.strip():
            raise doc.error(path, "a profile name must not be blank")
        if not name.isprintable():
            raise doc.error(path, "a profile name must not contain control characters")
        if isinstance(raw, list):
            raise doc.error(
                path,
                "a profile is a mapping {description, pins: {requested: target}}; the list "
                "form of older llama-swap versions is not read: write its names under pins",
            )
        if not isinstance(raw, dict):
            raise doc.error(path, f"must be a mapping of keys (got {type_name(raw)})")
        for key in raw:
            if key not in _PROFILE_KEYS:
                warnings.append(doc.warning((*path, key), "unknown key; ignored"))
        pins_value = raw.get("pins")
        pins_path = (*path, "pins")
        if pins_value is None:
            raise doc.error(pins_path, "required key is missing")
        if not isinstance(pins_value, dict) or not pins_value:
            raise doc.error(pins_path, "must be a non-empty mapping of requested name: target")
        pins: dict[str, str] = {}
        for requested, target in pins_value.items():
            pin_path = (*pins_path, requested)
            if not requested.strip():
                raise doc.error(pin_path, "a pinned name must not be blank")
            if target is None or target == "":
                pins[requested] = ""  # the name is turned off while the profile is active
                continue
            if not isinstance(target, str):
                raise doc.error(
                    pin_path, f"must be a model name or empty (got {type_name(target)})"
                )
            known = (
                config.resolve(target) is not None
                or config.resolve_peer(target) is not None
                or target in selectors
            )
            if not known:  # pins do not chain: another pin's name is not a model
                raise doc.error(
                    pin_path,
                    f"unknown model '{target}' (not a model, alias, peer model or selector)",
                )
            pins[requested] = target
        profiles[name] = ProfileConfig(
            name=name,
            description=_text(raw.get("description"), (*path, "description"), doc),
            pins=pins,
        )
    return profiles, warnings


def _targets(
    value: object, path: KeyPath, config: Config, selector_ids: set[str], doc: Document
) -> tuple[str, ...]:
    if value is None:
        raise doc.error(path, "required key is missing")
    if not isinstance(value, list) or not value:
        raise doc.error(path, "must be a non-empty list of model names")
    targets: list[str] = []
    for index, target in enumerate(value):
        where = (*path, index)
        if not isinstance(target, str) or not target.strip():
            raise doc.error(where, "must be a model name")
        if target in selector_ids and config.resolve(target) is None:
            raise doc.error(where, f"'{target}' is a selector: a selector cannot target a selector")
        if config.resolve(target) is None and config.resolve_peer(target) is None:
            raise doc.error(where, f"unknown model '{target}' (not a model, alias or peer model)")
        targets.append(target)
    return tuple(targets)


def _settings(
    value: object, path: KeyPath, strategy: str, doc: Document, warnings: list[tuple[int, str]]
) -> int:
    """``settings.spillover`` (default 1, at least 1); only the spillover strategy reads it."""
    if value is None:
        return 1
    if not isinstance(value, dict):
        raise doc.error(path, f"must be a mapping of keys (got {type_name(value)})")
    for key in value:
        if key != "spillover":
            warnings.append(doc.warning((*path, key), "unknown key; ignored"))
    spillover = value.get("spillover", 1)
    where = (*path, "spillover")
    if isinstance(spillover, bool) or not isinstance(spillover, int) or spillover < 1:
        raise doc.error(where, f"must be a whole number >= 1 (got {spillover!r})")
    if "spillover" in value and strategy != "spillover":
        warnings.append(doc.warning(where, "only the spillover strategy reads it; ignored"))
    return spillover


def _check_spillover(targets: Iterable[str], path: KeyPath, config: Config, doc: Document) -> None:
    """Distinct targets, and the local ones able to run together under the swap policy."""
    seen: dict[tuple[str, ...], int] = {}
    local: list[str] = []
    for index, target in enumerate(targets):
        model_id = config.resolve(target)
        if model_id is not None:
            key: tuple[str, ...] = ("model", model_id)
            local.append(model_id)
        else:
            peer = config.resolve_peer(target)
            assert peer is not None, "targets are resolved before this check"
            key = ("peer", *peer)
        if key in seen:
            first = seen[key]
            message = f"names the same model as targets[{first}]: spillover targets must differ"
            raise doc.error((*path, index), message)
        seen[key] = index
    if len(local) > 1 and not _can_run_together(local, config):
        raise doc.error(
            path,
            f"the local targets ({', '.join(local)}) cannot run together under the swap policy: "
            "put them in one group with swap: false, or in one matrix combination",
        )


def _can_run_together(models: list[str], config: Config) -> bool:
    """Whether the groups or the matrix allow every model of ``models`` at once.

    Fit by memory alone (``resources:`` without groups or matrix) decides by
    measured memory at run time: allowed here.
    """
    wanted = set(models)
    routing = config.routing
    if routing.router == "matrix" and routing.matrix is not None:
        sets = routing.matrix.sets
        for name in sets.definition_order:
            try:
                combinations = sets.expand(name, limit=_MATRIX_LIMIT)
            except MatrixError:  # a set too large to list: not provable from it
                continue
            if any(wanted <= combination for combination in combinations):
                return True
        return False
    if not routing.groups:
        return bool(config.resources)
    return any(not group.swap and wanted <= set(group.members) for group in routing.groups)


def _text(value: object, path: KeyPath, doc: Document) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise doc.error(path, f"must be text (got {type_name(value)})")
    return value.strip()


def _flag(value: object, path: KeyPath, doc: Document) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise doc.error(path, f"must be true or false (got {type_name(value)})")
    return value


def _mapping(value: object, path: KeyPath, doc: Document) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(path, f"must be a mapping (got {type_name(value)})")
    return dict(value)
