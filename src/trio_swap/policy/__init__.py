"""Swap policies: which running models must stop for a target to run. Pure functions."""

from trio_swap.policy.base import SwapPolicy
from trio_swap.policy.exclusive import OneAtATime

__all__ = ["OneAtATime", "SwapPolicy"]
