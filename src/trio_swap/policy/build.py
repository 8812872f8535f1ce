"""Choosing the policy a config asks for."""

from __future__ import annotations

from trio_swap.config.model import Config
from trio_swap.policy.base import SwapPolicy
from trio_swap.policy.groups import GroupsPolicy

__all__ = ["build_policy"]


def build_policy(config: Config) -> SwapPolicy:
    """The config's swap policy; the config loader has already validated it."""
    routing = config.routing
    if routing.router == "matrix":
        from trio_swap.policy.matrix import MatrixPolicy

        assert routing.matrix is not None
        return MatrixPolicy.from_config(routing.matrix, list(config.models))
    return GroupsPolicy(routing.groups, config.models)
