"""The swap-policy part of a config: legacy ``groups``/``matrix`` or ``routing.router``.

llama-swap accepts two spellings: the legacy top-level ``groups:`` or
``matrix:``, and the canonical ``routing.router`` block (``use: group|matrix``
with ``settings.groups`` / ``settings.matrix``). Mixing them, or giving both
legacy keys, is an error that says how to migrate. Group membership is
checked here (a model in two groups, twice in one group, or not a model at
all); the matrix DSL is compiled by :mod:`.matrix_dsl`, whose errors are
located here at the set's key and line.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Final

import msgspec

from trio_swap.config.matrix_dsl import MatrixConfig, MatrixError, compile_matrix
from trio_swap.config.model import (
    DEFAULT_GROUP,
    DEFAULT_MAX_WAIT,
    GroupConfig,
    ModelConfig,
    RoutingConfig,
    SchedulerConfig,
    build_model_names,
)
from trio_swap.config.validate import convert
from trio_swap.config.yamlsource import Document, KeyPath, type_name

__all__ = ["ROUTING_TOP_KEYS", "load_routing"]

#: Top-level keys this module reads.
ROUTING_TOP_KEYS: Final = ("groups", "matrix", "routing")
ROUTERS: Final = ("group", "matrix")


class _RawGroup(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: list[str] = msgspec.field(default_factory=list)


class _RawMatrix(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    vars: dict[str, str] = msgspec.field(default_factory=dict)
    evict_costs: dict[str, int] = msgspec.field(default_factory=dict)
    sets: dict[str, str] = msgspec.field(default_factory=dict)


class _RawSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: Converted group by group (msgspec's errors do not name mapping keys).
    groups: dict[str, object] = msgspec.field(default_factory=dict)
    matrix: _RawMatrix | None = None


class _RawFifo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    priority: dict[str, int] = msgspec.field(default_factory=dict)


class _RawSchedulerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_wait: float = msgspec.field(default=DEFAULT_MAX_WAIT, name="maxWait")
    min_resident: float = msgspec.field(default=0.0, name="minResident")
    max_queue: int = msgspec.field(default=0, name="maxQueue")
    fifo: _RawFifo = msgspec.field(default_factory=_RawFifo)


class _RawScheduler(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    use: str = "fifo"
    settings: _RawSchedulerSettings = msgspec.field(default_factory=_RawSchedulerSettings)


class _RawRouter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    use: str = "group"
    settings: _RawSettings = msgspec.field(default_factory=_RawSettings)


def load_routing(
    values: dict[str, object], models: Mapping[str, ModelConfig], doc: Document
) -> tuple[RoutingConfig, list[tuple[int, str]]]:
    """Validate the routing keys of the top level; returns the config and (line, warning) pairs.

    Raises:
        ConfigError: conflicting spellings, bad group membership, a bad matrix,
            or bad scheduler settings.
    """
    warnings: list[tuple[int, str]] = []
    routing = values.get("routing")
    router_value: object = None
    scheduler = SchedulerConfig()
    if routing is not None:
        if not isinstance(routing, dict):
            raise doc.error(("routing",), "must be a mapping with 'router' and/or 'scheduler'")
        for key in routing:
            if key not in ("router", "scheduler"):
                raise doc.error(("routing", key), "unknown key (expected 'router' or 'scheduler')")
        router_value = routing.get("router")
        if routing.get("scheduler") is not None:
            scheduler = _scheduler(routing["scheduler"], models, doc)
    routing_config, more = _router(values, router_value, models, doc)
    warnings.extend(more)
    return msgspec.structs.replace(routing_config, scheduler=scheduler), warnings


def _scheduler(value: object, models: Mapping[str, ModelConfig], doc: Document) -> SchedulerConfig:
    base: KeyPath = ("routing", "scheduler")
    raw = convert(value, _RawScheduler, base, doc)
    if raw.use != "fifo":
        raise doc.error((*base, "use"), f"must be 'fifo', the only scheduler (got {raw.use!r})")
    settings = raw.settings
    where: KeyPath = (*base, "settings")
    for name, number in (("maxWait", settings.max_wait), ("minResident", settings.min_resident)):
        if not math.isfinite(number) or number < 0:
            raise doc.error((*where, name), f"must be a number of seconds >= 0 (got {number})")
    if settings.max_queue < 0:
        raise doc.error((*where, "maxQueue"), f"must be >= 0 (got {settings.max_queue})")
    priority: dict[str, int] = {}
    known = build_model_names(models)
    for name, level in settings.fifo.priority.items():
        model = known.get(name)
        if model is None:
            raise doc.error(
                (*where, "fifo", "priority", name), f"unknown model {name!r} (not an id or alias)"
            )
        priority[model] = level  # an alias counts too (llama-swap silently ignores it)
    return SchedulerConfig(
        max_wait=settings.max_wait,
        min_resident=settings.min_resident,
        max_queue=settings.max_queue,
        priority=priority,
    )


def _router(
    values: dict[str, object],
    router_value: object,
    models: Mapping[str, ModelConfig],
    doc: Document,
) -> tuple[RoutingConfig, list[tuple[int, str]]]:
    warnings: list[tuple[int, str]] = []
    legacy = [key for key in ("groups", "matrix") if values.get(key) is not None]
    if router_value is not None and legacy:
        raise doc.error(
            (legacy[0],),
            f"cannot be combined with 'routing.router'; move it to "
            f"routing.router.settings.{legacy[0]} (and set routing.router.use: "
            f"{'group' if legacy[0] == 'groups' else 'matrix'})",
        )
    if len(legacy) == 2:
        raise doc.error(
            ("matrix",),
            "a config uses either 'groups' or 'matrix', not both; keep one "
            "(or move both under routing.router.settings and pick one with routing.router.use)",
        )

    if router_value is not None:
        base: KeyPath = ("routing", "router")
        raw = convert(router_value, _RawRouter, base, doc)
        if raw.use not in ROUTERS:
            raise doc.error((*base, "use"), f"must be 'group' or 'matrix' (got {raw.use!r})")
        settings: KeyPath = (*base, "settings")
        groups = _groups(raw.settings.groups, (*settings, "groups"), models, doc)
        if raw.use == "matrix":
            if raw.settings.matrix is None:
                raise doc.error(
                    (*base, "use"), "is 'matrix' but routing.router.settings.matrix is missing"
                )
            matrix = _matrix(raw.settings.matrix, (*settings, "matrix"), models, doc)
            return RoutingConfig(router="matrix", groups=groups, matrix=matrix), warnings
        return RoutingConfig(router="group", groups=groups), warnings

    if values.get("matrix") is not None:
        raw_matrix = convert(values["matrix"], _RawMatrix, ("matrix",), doc)
        matrix = _matrix(raw_matrix, ("matrix",), models, doc)
        return RoutingConfig(router="matrix", matrix=matrix), warnings
    raw_groups = values.get("groups") or {}
    if not isinstance(raw_groups, dict):
        raise doc.error(
            ("groups",), f"must be a mapping of group names (got {type_name(raw_groups)})"
        )
    return RoutingConfig(router="group", groups=_groups(raw_groups, ("groups",), models, doc)), (
        warnings
    )


def _groups(
    raw: dict[str, object], base: KeyPath, models: Collection[str], doc: Document
) -> tuple[GroupConfig, ...]:
    owner: dict[str, str] = {}
    groups: list[GroupConfig] = []
    for name, value in raw.items():
        if name == DEFAULT_GROUP:
            raise doc.error((*base, name), f"'{DEFAULT_GROUP}' is reserved for ungrouped models")
        group = convert(value or {}, _RawGroup, (*base, name), doc)
        for index, member in enumerate(group.members):
            where: KeyPath = (*base, name, "members", index)
            if member not in models:
                raise doc.error(where, f"unknown model {member!r} (members must be model ids)")
            if owner.get(member) == name:
                raise doc.error(where, f"model {member!r} is listed twice in group {name!r}")
            if member in owner:
                raise doc.error(
                    where,
                    f"model {member!r} is already in group {owner[member]!r}; "
                    "a model belongs to at most one group",
                )
            owner[member] = name
        groups.append(
            GroupConfig(
                name=name,
                swap=group.swap,
                exclusive=group.exclusive,
                persistent=group.persistent,
                members=tuple(group.members),
            )
        )
    return tuple(groups)


def _matrix(raw: _RawMatrix, base: KeyPath, models: Collection[str], doc: Document) -> MatrixConfig:
    """Compile the matrix (the only place its DSL is parsed), locating its errors."""
    try:
        return compile_matrix(raw.sets, raw.vars, raw.evict_costs, models)
    except MatrixError as exc:
        raise doc.error((*base, *exc.key_path), exc.detail) from exc
