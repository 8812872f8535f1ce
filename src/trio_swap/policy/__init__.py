"""Swap policies: which running models must stop for a target to run. Pure functions."""

from trio_swap.policy.base import SwapPolicy
from trio_swap.policy.build import build_policy
from trio_swap.policy.exclusive import OneAtATime
from trio_swap.policy.fit import FitPolicy
from trio_swap.policy.groups import GroupsPolicy

__all__ = ["FitPolicy", "GroupsPolicy", "OneAtATime", "SwapPolicy", "build_policy"]
