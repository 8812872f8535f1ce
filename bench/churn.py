"""Churn: fit by memory against one model at a time and against a cap on the count.

Usage (from the repository root)::

    .venv/bin/python bench/churn.py              # full: 240 requests per run, a few minutes
    .venv/bin/python bench/churn.py --quick      # 40 requests per run, under a minute
    .venv/bin/python bench/churn.py --seed 2 --clients 1 --no-warmup

Six built-in responders of different sizes (``--hold-memory``, with a
``--startup-delay`` that grows with the size, like weights being read) sit
behind one trio-swap. A seeded trace with locality (phases in which a working
set of 2-3 models gets most of the traffic) is replayed three times, each
time against a fresh trio-swap (fresh ``--state-dir``: nothing learned leaks
between runs):

- **fit**: ``resources: {ram: BUDGET}``, no ``needs``: trio-swap measures them;
- **one at a time**: no ``resources``, no groups (llama-swap's default);
- **by count**: ``resources: {slots: 3}``, every model ``needs: {slots: 1}``
  (like llama.cpp's ``--models-max 3``; the victim is still chosen by
  trio-swap's cost formula, not by pure LRU).

Every run first sends one request to each model in turn (the warm-up, so fit
has measured every model; ``--no-warmup`` skips it); what it loads is not
counted. Then ``--clients`` threads take the trace's requests in order from
one shared queue, so at most that many are in flight and the order the
server sees is the trace's, whatever the timing. A sampler sums the memory
(PSS) of every running responder's process tree every 50 ms.

Prints a markdown table (loads, seconds spent loading, wall time, client
wait, peak RAM against the budget, error answers) and the parameters on
stdout; progress goes to stderr. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, final

from common import quantile
from procs import REPO, STARTUP_TIMEOUT, STOP_TIMEOUT, ProcessSet, free_ports, responder_argv
from run import machine
from trio_swap.fit.ledger import DEMAND_HALF_LIFE
from trio_swap.upstream.footprint import measure_footprint, process_tree

MiB: Final = 1 << 20


@dataclass(frozen=True)
class Model:
    """One responder: the RAM it holds (on top of its own ~30 MiB) and its start delay."""

    name: str
    hold_mib: int

    @property
    def startup_delay(self) -> float:
        """0.1 s plus the held size read at 500 MB/s: a bigger model takes longer to load."""
        return round(0.1 + self.hold_mib * MiB / 500e6, 3)


MODELS: Final = tuple(Model(f"m{size}", size) for size in (40, 60, 80, 110, 150, 200))
#: Holds 2-3 of them. Measured needs (PSS + 10 %) here are about 74, 95, 117, 150,
#: 195 and 250 MiB: any three of the four smallest fit, or a big one beside two small
#: ones (m40 + m60 + m200), but m150 + m200 never fit together. Chosen 10 MiB from
#: every sum of needs, so a few hundred KiB of measured growth flips no decision
#: (400 MiB sat exactly on m110 + m200, which then fitted or not by 1 MiB).
BUDGET_MIB: Final = 430
#: ``by count``: at most this many models, whatever their size.
SLOTS: Final = 3
SAMPLE_INTERVAL: Final = 0.05
SCENARIOS: Final = ("fit", "one at a time", "by count")


# --- the trace -------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    working_set: tuple[str, ...]
    requests: tuple[str, ...]


def make_trace(requests: int, seed: int, phase_len: int, hot: float) -> list[Phase]:
    """Phases of ``phase_len`` requests: a working set of 2-3 models gets ``hot`` of them,
    the other models share the rest evenly."""
    rng = random.Random(seed)
    names = [m.name for m in MODELS]
    phases: list[Phase] = []
    left = requests
    while left > 0:
        working = tuple(rng.sample(names, rng.choice((2, 3))))
        others = [n for n in names if n not in working]
        count = min(phase_len, left)
        picks = tuple(
            rng.choice(working) if rng.random() < hot else rng.choice(others) for _ in range(count)
        )
        phases.append(Phase(working, picks))
        left -= count
    return phases


# --- trio-swap ---------------------------------------------------------------------------


def write_config(path: Path, scenario: str, ports: Sequence[int], *, log: bool = False) -> Path:
    """The config of one scenario: the same six models, different sharing rules.

    ``log``: trio-swap's own log (loads, evictions and why) to its stdout.
    """
    lines = ["healthCheckTimeout: 60", f"logToStdout: {'proxy' if log else 'none'}"]
    if scenario == "fit":
        lines.append(f"resources: {{ram: {BUDGET_MIB}MiB}}")
    elif scenario == "by count":
        lines.append(f"resources: {{slots: {SLOTS}}}")
    lines.append("models:")
    for model, port in zip(MODELS, ports, strict=True):
        argv = responder_argv(
            port,
            model.name,
            "--hold-memory",
            f"{model.hold_mib}MiB",
            "--startup-delay",
            str(model.startup_delay),
        )
        lines += [
            f"  {model.name}:",
            f"    cmd: {json.dumps(shlex.join(argv))}",
            f"    proxy: http://127.0.0.1:{port}",
        ]
        if scenario == "by count":
            lines.append("    needs: {slots: 1}")
    path.write_text("\n".join(lines) + "\n")
    return path


@final
class Serve:
    """One ``trio-swap serve`` with its own state directory, and the admin calls we make."""

    def __init__(self, processes: ProcessSet, config: Path, port: int, workdir: Path) -> None:
        self.port = port
        self.log = workdir / "trio-swap.log"
        state = workdir / "state"
        state.mkdir()
        argv = [sys.executable, "-m", "trio_swap", "serve", "--config", str(config)]
        argv += ["--listen", f"127.0.0.1:{port}", "--state-dir", str(state)]
        self.popen = processes.spawn(argv, log=self.log)
        self.pid = self.popen.pid
        self._upstream_pids: set[int] = set()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"trio-swap exited:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.get("/health")[0] == 200:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"trio-swap not listening after {STARTUP_TIMEOUT:g}s")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def json(self, path: str) -> dict[str, object]:
        status, body = self.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body[:200]!r}")
        document: dict[str, object] = json.loads(body)
        return document

    def models(self) -> dict[str, dict[str, object]]:
        """``GET /api/models`` keyed by id; remembers upstream pids for cleanup."""
        rows = self.json("/api/models")["models"]
        assert isinstance(rows, list)
        by_id = {str(row["id"]): row for row in rows}
        self._upstream_pids.update(int(r["pid"]) for r in by_id.values() if r.get("pid"))
        return by_id

    def metrics(self) -> dict[str, float]:
        """The counters we compare, summed over models (``/metrics``)."""
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        wanted = {
            "trio_swap_model_time_to_ready_seconds_sum": "ready_s",
            "trio_swap_model_time_to_ready_seconds_count": "ready_n",
            "trio_swap_model_evictions_total": "evictions",
            "trio_swap_swaps_total": "swaps",
        }
        totals = dict.fromkeys(wanted.values(), 0.0)
        for line in body.decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in wanted:
                totals[wanted[name]] += float(line.rsplit(" ", 1)[1])
        return totals

    def stop(self) -> None:
        """SIGTERM (trio-swap stops its models), then SIGKILL whatever is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_TIMEOUT)
        ProcessSet.kill(self.popen)
        for pid in self._upstream_pids:
            with contextlib.suppress(OSError):
                if b"responder" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.killpg(pid, signal.SIGKILL)


# --- measuring -----------------------------------------------------------------------


def responder_ram(server_pid: int) -> int:
    """Bytes (PSS) held by every responder tree under trio-swap now."""
    total = 0
    for pid in process_tree(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"responder" in cmdline:
            total += measure_footprint(pid, None)["ram"]
    return total


@final
class RamSampler:
    """Samples :func:`responder_ram` every :data:`SAMPLE_INTERVAL` in a thread."""

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(responder_ram(self._pid))
            self._stop.wait(SAMPLE_INTERVAL)

    @contextlib.contextmanager
    def running(self) -> Iterator[RamSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def chat_body(model: str) -> bytes:
    """A small non-streaming chat completion."""
    messages = [{"role": "user", "content": "hi"}]
    return json.dumps({"model": model, "messages": messages, "max_tokens": 8}).encode()


@dataclass
class Answer:
    model: str
    status: int  # 0: no HTTP answer (connection error)
    seconds: float


def replay(port: int, trace: Sequence[str], clients: int) -> list[Answer]:
    """``clients`` threads take the trace's requests in order from one queue."""
    answers: list[Answer] = []
    lock = threading.Lock()
    queue = iter(trace)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        headers = {"Content-Type": "application/json"}
        while True:
            with lock:
                model = next(queue, None)
            if model is None:
                break
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", chat_body(model), headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                status = 0
            with lock:
                answers.append(Answer(model, status, time.perf_counter() - start))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@dataclass
class Result:
    scenario: str
    loads: int
    ready_seconds: float
    wall: float
    waits: list[float]
    peak_ram: int
    over_budget: float  # share of samples above the budget
    errors: Counter[int]
    loads_by_model: dict[str, int]
    evictions: int
    #: fit: each model's ram need (basis, bytes) after the warm-up and after the trace.
    needs: dict[str, tuple[str, int]] = field(default_factory=dict)
    needs_after: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: Models running when the trace began, and each model's learned load time after it.
    resident: list[str] = field(default_factory=list)
    load_seconds: dict[str, float] = field(default_factory=dict)


def start_counts(server: Serve) -> dict[str, int]:
    rows = server.models()
    return {m.name: int(str(rows[m.name]["start_count"])) for m in MODELS}


def fit_needs(server: Serve) -> dict[str, tuple[str, int]]:
    """fit: each model's ram need from ``/api/fit``: (basis, bytes)."""
    rows = server.json("/api/fit")["models"]
    assert isinstance(rows, list)
    return {str(r["id"]): (str(r["basis"]["ram"]), int(r["needs"]["ram"])) for r in rows}


def wait_measured(server: Serve, timeout: float = 30.0) -> dict[str, tuple[str, int]]:
    """fit: wait until every model's ram need is measured (at ready, so soon after the warm-up)."""
    deadline = time.monotonic() + timeout
    while True:
        needs = fit_needs(server)
        if all(basis == "measured" for basis, _ in needs.values()):
            return needs
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all measured: {needs}")
        time.sleep(0.1)


def run_scenario(
    scenario: str, trace: Sequence[str], args: argparse.Namespace, processes: ProcessSet
) -> Result:
    """A fresh trio-swap, the warm-up, the trace; always stops trio-swap."""
    with tempfile.TemporaryDirectory(prefix="trio-swap-churn-") as tmp:
        workdir = Path(tmp)
        swap_port, *ports = free_ports(1 + len(MODELS))
        config = write_config(workdir / "config.yaml", scenario, ports, log=args.logs is not None)
        server = Serve(processes, config, swap_port, workdir)
        try:
            needs: dict[str, tuple[str, int]] = {}
            needs_after: dict[str, tuple[str, int]] = {}
            if args.warmup:
                replay(swap_port, [m.name for m in MODELS], 1)
                if scenario == "fit":
                    needs = wait_measured(server)
            before, counters = start_counts(server), server.metrics()
            resident = [m for m, row in server.models().items() if row["state"] != "stopped"]
            sampler = RamSampler(server.pid)
            with sampler.running():
                started = time.monotonic()
                answers = replay(swap_port, trace, args.clients)
                wall = time.monotonic() - started
            after, counters_after = start_counts(server), server.metrics()
            load_seconds = {
                m: float(str(row["load_seconds"]))
                for m, row in server.models().items()
                if row.get("load_seconds") is not None
            }
            if scenario == "fit":
                needs_after = fit_needs(server)
        except BaseException:
            _progress(f"{scenario} failed; trio-swap log tail:\n{server.log_tail()}")
            raise
        finally:
            server.stop()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                name = scenario.replace(" ", "-")
                shutil.copy(server.log, args.logs / f"{name}.log")
                shutil.copy(config, args.logs / f"{name}.yaml")
    budget = BUDGET_MIB * MiB
    samples = sampler.samples or [0]
    return Result(
        scenario=scenario,
        loads=sum(after.values()) - sum(before.values()),
        ready_seconds=counters_after["ready_s"] - counters["ready_s"],
        wall=wall,
        waits=[a.seconds for a in answers],
        peak_ram=max(samples),
        over_budget=sum(1 for s in samples if s > budget) / len(samples),
        errors=Counter(a.status for a in answers if a.status != 200),
        loads_by_model={m: after[m] - before[m] for m in after},
        evictions=int(counters_after["evictions"] - counters["evictions"]),
        needs=needs,
        needs_after=needs_after,
        resident=resident,
        load_seconds=load_seconds,
    )


# --- the same trace on paper ---------------------------------------------------------


#: Picks the models to stop so that ``target`` fits: (running, target, position, trace,
#: requests so far per model, needs, budget) -> victims.
Chooser = Callable[
    [Sequence[str], str, int, Sequence[str], Mapping[str, int], Mapping[str, int], int],
    tuple[str, ...],
]


def on_paper(
    trace: Sequence[str],
    resident: Sequence[str],
    needs: Mapping[str, int],
    budget: int,
    choose: Chooser,
) -> int:
    """Loads of a sequential replay (as ``--clients 1``) where ``choose`` picks the victims.

    A reference for reading the measured rows: what the trace costs in the same
    budget with the same (measured) needs under another victim rule.
    """
    running = [m for m in resident if m in needs]
    counts: Counter[str] = Counter()
    loads = 0
    for index, model in enumerate(trace):
        counts[model] += 1
        if model in running:
            continue
        loads += 1
        if sum(needs[m] for m in running) + needs[model] > budget:
            victims = choose(running, model, index, trace, counts, needs, budget)
            running = [m for m in running if m not in victims]
        running.append(model)
    return loads


def _one_by_one(key: Callable[[str], float]) -> Chooser:
    """Stop the model ranked first by ``key`` (lowest) until the target fits."""

    def choose(
        running: Sequence[str],
        target: str,
        index: int,
        trace: Sequence[str],
        counts: Mapping[str, int],
        needs: Mapping[str, int],
        budget: int,
    ) -> tuple[str, ...]:
        left = sorted(running, key=key)
        victims: list[str] = []
        while left and sum(needs[m] for m in left) + needs[target] > budget:
            victims.append(left.pop(0))
        return tuple(victims)

    return choose


def lru(
    running: Sequence[str],
    target: str,
    index: int,
    trace: Sequence[str],
    counts: Mapping[str, int],
    needs: Mapping[str, int],
    budget: int,
) -> tuple[str, ...]:
    """Least recently requested first."""

    def last_use(model: str) -> float:
        return max((i for i in range(index) if trace[i] == model), default=-1)

    return _one_by_one(last_use)(running, target, index, trace, counts, needs, budget)


def farthest(
    running: Sequence[str],
    target: str,
    index: int,
    trace: Sequence[str],
    counts: Mapping[str, int],
    needs: Mapping[str, int],
    budget: int,
) -> tuple[str, ...]:
    """Requested again last first (Belady's rule: it knows the future, so no server can)."""

    def next_use(model: str) -> float:
        later = (i for i in range(index + 1, len(trace)) if trace[i] == model)
        return -next(later, len(trace))

    return _one_by_one(next_use)(running, target, index, trace, counts, needs, budget)


def formula(load_seconds: Mapping[str, float]) -> Chooser:
    """fit's own rule: the set freeing enough with the lowest ``load_seconds * (1 + demand)``,
    then the fewest models; demand weighs each request of a model ``2^(-k / 5)``, ``k``
    the requests (to any model) after it (``trio_swap.fit.ledger``)."""

    def choose(
        running: Sequence[str],
        target: str,
        index: int,
        trace: Sequence[str],
        counts: Mapping[str, int],
        needs: Mapping[str, int],
        budget: int,
    ) -> tuple[str, ...]:
        def demand(model: str) -> float:
            return sum(
                2.0 ** (-(index - i) / DEMAND_HALF_LIFE)
                for i in range(index + 1)
                if trace[i] == model
            )

        over = sum(needs[m] for m in running) + needs[target] - budget
        best: tuple[float, int, tuple[str, ...]] | None = None
        for size in range(1, len(running) + 1):
            for victims in itertools.combinations(running, size):
                if sum(needs[m] for m in victims) < over:
                    continue
                cost = sum(load_seconds.get(m, 1.0) * (1 + demand(m)) for m in victims)
                key = (round(cost, 9), size, victims)
                if best is None or key[:2] < best[:2]:
                    best = key
        return best[2] if best is not None else tuple(running)

    return choose


def paper_note(trace: Sequence[str], fit: Result) -> str:
    """Loads of the trace on paper with the fit run's needs, start state and load times."""
    needs = {m: n for m, (_, n) in fit.needs_after.items()}
    budget = BUDGET_MIB * MiB
    last = [MODELS[-1].name] if fit.resident else []  # the warm-up's last model
    one = on_paper(trace, last, {m: budget for m in needs}, budget, lru)
    rules = {
        "one at a time": one,
        "LRU by memory": on_paper(trace, fit.resident, needs, budget, lru),
        "fit's formula": on_paper(trace, fit.resident, needs, budget, formula(fit.load_seconds)),
        "farthest next use (knows the future)": on_paper(
            trace, fit.resident, needs, budget, farthest
        ),
    }
    text = ", ".join(f"{rule} {loads}" for rule, loads in rules.items())
    return (
        f"- on paper (one request at a time, in the fit run's {BUDGET_MIB} MiB with its "
        f"measured needs, from the models it had running): loads with {text}"
    )


# --- output --------------------------------------------------------------------------


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| run | loads | loading s (sum of time to ready) | trace wall s "
        "| wait p50 | wait p95 | wait max | peak RAM of responders | non-200 |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for r in results:
        over = f" ({r.over_budget:.0%} of samples over budget)" if r.over_budget else ""
        errors = ", ".join(f"{n}x {s or 'no answer'}" for s, n in sorted(r.errors.items())) or "0"
        cells = (
            r.scenario,
            str(r.loads),
            f"{r.ready_seconds:.1f}",
            f"{r.wall:.1f}",
            _ms(quantile(r.waits, 0.5)),
            _ms(quantile(r.waits, 0.95)),
            _ms(max(r.waits)),
            f"{r.peak_ram / MiB:.0f} MiB{over}",
            errors,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def parameters(args: argparse.Namespace, phases: Sequence[Phase]) -> str:
    models = ", ".join(
        f"{m.name} (holds {m.hold_mib} MiB, --startup-delay {m.startup_delay:g})" for m in MODELS
    )
    sets = "; ".join("+".join(p.working_set) for p in phases)
    counts = Counter(name for p in phases for name in p.requests)
    share = ", ".join(f"{m.name} {counts[m.name]}" for m in MODELS)
    return "\n".join(
        [
            f"- models: {models}",
            f"- budget (fit): ram {BUDGET_MIB} MiB; by count: slots {SLOTS}",
            f"- trace: {args.requests} requests, seed {args.seed}, phases of {args.phase} with "
            f"{args.hot:.0%} to the working set: {sets}",
            f"- requests per model: {share}",
            f"- clients: {args.clients} (one shared queue, trace order); "
            f"warm-up: {'one request per model, not counted' if args.warmup else 'none'}",
        ]
    )


def revision() -> str:
    """The commit measured, and whether src/ differed from it (others edit the tree too)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown commit"
    return f"commit {head or 'unknown'}" + (" with uncommitted changes in src/" if dirty else "")


def _progress(text: str) -> None:
    print(f"[churn] {text}", file=sys.stderr, flush=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/churn.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="40 requests in phases of 20 (under a minute)"
    )
    parser.add_argument("--requests", type=int, help="requests in the trace (default 240)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--phase", type=int, help="requests per phase (default 30)")
    parser.add_argument(
        "--hot", type=float, default=0.85, help="share of a phase to its working set"
    )
    parser.add_argument("--clients", type=int, default=3, help="requests in flight (default 3)")
    parser.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the warm-up pass"
    )
    parser.add_argument(
        "--logs", metavar="DIR", type=Path, help="keep each run's trio-swap log and config here"
    )
    parser.add_argument(
        "--only",
        metavar="LIST",
        help="comma-separated runs of fit,one,count (default: all three)",
    )
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 40 if args.quick else 240
    if args.phase is None:
        args.phase = 20 if args.quick else 30
    short = {"fit": "fit", "one": "one at a time", "count": "by count"}
    chosen = args.only.split(",") if args.only else list(short)
    if unknown := [c for c in chosen if c not in short]:
        parser.error(f"unknown run(s) {unknown}; choose from {list(short)}")
    args.scenarios = [short[c] for c in chosen]
    return args


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every process."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    info = machine()
    info["revision"] = revision()
    phases = make_trace(args.requests, args.seed, args.phase, args.hot)
    trace = [name for phase in phases for name in phase.requests]
    processes = ProcessSet()
    results: list[Result] = []
    try:
        for scenario in args.scenarios:
            _progress(f"run: {scenario}")
            results.append(run_scenario(scenario, trace, args, processes))
            r = results[-1]
            _progress(f"{scenario}: {r.loads} loads, {r.ready_seconds:.1f} s loading")
    finally:
        processes.kill_all()
    if (now := revision()) != info["revision"]:
        info["revision"] += f" at the start, {now} at the end (the tree changed during the run)"
    command = shlex.join([".venv/bin/python", "bench/churn.py", *(argv or sys.argv[1:])])
    print(
        f"# churn ({info['date']})\n\n`{command}`\n\n"
        f"{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"load average {info['loadavg']} before, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after; {info['revision']}.\n"
    )
    print(markdown_table(results))
    print("\n" + parameters(args, phases))
    for r in results:
        loads = ", ".join(f"{m} {n}" for m, n in r.loads_by_model.items())
        print(f"- {r.scenario}: loads per model {loads}; {r.evictions} evictions")
        for when, needs in (("the warm-up", r.needs), ("the trace", r.needs_after)):
            if needs:
                text = ", ".join(f"{m} {n / MiB:.0f} MiB ({b})" for m, (b, n) in needs.items())
                print(f"- {r.scenario}: ram needs after {when}: {text}")
        if r.scenario == "fit" and r.needs and r.needs_after:
            print(paper_note(trace, r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
