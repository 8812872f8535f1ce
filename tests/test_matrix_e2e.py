"""The matrix policy end to end: config loading, the CLI contract, real swaps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.conftest import chat, make_config, responder_model, running
from trio_swap.cli import main
from trio_swap.config import ConfigError, load_config_text
from trio_swap.config.matrix_dsl import compile_matrix
from trio_swap.config.model import RoutingConfig

SEED = """\
models:
  gemma-model: {cmd: "s ${PORT}"}
  qwen-model: {cmd: "s ${PORT}"}
  voxtral-model: {cmd: "s ${PORT}"}
  reranker-model: {cmd: "s ${PORT}"}
  llama-70B: {cmd: "s ${PORT}"}
routing:
  router:
    use: matrix
    settings:
      matrix:
        vars: {g: gemma-model, q: qwen-model, v: voxtral-model, e: reranker-model, L: llama-70B}
        evict_costs: {v: 50, L: 30}
        sets:
          standard: "(g | q) & v"
          with_rerank: "(g | q) & v & e"
          full: "L"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_check_json_lists_sets_expanded_and_sorted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(write(tmp_path, SEED)), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["router"] == "matrix"
    assert list(document["sets"]) == ["standard", "with_rerank", "full"]
    assert document["sets"]["standard"] == [
        ["gemma-model", "voxtral-model"],
        ["qwen-model", "voxtral-model"],
    ]
    assert document["sets"]["with_rerank"][0] == ["gemma-model", "reranker-model", "voxtral-model"]
    assert document["sets"]["full"] == [["llama-70B"]]
    assert "groups" not in document


@pytest.mark.parametrize(
    ("running", "request_", "expected"),
    [
        # switching LLMs keeps the expensive speech model
        (
            "gemma-model,voxtral-model",
            "qwen-model",
            {"evict": ["gemma-model"], "set": "standard", "cost": 1},
        ),
        # the 70B runs alone: everything goes
        (
            "qwen-model,voxtral-model",
            "llama-70B",
            {"evict": ["qwen-model", "voxtral-model"], "set": "full", "cost": 51},
        ),
        # already running: nothing to do
        ("qwen-model", "qwen-model", {"evict": [], "set": None, "cost": 0}),
    ],
)
def test_plan_json_gives_evictions_set_and_cost(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    running: str,
    request_: str,
    expected: dict[str, object],
) -> None:
    path = str(write(tmp_path, SEED))
    args = ["plan", "--config", path, "--running", running, "--request", request_]
    assert main([*args, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert main(args) == 0
    assert request_ in capsys.readouterr().out


def test_matrix_errors_are_located_at_the_set(tmp_path: Path) -> None:
    text = SEED.replace('full: "L"', 'full: "L &"')
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "config.yaml")
    error = caught.value
    assert error.key_path == "routing.router.settings.matrix.sets.full"
    assert error.line == 17
    assert "nothing on its right" in str(error)
    assert "column" in str(error)


def test_check_exits_2_on_an_unknown_name_in_a_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, SEED.replace('full: "L"', 'full: "L | ghost"'))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sets.full" in err and "ghost" in err and ":17:" in err


async def test_matrix_sequence_with_real_processes() -> None:
    """The running set after each request is exactly what the solver says."""
    base = make_config(responder_model("llm-a"), responder_model("llm-b"), responder_model("tts"))
    config = type(base)(
        source=base.source,
        models=base.models,
        log_to_stdout="none",
        routing=RoutingConfig(
            router="matrix",
            matrix=compile_matrix(
                {"speech": "(llm-a | llm-b) & tts"}, evict_costs={"tts": 50}, models=base.models
            ),
        ),
    )
    steps = [
        ("tts", {"tts"}),
        ("llm-a", {"tts", "llm-a"}),
        ("llm-b", {"tts", "llm-b"}),  # swaps the LLM, keeps the costly tts
        ("tts", {"tts", "llm-b"}),
    ]
    with trio.fail_after(60):
        async with running(config) as h:
            for model, expected in steps:
                response = await h.client.post("/v1/chat/completions", json=chat(model))
                assert response.status_code == 200
                rows = (await h.client.get("/running")).json()["running"]
                assert {row["model"] for row in rows} == expected, model
            assert (await h.models())["tts"]["start_count"] == 1


def test_scheduler_with_the_matrix_loads_coexisting_models_in_parallel() -> None:
    from tests.scheduler_support import Quiet
    from trio_swap.policy.matrix import MatrixPolicy
    from trio_swap.scheduling import FifoScheduler, ModelLimits, StartSwap

    policy = MatrixPolicy.build({"pair": "a & b", "solo": "c"}, models=["a", "b", "c"])
    limits = {m: ModelLimits(concurrency_limit=10, ttl=0) for m in "abc"}
    scheduler = Quiet(FifoScheduler(limits, policy))
    assert scheduler.on_request(1, "a", 0) == [StartSwap(swap_id=1, target="a", victims=())]
    assert scheduler.on_request(2, "b", 0) == [StartSwap(swap_id=2, target="b", victims=())]
    assert scheduler.on_request(3, "c", 0) == []  # c runs alone: waits for both loads
    scheduler.on_swap_done(1, None, 1)
    scheduler.on_swap_done(2, None, 1)
    scheduler.on_finished(1, 2)
    assert scheduler.on_finished(2, 2) == [StartSwap(swap_id=3, target="c", victims=("a", "b"))]
