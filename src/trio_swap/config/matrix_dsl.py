"""The ``matrix`` block: its set DSL parsed, names resolved, checked once, at load.

The matrix is the config file's own syntax, so it is compiled here, by the
loader, and nowhere else: :func:`compile_matrix` turns ``vars``,
``evict_costs`` and ``sets`` into a :class:`MatrixConfig` whose sets are
already syntax trees over model ids. The solver (``policy/matrix/``) builds
its bit masks from that and never sees a string.

Pipeline, one set at a time in definition order (so the first bad set is the
one reported): lark parses the string (``matrix_dsl.lark``), lark's errors
become plain words (:func:`_syntax_error`), the tree becomes an AST whose
leaves are already resolved to model ids, and every ``+ref`` must name a set.
Then, over all sets, a depth-first walk finds reference cycles and fixes the
*visiting order* the solver breaks ties with, and no set may nest deeper than
:data:`MAX_DEPTH`, counting the sets it ``+ref``-s: the solver and
:meth:`SetTable.expand` recurse over the tree, and a request must never meet
Python's recursion limit.

Expansion (:meth:`SetTable.expand`) is for showing sets to people (``trio-swap
check``); the solver works on the AST and never expands (see
``policy/matrix/solver.py``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, final

import lark
import msgspec
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

__all__ = [
    "DEFAULT_EVICT_COST",
    "MAX_DEPTH",
    "And",
    "MatrixConfig",
    "MatrixError",
    "Model",
    "Node",
    "Or",
    "Ref",
    "SetTable",
    "compile_matrix",
    "compile_sets",
    "parse_set",
]

#: What evicting a model costs when ``evict_costs`` does not say.
DEFAULT_EVICT_COST: Final = 1
#: How deep a set may nest, counting through its ``+refs`` (real sets nest 2 or 3).
MAX_DEPTH: Final = 100

_VAR_NAME: Final = re.compile(r"[A-Za-z0-9.-]{1,32}")


class MatrixError(Exception):
    """A matrix config the policy cannot use, said in plain words.

    Attributes:
        message: what is wrong, without the set name (``unknown name 'x' ...``).
        set_name: the set whose expression is wrong, or None when the problem is
            elsewhere (``vars``, ``evict_costs``, no sets at all).
        position: 0-based offset into the set's string where the problem
            starts (newlines count as one character), or None when it is about
            the whole string or not about a string.
        key_path: where the problem is, relative to the ``matrix`` block, for
            the config loader to point at a line: ``("sets", name)``,
            ``("vars", name)``, ``("evict_costs", key)`` or ``("sets",)``.
    """

    def __init__(
        self,
        message: str,
        *,
        set_name: str | None = None,
        position: int | None = None,
        key_path: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.set_name = set_name
        self.position = position
        if key_path is None:
            key_path = ("sets",) if set_name is None else ("sets", set_name)
        self.key_path = key_path

    @property
    def detail(self) -> str:
        """``message`` with the column added when it does not say it already."""
        if self.position is None or "column" in self.message:
            return self.message
        return f"{self.message} (column {self.position})"

    def __str__(self) -> str:
        # "set 'a' refers to undefined set 'b'" names its set already.
        if self.set_name is None or self.message.startswith(f"set '{self.set_name}' "):
            return self.message
        return f"set '{self.set_name}': {self.message}"

    def __repr__(self) -> str:
        return (
            f"MatrixError({self.message!r}, set_name={self.set_name!r}, position={self.position!r})"
        )


# --- the AST -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Model:
    """A leaf: one model. ``name`` is what the set's string says (a var or the id)."""

    model: str
    name: str
    position: int


@dataclass(frozen=True, slots=True)
class Ref:
    """``+name``: the combinations of another set, inlined."""

    set_name: str
    position: int


@dataclass(frozen=True, slots=True)
class And:
    """Every union of one combination from each child (left-major). Two or more children."""

    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """The children's combinations one after another. Two or more children."""

    children: tuple[Node, ...]


Node = Model | Ref | And | Or


# --- parsing -----------------------------------------------------------------

#: Terminal names in matrix_dsl.lark that error messages depend on.
_NAME: Final = "NAME"
_REF: Final = "REF"
_OPERATORS: Final = {"_AND": "&", "_OR": "|"}
_LPAR: Final = "_LPAR"
_RPAR: Final = "_RPAR"
_END: Final = "$END"


@functools.cache
def _parser() -> lark.Lark:
    """The LALR parser, built once per process (building it costs tens of ms)."""
    return lark.Lark.open_from_package(
        "trio_swap.config",
        "matrix_dsl.lark",
        parser="lalr",
        lexer="basic",
        maybe_placeholders=False,
    )


def parse_set(set_name: str, text: str, resolve: Callable[[str], str | None]) -> Node:
    """Parse one set's string into an AST whose leaves are model ids.

    Args:
        set_name: named in errors.
        text: the DSL string.
        resolve: maps a name to a model id (a var first, then a model id), or
            None when the name is neither.

    Raises:
        MatrixError: a syntax error or an unknown name, with its position.
    """
    if not text.strip():
        raise MatrixError("empty expression", set_name=set_name)
    try:
        tree = _parser().parse(text)
    except (UnexpectedCharacters, UnexpectedToken, UnexpectedEOF) as exc:
        position, message = _syntax_error(text, exc)
        raise MatrixError(message, set_name=set_name, position=position) from None
    return _to_ast(tree, set_name, resolve, 1)


def _to_ast(
    tree: lark.Tree[lark.Token] | lark.Token,
    set_name: str,
    resolve: Callable[[str], str | None],
    depth: int,
) -> Node:
    if depth > MAX_DEPTH:  # before Python's recursion limit, wherever the caller's stack is
        raise MatrixError(_too_deep(), set_name=set_name)
    if isinstance(tree, lark.Token):
        position = tree.start_pos or 0
        if tree.type == _REF:
            return Ref(tree.value[1:], position)
        model = resolve(tree.value)
        if model is None:
            raise MatrixError(
                f"unknown name '{tree.value}' (not a var or a model id)",
                set_name=set_name,
                position=position,
            )
        return Model(model, tree.value, position)
    children = tuple(_to_ast(child, set_name, resolve, depth + 1) for child in tree.children)
    if tree.data == "and_expr":
        return And(children)
    return Or(children)


# --- lark's errors in plain words --------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tok:
    type: str
    value: str
    position: int


def _tokens(text: str) -> Iterator[_Tok]:
    """The tokens lark sees, up to the first character it cannot lex."""
    try:
        for token in _parser().lex(text):
            yield _Tok(token.type, token.value, token.start_pos or 0)
    except UnexpectedCharacters:
        return


def _syntax_error(
    text: str, exc: UnexpectedCharacters | UnexpectedToken | UnexpectedEOF
) -> tuple[int | None, str]:
    """Say what is wrong from the token lark stopped at and the one before it.

    The grammar is small enough that those two tokens always tell the story;
    lark's own message (``Expected one of: RPAR, __ANON_0``) never reaches a user.
    """
    if isinstance(exc, UnexpectedCharacters):
        position = exc.pos_in_stream or 0
        char = text[position]
        if char == "+":
            return position, f"'+' at column {position} must be immediately followed by a set name"
        shown = char if char.isprintable() else repr(char)[1:-1]
        return position, f"unexpected character '{shown}' at column {position}"

    tokens = list(_tokens(text))
    index = len(tokens)  # $END (and UnexpectedEOF): past the last token
    if isinstance(exc, UnexpectedToken) and exc.token.type != _END:
        start = exc.token.start_pos
        index = next((i for i, tok in enumerate(tokens) if tok.position == start), len(tokens))
    current = tokens[index] if index < len(tokens) else None
    previous = tokens[index - 1] if 0 < index <= len(tokens) else None
    return _classify(tokens, previous, current)


def _classify(
    tokens: list[_Tok], previous: _Tok | None, current: _Tok | None
) -> tuple[int | None, str]:
    # (1) An operator followed by something that is not an operand.
    if (
        previous is not None
        and previous.type in _OPERATORS
        and (current is None or current.type in _OPERATORS or current.type == _RPAR)
    ):
        return previous.position, f"operator '{previous.value}' has nothing on its right"
    # (2) The input ends where an operand or ')' is still needed.
    if current is None:
        if previous is None:
            return None, "empty expression"
        opening = _unclosed_parenthesis(tokens)
        if opening is not None:
            return opening, f"'(' at column {opening} is never closed"
        return previous.position, f"unexpected end after '{previous.value}'"
    # (3) An operator with no operand before it.
    if current.type in _OPERATORS:
        return current.position, f"operator '{current.value}' has nothing on its left"
    # (4) Parentheses: empty, or a ')' without its '('.
    if current.type == _RPAR:
        if previous is not None and previous.type == _LPAR:
            return previous.position, f"empty parentheses at column {previous.position}"
        return current.position, f"')' at column {current.position} has no matching '('"
    # (5) Two operands side by side.
    if previous is not None and previous.type in (_NAME, _REF, _RPAR):
        what = "names" if {previous.type, current.type} <= {_NAME, _REF} else "expressions"
        return (
            current.position,
            f"two {what} without an operator between them at column {current.position}; use & or |",
        )
    return current.position, f"unexpected '{current.value}' at column {current.position}"


def _unclosed_parenthesis(tokens: list[_Tok]) -> int | None:
    """Position of the innermost '(' still open at the end of ``tokens``."""
    open_at: list[int] = []
    for tok in tokens:
        if tok.type == _LPAR:
            open_at.append(tok.position)
        elif tok.type == _RPAR and open_at:
            open_at.pop()
    return open_at[-1] if open_at else None


# --- all sets together -------------------------------------------------------


@final
class SetTable(msgspec.Struct, frozen=True, kw_only=True):
    """The parsed sets of one matrix, references checked, cycle-free, depth-limited.

    ``definition_order`` is the config's order. ``visiting_order`` is the
    solver's tie-break order: sets in definition order, each one after the sets
    it references (a depth-first topological order, as llama-swap).
    Two tables are equal when their sets are written the same way.
    """

    #: Set name -> its syntax tree (leaves are model ids), in definition order.
    roots: dict[str, Node]
    #: Set name -> its DSL string as configured.
    texts: dict[str, str]
    visiting_order: tuple[str, ...]

    @property
    def definition_order(self) -> tuple[str, ...]:
        return tuple(self.roots)

    def __repr__(self) -> str:
        return f"<SetTable {len(self.roots)} sets: {', '.join(self.visiting_order)}>"

    def models(self) -> tuple[str, ...]:
        """Every model some set mentions, in order of first mention."""
        found: dict[str, None] = {}
        for root in self.roots.values():
            stack: list[Node] = [root]
            while stack:
                match stack.pop():
                    case Model(model=model):
                        found[model] = None
                    case And(children=children) | Or(children=children):
                        stack.extend(reversed(children))
                    case Ref():
                        pass  # its set is walked in its own right
        return tuple(found)

    def expand(self, name: str, limit: int | None = None) -> list[frozenset[str]]:
        """Every combination of set ``name``, in expansion order, duplicates removed.

        ``a & b`` is each union of one combination of ``a`` with one of ``b``
        (``a``'s combinations in the outer loop); ``a | b`` is ``a``'s then
        ``b``'s; a combination that already appeared keeps its first place.

        Raises:
            KeyError: no such set.
            MatrixError: some part of the set has more than ``limit``
                combinations (the solver never expands, so only listing has a limit).
        """
        memo: dict[str, list[frozenset[str]]] = {}

        def over_limit() -> MatrixError:
            return MatrixError(
                f"expands to more than {limit} combinations, too many to list",
                set_name=name,
            )

        def walk(node: Node) -> list[frozenset[str]]:
            match node:
                case Model(model=model):
                    return [frozenset((model,))]
                case Ref(set_name=ref):
                    if ref not in memo:
                        memo[ref] = walk(self.roots[ref])
                    return memo[ref]
                case Or(children=children):
                    seen: dict[frozenset[str], None] = {}
                    for child in children:
                        seen.update(dict.fromkeys(walk(child)))
                        if limit is not None and len(seen) > limit:
                            raise over_limit()
                    return list(seen)
                case And(children=children):
                    combos = walk(children[0])
                    for child in children[1:]:
                        right = walk(child)
                        product: dict[frozenset[str], None] = {}
                        for left in combos:
                            for other in right:
                                product[left | other] = None
                            if limit is not None and len(product) > limit:
                                raise over_limit()
                        combos = list(product)
                    return combos

        return walk(self.roots[name])


def compile_sets(sets: Mapping[str, str], resolve: Callable[[str], str | None]) -> SetTable:
    """Parse and check every set; errors come for the first bad set in definition order.

    Raises:
        MatrixError: no sets, a syntax error, an unknown name, a ``+ref`` to a
            set that does not exist, a reference cycle, or a set nesting
            deeper than :data:`MAX_DEPTH` through its ``+refs``.
    """
    if not sets:
        raise MatrixError("the matrix must define at least one set")
    roots: dict[str, Node] = {}
    refs: dict[str, dict[str, int]] = {}
    for set_name, text in sets.items():
        root = parse_set(set_name, text, resolve)
        found = _refs(root)
        for ref, position in found.items():
            if ref not in sets:
                raise MatrixError(
                    f"set '{set_name}' refers to undefined set '{ref}'",
                    set_name=set_name,
                    position=position,
                )
        roots[set_name] = root
        refs[set_name] = found
    order = _visiting_order(refs)
    _check_depth(roots, order)
    return SetTable(roots=roots, texts=dict(sets), visiting_order=order)


def _refs(node: Node) -> dict[str, int]:
    """The sets ``node`` refers to, left to right, each with its first position."""
    found: dict[str, int] = {}
    stack: list[Node] = [node]
    while stack:
        match stack.pop():
            case Ref(set_name=ref, position=position):
                found.setdefault(ref, position)
            case And(children=children) | Or(children=children):
                stack.extend(reversed(children))
            case Model():
                pass
    return found


def _visiting_order(refs: Mapping[str, Mapping[str, int]]) -> tuple[str, ...]:
    """Depth-first post-order over the sets in definition order; raise on a cycle.

    Iterative, so a long chain of ``+refs`` cannot hit Python's recursion limit.
    """
    done: set[str] = set()
    order: list[str] = []
    for start in refs:
        if start in done:
            continue
        path = [start]
        pending = [iter(refs[start])]
        while pending:
            ref = next(pending[-1], None)
            if ref is None:
                pending.pop()
                finished = path.pop()
                done.add(finished)
                order.append(finished)
            elif ref in path:
                cycle = [*path[path.index(ref) :], ref]
                raise MatrixError(
                    f"circular reference: {' -> '.join(cycle)}",
                    set_name=cycle[0],
                    position=refs[cycle[0]][cycle[1]],
                )
            elif ref not in done:
                path.append(ref)
                pending.append(iter(refs[ref]))
    return tuple(order)


def _check_depth(roots: Mapping[str, Node], visiting_order: tuple[str, ...]) -> None:
    """No set nests deeper than :data:`MAX_DEPTH`, a ``+ref`` counting as the set it names.

    A chain of sets each ``+ref``-ing the next is as deep as one set written
    out, and the solver recurses through it the same way. Each set's own tree
    is already at most :data:`MAX_DEPTH` deep, so this recursion is bounded.
    """
    depths: dict[str, int] = {}

    def depth(node: Node) -> int:
        match node:
            case Model():
                return 1
            case Ref(set_name=ref):
                return depths[ref]
            case And(children=children) | Or(children=children):
                return 1 + max(depth(child) for child in children)

    for name in visiting_order:  # referenced sets come first
        depths[name] = depth(roots[name])
        if depths[name] > MAX_DEPTH:
            raise MatrixError(_too_deep(), set_name=name)


def _too_deep() -> str:
    return f"nests more than {MAX_DEPTH} levels deep (counting the sets it +refs); write it flatter"


# --- the whole block ---------------------------------------------------------


@final
class MatrixConfig(msgspec.Struct, frozen=True, kw_only=True):
    """llama-swap's ``matrix``, checked and compiled: which models may run together,
    and what evicting each one costs.

    Built by :func:`compile_matrix` (the loader calls it once per load); the
    swap policy (:class:`~trio_swap.policy.matrix.MatrixPolicy`) is built from
    it and never parses anything.
    """

    #: Short name -> model id, as written.
    vars: dict[str, str] = msgspec.field(default_factory=dict)
    #: Model id -> positive eviction cost; a model not listed costs
    #: :data:`DEFAULT_EVICT_COST`. (The file may key a cost by var; resolved here.)
    evict_costs: dict[str, int] = msgspec.field(default_factory=dict)
    #: The sets, parsed.
    sets: SetTable

    def evict_cost(self, model: str) -> int:
        """What evicting ``model`` costs."""
        return self.evict_costs.get(model, DEFAULT_EVICT_COST)


def compile_matrix(
    sets: Mapping[str, str],
    vars: Mapping[str, str] | None = None,
    evict_costs: Mapping[str, int] | None = None,
    models: Collection[str] = (),
) -> MatrixConfig:
    """Validate a matrix block and compile its sets.

    Args:
        sets: set name → DSL string, in definition order (at least one).
        vars: short name → model id. Names are 1 to 32 characters of
            ``A-Z a-z 0-9 . -``; targets must be model ids (not aliases).
        evict_costs: var or model id → positive int (default 1 per model).
        models: every configured model id.

    Raises:
        MatrixError: the first problem found: no sets, a bad var, a bad
            cost, then the first bad set in definition order. ``key_path``
            locates it in the block.
    """
    known = frozenset(models)
    if not sets:
        raise MatrixError("the matrix must define at least one set")
    var_map = dict(vars or {})
    for name, target in var_map.items():
        if not _VAR_NAME.fullmatch(name):
            raise MatrixError(
                f"var name '{name}' must be 1 to 32 characters, each a letter, a digit, '.' or '-'",
                key_path=("vars", name),
            )
        if target not in known:
            raise MatrixError(
                f"var '{name}' points to '{target}', which is not a model id"
                " (aliases are not accepted)",
                key_path=("vars", name),
            )

    def resolve(name: str) -> str | None:
        if name in var_map:
            return var_map[name]
        return name if name in known else None

    costs = _resolve_costs(evict_costs or {}, resolve)
    return MatrixConfig(vars=var_map, evict_costs=costs, sets=compile_sets(sets, resolve))


def _resolve_costs(
    evict_costs: Mapping[str, int], resolve: Callable[[str], str | None]
) -> dict[str, int]:
    """Key eviction costs by model id; each model may be priced once."""
    costs: dict[str, int] = {}
    priced_as: dict[str, str] = {}
    for key, value in evict_costs.items():
        model = resolve(key)
        if model is None:
            raise MatrixError(
                f"evict cost key '{key}' is not a var or a model id", key_path=("evict_costs", key)
            )
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MatrixError(
                f"evict cost of '{key}' must be a positive integer, got {value!r}",
                key_path=("evict_costs", key),
            )
        if model in priced_as:
            raise MatrixError(
                f"model '{model}' has two evict costs (as '{priced_as[model]}' and as '{key}')",
                key_path=("evict_costs", key),
            )
        priced_as[model] = key
        costs[model] = value
    return costs
