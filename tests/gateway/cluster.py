"""The gateway lane's processes: trio-swap nodes and a LiteLLM proxy, each a real subprocess.

A node is ``trio-swap serve`` on loopback with built-in responder models; the
gateway is LiteLLM's own ``litellm`` command on the config that
``trio-swap gateway-config`` printed for the nodes. The tests are plain
synchronous code (the ``openai`` SDK, ``httpx``), as a gateway's clients are.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar

import httpx

from tests.conftest import free_port

T = TypeVar("T")

#: LiteLLM refuses to start without a master key; clients send it as their API key.
MASTER_KEY: Final = "sk-gateway-lane"
#: LiteLLM imports for 15-20 s on the 2-core machines; trio-swap starts in about 1 s.
STARTUP_TIMEOUT: Final = 120.0


def poll(predicate: Callable[[], T | None], *, what: str, timeout: float = 30.0) -> T:
    """Call ``predicate`` until it returns something true; a hang guard, not a timing."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Node:
    """One ``trio-swap serve`` on loopback; models are responders kept loaded together."""

    def __init__(
        self,
        name: str,
        directory: Path,
        models: Mapping[str, Sequence[str]],
        settings: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        """``models``: id -> responder flags; ``settings``: id -> more config keys."""
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"node-{name}.log"
        self.config = directory / f"node-{name}.yaml"
        self.popen: subprocess.Popen[bytes] | None = None
        lines = [f"startPort: {free_port()}", "models:"]
        for model, flags in models.items():
            argv = [sys.executable, "-m", "trio_swap", "responder", "--port", "${PORT}"]
            argv += ["--model", model, *flags]
            lines += [f"  {model}:", f"    cmd: {json.dumps(shlex.join(argv))}"]
            lines += [
                f"    {k}: {json.dumps(v)}" for k, v in (settings or {}).get(model, {}).items()
            ]
        # One group that does not swap: every model stays up once started, so
        # requests spread over models never wait for a swap.
        lines += [
            "groups:",
            "  all:",
            "    swap: false",
            f"    members: {json.dumps(list(models))}",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        argv = [sys.executable, "-m", "trio_swap", "serve", "--config", str(self.config)]
        argv += ["--listen", f"127.0.0.1:{self.port}"]
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

        def healthy() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"node {self.name} exited:\n{_log_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            return False

        poll(healthy, what=f"node {self.name} to listen", timeout=STARTUP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL trio-swap, as a box that dies; its orphan guard takes the models down."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(30)

    def stop(self) -> None:
        """SIGTERM (trio-swap stops its models), SIGKILL if that takes too long."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def answered(self, model: str) -> list[int]:
        """The status of each request for ``model`` this node has finished, oldest first."""
        response = httpx.get(
            f"{self.url}/api/activity", params={"model": model, "limit": 1000}, timeout=10
        )
        response.raise_for_status()
        return [row["status"] for row in reversed(response.json()["data"])]


class LiteLLM:
    """LiteLLM's proxy (``litellm --config FILE``) on loopback: no database, a master key."""

    def __init__(self, config: Path, directory: Path) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "litellm.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> Path:
        found = Path(sys.executable).with_name("litellm")
        if not found.exists():
            raise AssertionError("LiteLLM is not installed: pip install -e '.[gateway]'")
        return found

    def start(self) -> None:
        argv = [str(self.executable()), "--config", str(self.config)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": MASTER_KEY,
            # The model cost map is otherwise fetched from the network at startup
            # (three tries, then the packaged copy): use the packaged copy at once.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        env.pop("DATABASE_URL", None)  # no database: the config file is all there is
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )

        def ready() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"LiteLLM exited:\n{_log_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(f"{self.url}/health/readiness", timeout=5)
                return answer.status_code == 200
            return False

        poll(ready, what="LiteLLM to be ready", timeout=STARTUP_TIMEOUT)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(30)

    def log_tail(self) -> str:
        return _log_tail(self.log)
