"""The Containerfiles, checked as text: no image is built (no registry, maybe no podman).

What matters and can be read from the file: the final stage runs as a
non-root user, starts ``trio-swap serve`` directly (no ``tini``: trio-swap
handles SIGTERM and, as PID 1, reaps orphans: tests/test_pid1.py), exposes the
port it listens on, and installs trio-swap from this source tree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "Containerfile"
WITH_LLAMA = sorted((ROOT / "deploy" / "container").glob("*.Containerfile"))
ALL = [MAIN, *WITH_LLAMA]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str

    def exec_form(self) -> list[str]:
        """A JSON array argument (``["trio-swap", "serve"]``), or a failure."""
        value = json.loads(self.argument)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def instructions(path: Path) -> list[Instruction]:
    """The file's instructions: comments dropped, continuation lines joined."""
    joined: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, f"{path}: a continuation runs off the end"
    result = []
    for line in joined:
        keyword, _, argument = line.partition(" ")
        result.append(Instruction(keyword.upper(), argument.strip()))
    return result


def final_stage(path: Path) -> list[Instruction]:
    every = instructions(path)
    last_from = max(i for i, instruction in enumerate(every) if instruction.keyword == "FROM")
    return every[last_from:]


def _last(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_the_final_stage_runs_as_a_non_root_user(path: Path) -> None:
    user = _last(final_stage(path), "USER").argument.split(":")[0]
    assert user not in ("root", "0"), user


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_trio_swap_serve_is_the_entrypoint_and_no_init_shim(path: Path) -> None:
    stage = final_stage(path)
    assert _last(stage, "ENTRYPOINT").exec_form() == ["trio-swap", "serve"]
    for instruction in instructions(path):
        assert not re.search(r"\b(tini|dumb-init)\b", instruction.argument), instruction
        assert "--init" not in instruction.argument
    command = _last(stage, "CMD").exec_form()
    assert command[command.index("--config") + 1] == "/etc/trio-swap/config.yaml"
    assert command[command.index("--listen") + 1].startswith("0.0.0.0:")


@pytest.mark.parametrize("path", [MAIN, ROOT / "deploy/container/llama-cuda.Containerfile"])
def test_the_port_it_listens_on_is_exposed_and_checked(path: Path) -> None:
    stage = final_stage(path)
    command = _last(stage, "CMD").exec_form()
    port = command[command.index("--listen") + 1].rsplit(":", 1)[1]
    assert _last(stage, "EXPOSE").argument.split() == [port]
    healthcheck = _last(stage, "HEALTHCHECK").argument
    assert f"127.0.0.1:{port}/livez" in healthcheck


def test_the_image_is_a_slim_python_with_trio_swap_from_this_tree() -> None:
    every = instructions(MAIN)
    (python,) = [i.argument for i in every if i.keyword == "ARG" and "PYTHON_IMAGE" in i.argument]
    assert python.split("=", 1)[1].startswith("python:3.11-slim")
    copies = [i.argument for i in every if i.keyword == "COPY"]
    assert "src ./src" in copies and "pyproject.toml README.md ./" in copies
    assert any(
        i.keyword == "RUN" and 'pip install --no-cache-dir "/src' in i.argument for i in every
    )
    # The build context holds only what is copied (no .venv, no tests).
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    entries = [line for line in lines if line and not line.startswith("#")]
    assert entries[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!src/"} <= set(entries)


@pytest.mark.parametrize("path", WITH_LLAMA, ids=lambda p: p.name)
def test_the_llama_images_take_llama_server_from_the_official_image(path: Path) -> None:
    every = instructions(path)
    image = [i.argument for i in every if i.keyword == "ARG" and "LLAMA_IMAGE" in i.argument]
    assert image and image[0].split("=", 1)[1].startswith("ghcr.io/ggml-org/llama.cpp:server")
    # llama.cpp's images keep llama-server and its libraries in /app: the final stage
    # copies it (CPU) or is built on that image (CUDA: its runtime libraries too).
    stage = final_stage(path)
    copied = any(i.keyword == "COPY" and i.argument.endswith("/app /app") for i in stage)
    assert copied or stage[0].argument == "${LLAMA_IMAGE}"
    config = (ROOT / "deploy" / "kubernetes" / "config.yaml").read_text()
    assert "/app/llama-server" in config
