"""Where a proxied request's time goes: sample trio-swap with py-spy under one load.

Usage (from the repository root; py-spy is not a project dependency)::

    pipx install py-spy        # or: python3 -m venv /tmp/spy && /tmp/spy/bin/pip install py-spy
    .venv/bin/python bench/profile.py --load c32 [--seconds 8] [--py-spy PATH]

Loads: ``c1`` (one connection, small requests), ``c32`` (32 connections),
``sse`` (bulk streams back to back). Prints the share of samples per package
(own time), the hottest functions (own time) and the hottest call sites
(inclusive). A sampling profiler barely slows the server, unlike
``run.py --profile`` (cProfile), so these shares are close to the real split.
Time inside a socket method's frame is mostly the system call (on loopback
the kernel also does the receiver's TCP work inside the sender's ``send``).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from procs import ModelPorts, ProcessSet, TrioSwap, free_ports, write_config
from rawhttp import Connection, ResponseReader, chat_request, closed_loop

_LINE_NUMBER: Final = re.compile(r":\d+\)$")
_SAMPLE_RATE: Final = 250


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/profile.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--load", choices=("c1", "c32", "sse"), default="c32")
    parser.add_argument("--seconds", type=float, default=8.0, help="sampling time (default 8)")
    parser.add_argument("--py-spy", dest="py_spy", help="py-spy executable (default: on PATH)")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks in this file")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    return parser.parse_args(argv)


def _drive(port: int, load: str, seconds: float) -> str:
    """Run the load against trio-swap for ``seconds``; a one-line summary."""
    if load == "sse":
        request = chat_request(port, model="bench", max_tokens=100_000, stream=True)
        reader = ResponseReader(count_events=True)
        events, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            with Connection(port) as conn:
                events += conn.exchange(request, reader).events
        return f"{events / (time.perf_counter() - start):,.0f} events/s"
    request = chat_request(port, model="bench", max_tokens=1)
    result = closed_loop(port, request, connections=int(load[1:]), duration=seconds)
    return f"{result.rate:,.0f} req/s, non-200: {result.errors or 'none'}"


def _package(frame: str) -> str:
    """``func (httpcore/_async/http11.py)`` -> ``httpcore``; the standard library as one."""
    where = frame[frame.rfind("(") + 1 : -1]
    if "/" not in where or where.startswith("<"):
        return "stdlib"
    head = where.split("/", 1)[0]
    return head if head.isidentifier() else "stdlib"


def summarize(raw: Path, top: int) -> str:
    """Tables of own time per package and function, and inclusive time per function."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples (was trio-swap busy?)"
    out = [f"{total} samples of busy trio-swap threads\n", "own time per package:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in packages.most_common()]
    out.append("\nown time per function:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    out.append("\ninclusive time per function:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top * 2)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    py_spy = args.py_spy or shutil.which("py-spy")
    if py_spy is None:
        print("py-spy not found: install it (see --help) or pass --py-spy PATH", file=sys.stderr)
        return 2
    processes = ProcessSet()
    with tempfile.TemporaryDirectory(prefix="trio-swap-profile-") as tmp:
        workdir = Path(tmp)
        raw = args.raw.resolve() if args.raw else workdir / "stacks.txt"
        summary = "interrupted"
        try:
            swap_port, *model_ports = free_ports(6)
            config = write_config(workdir / "config.yaml", ModelPorts(*model_ports))
            swap = TrioSwap(processes, config=config, port=swap_port, log=workdir / "log")
            try:
                swap.load("bench")
                _drive(swap_port, args.load, 1.0)  # warm-up, not sampled
                spy_argv = [py_spy, "record", "--pid", str(swap.pid)]
                spy_argv += ["-f", "raw", "-r", str(_SAMPLE_RATE), "-o", str(raw)]
                spy_argv += ["-d", str(max(1, round(args.seconds)))]
                spy = subprocess.Popen(
                    spy_argv,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # ProcessSet.kill signals the group
                )
                try:
                    time.sleep(0.3)  # py-spy attaches
                    summary = _drive(swap_port, args.load, args.seconds)
                    spy.wait(timeout=args.seconds + 30)
                finally:
                    ProcessSet.kill(spy)
            finally:
                swap.stop()
        finally:
            processes.kill_all()
        print(f"# trio-swap under load {args.load}: {summary}\n")
        print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
