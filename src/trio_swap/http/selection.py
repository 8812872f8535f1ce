"""Profiles and selectors at run time: which name a request really asks for.

Before a model-routed request's name is looked up (not on ``/upstream/``):

1. the **active profile**'s pin for the name, if any, replaces it (``""``:
   the name is turned off while the profile is active, a 404);
2. a **selector** name picks one of its targets (docs/selectors.md):

   * ``pin``: always the first target;
   * ``warm``: the first ready target, else the first starting one, else the
     first asleep one (a wake is much cheaper than a cold start), else the first;
   * ``spillover``: keeps a count of the requests it sent to each target and
     not yet finished (its *reservations*). The *active* targets are local ones
     that are ready or starting and any target with reservations (a local one
     being stopped is skipped). With none active, the first cold target; if the
     least reserved active target has fewer than ``settings.spillover``, that one
     (turns taken among equals); otherwise the next cold target; with none left,
     the least reserved. No target at all: 503.

The choice happens in the same step as the lookup (no ``await`` between), so
two requests never both see a free target; a request takes its choices through
:meth:`Selection.held`, which releases them however the request ends. One
:class:`Selection` lives for the server's life; a reload hands it the new config
and turns the profile off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final, NamedTuple, final

from trio_swap.config.model import Config, SelectorConfig
from trio_swap.errors import NoSelectorTarget

__all__ = ["Choice", "Selection"]

#: Process states, by name, in which a local target counts (kept as strings: this
#: module reads the state's value and so needs nothing from the process layer).
_READY: Final = "ready"
_STARTING: Final = "starting"
_SLEEPING: Final = "sleeping"
_STOPPING: Final = "stopping"


class Choice(NamedTuple):
    """What a requested name became."""

    #: The name to look up (a model id, alias or peer model name).
    name: str
    #: The selector that chose ``name``; None when the client named it.
    selector: str | None = None
    #: The active profile whose pin rewrote the name; None when none did.
    profile: str | None = None
    #: A spillover reservation to release when the request ends.
    reserved: str | None = None


@final
class Selection:
    """The active profile and the spillover reservations, and the choice per request.

    ``state_of`` gives a local model's process state (``"ready"``, ...), or None
    for an unknown model.
    """

    def __init__(self, config: Config, state_of: Callable[[str], str | None]) -> None:
        self._config = config
        self._state_of = state_of
        self.active: str | None = None
        #: Target name -> requests a spillover selector sent there and not finished.
        self._reserved: Counter[str] = Counter()
        #: Selector id -> turns taken among equally loaded targets.
        self._turns: Counter[str] = Counter()

    def switch(self, config: Config) -> None:
        """A reload: the new config's selectors and profiles; no profile is active."""
        self._config = config
        self.active = None

    def activate(self, name: str | None) -> None:
        """Make ``name`` the active profile (None: none).

        Raises:
            KeyError: no such profile.
        """
        if name is not None and name not in self._config.profiles:
            raise KeyError(name)
        self.active = name

    def choose(self, requested: str) -> Choice:
        """The name to look up for ``requested``; reserve a spillover target.

        Raises:
            NoSelectorTarget: a spillover selector whose every target is stopping.
        """
        config = self._config
        name, profile = requested, None
        if self.active is not None:
            pins = config.profiles[self.active].pins
            if requested in pins:
                name, profile = pins[requested], self.active
        selector = config.selectors.get(name)
        if selector is None or config.resolve(name) is not None:
            return Choice(name, None, profile)
        match selector.strategy:
            case "pin":
                return Choice(selector.targets[0], selector.id, profile)
            case "warm":
                return Choice(self._warm(selector), selector.id, profile)
            case _:
                target = self._spillover(selector)
                self._reserved[target] += 1
                return Choice(target, selector.id, profile, reserved=target)

    def release(self, choice: Choice) -> None:
        """The request that made ``choice`` is over (served, failed or gone)."""
        if choice.reserved is not None:
            self._reserved[choice.reserved] -= 1
            if self._reserved[choice.reserved] <= 0:
                del self._reserved[choice.reserved]

    @contextmanager
    def held(self) -> Iterator[Callable[[str], Choice]]:
        """A :meth:`choose` for one request whose reservations all end with the block.

        However the request ends (a body refused after the choice, a scoped
        key's 403, the client gone, a cancel), each reservation it made is
        released exactly once.
        """
        made: list[Choice] = []

        def choose(requested: str) -> Choice:
            choice = self.choose(requested)
            if choice.reserved is not None:
                made.append(choice)
            return choice

        try:
            yield choose
        finally:
            for choice in made:
                self.release(choice)

    def reservations(self) -> Mapping[str, int]:
        return dict(self._reserved)

    def loaded(self, selector: SelectorConfig) -> bool:
        """``/v1/models``' status: pin's first target, or any target, ready or starting."""
        targets = selector.targets[:1] if selector.strategy == "pin" else selector.targets
        return any(self._local_state(t) in (_READY, _STARTING) for t in targets)

    def _local_state(self, target: str) -> str | None:
        model_id = self._config.resolve(target)
        return None if model_id is None else self._state_of(model_id)

    def _warm(self, selector: SelectorConfig) -> str:
        states = [self._local_state(t) for t in selector.targets]
        for wanted in (_READY, _STARTING, _SLEEPING):
            for target, state in zip(selector.targets, states, strict=True):
                if state == wanted:
                    return target
        return selector.targets[0]

    def _spillover(self, selector: SelectorConfig) -> str:
        active: list[str] = []
        cold: list[str] = []
        for target in selector.targets:
            state = self._local_state(target)
            if self._reserved[target] > 0 or state in (_READY, _STARTING):
                active.append(target)
            elif state != _STOPPING:  # a local one going away is no candidate
                cold.append(target)
        if not active:
            if not cold:
                raise NoSelectorTarget(selector.id)
            return cold[0]
        least = min(self._reserved[t] for t in active)
        if least < selector.spillover or not cold:
            tied = [t for t in active if self._reserved[t] == least]
            turn = self._turns[selector.id]
            self._turns[selector.id] = turn + 1
            return tied[turn % len(tied)]
        return cold[0]
