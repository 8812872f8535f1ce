"""``performance:``, validated: how often CPU, memory and GPUs are sampled.

llama-swap's keys and defaults::

    performance:
      disabled: false     # true: no sampling; /api/performance answers 503
      every: 5s           # a Go duration ("15s", "1m30s", "1.5m"); at least 5s

``every`` takes Go's duration syntax (what llama-swap's YAML decoder reads)
and, trio-swap's own, a plain number of seconds, like trio-swap's other
durations. llama-swap reads a bare number as nanoseconds and so refuses it
(below 5s); here ``every: 10`` means ten seconds. Each malformed value is a
located :class:`~trio_swap.config.errors.ConfigError`.
"""

from __future__ import annotations

import math
import re
from typing import Final

from trio_swap.config.model import MIN_PERFORMANCE_EVERY, PerformanceConfig
from trio_swap.config.schema import RawPerformance
from trio_swap.config.yamlsource import Document, KeyPath

__all__ = ["check_performance", "parse_duration"]

#: Go's units (``time.ParseDuration``): both spellings of the micro sign.
_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART: Final = r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_DURATION: Final = re.compile(rf"[+-]?(?:{_PART})+", re.ASCII)
_PARTS: Final = re.compile(_PART, re.ASCII)
#: Go's longest duration (2**63 - 1 nanoseconds, about 292 years).
_LONGEST: Final = (2**63 - 1) / 1e9
_EXAMPLE: Final = "a duration such as '15s' or '1m30s', or a number of seconds"


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration string (``"1m30s"`` -> 90.0); None if it is not one.

    As Go: ``"0"`` alone needs no unit, a sign may lead, components add up, and
    a duration longer than Go's int64 of nanoseconds is refused.
    """
    text = text.strip()
    if text in ("0", "+0", "-0"):
        return 0.0
    if len(text) > 100 or _DURATION.fullmatch(text) is None:
        return None
    total = sum(float(number) * _UNITS[unit] for number, unit in _PARTS.findall(text))
    if total > _LONGEST:
        return None
    return -total if text.startswith("-") else total


def check_performance(raw: RawPerformance | None, doc: Document) -> PerformanceConfig:
    """Top-level ``performance:``; absent or null: sampling on, every 5 s."""
    if raw is None:
        return PerformanceConfig()
    return PerformanceConfig(enabled=not raw.disabled, every=_every(raw.every, doc))


def _every(value: str | float, doc: Document) -> float:
    path: KeyPath = ("performance", "every")
    if isinstance(value, str):
        seconds = parse_duration(value)
        if seconds is None:
            raise doc.error(path, f"must be {_EXAMPLE} (got {value!r})")
    else:
        if not math.isfinite(value):
            raise doc.error(path, f"must be {_EXAMPLE} (got {value})")
        seconds = float(value)
    if seconds < MIN_PERFORMANCE_EVERY:
        shown = repr(value) if isinstance(value, str) else f"{value:g}"
        raise doc.error(path, f"must be at least {MIN_PERFORMANCE_EVERY:g}s (got {shown})")
    return seconds
