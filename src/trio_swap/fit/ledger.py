"""What trio-swap has learned about each model, and the need and cost it derives.

The router owns the ledger: it reports measurements, loads and requests
(:meth:`FitLedger.measured`, :meth:`~FitLedger.loaded`,
:meth:`~FitLedger.requested`) from its own task, and the pure fit policy reads
the derived numbers. No I/O here: :mod:`trio_swap.fit.state` saves and restores
the :class:`Learned` records.

**Effective need**, per resource (docs/swap-policies.md#fit):

1. declared (``needs:``), unless the model was measured above it (an overrun):
   then the measured peak plus the margin;
2. else the measured peak plus :data:`MARGIN`;
3. else an estimate: the size of the model files its ``cmd`` names, plus the margin;
4. else the whole resource (nothing to go on: it needs everything free);

except for a resource trio-swap does not measure (anything but ``ram`` and
``vramN``, e.g. ``slots``): not declared, it is 0 (nothing could ever tell);

never less than a floor raised after an out-of-memory start, never more than
the resource itself (a model that ran alone may always run alone).

**Eviction cost**: ``load_seconds * (1 + demand)``, where ``load_seconds`` is
the moving average of its loads (:data:`DEFAULT_LOAD_SECONDS` before the
first) and ``demand`` counts its recent requests, each weighted by
``2^(-k / DEMAND_HALF_LIFE)`` where ``k`` is the number of requests (to any
model) that arrived after it: the expected seconds of loading that evicting it
will cost, weighted by how likely it is to be wanted back soon. Counting in
requests, not seconds, makes the rule free of a time scale: it ranks the same
whether loads take half a second or a minute. Half-lives of 3 to 20 requests
were compared on replayed traces with locality (``bench/churn.py``): 5 had
the fewest loads across trace shapes, 5-11 % fewer than LRU and than a
10-minute half-life in seconds (docs/benchmarks.md).
"""

from __future__ import annotations

import enum
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final, final

import msgspec

from trio_swap.config.model import ModelConfig

__all__ = [
    "DEFAULT_LOAD_SECONDS",
    "DEFAULT_WAKE_SHARE",
    "DEMAND_HALF_LIFE",
    "FORMULA",
    "LOAD_SMOOTHING",
    "MARGIN",
    "Basis",
    "FitLedger",
    "Learned",
    "fingerprint",
    "is_measured",
    "learned_matrix_cost",
]

#: Headroom added to a measured or estimated size (10 %): allocations grow a
#: little after the first measurement (buffers, a longer KV cache in use).
_MARGIN_PERCENT: Final = 10
MARGIN: Final = _MARGIN_PERCENT / 100
#: Weight of the newest load in the moving average of load times.
LOAD_SMOOTHING: Final = 0.3
#: The load time assumed before a model was ever loaded.
DEFAULT_LOAD_SECONDS: Final = 1.0
#: A request followed by this many others counts half as much in ``demand``.
DEMAND_HALF_LIFE: Final = 5.0
#: A wake's assumed share of a load before the first wake was timed (vLLM reports
#: wakes 18-200x faster than a reload; a tenth is a cautious guess).
DEFAULT_WAKE_SHARE: Final = 0.1


#: The rules above in one paragraph, for ``/api/fit`` and ``trio-swap plan`` readers.
FORMULA: Final = (
    "eviction cost = load_seconds * (1 + demand); demand = recent requests, each weighted "
    f"2^(-k / {DEMAND_HALF_LIFE:g}), k = requests (to any model) since. Victims: the set "
    "that frees enough of every resource with the fewest pinned, then busy models, "
    "then the lowest total cost. "
    f"Need = declared, else measured peak + {MARGIN:.0%}, else model files + {MARGIN:.0%}, "
    "else the whole resource. A sleep: model may sleep instead (cost wake_seconds * "
    "(1 + demand)); asleep it holds its measured asleep footprint + margin (before one: "
    "its ram need plus its GPU needs, in ram); stopping a sleeper costs "
    "(load_seconds - wake_seconds) * (1 + demand)."
)


class Basis(enum.StrEnum):
    """Where an effective need comes from (shown in the UI, ``/api/fit`` and ``plan``)."""

    DECLARED = "declared"
    #: A resource trio-swap cannot measure (``slots``), not declared: 0.
    UNDECLARED = "undeclared"
    MEASURED = "measured"
    ESTIMATED = "estimated"
    UNKNOWN = "unknown"


class Learned(msgspec.Struct, kw_only=True):
    """What survives a restart about one command of a model (its :func:`fingerprint`)."""

    #: :func:`fingerprint` of the command the numbers were learned with (the key).
    fingerprint: str
    #: The model id it was learned under (for people reading the file).
    model: str = ""
    #: Wall-clock time of the last change (the file keeps the most recent entries).
    updated: float = 0.0
    #: Highest footprint ever measured, bytes per resource.
    peak: dict[str, int] = msgspec.field(default_factory=dict)
    #: Lowest need allowed, raised when a start ran out of memory.
    floor: dict[str, int] = msgspec.field(default_factory=dict)
    #: Moving average of load times (spawn to ready), seconds; None before a load.
    load_seconds: float | None = None
    loads: int = 0
    #: Highest footprint measured while asleep (``sleep:``), bytes per resource.
    asleep_peak: dict[str, int] = msgspec.field(default_factory=dict)
    #: Moving average of wake times (wake calls, check, test request), seconds.
    wake_seconds: float | None = None
    wakes: int = 0


_PORT_TOKEN = re.compile(r"(?<!\d)(\d{2,5})(?!\d)")
_MEASURED = re.compile(r"ram|vram\d+")


def is_measured(resource: str) -> bool:
    """Whether trio-swap measures ``resource`` itself (``ram``, ``vram0``, ``vram1``...)."""
    return _MEASURED.fullmatch(resource) is not None


def fingerprint(model: ModelConfig, port: int | None = None) -> str:
    """A short hash of what decides a model's memory: its command and environment.

    The ``${PORT}`` number trio-swap assigned is left out, so renumbering ports
    does not forget what was learned; any other change (context size, quant,
    a flag) starts learning afresh.
    """
    argv = list(model.cmd)
    if port is not None:
        text = str(port)
        argv = [_PORT_TOKEN.sub(lambda m: "${PORT}" if m[1] == text else m[1], a) for a in argv]
    digest = hashlib.sha256(msgspec.json.encode([argv, list(model.env)]))
    return digest.hexdigest()[:16]


@final
class _Demand:
    """A request count that halves every :data:`DEMAND_HALF_LIFE` requests (to any model)."""

    __slots__ = ("at", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.at = 0.0

    def add(self, now: float) -> None:
        self.value = self.read(now) + 1.0
        self.at = now

    def read(self, now: float) -> float:
        if self.value == 0.0:
            return 0.0
        return float(self.value * 2.0 ** (-max(0.0, now - self.at) / DEMAND_HALF_LIFE))

    # ``now`` and ``at`` count requests, not seconds (FitLedger._requests).


@final
class FitLedger:
    """Learned numbers per model, and the needs and costs the fit policy reads.

    ``resources`` is what the box has (empty: fit is off, but load times are
    still learned for the matrix's default costs). ``estimates`` are model
    file sizes in bytes, looked up by the caller (a ``stat`` per file).
    """

    def __init__(
        self,
        resources: Mapping[str, int],
        models: Mapping[str, ModelConfig],
        *,
        ports: Mapping[str, int] | None = None,
        estimates: Mapping[str, int] | None = None,
        learned: Mapping[str, Learned] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resources: dict[str, int] = dict(resources)
        self._models: dict[str, ModelConfig] = {}
        self._ports: dict[str, int] = {}
        self._estimates: dict[str, int] = {}
        #: Every command ever learned (the file's and this run's), by fingerprint.
        self._entries: dict[str, Learned] = dict(learned or {})
        #: Model id -> the entry of its current command.
        self._learned: dict[str, Learned] = {}
        self._clock = clock
        self._footprint: dict[str, dict[str, int]] = {}
        #: Models asleep now (the router's view), in the order it reported them.
        self._asleep: tuple[str, ...] = ()
        self._demand: dict[str, _Demand] = {}
        #: Requests seen so far: the clock ``demand`` decays on.
        self._requests = 0
        #: The latest time the router reported (demand is read at it).
        self.now = 0.0
        #: Bumped whenever a need or a cost may have changed (policies cache by it).
        self.version = 0
        #: Set when something worth saving changed; the saver clears it.
        self.dirty = False
        self.reconfigure(resources, models, ports=ports, estimates=estimates)

    # -- inputs (the router task) ------------------------------------------------

    def reconfigure(
        self,
        resources: Mapping[str, int],
        models: Mapping[str, ModelConfig],
        *,
        ports: Mapping[str, int] | None = None,
        estimates: Mapping[str, int] | None = None,
    ) -> None:
        """A (re)loaded config: what is learned is kept for models whose command is the same."""
        self.resources = dict(resources)
        self._models = dict(models)
        self._ports = dict(ports or {})
        self._estimates = dict(estimates or {})
        for model_id, model in models.items():
            key = self.fingerprint(model_id, model)
            known = self._entries.get(key)
            if known is None:
                known = self._entries[key] = Learned(fingerprint=key, model=model_id)
            self._learned[model_id] = known
            self._demand.setdefault(model_id, _Demand())
        for model_id in list(self._learned):
            if model_id not in models:
                del self._learned[model_id]
        self._asleep = tuple(m for m in self._asleep if m in models)
        self.version += 1

    def fingerprint(self, model_id: str, model: ModelConfig) -> str:
        """:func:`fingerprint` with the port this config assigned to ``model_id``."""
        return fingerprint(model, self._ports.get(model_id))

    def tick(self, now: float) -> None:
        """The router's clock, before it asks the scheduler anything."""
        self.now = now

    def requested(self, model: str, now: float) -> None:
        self.now = now
        demand = self._demand.get(model)
        if demand is not None:
            self._requests += 1
            demand.add(self._requests)
            self.version += 1

    def measured(
        self,
        model: str,
        footprint: Mapping[str, int],
        started_with: ModelConfig | None = None,
        *,
        asleep: bool = False,
    ) -> bool:
        """A measurement of a running (``asleep``: a sleeping) model; True when its
        effective need (awake or asleep) changed.

        ``started_with`` is the config its process runs: a process a reload
        replaced (still finishing its requests) is not the current command, so
        its numbers are not learned for it.
        """
        learned = self._learned.get(model)
        if learned is None:
            return False
        if (
            started_with is not None
            and self.fingerprint(model, started_with) != learned.fingerprint
        ):
            return False
        before = (self.need(model), self.asleep_need(model))
        self._footprint[model] = dict(footprint)
        peak = learned.asleep_peak if asleep else learned.peak
        for name, size in footprint.items():
            if name not in peak or size > peak[name]:
                peak[name] = size  # a measured 0 counts: it is knowledge
                self._touch(learned)
        changed = (self.need(model), self.asleep_need(model)) != before
        if changed:
            self.version += 1
        return changed

    def set_asleep(self, models: Iterable[str]) -> None:
        """The models asleep now (the scheduler thinks them stopped; their processes live)."""
        asleep = tuple(m for m in models if m in self._learned)
        if asleep != self._asleep:
            self._asleep = asleep
            self.version += 1

    def woke(self, model: str, seconds: float) -> None:
        """A wake finished (wake calls, check and test request) in ``seconds``."""
        learned = self._learned.get(model)
        if learned is None:
            return
        learned.wake_seconds = _smoothed(learned.wake_seconds, seconds)
        learned.wakes += 1
        self._touch(learned)
        self.version += 1

    def loaded(self, model: str, seconds: float) -> None:
        """A load finished (spawn to ready) in ``seconds``."""
        learned = self._learned.get(model)
        if learned is None:
            return
        learned.load_seconds = _smoothed(learned.load_seconds, seconds)
        learned.loads += 1
        self._touch(learned)
        self.version += 1

    def stopped(self, model: str) -> None:
        """Its process is gone: the last footprint no longer describes anything."""
        self._footprint.pop(model, None)

    def out_of_memory(
        self,
        model: str,
        resident: Iterable[str],
        resources: Iterable[str] | None = None,
        asleep: Iterable[str] = (),
    ) -> bool:
        """A start of ``model`` ran out of memory beside ``resident`` (awake) and
        ``asleep`` (sleeping models, at their asleep needs): raise its floor.

        The new floor makes it not fit beside what was resident, so the next
        placement evicts more (stopping sleepers too). ``resources`` names the
        exhausted ones (None: all). False when nothing changes (nothing else was
        resident: evicting more cannot help).
        """
        learned = self._learned.get(model)
        others = [m for m in resident if m != model and m in self._learned]
        sleepers = [m for m in asleep if m != model and m not in others and m in self._learned]
        if learned is None or not (others or sleepers) or not self.resources:
            return False
        names = list(self.resources) if resources is None else list(resources)
        changed = False
        for name in names:
            capacity = self.resources.get(name)
            if capacity is None:
                continue
            held = sum(self.need(other).get(name, 0) for other in others)
            held += sum(self.asleep_need(other).get(name, 0) for other in sleepers)
            if held == 0:
                continue  # the others hold none of it: it cannot be what ran out
            floor = min(capacity, capacity - held + 1)
            if floor > self.need(model).get(name, 0):
                learned.floor[name] = floor
                changed = True
        if changed:
            self._touch(learned)
            self.version += 1
        return changed

    def _touch(self, learned: Learned) -> None:
        learned.updated = self._clock()
        self.dirty = True

    # -- outputs (pure reads) -------------------------------------------------------

    def need(self, model: str) -> dict[str, int]:
        """Effective need, bytes per configured resource (the module docstring's rules)."""
        return {name: size for name, (size, _) in self._needs(model).items()}

    def basis(self, model: str) -> dict[str, str]:
        return {name: basis.value for name, (_, basis) in self._needs(model).items()}

    def footprint(self, model: str) -> dict[str, int]:
        """The last measurement while it runs; ``{}`` when unknown or stopped."""
        return dict(self._footprint.get(model, {}))

    def peak(self, model: str) -> dict[str, int]:
        learned = self._learned.get(model)
        return dict(learned.peak) if learned is not None else {}

    def load_seconds(self, model: str) -> float | None:
        learned = self._learned.get(model)
        return learned.load_seconds if learned is not None else None

    def demand(self, model: str) -> float:
        demand = self._demand.get(model)
        return demand.read(self._requests) if demand is not None else 0.0

    def eviction_cost(self, model: str) -> float:
        """Expected seconds of reloading caused by stopping ``model`` now."""
        return self._load_or_default(model) * (1.0 + self.demand(model))

    def can_sleep(self, model: str) -> bool:
        """Whether ``model`` has ``sleep:`` (it may sleep where it would stop)."""
        config = self._models.get(model)
        return config is not None and config.sleep is not None

    def asleep(self) -> tuple[str, ...]:
        """The models asleep now, as the router last reported them."""
        return self._asleep

    def wake_seconds(self, model: str) -> float | None:
        learned = self._learned.get(model)
        return learned.wake_seconds if learned is not None else None

    def expected_wake_seconds(self, model: str) -> float:
        """The measured wake time, else :data:`DEFAULT_WAKE_SHARE` of the load time."""
        seconds = self.wake_seconds(model)
        if seconds is None:
            seconds = DEFAULT_WAKE_SHARE * self._load_or_default(model)
        return seconds

    def sleep_cost(self, model: str) -> float:
        """Expected seconds of waking caused by putting ``model`` to sleep now."""
        return self.expected_wake_seconds(model) * (1.0 + self.demand(model))

    def asleep_stop_cost(self, model: str) -> float:
        """What stopping a sleeping ``model`` adds: a cold load where a wake would do."""
        extra = max(0.0, self._load_or_default(model) - self.expected_wake_seconds(model))
        return extra * (1.0 + self.demand(model))

    def asleep_need(self, model: str) -> dict[str, int]:
        """What ``model`` holds while asleep, bytes per resource (the module docstring)."""
        learned = self._learned.get(model)
        peak = learned.asleep_peak if learned is not None else {}
        awake = self.need(model)
        needs: dict[str, int] = {}
        for name, capacity in self.resources.items():
            if name in peak:
                size = _with_margin(peak[name])
            elif name == "ram":
                gpu = sum(size for other, size in awake.items() if other.startswith("vram"))
                size = awake.get("ram", 0) + gpu
            else:  # a GPU's memory is released; a counted resource (slots) is not held
                size = 0
            needs[name] = min(size, capacity)
        return needs

    def fits_asleep(self, model: str, awake: Iterable[str], asleep: Iterable[str]) -> bool:
        """Whether ``model``, awake now, may fall asleep beside ``awake`` (at their needs)
        and ``asleep`` (at their asleep needs): on every resource its sleep takes more
        of (``ram``, where vLLM's level 1 moves the weights) the total stays within
        capacity. A TTL asks (it has no victims to choose: it stops the model instead)."""
        mine, now = self.asleep_need(model), self.need(model)
        held = [self.need(m) for m in awake] + [self.asleep_need(m) for m in asleep]
        return all(
            mine.get(name, 0) <= now.get(name, 0)
            or sum(h.get(name, 0) for h in held) + mine.get(name, 0) <= capacity
            for name, capacity in self.resources.items()
        )

    def _load_or_default(self, model: str) -> float:
        seconds = self.load_seconds(model)
        return DEFAULT_LOAD_SECONDS if seconds is None else seconds

    def use(self, running: Iterable[str]) -> dict[str, dict[str, int]]:
        """Per resource: ``capacity``, ``reserved`` (effective needs of ``running``, and
        asleep needs of the sleepers) and ``used`` (their last measurements):
        ``/api/fit`` and ``/metrics`` show the same."""
        asleep = list(self._asleep)
        models = [m for m in running if m not in asleep]
        held = [self.need(m) for m in models] + [self.asleep_need(m) for m in asleep]
        return {
            name: {
                "capacity": capacity,
                "reserved": sum(n.get(name, 0) for n in held),
                "used": sum(self._footprint.get(m, {}).get(name, 0) for m in [*models, *asleep]),
            }
            for name, capacity in self.resources.items()
        }

    def learned(self) -> dict[str, Learned]:
        """What to save, by fingerprint: every command learned, in the config or not (a
        model commented out, or a flag tried and reverted, keeps its numbers)."""
        return {key: entry for key, entry in self._entries.items() if entry.updated or entry.loads}

    def _needs(self, model: str) -> dict[str, tuple[int, Basis]]:
        config = self._models.get(model)
        learned = self._learned.get(model)
        needs: dict[str, tuple[int, Basis]] = {}
        for name, capacity in self.resources.items():
            declared = config.needs.get(name) if config is not None else None
            peak = learned.peak.get(name) if learned is not None else None
            estimate = self._estimates.get(model)
            if declared is None and not is_measured(name):
                size, basis = 0, Basis.UNDECLARED  # nothing else will ever tell
            elif declared is not None and (peak is None or peak <= declared):
                size, basis = declared, Basis.DECLARED
            elif peak is not None:
                size, basis = _with_margin(peak), Basis.MEASURED
            elif estimate:
                size, basis = _with_margin(estimate), Basis.ESTIMATED
            else:
                size, basis = capacity, Basis.UNKNOWN
            if learned is not None:
                size = max(size, learned.floor.get(name, 0))
            needs[name] = (min(size, capacity), basis)
        return needs


def _smoothed(average: float | None, seconds: float) -> float:
    """The moving average of load (or wake) times with ``seconds`` added."""
    if average is None:
        return seconds
    return average + LOAD_SMOOTHING * (seconds - average)


def _with_margin(size: int) -> int:
    """``size`` plus :data:`MARGIN`, in whole bytes (integer arithmetic: exact)."""
    return size + -(-size * _MARGIN_PERCENT // 100)


def learned_matrix_cost(ledger: FitLedger, model: str) -> int | None:
    """The matrix's default eviction cost: whole seconds of load time (of wake time
    for a ``sleep:`` model, which the swap puts to sleep), at least 1.

    Whole seconds, so models that load in well under a second keep
    llama-swap's default of 1 and timing noise never flips a tie.
    """
    seconds = ledger.load_seconds(model)
    if ledger.can_sleep(model) and seconds is not None:
        seconds = ledger.expected_wake_seconds(model)
    if seconds is None:
        return None
    return max(1, round(seconds))
