"""The matrix set DSL: parse each set's string, resolve names and ``+refs``, expand.

Pipeline, one set at a time in definition order (so the first bad set is the
one reported): lark parses the string (``grammar.lark``), lark's errors become
plain words (:func:`_syntax_error`), the tree becomes an AST whose leaves are
already resolved to model ids, and every ``+ref`` must name a set. Then, over
all sets, a depth-first walk finds reference cycles and fixes the *visiting
order* the solver breaks ties with.

Expansion (:meth:`SetTable.expand`) is for showing sets to people (``trio-swap
check``); the solver works on the AST and never expands (see ``solver.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, final

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

__all__ = [
    "And",
    "MatrixError",
    "Model",
    "Node",
    "Or",
    "Ref",
    "SetTable",
    "compile_sets",
    "parse_set",
]


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

#: Terminal names in grammar.lark that error messages depend on.
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
        "trio_swap.policy.matrix",
        "grammar.lark",
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
    try:
        return _to_ast(tree, set_name, resolve)
    except RecursionError:
        raise MatrixError("expression is nested too deeply", set_name=set_name) from None


def _to_ast(
    tree: lark.Tree[lark.Token] | lark.Token, set_name: str, resolve: Callable[[str], str | None]
) -> Node:
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
    children = tuple(_to_ast(child, set_name, resolve) for child in tree.children)
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
class SetTable:
    """The parsed sets of one matrix, references checked and cycle-free.

    ``definition_order`` is the config's order. ``visiting_order`` is the
    solver's tie-break order: sets in definition order, each one after the sets
    it references (a depth-first topological order, as llama-swap).
    """

    def __init__(
        self,
        roots: Mapping[str, Node],
        texts: Mapping[str, str],
        visiting_order: tuple[str, ...],
    ) -> None:
        self.roots: Mapping[str, Node] = dict(roots)
        self.texts: Mapping[str, str] = dict(texts)
        self.definition_order: tuple[str, ...] = tuple(roots)
        self.visiting_order = visiting_order

    def __repr__(self) -> str:
        return f"<SetTable {len(self.roots)} sets: {', '.join(self.visiting_order)}>"

    def models(self) -> tuple[str, ...]:
        """Every model some set mentions, in order of first mention."""
        found: dict[str, None] = {}
        for name in self.definition_order:
            stack: list[Node] = [self.roots[name]]
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
            set that does not exist, or a reference cycle.
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
    return SetTable(roots, sets, _visiting_order(refs))


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
