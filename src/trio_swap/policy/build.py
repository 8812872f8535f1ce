"""Choosing the policy a config asks for."""

from __future__ import annotations

from functools import partial

from trio_swap.config.model import Config
from trio_swap.fit.ledger import FitLedger, learned_matrix_cost
from trio_swap.policy.base import SwapPolicy
from trio_swap.policy.fit import FitPolicy
from trio_swap.policy.groups import GroupsPolicy
from trio_swap.policy.matrix import MatrixPolicy

__all__ = ["build_policy"]


def build_policy(config: Config, ledger: FitLedger | None = None) -> SwapPolicy:
    """The config's swap policy, from what the loader validated and compiled.

    Parses nothing (the loader compiled the matrix sets), so it cannot fail
    on a config that loaded: reload and serve call it after loading.

    ``ledger`` holds what was learned (load times, measured memory); without
    one, a fresh ledger knows only the config (``trio-swap plan``). With
    ``resources:`` the policy is fit by memory around the groups or matrix,
    or alone when the config has neither (models share the box while they fit).
    """
    routing = config.routing
    inner: SwapPolicy | None
    if routing.router == "matrix":
        assert routing.matrix is not None, "the loader sets matrix for the matrix router"
        learned = partial(learned_matrix_cost, ledger) if ledger is not None else None
        inner = MatrixPolicy(routing.matrix, learned_cost=learned)
    elif routing.groups or not config.resources:
        inner = GroupsPolicy(routing.groups, config.models)
    else:
        inner = None
    if not config.resources:
        assert inner is not None
        return inner
    if ledger is None:
        ledger = FitLedger(config.resources, config.models, ports=config.ports)
    return FitPolicy(ledger, inner)
