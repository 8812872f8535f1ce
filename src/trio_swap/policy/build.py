"""Choosing the policy a config asks for."""

from __future__ import annotations

from trio_swap.config.model import Config
from trio_swap.policy.base import SwapPolicy
from trio_swap.policy.groups import GroupsPolicy
from trio_swap.policy.matrix import MatrixPolicy

__all__ = ["build_policy"]


def build_policy(config: Config) -> SwapPolicy:
    """The config's swap policy, from what the loader validated and compiled.

    Parses nothing (the loader compiled the matrix sets), so it cannot fail
    on a config that loaded: reload and serve call it after loading.
    """
    routing = config.routing
    if routing.router == "matrix":
        assert routing.matrix is not None, "the loader sets matrix for the matrix router"
        return MatrixPolicy(routing.matrix)
    return GroupsPolicy(routing.groups, config.models)
