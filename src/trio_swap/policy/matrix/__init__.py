"""The matrix swap policy: a DSL of models that may run together, and a cost-based solver.

``dsl`` parses and checks the sets and can expand them for display; ``solver``
decides evictions symbolically, without expanding. Build with
:meth:`MatrixPolicy.build` (or :func:`parse_matrix`, the same thing).
"""

from trio_swap.policy.matrix.dsl import MatrixError, SetTable
from trio_swap.policy.matrix.solver import EXPAND_LIMIT, MatrixPolicy, Plan

__all__ = ["EXPAND_LIMIT", "MatrixError", "MatrixPolicy", "Plan", "SetTable", "parse_matrix"]

#: The constructor under a function name: ``parse_matrix(sets, vars, evict_costs, models)``.
parse_matrix = MatrixPolicy.build
