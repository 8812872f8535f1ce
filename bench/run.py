"""trio-swap benchmarks: the proxy against the same responder called directly, in one run.

Usage (from the repository root)::

    .venv/bin/python bench/run.py            # full run, about 100 s
    .venv/bin/python bench/run.py --quick    # about 30 s, fewer samples
    .venv/bin/python bench/run.py --only 1,2 --profile bench/results/serve.prof

Prints a markdown table (figure, direct, via trio-swap, ratio/delta, target,
met?) and notes on stdout; progress goes to stderr. The machines this runs on
are noisy, so only ratios and deltas measured in the same run are compared
with targets (DESIGN.md "How we measure"); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from common import Bench, Plan, Row
from figures import (
    bulk_stream,
    idle_memory,
    latency,
    paced_streams,
    throughput,
    wrk_crosscheck,
)
from procs import ModelPorts, ProcessSet, TrioSwap, children, free_ports, memory_kib, write_config
from startup import cold_start

#: Figure number -> measurement, in run order. 6 (memory) always runs last.
FIGURES: Final[dict[str, Callable[[Bench], list[Row]]]] = {
    "1": latency,
    "2": throughput,
    "wrk": wrk_crosscheck,
    "3": bulk_stream,
    "4": paced_streams,
    "5": cold_start,
}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (under a minute)")
    parser.add_argument(
        "--only",
        metavar="LIST",
        help=f"comma-separated figures to run, of {','.join(FIGURES)} (6 always runs)",
    )
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write results as JSON")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="a top-level config setting for trio-swap, as YAML (e.g. --set captureBuffer=0)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        type=Path,
        help="run trio-swap under cProfile, save the stats to FILE and print the top functions "
        "(slows trio-swap down: the figures are then not comparable with targets)",
    )
    args = parser.parse_args(argv)
    selected = args.only.split(",") if args.only else list(FIGURES)
    unknown = [name for name in selected if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    args.figures = selected
    return args


def machine() -> dict[str, str]:
    """What the numbers were measured on; they mean little without it."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def markdown_table(rows: list[Row]) -> str:
    """The result table: one row per figure, verdict in the last column."""
    lines = [
        "| figure | direct | via trio-swap | ratio / delta | target | met? |",
        "| --- | --: | --: | --: | --- | --- |",
    ]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**NO**")
        cells = (row.figure, row.direct, row.proxied, row.compare, row.target, met)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _print_profile(path: Path) -> None:
    """Where trio-swap's time went: the functions with the most own time, then cumulative."""
    if not path.exists():
        _progress(f"no profile written to {path} (trio-swap did not exit cleanly)")
        return
    stats = pstats.Stats(str(path), stream=sys.stdout)
    print(f"\n## Profile of trio-swap ({path})\n\n```")
    stats.strip_dirs().sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    print("```")


def run(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Start trio-swap, measure the selected figures, always stop every process."""
    plan = Plan.quick() if args.quick else Plan.full()
    processes = ProcessSet()
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="trio-swap-bench-") as tmp:
        workdir = Path(tmp)
        try:
            swap_port, *model_ports = free_ports(6)
            ports = ModelPorts(*model_ports)
            config = write_config(workdir / "config.yaml", ports, settings=args.set)
            _progress(f"starting trio-swap on port {swap_port}")
            swap = TrioSwap(
                processes,
                config=config,
                port=swap_port,
                log=workdir / "trio-swap.log",
                profile=args.profile.resolve() if args.profile else None,
            )
            try:
                time.sleep(0.5)  # let startup garbage settle before reading RSS
                rss_start = memory_kib(swap.pid)
                guards = children(swap.pid)
                bench = Bench(swap, ports, processes, plan, workdir, notes)
                for name in args.figures:
                    _progress(f"figure {name}: {FIGURES[name].__name__}")
                    started = time.monotonic()
                    rows += FIGURES[name](bench)
                    _progress(f"figure {name} took {time.monotonic() - started:.1f}s")
                guard_kib = memory_kib(guards[0])["VmRSS"] if guards else None
                rows += idle_memory(bench, rss_start, guard_kib)
            except BaseException:
                _progress(f"failed; trio-swap log tail:\n{swap.log_tail()}")
                raise
            finally:
                swap.stop()
        finally:
            processes.kill_all()
    return rows, notes


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every process."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    info = machine()
    started = time.monotonic()
    rows, notes = run(args)
    info["duration"] = f"{time.monotonic() - started:.0f} s"
    info["mode"] = "quick" if args.quick else "full"
    info["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# trio-swap benchmark ({info['mode']}, {info['date']})\n\n"
        f"{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"Linux {info['kernel']}, load average {info['loadavg']} before, "
        f"{info['loadavg_after']} after; took {info['duration']}.\n"
    )
    busy = float(info["loadavg"].split()[0]) / int(info["nproc"])
    if busy > 0.5:
        print(
            f"**Warning: the machine was busy before the run (1-min load {busy:.0%} of its CPUs); "
            "other processes compete with both sides, so ratios are less reliable.**\n"
        )
    print(markdown_table(rows))
    if notes:
        print("\nNotes:\n")
        print("\n".join(f"- {note}" for note in notes))
    if args.profile:
        _print_profile(args.profile)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "rows": [row.__dict__ for row in rows], "notes": notes}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
