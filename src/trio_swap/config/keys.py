"""``apiKeys`` entries and ``allowedHosts``: their checks, and what a presented key may do.

An ``apiKeys`` entry is a plain string (a key that opens everything, as in
llama-swap) or a mapping (a *scoped key*, trio-swap's own, docs/security.md)::

    apiKeys:
      - "${env.ADMIN_KEY}"                 # everything
      - key: "${env.CI_KEY}"
        name: ci                           # shown in the activity log, never the key
        models: [small, "qwen-*"]          # ids, aliases (resolved to ids), globs over ids
        peers: [openrouter]                # peer ids ("*": every peer)
        admin: false                       # /logs, /api/..., unload, reload

Checking happens in two steps, both raising located errors: :func:`check_api_keys`
(the entries alone: empty or blank keys, duplicates, names) with the other
top-level settings, and :func:`scope_api_keys` once the models and peers are
known (names resolve, globs that match nothing are a warning).

At run time :class:`Grant` is what a presented key may do. The access
middleware finds it and puts it in the request's ASGI scope under
:data:`GRANT_SCOPE`; the inference routes, the model list and the activity
log read it with :func:`grant_of`. A request without one (no ``apiKeys``)
may do everything.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase, translate
from typing import Final, final

import msgspec

from trio_swap.config.model import (
    ModelConfig,
    PeerConfig,
    ScopedKey,
    build_model_names,
    build_peer_names,
)
from trio_swap.config.schema import RawApiKey
from trio_swap.config.yamlsource import Document, KeyPath

__all__ = [
    "ALL",
    "GRANT_SCOPE",
    "Grant",
    "check_allowed_hosts",
    "check_api_keys",
    "default_key_name",
    "grant_of",
    "scope_api_keys",
]

#: ``models: ["*"]``, ``peers: ["*"]``: every one; ``allowedHosts: ["*"]``: no Host check.
ALL: Final = "*"
#: The ASGI scope key the access middleware stores the request's :class:`Grant` under.
GRANT_SCOPE: Final = "trio_swap.grant"
#: Characters that make a ``models`` entry a glob (fnmatch syntax).
_GLOB_CHARS: Final = frozenset("*?[")
#: Longest key name (it is a label in logs and the activity table).
MAX_NAME: Final = 64
#: Characters no host name contains (a URL was pasted, or a list in one string).
_NOT_IN_HOSTS: Final = frozenset("/\\@?#,;'\"<>()")


def default_key_name(index: int) -> str:
    """The name of ``apiKeys[index]`` when none is written (plain strings have none)."""
    return f"apiKeys[{index}]"


# -- what a key may do, per request ------------------------------------------------------


@final
class Grant:
    """What one presented key may do: built once per key, read per request.

    A plain string key gets :meth:`full`; a :class:`ScopedKey` its scope.
    Model ids are matched exactly or by one compiled regular expression of
    its globs, so a check costs a set lookup and at most one regex match.
    """

    __slots__ = ("_all_models", "_all_peers", "_globs", "_ids", "_peers", "admin", "name")

    def __init__(
        self,
        name: str,
        *,
        models: Iterable[str] = (ALL,),
        peers: Iterable[str] = (ALL,),
        admin: bool = True,
    ) -> None:
        #: Recorded in the activity log; never the key.
        self.name = name
        #: May call the admin routes.
        self.admin = admin
        patterns = tuple(models)
        self._all_models = ALL in patterns
        self._ids = frozenset(p for p in patterns if not _is_glob(p))
        globs = [translate(p) for p in patterns if _is_glob(p)]
        self._globs = re.compile("|".join(globs)) if globs else None
        peer_ids = frozenset(peers)
        self._all_peers = ALL in peer_ids
        self._peers = peer_ids

    @classmethod
    def of(cls, entry: str | ScopedKey, index: int) -> Grant:
        """The grant of ``apiKeys[index]``."""
        if isinstance(entry, str):
            return cls(default_key_name(index))
        return cls(entry.name, models=entry.models, peers=entry.peers, admin=entry.admin)

    @property
    def full(self) -> bool:
        """Every model, every peer, the admin routes: a plain string key."""
        return self.admin and self._all_models and self._all_peers

    def allows_model(self, model_id: str) -> bool:
        """Whether requests may go to local model ``model_id`` (an id, aliases resolved)."""
        if self._all_models or model_id in self._ids:
            return True
        return self._globs is not None and self._globs.match(model_id) is not None

    def allows_peer(self, peer_id: str) -> bool:
        """Whether requests may go to the models of peer ``peer_id``."""
        return self._all_peers or peer_id in self._peers

    def __repr__(self) -> str:
        return f"Grant({self.name!r}, admin={self.admin})"


def grant_of(scope: Mapping[str, object]) -> Grant | None:
    """The request's grant (see :data:`GRANT_SCOPE`); None: no ``apiKeys``, all allowed."""
    grant = scope.get(GRANT_SCOPE)
    return grant if isinstance(grant, Grant) else None


def _is_glob(pattern: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(pattern)


# -- checking the config -----------------------------------------------------------------


def check_api_keys(
    entries: Sequence[str | RawApiKey], doc: Document
) -> tuple[str | ScopedKey, ...]:
    """The entries alone: keys, names and list shapes (model and peer names come later).

    Raises:
        ConfigError: an empty key or one with blanks, a key listed twice, a
            blank, unprintable, too long or repeated name, a name equal to its
            key, a blank or repeated ``models``/``peers`` entry.
    """
    first_index: dict[str, int] = {}
    named: dict[str, int] = {}
    keys: list[str | ScopedKey] = []
    for index, entry in enumerate(entries):
        path: KeyPath = ("apiKeys", index)
        key = entry if isinstance(entry, str) else entry.key
        key_path = path if isinstance(entry, str) else (*path, "key")
        if not key.strip():
            raise doc.error(key_path, "an API key must not be empty")
        if any(c.isspace() for c in key):
            raise doc.error(key_path, "an API key cannot contain spaces")
        if not key.isprintable():
            raise doc.error(key_path, "an API key cannot contain control characters")
        earlier = first_index.setdefault(key, index)
        if earlier != index:
            raise doc.error(key_path, f"the same key as {default_key_name(earlier)}: list it once")
        if isinstance(entry, str):
            named.setdefault(default_key_name(index), index)
            keys.append(entry)
            continue
        name = _key_name(entry, index, path, doc)
        other = named.setdefault(name, index)
        if other != index:
            raise doc.error((*path, "name"), f"{name!r} is also the name of apiKeys[{other}]")
        keys.append(
            ScopedKey(
                key=key,
                name=name,
                models=_names(entry.models, (*path, "models"), doc),
                peers=_names(entry.peers, (*path, "peers"), doc),
                admin=entry.admin,
            )
        )
    return tuple(keys)


def _key_name(entry: RawApiKey, index: int, path: KeyPath, doc: Document) -> str:
    if entry.name is None:
        return default_key_name(index)
    where: KeyPath = (*path, "name")
    name = entry.name
    if not name.strip() or name != name.strip():
        raise doc.error(where, "must not be blank or start or end with blanks")
    if not name.isprintable():
        raise doc.error(where, "must not contain control characters or line breaks")
    if len(name) > MAX_NAME:
        raise doc.error(where, f"must be at most {MAX_NAME} characters (got {len(name)})")
    if name == entry.key:
        raise doc.error(where, "must not be the key itself: the name is shown in the activity log")
    return name


def _names(values: Sequence[str], path: KeyPath, doc: Document) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        if not value.strip() or value != value.strip():
            raise doc.error((*path, index), "must not be empty or start or end with blanks")
        if not value.isprintable():
            raise doc.error((*path, index), "must not contain control characters or line breaks")
        earlier = seen.setdefault(value, index)
        if earlier != index:
            raise doc.error((*path, index), f"{value!r} is listed twice")
    return tuple(values)


def scope_api_keys(
    keys: Sequence[str | ScopedKey],
    models: Mapping[str, ModelConfig],
    peers: Mapping[str, PeerConfig],
    doc: Document,
    *,
    selectors: object = None,
) -> tuple[tuple[str | ScopedKey, ...], list[tuple[int, str]]]:
    """Resolve each scoped key's names against the models and peers; (keys, warnings).

    A ``models`` entry that is a model id or an alias becomes the model's id;
    any other entry with ``*``, ``?`` or ``[`` is a glob over model ids (a
    warning when it matches none: it may be meant for a model added later).
    ``selectors`` is the raw ``selectors:`` value, only read for its ids: a
    selector is allowed through its targets, so naming one is an error that
    says so.

    Raises:
        ConfigError: a ``models`` entry that names no model (and is no glob),
            or a ``peers`` entry that names no peer.
    """
    local = build_model_names(models)
    peer_names = build_peer_names(dict(models), dict(peers)) if peers else {}
    resolved: list[str | ScopedKey] = []
    warnings: list[tuple[int, str]] = []
    for index, entry in enumerate(keys):
        if isinstance(entry, str):
            resolved.append(entry)
            continue
        path: KeyPath = ("apiKeys", index)
        ids: dict[str, None] = {}
        for position, name in enumerate(entry.models):
            where: KeyPath = (*path, "models", position)
            model_id = local.get(name)
            if model_id is not None:
                ids[model_id] = None
            elif name == ALL or _is_glob(name):
                ids[name] = None
                if name != ALL and not any(fnmatchcase(m, name) for m in models):
                    warnings.append(doc.warning(where, f"the glob {name!r} matches no model id"))
            elif isinstance(selectors, dict) and name in selectors:
                raise doc.error(
                    where,
                    f"{name!r} is a selector: list the models it may choose (a request "
                    "for a selector is checked on the model it chooses)",
                )
            elif name in peer_names:
                raise doc.error(
                    where,
                    f"{name!r} is a peer's model: list its peer ({peer_names[name][0]!r}) "
                    "under 'peers'",
                )
            else:
                raise doc.error(where, f"unknown model {name!r} (not an id, an alias or a glob)")
        for position, peer_id in enumerate(entry.peers):
            if peer_id != ALL and peer_id not in peers:
                known = ", ".join(peers) or "none configured"
                raise doc.error(
                    (*path, "peers", position), f"unknown peer {peer_id!r} (peers: {known})"
                )
        if not (ids or entry.peers or entry.admin):
            warnings.append(
                doc.warning(path, "this key may use no model, no peer and no admin route")
            )
        resolved.append(msgspec.structs.replace(entry, models=tuple(ids)))
    return tuple(resolved), warnings


def check_allowed_hosts(values: Sequence[str], doc: Document) -> tuple[str, ...]:
    """``allowedHosts``, normalised: lower case, no trailing dot, IDNA (``xn--``) names.

    Each entry is a host name, an IP address, a ``*.example.com`` pattern (any
    name ending in ``.example.com``) or ``*`` alone (no Host check at all).

    Raises:
        ConfigError: an empty entry, a URL or a port, a ``*`` elsewhere, a
            name IDNA cannot encode (an empty or over-long label).
    """
    hosts: dict[str, None] = {}
    for index, value in enumerate(values):
        where: KeyPath = ("allowedHosts", index)
        text = value.strip().lower()
        if not text:
            raise doc.error(where, "must not be empty")
        if text == ALL:
            hosts[ALL] = None
            continue
        if any(c.isspace() or not c.isprintable() or c in _NOT_IN_HOSTS for c in text):
            raise doc.error(
                where,
                f"must be a host name such as models.example.com, without scheme or path "
                f"(got {value!r})",
            )
        wildcard = text.startswith("*.")
        name = text[2:] if wildcard else text
        if ALL in name:
            raise doc.error(where, f"'*' may only stand alone or start '*.example.com' ({value!r})")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        address = _ip(name)
        if address is not None:
            if wildcard:
                raise doc.error(where, f"an IP address cannot be a '*.' pattern ({value!r})")
            hosts[address] = None
            continue
        if ":" in name:
            raise doc.error(
                where, f"must not carry a port: a Host's port is never compared ({value!r})"
            )
        name = name.removesuffix(".")
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise doc.error(
                where, f"is not a valid host name (an empty or over-long label): {value!r}"
            ) from None
        if not name:
            raise doc.error(where, f"is not a valid host name: {value!r}")
        hosts[f"*.{name}" if wildcard else name] = None
    return tuple(hosts)


def _ip(text: str) -> str | None:
    """``text`` as an IP address in its usual spelling (``2001:db8::1``), or None."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
