"""Orphan guard: a tiny watcher process that kills upstream process groups if trio-swap dies.

trio-swap starts this script once (``python -I guard.py``) with a pipe on its
stdin, then writes one JSON line per upstream: ``{"add": pgid, "stop": [argv]}``
when it spawns one and ``{"del": pgid}`` once it has reaped it. If trio-swap
exits by any path, SIGKILL included, the pipe reaches EOF; the guard then runs
each remaining ``stop`` command (``docker stop ...``), SIGTERMs each remaining
group, waits up to ``GRACE`` seconds and SIGKILLs what is left.

It runs in its own process group and ignores SIGINT/SIGTERM/SIGHUP, so a Ctrl-C
in the terminal or a signal to trio-swap's group does not take it down before
it has done its job. Standard library only: it must start fast and import
nothing from trio-swap.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

GRACE = 1.0


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _cleanup(groups: dict[int, list[str]]) -> None:
    for argv in groups.values():
        if argv:
            with contextlib.suppress(OSError):
                subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    for pgid in groups:
        _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and any(_alive(p) for p in groups):
        time.sleep(0.02)
    for pgid in groups:
        _signal(pgid, signal.SIGKILL)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: dict[int, list[str]] = {}
    for line in sys.stdin.buffer:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "add" in message:
            groups[int(message["add"])] = [str(a) for a in message.get("stop") or []]
        elif "del" in message:
            groups.pop(int(message["del"]), None)
    _cleanup(groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
