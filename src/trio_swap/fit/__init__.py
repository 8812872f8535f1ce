"""Fit by memory: what each model needs, what the box has, and who goes when it is full.

The parts, each with one job:

- :mod:`.ledger`: what trio-swap has learned per model (measured peaks, load
  times, how often it is asked for) and the effective need derived from it;
- :mod:`.state`: the ledger's small JSON file, so a restart does not forget;
- :mod:`.oom`: recognising an out-of-memory death in a server's output.

The pure swap policy built on the ledger is :mod:`trio_swap.policy.fit`; sizes as
users write them are the config's syntax (:mod:`trio_swap.config.sizes`).
"""
