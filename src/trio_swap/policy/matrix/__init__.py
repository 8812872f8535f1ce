"""The matrix swap policy: a cost-based solver over the sets of a loaded config.

The sets themselves (the DSL, its parsing and checks) belong to the config
file and live in :mod:`trio_swap.config.matrix_dsl`; the loader compiles them
once into a :class:`~trio_swap.config.model.MatrixConfig`, and
:class:`MatrixPolicy` decides evictions from that, symbolically, without
expanding. :meth:`MatrixPolicy.build` (or :func:`parse_matrix`, the same
thing) compiles and builds in one step, for code without a config file.
"""

# MatrixError is the DSL's, re-exported: build() and expand_set() raise it.
from trio_swap.config.matrix_dsl import MatrixError
from trio_swap.policy.matrix.solver import EXPAND_LIMIT, MatrixPolicy, Plan

__all__ = ["EXPAND_LIMIT", "MatrixError", "MatrixPolicy", "Plan", "parse_matrix"]

#: The constructor under a function name: ``parse_matrix(sets, vars, evict_costs, models)``.
parse_matrix = MatrixPolicy.build
