"""Types, ranges and defaults: expanded raw values to the final model classes.

Runs after macro expansion, so every value here is what the process
supervisor and router will use. Each check raises a located
:class:`~trio_swap.config.errors.ConfigError`; defaults that mean "inherit"
(``ttl: -1``, ``unloadTimeout: 0``, ``concurrencyLimit: 0``) are resolved so
runtime code never has to know about them.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Final, TypeVar, final
from urllib.parse import urlsplit

import msgspec

from trio_swap.config.address import Upstream
from trio_swap.config.command import split_command
from trio_swap.config.keys import check_api_keys
from trio_swap.config.model import (
    DEFAULT_CONCURRENCY_LIMIT,
    DEFAULT_UNLOAD_TIMEOUT,
    FilterConfig,
    ModelConfig,
    PeerConfig,
    ScopedKey,
)
from trio_swap.config.schema import (
    INHERIT_TTL,
    RawApiKey,
    RawConfig,
    RawFilters,
    RawModel,
    RawPeer,
)
from trio_swap.config.timeouts import check_peer_timeouts
from trio_swap.config.yamlsource import Document, KeyPath, type_name

LOG_LEVELS: Final = ("debug", "info", "warn", "error")
LOG_TO_STDOUT: Final = ("proxy", "upstream", "both", "none")
_HIGHEST_PORT: Final = 65535
#: Names clients send and logs print (model IDs, aliases): no control characters.
NOT_PRINTABLE: Final = "{what} must not contain control characters or line breaks"
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_ENV_ENTRY = re.compile(r"([^=\s]+)=(.*)", re.DOTALL)

T = TypeVar("T", bound=msgspec.Struct)


@final
class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The validated top-level settings that models inherit from."""

    health_check_timeout: float
    start_port: int
    #: Seconds; 0 = never unload.
    global_ttl: float
    unload_timeout: float
    log_level: str
    log_to_stdout: str
    send_loading_state: bool
    api_keys: tuple[str | ScopedKey, ...]
    include_aliases_in_list: bool


def convert(value: object, kind: type[T], path: KeyPath, doc: Document) -> T:
    """Strict conversion into a raw Struct, with errors located by key path and line.

    Strict: ``"5"`` is not an int and ``true`` is not a number; YAML already
    types unquoted scalars, and a typed macro keeps its type.

    The types are checked here, by :func:`_check`, before msgspec converts:
    msgspec's errors are English sentences with a ``$.a[1]`` path inside (no
    structured fields), and their wording is not an API, so parsing it broke
    silently whenever it changed. ``_check`` walks :mod:`msgspec.inspect`'s
    type descriptions (a documented API) and accepts exactly what
    ``msgspec.convert(strict=True)`` accepts for the types our Structs use;
    ``tests/test_config.py::test_every_raw_struct_uses_only_types_the_checker_knows``
    fails if a Struct gains a type or constraint it does not handle. So msgspec
    needs no upper bound in pyproject.toml.
    """
    _check(value, _type_info(kind), path, doc)
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:  # _check let through what msgspec refuses: a bug
        raise doc.error(path, f"invalid value: {exc}") from exc


@functools.cache
def _type_info(kind: type[msgspec.Struct]) -> msgspec.inspect.Type:
    """``kind``'s type description, once it is known :func:`_check` handles all of it.

    Raises:
        TypeError: ``kind`` uses a type or a constraint (``Meta(ge=0)``) that
            ``_check`` does not handle: a programming error, caught by the first
            test that loads such a key.
    """
    info = msgspec.inspect.type_info(kind)
    stack: list[msgspec.inspect.Type] = [info]
    while stack:
        node = stack.pop()
        if isinstance(node, msgspec.inspect.UnionType):
            stack.extend(node.types)
            continue
        try:
            _kind(node)
        except KeyError:
            raise TypeError(f"config.validate cannot check {node!r} (in {kind.__name__})") from None
        constraints = ("min_length", "max_length", "pattern", "gt", "ge", "lt", "le", "multiple_of")
        if any(getattr(node, name, None) is not None for name in constraints):
            raise TypeError(f"config.validate ignores the constraints of {node!r}")
        if isinstance(node, msgspec.inspect.ListType):
            stack.append(node.item_type)
        elif isinstance(node, msgspec.inspect.DictType):
            stack.extend((node.key_type, node.value_type))
        elif isinstance(node, msgspec.inspect.StructType):
            if not node.forbid_unknown_fields or node.array_like or node.tag_field is not None:
                raise TypeError(f"config.validate expects plain strict Structs, not {node!r}")
            stack.extend(field.type for field in node.fields)
    return info


#: Each checked type, with the Python values it takes and its name in messages.
_KINDS: Final[dict[type[msgspec.inspect.Type], tuple[tuple[type, ...], str]]] = {
    msgspec.inspect.StrType: ((str,), "string"),
    msgspec.inspect.IntType: ((int,), "int"),
    msgspec.inspect.FloatType: ((int, float), "float"),
    msgspec.inspect.BoolType: ((bool,), "bool"),
    msgspec.inspect.NoneType: ((type(None),), "null"),
    msgspec.inspect.ListType: ((list,), "list"),
    msgspec.inspect.DictType: ((dict,), "mapping"),
    msgspec.inspect.StructType: ((dict,), "mapping"),
    msgspec.inspect.AnyType: ((object,), "any value"),
}


def _kind(info: msgspec.inspect.Type) -> tuple[tuple[type, ...], str]:
    if isinstance(info, msgspec.inspect.CustomType) and info.cls is object:
        return (object,), "any value"  # ``dict[str, object]``: metadata, setParams
    return _KINDS[type(info)]


def _takes(info: msgspec.inspect.Type, value: object) -> bool:
    """Whether ``value`` has the right Python type for ``info`` (its contents aside)."""
    kinds, _ = _kind(info)
    if isinstance(value, bool) and bool not in kinds and object not in kinds:
        return False  # bool is an int subclass, but never a number here
    return isinstance(value, kinds)


def _check(value: object, info: msgspec.inspect.Type, path: KeyPath, doc: Document) -> None:
    """Raise a located error unless ``value`` converts to ``info`` in strict mode.

    Only the type descriptions our raw Structs use are handled (see
    :func:`convert`); a value fitting none of a union's members is reported
    with every member's name (``expected mapping | null, got list``).
    """
    members = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    fitting = next((member for member in members if _takes(member, value)), None)
    if fitting is None:
        want = " | ".join(_kind(member)[1] for member in members)
        scalar = isinstance(value, str | int | float) and not isinstance(value, bool)
        shown = f" {value!r}" if scalar else ""
        raise doc.error(path, f"expected {want}, got {type_name(value)}{shown}")
    if isinstance(fitting, msgspec.inspect.IntType):
        assert isinstance(value, int)
        if not _INT64_MIN <= value <= _INT64_MAX:
            # As in llama-swap (Go int64); SQLite and friends refuse larger ones at run time.
            raise doc.error(path, f"number out of range: must fit in 64 bits (got {value})")
    elif isinstance(fitting, msgspec.inspect.FloatType) and isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise doc.error(path, f"number out of range (got {value})") from None
    elif isinstance(fitting, msgspec.inspect.ListType):
        assert isinstance(value, list)
        for index, item in enumerate(value):
            _check(item, fitting.item_type, (*path, index), doc)
    elif isinstance(fitting, msgspec.inspect.DictType):
        assert isinstance(value, dict)
        for key, item in value.items():
            _check(key, fitting.key_type, (*path, key), doc)
            _check(item, fitting.value_type, (*path, key), doc)
    elif isinstance(fitting, msgspec.inspect.StructType):
        assert isinstance(value, dict)
        _check_struct(value, fitting, path, doc)


def _check_struct(
    value: dict[object, object], info: msgspec.inspect.StructType, path: KeyPath, doc: Document
) -> None:
    fields = {field.encode_name: field for field in info.fields}
    for key in value:
        if key not in fields:
            known = ", ".join(fields)
            raise doc.error(path, f"contains unknown field `{key}` (known: {known})")
    for name, field in fields.items():
        if name in value:
            _check(value[name], field.type, (*path, name), doc)
        elif field.required:
            raise doc.error((*path, name), "required key is missing")


def check_settings(raw: RawConfig, doc: Document) -> Settings:
    """Validate the top level and resolve its defaults.

    Unlike llama-swap, a ``healthCheckTimeout`` below 15 is kept as written
    (llama-swap silently raises it to 15); only a value <= 0 is rejected.
    """
    timeout = _finite(raw.health_check_timeout, ("healthCheckTimeout",), doc)
    if timeout <= 0:
        raise doc.error(("healthCheckTimeout",), f"must be > 0 seconds (got {_show(timeout)})")
    if not 1 <= raw.start_port <= _HIGHEST_PORT:
        raise doc.error(
            ("startPort",), f"must be between 1 and {_HIGHEST_PORT} (got {raw.start_port})"
        )
    global_ttl = _finite(raw.global_ttl, ("globalTTL",), doc)
    if global_ttl < 0:
        raise doc.error(("globalTTL",), f"must be >= 0 (got {_show(global_ttl)})")
    unload = _finite(raw.unload_timeout, ("unloadTimeout",), doc)
    if unload < 0:
        raise doc.error(("unloadTimeout",), f"must be >= 0 (got {_show(unload)})")
    _one_of(raw.log_level, LOG_LEVELS, ("logLevel",), doc)
    _one_of(raw.log_to_stdout, LOG_TO_STDOUT, ("logToStdout",), doc)
    return Settings(
        health_check_timeout=timeout,
        start_port=raw.start_port,
        global_ttl=global_ttl,
        unload_timeout=unload or DEFAULT_UNLOAD_TIMEOUT,
        log_level=raw.log_level,
        log_to_stdout=raw.log_to_stdout,
        send_loading_state=raw.send_loading_state,
        api_keys=_api_keys(raw.api_keys, doc),
        include_aliases_in_list=raw.include_aliases_in_list,
    )


def check_model(model_id: str, raw: RawModel, settings: Settings, doc: Document) -> ModelConfig:
    """Validate one expanded model and resolve what it inherits from ``settings``."""
    path: KeyPath = ("models", model_id)
    cmd = _command(raw.cmd, (*path, "cmd"), doc)
    if not cmd:
        raise doc.error((*path, "cmd"), "is empty (after removing comment lines)")
    ttl = _finite(raw.ttl, (*path, "ttl"), doc)
    if ttl < INHERIT_TTL:
        raise doc.error((*path, "ttl"), f"must be >= -1 (got {_show(ttl)})")
    if INHERIT_TTL < ttl < 0:
        raise doc.error(
            (*path, "ttl"), f"must be -1 (inherit globalTTL), 0 (never) or > 0 (got {_show(ttl)})"
        )
    unload = _finite(raw.unload_timeout, (*path, "unloadTimeout"), doc)
    if unload < 0:
        raise doc.error((*path, "unloadTimeout"), f"must be >= 0 (got {_show(unload)})")
    if raw.concurrency_limit < 0:
        raise doc.error((*path, "concurrencyLimit"), f"must be >= 0 (got {raw.concurrency_limit})")
    filters = _filters(raw.filters, (*path, "filters"), doc, model_id=model_id)
    aliases = _aliases(raw.aliases, (*path, "aliases"), doc)
    # Every setParamsByID name other than the model's own id is also an alias.
    generated = [n for n in filters.set_params_by_id if n != model_id and n not in aliases]
    return ModelConfig(
        id=model_id,
        cmd=cmd,
        cmd_stop=_command(raw.cmd_stop, (*path, "cmdStop"), doc),
        proxy=_proxy(raw.proxy, (*path, "proxy"), doc),
        check_endpoint=_check_endpoint(raw.check_endpoint, (*path, "checkEndpoint"), doc),
        aliases=(*aliases, *generated),
        env=tuple(_env(entry, (*path, "env", i), doc) for i, entry in enumerate(raw.env)),
        ttl=settings.global_ttl if ttl == INHERIT_TTL else ttl,
        unload_timeout=unload or settings.unload_timeout,
        use_model_name=raw.use_model_name,
        name=raw.name.strip(),
        description=raw.description.strip(),
        unlisted=raw.unlisted,
        metadata=raw.metadata,
        concurrency_limit=raw.concurrency_limit or DEFAULT_CONCURRENCY_LIMIT,
        swappable=raw.swappable,
        filters=filters,
        send_loading_state=(
            settings.send_loading_state
            if raw.send_loading_state is None
            else raw.send_loading_state
        ),
    )


def _api_keys(keys: list[str | RawApiKey], doc: Document) -> tuple[str | ScopedKey, ...]:
    """Plain keys and scoped ones (their model and peer names are resolved later)."""
    return check_api_keys(keys, doc)


def _filters(
    raw: RawFilters, path: KeyPath, doc: Document, *, model_id: str | None
) -> FilterConfig:
    """Normalise ``filters``; ``model`` can never be stripped or set (it is routing).

    ``${MODEL_ID}`` in a ``setParamsByID`` name becomes ``model_id``; for a peer
    (``model_id`` None) it is an error.
    """
    text = raw.strip_params or raw.strip_params_legacy
    strip: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if name and name != "model" and name not in strip:
            strip.append(name)
    set_params = {k: v for k, v in sorted(raw.set_params.items()) if k != "model"}
    by_id: dict[str, dict[str, object]] = {}
    for key, params in raw.set_params_by_id.items():
        if model_id is None and "${MODEL_ID}" in key:
            raise doc.error(
                (*path, "setParamsByID", key), "${MODEL_ID} is only available inside a model"
            )
        name = key.replace("${MODEL_ID}", model_id or "").strip()
        if not name:
            raise doc.error((*path, "setParamsByID", key), "an empty name cannot be requested")
        if not name.isprintable():
            raise doc.error((*path, "setParamsByID", key), NOT_PRINTABLE.format(what="a name"))
        if name in by_id:
            raise doc.error((*path, "setParamsByID", key), f"{name!r} is listed twice")
        by_id[name] = {k: v for k, v in sorted(params.items()) if k != "model"}
    return FilterConfig(strip_params=tuple(strip), set_params=set_params, set_params_by_id=by_id)


def check_aliases(models: dict[str, ModelConfig], doc: Document) -> None:
    """Every alias names exactly one model and never shadows a model ID."""
    owners: dict[str, str] = {}
    for model in models.values():
        for index, alias in enumerate(model.aliases):
            where: KeyPath = ("models", model.id, "aliases", index)
            if alias in models and alias != model.id:
                raise doc.error(where, f"alias '{alias}' is already a model ID")
            owner = owners.setdefault(alias, model.id)
            if owner != model.id:
                raise doc.error(where, f"alias '{alias}' is already used by model '{owner}'")


def check_peers(
    raw_peers: dict[str, RawPeer], models: dict[str, ModelConfig], doc: Document
) -> tuple[dict[str, PeerConfig], list[tuple[int, str]]]:
    """Validate ``peers`` against each other and the local names; returns (line, warning) pairs.

    Every ``<peer id>/<model>`` is reserved for its peer: it may be neither a
    local model id or alias nor another peer's qualified name (peer ``a``
    model ``b/c`` and peer ``a/b`` model ``c``). A model a peer lists twice
    counts once.
    """
    local: dict[str, str] = {}
    for model in models.values():
        local[model.id] = "a local model ID"
        for alias in model.aliases:
            local[alias] = f"an alias of local model '{model.id}'"
    owners: dict[str, tuple[str, str]] = {}
    peers: dict[str, PeerConfig] = {}
    warnings: list[tuple[int, str]] = []
    for peer_id, raw in raw_peers.items():
        path: KeyPath = ("peers", peer_id)
        proxy = _proxy(raw.proxy, (*path, "proxy"), doc)
        if any(c.isspace() or not c.isprintable() for c in raw.api_key):
            raise doc.error(
                (*path, "apiKey"), "an API key cannot contain spaces or control characters"
            )
        if not raw.models:
            raise doc.error((*path, "models"), "must list at least one model")
        names: list[str] = []
        for index, name in enumerate(raw.models):
            where: KeyPath = (*path, "models", index)
            if not name.strip():
                raise doc.error(where, "a model name must not be empty")
            if not name.isprintable():
                raise doc.error(where, NOT_PRINTABLE.format(what="a model name"))
            if name in names:
                continue
            names.append(name)
            qualified = f"{peer_id}/{name}"
            if qualified in local:
                raise doc.error(where, f"'{qualified}' is already {local[qualified]}")
            other = owners.setdefault(qualified, (peer_id, name))
            if other != (peer_id, name):
                raise doc.error(
                    where,
                    f"'{qualified}' is also the name of model '{other[1]}' of peer '{other[0]}'",
                )
        filters, unused = _peer_filters(peer_id, raw, names, path, doc)
        warnings.extend(unused)
        connect_path: KeyPath = (*path, "timeouts", "connect")
        connect = _finite(raw.timeouts.connect, connect_path, doc)
        if connect <= 0:
            raise doc.error(connect_path, f"must be > 0 seconds (got {_show(connect)})")
        header_path: KeyPath = (*path, "timeouts", "responseHeader")
        header = _finite(raw.timeouts.response_header, header_path, doc)
        if header < 0:
            raise doc.error(header_path, f"must be >= 0 (got {_show(header)}); 0 = no limit")
        check_peer_timeouts(raw.timeouts, (*path, "timeouts"), doc)
        peers[peer_id] = PeerConfig(
            id=peer_id,
            proxy=proxy,
            api_key=raw.api_key,
            models=tuple(names),
            filters=filters,
            connect_timeout=connect,
            response_header_timeout=header,
        )
    return peers, warnings


def _peer_filters(
    peer_id: str, raw: RawPeer, names: list[str], path: KeyPath, doc: Document
) -> tuple[FilterConfig, list[tuple[int, str]]]:
    """A peer's filters; a ``setParamsByID`` name no request for this peer can use is a warning."""
    filters = _filters(raw.filters, (*path, "filters"), doc, model_id=None)
    requestable = {*names, *(f"{peer_id}/{name}" for name in names)}
    kept: dict[str, dict[str, object]] = {}
    warnings: list[tuple[int, str]] = []
    for name, params in filters.set_params_by_id.items():
        if name in requestable:
            kept[name] = params
            continue
        where: KeyPath = (*path, "filters", "setParamsByID", name)
        warnings.append(
            doc.warning(
                where,
                f"not a name of this peer's models ('{peer_id}/<model>' or a bare model it "
                "lists), so it never applies; ignored",
            )
        )
    return msgspec.structs.replace(filters, set_params_by_id=kept), warnings


def _command(text: str, path: KeyPath, doc: Document) -> tuple[str, ...]:
    try:
        return split_command(text)
    except ValueError as exc:
        raise doc.error(path, f"cannot split into arguments: {exc}") from exc


def _proxy(url: str, path: KeyPath, doc: Document) -> str:
    if url != url.strip() or not url:
        raise doc.error(path, f"must be an http(s) URL without surrounding blanks (got {url!r})")
    if any(char.isspace() or not char.isprintable() for char in url):
        # urlsplit keeps them in the host ("http://a b"); the connect would fail on every request.
        raise doc.error(path, f"must not contain blanks or control characters (got {url!r})")
    try:
        Upstream(url)  # ValueError for "http://[::1" too (a traceback before 87ace1f)
        parts = urlsplit(url)
    except ValueError as exc:
        raise doc.error(
            path,
            f"must be an http:// or https:// URL with a valid host and a valid port (got {url!r})",
        ) from exc
    if parts.port == 0:  # Upstream would quietly take it for the scheme's default port
        raise doc.error(path, f"must be an http:// or https:// URL with a valid port (got {url!r})")
    if parts.query or parts.fragment:
        raise doc.error(path, f"must not have a query or fragment (got {url!r})")
    return url.rstrip("/")


def _check_endpoint(text: str, path: KeyPath, doc: Document) -> str | None:
    endpoint = text.strip()
    if endpoint == "none":
        return None
    if not endpoint.startswith("/"):
        raise doc.error(path, f"must be a path starting with '/' or 'none' (got {text!r})")
    return endpoint


def _aliases(aliases: list[str], path: KeyPath, doc: Document) -> tuple[str, ...]:
    seen: set[str] = set()
    for index, alias in enumerate(aliases):
        if not alias.strip():
            raise doc.error((*path, index), "alias must not be empty")
        if not alias.isprintable():
            raise doc.error((*path, index), NOT_PRINTABLE.format(what="an alias"))
        if alias in seen:
            raise doc.error((*path, index), f"alias '{alias}' is listed twice")
        seen.add(alias)
    return tuple(aliases)


def _env(entry: str, path: KeyPath, doc: Document) -> tuple[str, str]:
    match = _ENV_ENTRY.fullmatch(entry)
    if match is None:
        raise doc.error(path, f"must be NAME=value (got {entry!r})")
    if "\0" in entry:
        raise doc.error(path, "must not contain a NUL character")
    return match.group(1), match.group(2)


def _one_of(value: str, allowed: tuple[str, ...], path: KeyPath, doc: Document) -> None:
    if value not in allowed:
        raise doc.error(path, f"must be one of {', '.join(allowed)} (got {value!r})")


def _finite(value: float, path: KeyPath, doc: Document) -> float:
    if not math.isfinite(value):
        raise doc.error(path, f"must be a finite number (got {value})")
    return value


def _show(number: float) -> str:
    """``-5`` rather than ``-5.0`` when echoing a whole number back to the user."""
    return str(int(number)) if float(number).is_integer() else str(number)
