"""Observability: Prometheus metrics (``/metrics``) and the per-request activity log.

Deliberately empty: :mod:`trio_swap.upstream.process` imports :mod:`.hooks`,
and importing the package must not pull in ``prometheus_client`` or anything
that imports the process module back.
"""
