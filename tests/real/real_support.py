"""Helpers for the real-backend lane: ports, config, /proc checks, the trio-swap child.

Kept out of conftest.py so the tests can import them by a unique module name
(``conftest`` is a name every test directory may use).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from tests.conftest import PORT_BLOCK, free_port  # one race-free allocator for every lane

#: Flags that keep one tiny llama-server small and quick on a 2-core box:
#: a 256-token context, one slot, one thread (two models may briefly overlap).
LLAMA_SERVER_FLAGS = "--host 127.0.0.1 -c 256 -np 1 --threads 1 --threads-http 2"

#: How long trio-swap itself may take to answer /health after being spawned.
SERVE_START_TIMEOUT = 30.0


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive free ports, for ``startPort``.

    ``free_port()`` reserves a block of ports above the one it returns (see its
    docstring), so ``count`` is bounded by the block.
    """
    if count > PORT_BLOCK - 2:
        raise ValueError(f"a port block holds at most {PORT_BLOCK - 2} ports above its start")
    return free_port()


def write_config(
    path: Path, server: Path, models: dict[str, Path], *, top: Sequence[str] = ()
) -> Path:
    """A llama-swap format config with one entry per tiny model; ``top``: more top-level lines."""
    lines = [
        *top,
        "healthCheckTimeout: 60",
        f"startPort: {free_port_range(10)}",
        "models:",
    ]
    for model_id, model in models.items():
        cmd = f"{shlex.quote(str(server))} -m {shlex.quote(str(model))} --port ${{PORT}}"
        lines += [f"  {model_id}:", f"    cmd: {cmd} {LLAMA_SERVER_FLAGS}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has exited)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def pids_with_arg(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (e.g. a model path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@dataclass
class TrioSwapServer:
    """A running ``python -m trio_swap serve`` child and what the tests need of it."""

    proc: subprocess.Popen[bytes]
    base_url: str
    config: Path
    log: Path
    models: dict[str, Path]
    server_bin: Path
    _closed: bool = field(default=False, repr=False)

    def log_tail(self, n: int = 60) -> str:
        """The last lines of trio-swap's combined output, for assertion messages."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])

    def upstream_pids(self) -> list[int]:
        """Live llama-server processes started with one of our model files."""
        return sorted({pid for m in self.models.values() for pid in pids_with_arg(str(m))})

    def kill_everything(self) -> None:
        """Last-resort cleanup: our trio-swap's group, then any upstream it left behind."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for pid in self.upstream_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_trio_swap(
    tmp: Path, server: Path, models: dict[str, Path], *, top: Sequence[str] = ()
) -> TrioSwapServer:
    """Spawn trio-swap in its own session and wait until /health answers 200."""
    config = write_config(tmp / "config.yaml", server, models, top=top)
    return serve_config(tmp, config, models, server)


def serve_config(tmp: Path, config: Path, models: dict[str, Path], server: Path) -> TrioSwapServer:
    """Run ``trio-swap serve`` on ``config`` in its own session; wait until /health is 200.

    ``models`` (id -> model file) and ``server`` (the llama-server binary) are
    what :meth:`TrioSwapServer.kill_everything` looks for when cleaning up.
    """
    port = free_port()
    log = tmp / "trio-swap.log"
    cmd = [
        sys.executable,
        "-m",
        "trio_swap",
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(tmp / "state"),  # what it learns stays with the test
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    handle = TrioSwapServer(proc, f"http://127.0.0.1:{port}", config, log, models, server)
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                handle.kill_everything()
                rc = proc.returncode
                pytest.fail(f"trio-swap exited with {rc} before listening:\n{handle.log_tail()}")
            try:
                if client.get(f"{handle.base_url}/health").status_code == 200:
                    return handle
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                handle.kill_everything()
                pytest.fail(
                    f"trio-swap not healthy after {SERVE_START_TIMEOUT}s:\n{handle.log_tail()}"
                )
            time.sleep(0.05)


def cmdline(pid: int) -> str:
    """The command line of ``pid`` as one string ('' once it is gone)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""
