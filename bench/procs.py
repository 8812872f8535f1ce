"""The processes under test: trio-swap, the responders, and what /proc says about them.

Everything runs as a subprocess in its own session (process group), so the
load generator never shares an event loop or a GIL with a server, and
:class:`ProcessSet` can kill every group it started however the run ends.
Admin calls (``/api/models``, unload) use ``http.client``: they are off the
measured path, so convenience wins there.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

__all__ = [
    "ModelPorts",
    "ProcessSet",
    "TrioSwap",
    "children",
    "cpu_seconds",
    "free_ports",
    "memory_kib",
    "read_stamp",
    "responder_argv",
    "stamp_file",
    "stamped",
    "write_config",
]

REPO: Final = Path(__file__).resolve().parent.parent
#: Startup of trio-swap (imports, orphan guard, bind) on a slow shared machine.
STARTUP_TIMEOUT: Final = 60.0
#: SIGTERM to trio-swap stops its models gracefully; this bounds that before SIGKILL.
STOP_TIMEOUT: Final = 20.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free now, chosen below the ephemeral range.

    Ports from ``bind(0)`` come from the ephemeral range, where an outgoing
    connection of the benchmark itself could grab a model's port before the
    model starts. Probing random ports below that range avoids the clash; the
    probe sockets stay open until all are chosen, so the ports are distinct.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(20000, low)) if low > 21000 else list(range(low, 65536))
    random.shuffle(candidates)
    probes: list[socket.socket] = []
    try:
        for port in candidates:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                probe.close()
                continue
            probes.append(probe)
            if len(probes) == count:
                return [p.getsockname()[1] for p in probes]
    finally:
        for probe in probes:
            probe.close()
    raise OSError(f"could not find {count} free ports")


def stamped(argv: Sequence[str], stamp: Path) -> list[str]:
    """``argv`` behind ``sh -c``, which appends the wall-clock time to ``stamp``, then execs.

    The stamp is the moment the upstream's own start begins, whoever spawned
    it, so a cold start through trio-swap splits exactly into trio-swap's part
    (request to exec, readiness detection) and the upstream's (exec to
    healthy), measured on one and the same process. ``sh`` and ``date`` cost a
    few ms, the same for a direct spawn, which uses the same wrapper.
    """
    script = f"date +%s.%N >> {shlex.quote(str(stamp))}; exec {shlex.join(argv)}"
    return ["/bin/sh", "-c", script]


def read_stamp(stamp: Path) -> float:
    """The latest time :func:`stamped` wrote to ``stamp`` (seconds since the epoch)."""
    return float(stamp.read_text().split()[-1])


def responder_argv(port: int, model: str, *options: str) -> list[str]:
    """The built-in responder, run by the interpreter running the benchmark."""
    return [
        sys.executable,
        "-m",
        "trio_swap",
        "responder",
        "--port",
        str(port),
        "--model",
        model,
        *options,
    ]


@dataclass(frozen=True)
class ModelPorts:
    """One port per configured model, plus one for responders the benchmark spawns itself."""

    bench: int
    paced: int
    cold: int
    loading: int
    direct: int


#: The paced model's --token-delay: roughly a 60 tokens/s LLM.
PACED_TOKEN_DELAY: Final = 0.015
#: The loading model's --load-delay: /health answers 503 this long after binding.
LOAD_DELAY: Final = 0.5


def model_options(name: str) -> list[str]:
    """Responder flags per model; the direct comparisons spawn the same flags."""
    return {
        "bench": ["--token-delay", "0"],
        "paced": ["--token-delay", str(PACED_TOKEN_DELAY)],
        "cold": ["--token-delay", "0"],
        "loading": ["--token-delay", "0", "--load-delay", str(LOAD_DELAY)],
    }[name]


def write_config(path: Path, ports: ModelPorts, *, settings: Sequence[str] = ()) -> Path:
    """A llama-swap style config: four models, all the built-in responder.

    Each model's command is :func:`stamped` into ``<model>.stamp`` next to the config;
    ``settings`` are more top-level ``key=value`` lines (YAML values).
    """
    lines = ["healthCheckTimeout: 30", "logToStdout: none"]
    lines += [
        f"{key.strip()}: {value.strip()}" for key, value in (s.split("=", 1) for s in settings)
    ]
    lines.append("models:")
    for name in ("bench", "paced", "cold", "loading"):
        port = getattr(ports, name)
        argv = stamped(
            responder_argv(port, name, *model_options(name)), stamp_file(path.parent, name)
        )
        lines += [
            f"  {name}:",
            f"    cmd: {json.dumps(shlex.join(argv))}",
            f"    proxy: http://127.0.0.1:{port}",
            # The default (10, as llama-swap) answers 429 beyond 10 admitted
            # requests; the 32-connection figure needs 32 in flight.
            "    concurrencyLimit: 128",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def stamp_file(directory: Path, name: str) -> Path:
    """Where the stamped command of model (or spawn) ``name`` writes its exec times."""
    return directory / f"{name}.stamp"


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in KiB, from /proc/PID/status."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0.0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the orphan guard, the upstreams)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


@final
class ProcessSet:
    """Every process group the benchmark started; :meth:`kill_all` leaves none behind."""

    def __init__(self) -> None:
        self._popens: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], *, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` as the leader of a new session, output to ``log`` (or nowhere)."""
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self._popens.append(popen)
        return popen

    @staticmethod
    def kill(popen: subprocess.Popen[bytes]) -> None:
        """SIGKILL the whole group of ``popen`` and reap it.

        Once the leader is reaped its pid (the group id) may be reused by an
        unrelated process, so a reaped ``popen`` is left alone.
        """
        if popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)

    def kill_all(self) -> None:
        for popen in self._popens:
            self.kill(popen)
        self._popens.clear()


@final
class TrioSwap:
    """One ``trio-swap serve`` subprocess and the admin calls the benchmark makes."""

    def __init__(
        self,
        processes: ProcessSet,
        *,
        config: Path,
        port: int,
        log: Path,
        profile: Path | None = None,
    ) -> None:
        self.port = port
        self.log = log
        self._processes = processes
        self._upstream_pids: set[int] = set()
        argv = [sys.executable]
        if profile is not None:
            argv += ["-m", "cProfile", "-o", str(profile)]
        argv += ["-m", "trio_swap", "serve", "--config", str(config)]
        argv += ["--listen", f"127.0.0.1:{port}"]
        self.popen = processes.spawn(argv, log=log)
        self.pid = self.popen.pid
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"trio-swap exited with status {self.popen.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                if self._call("GET", "/health")[0] == 200:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"trio-swap not listening after {STARTUP_TIMEOUT:g}s")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def models(self) -> dict[str, dict[str, object]]:
        """``GET /api/models`` keyed by model id; remembers upstream pids for cleanup."""
        status, body = self._call("GET", "/api/models")
        if status != 200:
            raise RuntimeError(f"GET /api/models answered {status}: {body[:200]!r}")
        rows = {str(row["id"]): row for row in json.loads(body)["models"]}
        self._upstream_pids.update(int(r["pid"]) for r in rows.values() if r.get("pid"))
        return rows

    def load(self, model: str) -> None:
        """Make ``model`` the running one (a small request through the proxy)."""
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body = json.dumps({**payload, "max_tokens": 1}).encode()
        status, answer = self._call("POST", "/v1/chat/completions", body)
        if status != 200:
            raise RuntimeError(f"loading {model} answered {status}: {answer[:300]!r}")
        self.models()

    def unload(self) -> None:
        """Stop every model and wait until trio-swap reports them all stopped."""
        self.models()
        status, body = self._call("POST", "/api/models/unload", b"{}")
        if status != 200:
            raise RuntimeError(f"unload answered {status}: {body[:200]!r}")
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(row["state"] != "stopped" for row in self.models().values()):
            if time.monotonic() > deadline:
                raise TimeoutError("models still running after unload")
            time.sleep(0.005)

    def stop(self) -> None:
        """SIGTERM (graceful: trio-swap stops its models), then SIGKILL whatever is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_TIMEOUT)
        ProcessSet.kill(self.popen)
        # Belt and braces: trio-swap and its orphan guard should have stopped
        # these already; kill any upstream group still alive, if still ours.
        for pid in self._upstream_pids:
            with contextlib.suppress(OSError):
                if b"responder" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.killpg(pid, signal.SIGKILL)
