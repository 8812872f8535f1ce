"""The matrix swap policy: the cheapest combination that lets the target run.

The rules (llama-swap's, see ``docs/swap-policies.md``):

1. The target is running: evict nothing.
2. Otherwise look at every combination, of every set, that contains the target,
   and price it: the sum of the eviction costs of the running models *not* in it.
3. The cheapest wins; a tie goes to the first in visiting order (sets after the
   sets they ``+ref``, each set's combinations in expansion order).
4. Evict the running models outside the winner, in ``running``'s order.
5. A target in no set runs alone: evict everything.

Rule 2 read literally expands every set, and a product of alternatives
explodes (13 three-way choices are 1.6 million combinations). So the solver
never expands. Only the *relevant* models, the target and the running ones,
can change a price, so every combination is seen through its projection onto
them (a bit mask), and pricing "keep the running models in the mask" means
maximising the kept cost, ``weight(mask)``, which only grows with the mask.

Two passes, both over the AST, neither with positions:

1. **Best price** (:meth:`_Search.maximal`). Per node, only the *maximal*
   projections matter: any projection lies inside a maximal one, which holds
   the target too and keeps at least as much. Leaves give their own bit, an OR
   node the maximal ones among its children's, an AND node the maximal unions
   of one from each child. Sets are visited in order; the first set whose
   best weight is strictly the highest holds the winner.
2. **First winner in that set** (:meth:`_Search.first`). "Good enough" (holds
   the target, weight at least the best) is upward closed, so the first
   combination that is good enough is found greedily top-down: an OR node
   descends into its first child that *can* be good enough (one of its maximal
   projections is); an AND node, whose expansion is left-major, fixes each
   child in turn to its first choice that can still be completed by the
   children after it (their maximal unions). Only one path is walked.

A subtree with no relevant model has the empty projection and is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, final

import msgspec

from trio_swap.config.matrix_dsl import (
    And,
    MatrixConfig,
    Model,
    Node,
    Or,
    Ref,
    SetTable,
    compile_matrix,
)
from trio_swap.policy.base import NO_CONTEXT, Placement

__all__ = ["EXPAND_LIMIT", "MatrixPolicy", "Plan"]

#: Most combinations :meth:`MatrixPolicy.expand_set` lists; solving has no limit.
EXPAND_LIMIT: Final = 100_000


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What the matrix decided for one request.

    Attributes:
        evict: running models to stop, in the order they were given.
        set_name: the set whose combination was chosen; None when the target
            was already running or is in no set (it then runs alone).
        cost: the sum of the evicted models' eviction costs.
    """

    evict: tuple[str, ...]
    set_name: str | None
    cost: int


# --- the compiled matrix -----------------------------------------------------


class _Kind(Enum):
    LEAF = 1
    AND = 2
    OR = 3


@dataclass(frozen=True, slots=True, eq=False)
class _Compiled:
    """One AST node as the solver walks it; a ``+ref`` is the referenced set's node itself."""

    kind: _Kind
    support: int  # bit mask of every model in the subtree (one bit, for a leaf)
    first: int  # bit mask of the models in the subtree's first combination
    children: tuple[_Compiled, ...] = ()


def _compile(table: SetTable, bits: Mapping[str, int]) -> dict[str, _Compiled]:
    """Compile every set, referenced sets first (visiting order guarantees it)."""
    compiled: dict[str, _Compiled] = {}

    def walk(node: Node) -> _Compiled:
        match node:
            case Model(model=model):
                return _Compiled(_Kind.LEAF, bits[model], bits[model])
            case Ref(set_name=ref):
                return compiled[ref]
            case Or(children=children):
                kids = tuple(walk(child) for child in children)
                return _Compiled(_Kind.OR, _union(k.support for k in kids), kids[0].first, kids)
            case And(children=children):
                kids = tuple(walk(child) for child in children)
                support, first = _union(k.support for k in kids), _union(k.first for k in kids)
                return _Compiled(_Kind.AND, support, first, kids)

    for name in table.visiting_order:
        compiled[name] = walk(table.roots[name])
    return compiled


def _union(masks: Iterable[int]) -> int:
    result = 0
    for mask in masks:
        result |= mask
    return result


# --- the symbolic search -----------------------------------------------------

_NOTHING: Final[tuple[int, ...]] = (0,)  # the projections of a subtree without relevant models


def _maximal(masks: Iterable[int]) -> tuple[int, ...]:
    """The masks that are not inside another one."""
    unique = set(masks)
    if len(unique) == 1:
        return tuple(unique)
    kept: list[int] = []
    for mask in sorted(unique, key=int.bit_count, reverse=True):
        for other in kept:
            if mask | other == other:
                break
        else:
            kept.append(mask)
    return tuple(kept)


def _unions(left: Iterable[int], right: Iterable[int]) -> tuple[int, ...]:
    return _maximal([a | b for a in left for b in right])


@final
class _Search:
    """One solve's scratch state: which models matter, what they are worth.

    Memos are keyed by ``id(node)``: the compiled nodes outlive the search.
    """

    __slots__ = ("_after", "_goal", "_maximal", "_priced", "_relevant", "_target", "_weights")

    def __init__(self, target: int, priced: Sequence[tuple[int, int]]) -> None:
        self._target = target
        self._priced = priced  # (bit, eviction cost) per running model in the matrix
        self._relevant = _union(bit for bit, _ in priced) | target
        self._maximal: dict[int, tuple[int, ...]] = {}  # node -> its maximal projections
        # AND node -> per child, the maximal unions of the children after it
        self._after: dict[int, list[tuple[int, ...]]] = {}
        self._weights: dict[int, int] = {}
        self._goal = 0

    def weight(self, mask: int) -> int:
        """The eviction cost saved by keeping the running models in ``mask``."""
        weight = self._weights.get(mask)
        if weight is None:
            weight = self._weights[mask] = sum(cost for bit, cost in self._priced if mask & bit)
        return weight

    def best(self, root: _Compiled) -> int | None:
        """The highest weight of a combination of ``root`` holding the target."""
        weights = [self.weight(m) for m in self.maximal(root) if m & self._target]
        return max(weights) if weights else None

    def maximal(self, node: _Compiled) -> tuple[int, ...]:
        """Pass 1: the maximal projections of ``node``'s combinations."""
        if not node.support & self._relevant:
            return _NOTHING
        if node.kind is _Kind.LEAF:
            return (node.support,)
        found = self._maximal.get(id(node))
        if found is not None:
            return found
        if node.kind is _Kind.OR:
            found = _maximal(m for child in node.children for m in self.maximal(child))
        else:
            # Right to left, keeping each suffix for pass 2.
            after: list[tuple[int, ...]] = [_NOTHING] * len(node.children)
            found = _NOTHING
            for i in range(len(node.children) - 1, -1, -1):
                after[i] = found
                masks = self.maximal(node.children[i])
                if masks is not _NOTHING:
                    found = masks if found is _NOTHING else _unions(masks, found)
            self._after[id(node)] = after
        self._maximal[id(node)] = found
        return found

    def first(self, root: _Compiled, goal: int) -> int:
        """Pass 2: the projection of ``root``'s first combination holding the
        target and weighing at least ``goal`` (there must be one)."""
        self._goal = goal
        return self._first(root, _NOTHING)

    def _good(self, mask: int) -> bool:
        return bool(mask & self._target) and self.weight(mask) >= self._goal

    def _first(self, node: _Compiled, completions: tuple[int, ...]) -> int:
        """The projection of ``node``'s first combination that some completion makes good.

        ``completions`` are the maximal projections the rest of the set can
        add to this node's choice; pass 1 must have seen ``node``.
        """
        if not node.support & self._relevant:
            return 0
        head = node.first & self._relevant
        if any(self._good(head | c) for c in completions):
            return head  # the very first combination will do
        if node.kind is _Kind.OR:
            for child in node.children:
                masks = self.maximal(child)
                if any(self._good(m | c) for m in masks for c in completions):
                    return self._first(child, completions)
            raise AssertionError("no good combination: pass 1 and pass 2 disagree")
        if node.kind is _Kind.LEAF:
            raise AssertionError("a leaf that is not good: pass 1 and pass 2 disagree")
        # AND, left-major: fix each child in turn to its first choice that the
        # children after it (their maximal unions) can still complete.
        chosen = 0
        for child, rest in zip(node.children, self._after[id(node)], strict=True):
            if child.support & self._relevant:
                chosen |= self._first(child, _unions(rest, [c | chosen for c in completions]))
        return chosen


# --- the policy --------------------------------------------------------------


@final
class MatrixPolicy:
    """llama-swap's matrix: named sets of models that may run together, priced evictions.

    Built from a loaded config's :class:`~trio_swap.config.model.MatrixConfig`,
    whose sets the loader has already parsed and checked (or with
    :meth:`build`, which compiles one first). Immutable and pure, so the
    scheduler can call :meth:`evictions` on every placement attempt.
    """

    def __init__(
        self, matrix: MatrixConfig, learned_cost: Callable[[str], int | None] | None = None
    ) -> None:
        self._matrix = matrix
        #: The default cost of a model ``evict_costs`` does not list (fit's learned
        #: load time); None, or a None answer, is llama-swap's default of 1.
        self._learned_cost = learned_cost
        self._table: SetTable = matrix.sets
        self._bits: dict[str, int] = {model: 1 << i for i, model in enumerate(self._table.models())}
        compiled = _compile(self._table, self._bits)
        # Visiting order, as (name, root) pairs, per model that can appear in them.
        self._sets_with: dict[str, tuple[tuple[str, _Compiled], ...]] = {
            model: tuple(
                (name, compiled[name])
                for name in self._table.visiting_order
                if compiled[name].support & bit
            )
            for model, bit in self._bits.items()
        }

    @classmethod
    def build(
        cls,
        sets: Mapping[str, str],
        vars: Mapping[str, str] | None = None,
        evict_costs: Mapping[str, int] | None = None,
        models: Collection[str] = (),
    ) -> MatrixPolicy:
        """Compile a matrix (:func:`~trio_swap.config.matrix_dsl.compile_matrix`) and
        build the policy: for tests and benchmarks that have no config file.

        Raises:
            MatrixError: the first problem found: no sets, a bad var, a bad
                cost, then the first bad set in definition order.
        """
        return cls(compile_matrix(sets, vars, evict_costs, models))

    def __repr__(self) -> str:
        return f"<MatrixPolicy {len(self._table.roots)} sets over {len(self._bits)} models>"

    # --- what the config says ---

    @property
    def set_names(self) -> tuple[str, ...]:
        """Set names in definition order."""
        return self._table.definition_order

    @property
    def visiting_order(self) -> tuple[str, ...]:
        """Set names in tie-break order: each set after the sets it references."""
        return self._table.visiting_order

    def expression(self, set_name: str) -> str:
        """The set's DSL string as configured."""
        return self._table.texts[set_name]

    def evict_cost(self, model: str) -> int:
        """What evicting ``model`` costs: ``evict_costs``, else the learned cost, else 1."""
        if self._learned_cost is not None and model not in self._matrix.evict_costs:
            learned = self._learned_cost(model)
            if learned is not None:
                return learned
        return self._matrix.evict_cost(model)

    def expand_set(self, set_name: str, limit: int = EXPAND_LIMIT) -> list[tuple[str, ...]]:
        """Every combination of a set, in expansion order, each as sorted model ids.

        For showing a matrix to people (``trio-swap check --format json``);
        the solver never needs it.

        Raises:
            KeyError: no such set.
            MatrixError: more than ``limit`` combinations.
        """
        return [tuple(sorted(combo)) for combo in self._table.expand(set_name, limit)]

    # --- deciding ---

    def evictions(
        self, target: str, running: Sequence[str], context: Placement = NO_CONTEXT
    ) -> tuple[str, ...]:
        """:class:`~trio_swap.policy.SwapPolicy`: the models :meth:`plan` evicts."""
        return self.plan(target, running).evict

    def plan(self, target: str, running: Sequence[str]) -> Plan:
        """Decide which running models stop so ``target`` can run, and why.

        ``running`` is treated as a set (a repeated model counts once). Pure and
        cheap: it looks only at the target and the running models.
        """
        if target in running:
            return Plan(evict=(), set_name=None, cost=0)
        running = tuple(dict.fromkeys(running))
        candidates = self._sets_with.get(target, ())
        if not candidates:
            return self._evict(running, keep=0, set_name=None)
        priced = [(self._bits[m], self.evict_cost(m)) for m in running if m in self._bits]
        search = _Search(self._bits[target], priced)
        best_weight = -1
        best: tuple[str, _Compiled] | None = None
        for set_name, root in candidates:
            weight = search.best(root)
            # Strict ">": the first set in visiting order keeps a tie.
            if weight is not None and weight > best_weight:
                best_weight, best = weight, (set_name, root)
        assert best is not None, "a candidate set always holds the target"
        set_name, root = best
        return self._evict(running, keep=search.first(root, best_weight), set_name=set_name)

    def explain(self, target: str, running: Sequence[str]) -> str:
        """One or two sentences on what :meth:`plan` decides and why (``trio-swap plan``)."""
        if target in running:
            return f"{target} is already running; nothing has to stop."
        plan = self.plan(target, running)
        if plan.set_name is None:
            head = f"{target} is in no matrix set, so it runs alone."
        else:
            expression = " ".join(self.expression(plan.set_name).split())  # one line
            kept = ", ".join(m for m in dict.fromkeys(running) if m not in plan.evict)
            head = f"{target} runs in set '{plan.set_name}' ({expression})"
            head += f" beside {kept}." if kept else "."
        if not plan.evict:
            return f"{head} Nothing has to stop."
        evicted = ", ".join(f"{m} (cost {self.evict_cost(m)})" for m in plan.evict)
        why = ", the lowest of any set" if plan.set_name is not None else ""
        return f"{head} It evicts {evicted}: total cost {plan.cost}{why}."

    def _evict(self, running: tuple[str, ...], *, keep: int, set_name: str | None) -> Plan:
        evict = tuple(m for m in running if not self._bits.get(m, 0) & keep)
        return Plan(evict=evict, set_name=set_name, cost=sum(map(self.evict_cost, evict)))
