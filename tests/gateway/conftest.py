"""Fixtures for the gateway lane: LiteLLM's proxy in front of two trio-swap nodes.

Run with ``just test-gateway`` (``pytest -n 0 -m gateway tests/gateway``); the
default test run deselects it. It needs the ``gateway`` extra
(``pip install -e '.[gateway]'``: LiteLLM's proxy and the ``openai`` SDK) and
installs nothing itself. Everything listens on loopback.

The cluster (docs/scaling.md):

* node A serves ``alpha``, ``shared``, ``flaky`` and ``twin``;
* node B serves ``beta`` (20 tokens a second), ``shared`` (as slow, one request
  at a time: trio-swap answers 429 beyond it), ``flaky``, which cannot start
  there (the responder's ``--fail-start``: trio-swap answers 503), and ``twin``;
* LiteLLM runs the config ``trio-swap gateway-config`` printed for A and B, as is.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway.cluster import LiteLLM, Node


@dataclass
class Cluster:
    a: Node
    b: Node
    gateway: LiteLLM
    config_text: str  # what gateway-config printed, and LiteLLM runs


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    LiteLLM.executable()  # fail at once, with the install command, if it is missing
    directory = tmp_path_factory.mktemp("gateway")
    a = Node("a", directory, {"alpha": [], "shared": [], "flaky": [], "twin": []})
    slow = ["--token-delay", "0.05"]  # 20 tokens a second
    b = Node(
        "b",
        directory,
        {"beta": slow, "shared": slow, "flaky": ["--fail-start"], "twin": []},
        {"shared": {"concurrencyLimit": 1}},
    )
    gateway: LiteLLM | None = None
    try:
        a.start()
        b.start()
        command = [sys.executable, "-m", "trio_swap", "gateway-config"]
        generated = subprocess.run(
            [*command, "--node", a.url, "--node", b.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert generated.returncode == 0, generated.stderr
        config = directory / "litellm.yaml"
        config.write_text(generated.stdout)
        gateway = LiteLLM(config, directory)
        gateway.start()
        yield Cluster(a, b, gateway, generated.stdout)
    finally:
        if gateway is not None:
            gateway.stop()
        b.stop()
        a.stop()


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """On a failure, the tail of each process's log: that is what explains it."""
    found = getattr(item, "funcargs", {}).get("cluster")
    if call.when == "call" and call.excinfo is not None and isinstance(found, Cluster):
        logs = {"LiteLLM": found.gateway.log, "node A": found.a.log, "node B": found.b.log}
        for name, log in logs.items():
            item.add_report_section("call", name, _tail(log))


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    except OSError:
        return "(no log)"
