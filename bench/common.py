"""What every figure shares: the plan, the result rows, the targets, and small helpers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from procs import ModelPorts, ProcessSet, TrioSwap
from rawhttp import Connection, ResponseReader

__all__ = [
    "ADDED_P50_MS",
    "COLD_DELTA_MS",
    "CONNECTIONS",
    "HEALTH_POLL_S",
    "IDLE_RSS_MB",
    "PACED_RATIO",
    "READINESS_MS",
    "RPS_32",
    "SSE_EVENTS_PER_S",
    "STREAMS",
    "Bench",
    "Plan",
    "Row",
    "check_status",
    "ms",
    "quantile",
    "rate",
    "signed_ms",
    "timed",
]

#: Targets from DESIGN.md "How we measure".
ADDED_P50_MS: Final = 1.0
RPS_32: Final = 1000.0
SSE_EVENTS_PER_S: Final = 30_000.0
PACED_RATIO: Final = 0.97
COLD_DELTA_MS: Final = 30.0
READINESS_MS: Final = 25.0
IDLE_RSS_MB: Final = 60.0

CONNECTIONS: Final = 32
STREAMS: Final = 8
HEALTH_POLL_S: Final = 0.001


@dataclass(frozen=True)
class Plan:
    """How much of each figure to run: ``full`` (~100 s) or ``quick`` (~30 s)."""

    latency_requests: int  # per side per round
    latency_rounds: int
    load_seconds: float  # per side per round
    load_rounds: int
    bulk_tokens: int
    bulk_repeats: int
    paced_tokens: int
    paced_repeats: int
    cold_repeats: int

    @classmethod
    def full(cls) -> Plan:
        return cls(600, 5, 4.0, 3, 100_000, 3, 200, 2, 9)

    @classmethod
    def quick(cls) -> Plan:
        return cls(300, 2, 1.5, 1, 30_000, 1, 100, 1, 3)


@dataclass
class Row:
    """One line of the result table; ``met`` is None for informational rows."""

    figure: str
    direct: str
    proxied: str
    compare: str
    target: str
    met: bool | None
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    """What every figure needs: the running trio-swap, the ports, the plan."""

    swap: TrioSwap
    ports: ModelPorts
    processes: ProcessSet
    plan: Plan
    workdir: Path
    notes: list[str] = field(default_factory=list)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def signed_ms(seconds: float) -> str:
    return ("+" if seconds >= 0 else "-") + ms(abs(seconds))


def rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def quantile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check_status(reader: ResponseReader, what: str) -> None:
    if reader.status != 200:
        raise RuntimeError(f"{what}: HTTP {reader.status}")


def timed(conn: Connection, request: bytes, count: int, what: str) -> list[float]:
    """``count`` sequential exchanges on one connection; seconds per exchange."""
    reader = ResponseReader()
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        conn.exchange(request, reader)
        samples.append(clock() - start)
        check_status(reader, what)
    return samples
