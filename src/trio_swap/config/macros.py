"""Macros: ``${env.NAME}``, user macros, ``${MODEL_ID}``, ``${PORT}`` and ``${PID}``.

The order of the stages is what gives llama-swap's macros their meaning, so it
is kept exactly (reference §1.3):

1. :func:`substitute_env` replaces ``${env.NAME}`` in the *raw text*, before
   YAML parsing, but only inside YAML content (never in comments). Because it
   is textual, ``ttl: ${env.TTL}`` yields an int. An unset variable is an
   error even inside an unused macro.
2. :func:`read_macros` validates the ordered ``macros:`` declarations.
3. :func:`expand_globals` expands top-level values with the global macros;
   :func:`expand_model` expands one model with the ordered list
   ``MODEL_ID, <globals>, <model macros>`` (a model macro replaces a global of
   the same name in place, otherwise it is appended). Comment lines in ``cmd``
   and ``cmdStop`` are removed first.
4. :func:`assign_ports` hands out ``${PORT}`` in byte-sorted model-ID order,
   only to models whose ``cmd`` contains it (on a reload, models keep the
   port they had).
5. :func:`check_leftovers` rejects any ``${...}`` still present, except
   ``${PID}`` inside ``cmdStop`` (the process supervisor fills it in).

Expansion rule: a macro's value may use macros declared *before* it (so a
global may use ``${MODEL_ID}``, which is first). Each macro value is resolved
against its predecessors once, then every string is expanded in one pass. This
gives the same result as llama-swap's last-to-first replacement: a forward
reference is left as ``${name}`` and reported. A string that is exactly one
placeholder takes the macro's own type (``ttl: ${idle}`` with ``idle: 300`` is
the int 300); otherwise the value is interpolated as text, numbers formatted
as Go's ``%v`` does. Mapping keys are never expanded.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Final, final

from trio_swap.config.command import strip_comment_lines
from trio_swap.config.errors import ConfigError
from trio_swap.config.schema import DEFAULT_PROXY, MacroValue
from trio_swap.config.yamlsource import (
    Document,
    KeyPath,
    compose,
    format_path,
    iter_scalar_nodes,
    type_name,
)

#: A list of (name, value) in declaration order; order matters.
MacroList = list[tuple[str, MacroValue]]

RESERVED: Final = frozenset({"PORT", "MODEL_ID", "PID"})
#: Longest text macro expansion may make one value (a long command line is ~2 KiB).
MAX_EXPANDED: Final = 1 << 20
#: All the text macro expansion may produce in one load (see ExpansionBudget).
MAX_EXPANSION: Final = 16 << 20
MAX_NAME_LENGTH: Final = 63
PORT_PLACEHOLDER: Final = "${PORT}"
_PID: Final = "PID"
_HIGHEST_PORT: Final = 65535

_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_REF = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
_ANY_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
#: A ``#`` that starts a YAML comment: at line start or after a blank.
_COMMENT = re.compile(r"(?:^|(?<=[ \t]))#.*$", re.MULTILINE)


# --- 1. ${env.NAME} --------------------------------------------------------------


def substitute_env(text: str, source: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${env.NAME}`` in YAML content (not comments) with ``environ[NAME]``.

    The value is escaped for the quoting style it lands in (``"..."``,
    ``'...'``, or as-is in plain and block scalars), so it arrives verbatim.
    Values containing a line break or NUL are rejected: they would change the
    document's structure and shift every line number after them.

    Raises:
        ConfigError: an unset variable or a forbidden value, at its exact line.
    """
    if "${env." not in text:
        return text
    env = os.environ if environ is None else environ
    try:
        root = compose(text, source)
    except ConfigError:
        # Placeholders can be what breaks the YAML (e.g. in a flow list):
        # substitute outside comments by a line-based approximation and let
        # the parser judge the result.
        return _substitute_env_fallback(text, source, env)
    if root is None:
        return text
    edits: list[tuple[int, int, str]] = []
    for path, node in iter_scalar_nodes(root):
        start, end = node.start_mark.index, node.end_mark.index
        if node.style in ("|", ">"):
            # Skip the header line: "|  # comment" is a real comment.
            start = text.find("\n", start, end) + 1 or end
        quote = node.style if node.style in ('"', "'") else None
        for match in _ENV_REF.finditer(text, start, end):
            line = node.start_mark.line + 1 + text.count("\n", node.start_mark.index, match.start())
            value = _env_value(match.group(1), env, source, format_path(path), line)
            edits.append((match.start(), match.end(), _escape(value, quote)))
    out: list[str] = []
    cursor = 0
    for start, end, replacement in sorted(edits):
        out.append(text[cursor:start])
        out.append(replacement)
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def _substitute_env_fallback(text: str, source: str, env: Mapping[str, str]) -> str:
    lines = text.split("\n")
    for number, line in enumerate(lines):
        comment = _COMMENT.search(line)
        cut = comment.start() if comment else len(line)
        content, rest = line[:cut], line[cut:]

        def replace(match: re.Match[str], number: int = number) -> str:
            return _env_value(match.group(1), env, source, "", number + 1)

        lines[number] = _ENV_REF.sub(replace, content) + rest
    return "\n".join(lines)


def _env_value(name: str, env: Mapping[str, str], source: str, key_path: str, line: int) -> str:
    value = env.get(name)
    if value is None:
        message = f"environment variable '{name}' is not set (used as ${{env.{name}}})"
        raise ConfigError(message, source=source, key_path=key_path, line=line)
    # YAML also breaks lines at NEL, LS and PS; any break would shift line numbers.
    if any(char in value for char in "\n\r\0\x85\u2028\u2029"):
        message = f"environment variable '{name}' contains a line break or NUL"
        raise ConfigError(message, source=source, key_path=key_path, line=line)
    return value


def _escape(value: str, quote: str | None) -> str:
    if quote == '"':
        return value.replace("\\", "\\\\").replace('"', '\\"')
    if quote == "'":
        return value.replace("'", "''")
    return value


# --- 2. declarations -------------------------------------------------------------


def read_macros(value: object, path: KeyPath, doc: Document) -> MacroList:
    """Validate a ``macros:`` mapping and return it in declaration order.

    Raises:
        ConfigError: not a mapping; a bad, too long or reserved name; a list,
            map or null value; a string value using its own name.
    """
    if value is None:
        return []
    if not isinstance(value, dict):
        raise doc.error(path, f"must be a mapping of name: value (got {type_name(value)})")
    macros: MacroList = []
    for name, macro in value.items():
        where = (*path, name)
        if len(name) > MAX_NAME_LENGTH:
            raise doc.error(where, f"macro name is longer than {MAX_NAME_LENGTH} characters")
        if not _NAME.fullmatch(name):
            raise doc.error(where, "macro name must match ^[a-zA-Z0-9_-]+$")
        if name in RESERVED:
            raise doc.error(where, f"macro name '{name}' is reserved")
        if not isinstance(macro, str | int | float | bool):
            raise doc.error(
                where, f"macro value must be a string, number or bool (got {type_name(macro)})"
            )
        if isinstance(macro, str) and f"${{{name}}}" in macro:
            raise doc.error(where, f"macro '{name}' refers to itself")
        macros.append((name, macro))
    return macros


# --- 3. expansion ----------------------------------------------------------------


@final
class ExpansionBudget:
    """The text macro expansion may still produce in one load.

    A macro may use earlier ones, so ``b: ${a}${a}...`` ten times, ten macros
    deep, is 10^10 characters from a 300-byte file (issue 9: it took every
    byte of memory). So no value may expand past :data:`MAX_EXPANDED`, and
    every expanded value (macro values as they are resolved, then the config
    values using them) counts against :data:`MAX_EXPANSION` for the whole load.
    """

    def __init__(self, doc: Document, total: int = MAX_EXPANSION) -> None:
        self._doc = doc
        self._left = total

    def charge(self, size: int, path: KeyPath) -> None:
        """Count ``size`` characters produced for ``path``.

        Raises:
            ConfigError: the load's budget is spent, located at ``path``.
        """
        self._left -= size
        if self._left < 0:
            raise self._doc.error(
                path,
                f"macros expand to more than {MAX_EXPANSION >> 20} MiB of text in all "
                "(a macro repeats its whole value everywhere it is used)",
            )

    def too_long(self, path: KeyPath) -> ConfigError:
        return self._doc.error(
            path, f"macro expansion makes this value longer than {MAX_EXPANDED >> 10} KiB"
        )


def expand_globals(
    values: dict[str, object], macros: MacroList, doc: Document, budget: ExpansionBudget
) -> dict[str, object]:
    """Expand top-level settings (``startPort: ${first_port}``) with global macros.

    Raises:
        ConfigError: any ``${...}`` left over, at its key path; an expansion
            past ``budget`` or :data:`MAX_EXPANDED`.
    """
    table = _resolve(macros, {name: ("macros", name) for name, _ in macros}, budget)
    expanded = {key: _expand(value, table, (key,), budget) for key, value in values.items()}
    for key, value in expanded.items():
        check_leftovers(value, (key,), doc)
    return expanded


def expand_model(
    model_id: str,
    model: dict[str, object],
    global_macros: MacroList,
    doc: Document,
    budget: ExpansionBudget,
) -> dict[str, object]:
    """Expand one model's values; the ``macros`` key is consumed and dropped.

    ``${PORT}`` and ``${PID}`` are left for :func:`assign_ports` and the
    process supervisor; call :func:`check_leftovers` after :func:`assign_ports`.

    Raises:
        ConfigError: a bad ``macros`` block; an expansion past ``budget`` or
            :data:`MAX_EXPANDED`.
    """
    path: KeyPath = ("models", model_id)
    own = read_macros(model.get("macros"), (*path, "macros"), doc)
    merged: MacroList = [("MODEL_ID", model_id), *global_macros]
    where: dict[str, KeyPath] = {name: ("macros", name) for name, _ in global_macros}
    positions = {name: index for index, (name, _) in enumerate(merged)}
    for name, value in own:
        where[name] = (*path, "macros", name)
        if name in positions:
            merged[positions[name]] = (name, value)
        else:
            merged.append((name, value))
    table = _resolve(merged, where, budget)
    expanded: dict[str, object] = {}
    for key, item in model.items():
        if key == "macros":
            continue
        if key in ("cmd", "cmdStop") and isinstance(item, str):
            item = strip_comment_lines(item)
        expanded[key] = _expand(item, table, (*path, key), budget)
    return expanded


def _resolve(
    macros: MacroList, where: Mapping[str, KeyPath], budget: ExpansionBudget
) -> dict[str, MacroValue]:
    """Each macro's value expanded with the macros declared before it."""
    table: dict[str, MacroValue] = {}
    for name, value in macros:
        if isinstance(value, str):
            value = _expand_str(value, table, where.get(name, ()), budget)
        table[name] = value
    return table


def _expand_str(
    value: str, table: Mapping[str, MacroValue], path: KeyPath, budget: ExpansionBudget
) -> MacroValue:
    """``value`` with its macros substituted; a lone ``${name}`` keeps the macro's type.

    The length is counted as the substitution goes, so an expansion too long
    is refused before it is built.
    """
    whole = _REF.fullmatch(value)
    if whole is not None and whole.group(1) in table:
        found = table[whole.group(1)]
        if isinstance(found, str):
            budget.charge(len(found), path)  # later stages process every copy
        return found
    limit = max(MAX_EXPANDED, len(value))
    size = len(value)

    def substitute(match: re.Match[str]) -> str:
        nonlocal size
        text = _text(table.get(match.group(1)), match.group(0))
        size += len(text) - len(match.group(0))
        if size > limit:
            raise budget.too_long(path)
        return text

    expanded = _REF.sub(substitute, value)
    if expanded != value:
        budget.charge(len(expanded), path)
    return expanded


def _expand(
    value: object, table: Mapping[str, MacroValue], path: KeyPath, budget: ExpansionBudget
) -> object:
    if isinstance(value, str):
        return _expand_str(value, table, path, budget)
    if isinstance(value, list):
        return [_expand(item, table, (*path, i), budget) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: _expand(item, table, (*path, key), budget) for key, item in value.items()}
    return value


def _text(value: MacroValue | None, placeholder: str) -> str:
    """A macro value as interpolated text; unknown macros stay as written."""
    if value is None:
        return placeholder
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    return str(value)


def go_float(value: float) -> str:
    """Format a float like Go's ``%v`` (``0.7``, ``1``, ``1e+06``), as llama-swap does."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    mantissa = "".join(map(str, digits))
    exp10 = len(mantissa) + exponent - 1
    prefix = "-" if sign else ""
    # strconv's shortest %g switches to an exponent outside [1e-4, 1e6).
    if exp10 < -4 or exp10 >= 6:
        head, tail = mantissa[0], mantissa[1:]
        body = f"{head}.{tail}" if tail else head
        return f"{prefix}{body}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if exponent >= 0:
        return prefix + mantissa + "0" * exponent
    point = len(mantissa) + exponent
    if point > 0:
        return f"{prefix}{mantissa[:point]}.{mantissa[point:]}"
    return f"{prefix}0.{'0' * -point}{mantissa}"


# --- 4. ${PORT} ----------------------------------------------------------------------


def assign_ports(
    models: dict[str, dict[str, object]],
    start_port: int,
    doc: Document,
    *,
    keep: Mapping[str, int] | None = None,
    in_use: Mapping[int, str] | None = None,
) -> dict[str, int]:
    """Give each model whose ``cmd`` uses ``${PORT}`` a port, in place; return them by id.

    Models are visited in byte-sorted ID order (as llama-swap does, so ports
    stay stable when the file is reordered); models without ``${PORT}`` in
    ``cmd`` consume no number. A model without ``proxy`` gets
    ``http://localhost:${PORT}``, which is why its ``cmd`` then needs ``${PORT}``.

    ``keep`` is a reload's previous assignment: a model listed there keeps its
    port (when still at or above ``start_port``), and the others take the lowest
    free numbers, so adding or removing a model never renumbers (and restarts)
    the models that stay. Without it, numbering is llama-swap's.

    ``in_use`` maps each port a running (or stopping) process still holds to
    its model: such a port never goes to a different model, kept or new, so a
    health check or request for one model can never reach another model's
    server while that one finishes its last requests.

    Raises:
        ConfigError: ``${PORT}`` in ``proxy`` (explicit or default) but not in
            ``cmd``, or a port beyond 65535.
    """
    users: list[str] = []
    for model_id in sorted(models, key=lambda name: name.encode()):
        model = models[model_id]
        path: KeyPath = ("models", model_id)
        cmd = model.get("cmd")
        if not isinstance(cmd, str):
            raise doc.error((*path, "cmd"), f"must be a string (got {type_name(cmd)})")
        explicit_proxy = "proxy" in model
        proxy = model.setdefault("proxy", DEFAULT_PROXY)
        if PORT_PLACEHOLDER in cmd:
            users.append(model_id)
        elif isinstance(proxy, str) and PORT_PLACEHOLDER in proxy:
            if not explicit_proxy:
                raise doc.error(
                    (*path, "cmd"),
                    "cmd does not use ${PORT}, so set proxy: the default proxy "
                    "http://localhost:${PORT} needs it",
                )
            raise doc.error((*path, "proxy"), "proxy uses ${PORT} but cmd does not")
    previous = keep or {}
    held = in_use or {}

    def free_for(model_id: str, port: int) -> bool:
        return held.get(port, model_id) == model_id

    ports = {
        model_id: previous[model_id]
        for model_id in users
        if model_id in previous
        and start_port <= previous[model_id] <= _HIGHEST_PORT
        and free_for(model_id, previous[model_id])
    }
    taken = set(ports.values())
    port = start_port
    for model_id in users:
        if model_id in ports:
            continue
        while port in taken or not free_for(model_id, port):
            port += 1
        if port > _HIGHEST_PORT:
            raise doc.error(
                ("models", model_id, "cmd"), f"${{PORT}} would be {port}, beyond {_HIGHEST_PORT}"
            )
        ports[model_id] = port
        port += 1
    budget = ExpansionBudget(doc)  # a port number is never longer than "${PORT}"
    for model_id in users:
        model = models[model_id]
        table: dict[str, MacroValue] = {"PORT": ports[model_id]}
        for key, value in model.items():
            model[key] = _expand(value, table, ("models", model_id, key), budget)
    return {model_id: ports[model_id] for model_id in users}


# --- 5. leftovers ------------------------------------------------------------------


def check_leftovers(
    value: object, path: KeyPath, doc: Document, *, allow_pid: bool = False
) -> None:
    """Reject any ``${...}`` left in ``value`` after expansion.

    Raises:
        ConfigError: naming the placeholder and the key path where it was left.
    """
    if isinstance(value, str):
        for match in _ANY_REF.finditer(value):
            name = match.group(1)
            if name == _PID and allow_pid:
                continue
            raise doc.error(path, _leftover_message(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_leftovers(item, (*path, index), doc, allow_pid=allow_pid)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_leftovers(item, (*path, key), doc, allow_pid=allow_pid)


def check_model_leftovers(model_id: str, model: Mapping[str, object], doc: Document) -> None:
    """:func:`check_leftovers` over a whole model, allowing ``${PID}`` in ``cmdStop``."""
    for key, value in model.items():
        check_leftovers(value, ("models", model_id, key), doc, allow_pid=key == "cmdStop")


def _leftover_message(name: str) -> str:
    placeholder = f"${{{name}}}"
    if name == "PORT":
        return f"{placeholder} is only assigned to models whose cmd uses ${{PORT}}"
    if name == _PID:
        return f"{placeholder} is only available in cmdStop"
    if name == "MODEL_ID":
        return f"{placeholder} is only available inside a model"
    return f"unknown macro '{placeholder}'"
