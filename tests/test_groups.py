"""Groups: the eviction rule, config validation, and a real swap sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.conftest import chat, make_config, responder_model, running, wait_for
from trio_swap.config import ConfigError, load_config_text
from trio_swap.config.model import GroupConfig, RoutingConfig
from trio_swap.policy import GroupsPolicy

# llama-swap's groups design (issue #107), m1..m11
DESIGN = [
    GroupConfig(name="G1", members=("m1", "m2")),
    GroupConfig(name="G2", swap=False, members=("m3", "m4")),
    GroupConfig(name="G3", exclusive=False, members=("m5", "m6", "m7")),
    GroupConfig(name="G4", swap=False, exclusive=False, members=("m8", "m9")),
    GroupConfig(name="G5", swap=False, exclusive=False, persistent=True, members=("m10", "m11")),
]
MODELS = [f"m{i}" for i in range(1, 13)]  # m12 is in no group


def policy() -> GroupsPolicy:
    return GroupsPolicy(DESIGN, MODELS)


@pytest.mark.parametrize(
    ("target", "running", "evicted"),
    [
        ("m1", ["m2"], ["m2"]),  # same group, swaps
        ("m3", ["m4"], []),  # same group, swap: false
        ("m1", ["m3", "m5", "m8"], ["m3", "m5", "m8"]),  # exclusive evicts other groups
        ("m1", ["m10", "m11"], []),  # ... except persistent ones
        ("m5", ["m1", "m3"], []),  # non-exclusive: other groups stay
        ("m5", ["m6", "m1"], ["m6"]),  # ... but its own group swaps
        ("m8", ["m9", "m1", "m10"], []),  # swap false + non-exclusive: runs beside anything
        ("m12", ["m1", "m10"], ["m1"]),  # the implicit (default) group is exclusive
        ("m1", ["m12"], ["m12"]),
        ("m1", ["m1", "m2"], ["m2"]),  # the target itself is never evicted
    ],
)
def test_groups_evictions_follow_the_target_groups_flags(
    target: str, running: list[str], evicted: list[str]
) -> None:
    assert list(policy().evictions(target, running)) == evicted


def test_groups_exclusivity_is_one_way_as_in_llama_swap() -> None:
    """A non-exclusive model loads beside an exclusive one; the next exclusive request evicts it."""
    p = policy()
    assert p.evictions("m5", ["m1"]) == ()
    assert p.evictions("m1", ["m1", "m5"]) == ("m5",)


def test_no_groups_means_one_model_at_a_time() -> None:
    p = GroupsPolicy([], ["a", "b", "c"])
    assert p.evictions("a", ["b", "c"]) == ("b", "c")
    assert p.group_of("a").name == "(default)"


def test_explain_names_the_group_and_the_reason() -> None:
    text = policy().explain("m1", ["m2", "m10", "m5"])
    assert "group 'G1'" in text and "m2 (same group" in text and "m5 (group 'G3'" in text


MODELS_YAML = """\
models:
  a: {cmd: "s ${PORT}"}
  b: {cmd: "s ${PORT}"}
  c: {cmd: "s ${PORT}"}
"""


def load(text: str) -> RoutingConfig:
    return load_config_text(MODELS_YAML + text, "config.yaml").routing


def test_legacy_and_routing_spellings_load_the_same_groups() -> None:
    legacy = load("groups:\n  g: {swap: false, members: [a, b]}\n")
    canonical = load(
        "routing:\n  router:\n    use: group\n    settings:\n"
        "      groups:\n        g: {swap: false, members: [a, b]}\n"
    )
    assert legacy == canonical
    assert legacy.groups == (GroupConfig(name="g", swap=False, members=("a", "b")),)


@pytest.mark.parametrize(
    ("text", "key_path", "line", "words"),
    [
        ("groups:\n  g: {members: [a, a]}\n", "groups.g.members[1]", 6, "listed twice"),
        (
            "groups:\n  g: {members: [a]}\n  h: {members: [b, a]}\n",
            "groups.h.members[1]",
            7,
            "already in group 'g'",
        ),
        ("groups:\n  g: {members: [ghost]}\n", "groups.g.members[0]", 6, "unknown model 'ghost'"),
        ("groups:\n  (default): {members: [a]}\n", "groups.(default)", 6, "reserved"),
        ("groups:\n  g: {swap: maybe}\n", "groups.g.swap", 6, ""),
        ("groups:\n  g: {members: [a], colour: red}\n", "groups.g", 6, "colour"),
        (
            "groups:\n  g: {members: [a]}\nrouting:\n  router: {use: group}\n",
            "groups",
            5,
            "routing.router.settings.groups",
        ),
        (
            "groups:\n  g: {members: [a]}\nmatrix:\n  sets: {s: a}\n",
            "matrix",
            7,
            "either 'groups' or 'matrix'",
        ),
        ("routing:\n  router: {use: lottery}\n", "routing.router.use", 6, "'group' or 'matrix'"),
        (
            "routing:\n  router: {use: matrix}\n",
            "routing.router.use",
            6,
            "settings.matrix is missing",
        ),
        ("routing:\n  planner: {}\n", "routing.planner", 6, "unknown key"),
    ],
)
def test_routing_config_errors_name_file_key_and_line(
    text: str, key_path: str, line: int, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    error = caught.value
    assert (error.source, error.key_path, error.line) == ("config.yaml", key_path, line)
    assert words in str(error)


def test_scheduler_settings_and_preload_load_with_aliases_resolved() -> None:
    text = MODELS_YAML.replace('c: {cmd: "s ${PORT}"}', 'c: {cmd: "s ${PORT}", aliases: [see]}')
    config = load_config_text(
        text
        + "routing:\n  scheduler:\n    use: fifo\n    settings:\n"
        + "      maxWait: 5\n      minResident: 2\n      maxQueue: 50\n"
        + "      fifo: {priority: {see: 10, a: -1}}\n"
        + "hooks:\n  on_startup:\n    preload: [see, a]\n",
        "config.yaml",
    )
    scheduler = config.routing.scheduler
    assert (scheduler.max_wait, scheduler.min_resident, scheduler.max_queue) == (5, 2, 50)
    assert scheduler.priority == {"c": 10, "a": -1}  # the alias counts (llama-swap ignores it)
    assert config.preload == ("c", "a")


@pytest.mark.parametrize(
    ("text", "key_path", "words"),
    [
        ("routing:\n  scheduler: {use: lifo}\n", "routing.scheduler.use", "'fifo'"),
        (
            "routing:\n  scheduler: {settings: {maxWait: -1}}\n",
            "routing.scheduler.settings.maxWait",
            ">= 0",
        ),
        (
            "routing:\n  scheduler: {settings: {fifo: {priority: {ghost: 1}}}}\n",
            "routing.scheduler.settings.fifo.priority.ghost",
            "unknown model",
        ),
        ("hooks:\n  on_startup: {preload: [ghost]}\n", "hooks.on_startup.preload[0]", "ghost"),
        ("hooks:\n  on_shutdown: {}\n", "hooks.on_shutdown", "unknown hook"),
    ],
)
def test_scheduler_and_hook_errors_are_located(text: str, key_path: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text) if "hooks" not in text else load_config_text(MODELS_YAML + text, "c.yaml")
    assert caught.value.key_path == key_path
    assert caught.value.line is not None
    assert words in str(caught.value)


async def test_groups_sequence_with_real_processes(tmp_path: Path) -> None:
    """An always-on embedding model beside a swapping pair of LLMs."""
    config = make_config(
        responder_model("llm-a"), responder_model("llm-b"), responder_model("embed")
    )
    config = type(config)(
        source=config.source,
        models=config.models,
        log_to_stdout="none",
        routing=RoutingConfig(
            groups=(
                GroupConfig(name="llms", members=("llm-a", "llm-b")),
                GroupConfig(
                    name="always",
                    swap=False,
                    exclusive=False,
                    persistent=True,
                    members=("embed",),
                ),
            )
        ),
    )
    steps = [
        ("embed", {"embed"}),
        ("llm-a", {"embed", "llm-a"}),
        ("llm-b", {"embed", "llm-b"}),
        ("embed", {"embed", "llm-b"}),
        ("llm-a", {"embed", "llm-a"}),
    ]
    with trio.fail_after(60):
        async with running(config) as h:
            for model, expected in steps:
                response = await h.client.post("/v1/chat/completions", json=chat(model))
                assert response.status_code == 200
                rows = (await h.client.get("/running")).json()["running"]
                assert {row["model"] for row in rows} == expected, model
            models = await h.models()
            assert models["embed"]["start_count"] == 1
            assert models["llm-a"]["start_count"] == 2


GROUPS_CONFIG = """\
models:
  llm-a: {cmd: "s ${PORT}"}
  llm-b: {cmd: "s ${PORT}", aliases: [b]}
  embed: {cmd: "s ${PORT}"}
  other: {cmd: "s ${PORT}"}
groups:
  llms: {members: [llm-a, llm-b]}
  always: {swap: false, exclusive: false, persistent: true, members: [embed]}
"""


def test_check_json_lists_groups_in_definition_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trio_swap.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(GROUPS_CONFIG)
    assert main(["check", "--config", str(path), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["router"] == "group"
    assert document["models"] == ["llm-a", "llm-b", "embed", "other"]
    assert list(document["groups"]) == ["llms", "always", "(default)"]
    assert document["groups"]["always"] == {
        "swap": False,
        "exclusive": False,
        "persistent": True,
        "members": ["embed"],
    }
    assert document["groups"]["(default)"]["members"] == ["other"]


def test_plan_answers_in_json_and_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trio_swap.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(GROUPS_CONFIG)
    args = ["plan", "--config", str(path), "--running", "llm-a,embed,other", "--request", "b"]
    assert main([*args, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "evict": ["llm-a", "other"],
        "set": None,
        "cost": None,
    }
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "llm-b is in group 'llms'" in text and "llm-a (same group" in text
    assert main(["plan", "--config", str(path), "--request", "ghost"]) == 2
    assert "unknown model 'ghost'" in capsys.readouterr().err


def test_scheduler_loads_coexisting_models_in_parallel() -> None:
    from tests.scheduler_support import Quiet
    from trio_swap.scheduling import FifoScheduler, Grant, ModelLimits, StartSwap

    pool = GroupConfig(name="pool", swap=False, members=("a", "b"))
    scheduler = Quiet(
        FifoScheduler(
            {m: ModelLimits(concurrency_limit=10, ttl=0) for m in ("a", "b", "c")},
            GroupsPolicy([pool], ["a", "b", "c"]),
        )
    )
    (swap_a,) = scheduler.on_request(1, "a", 0)
    (swap_b,) = scheduler.on_request(2, "b", 0)  # no eviction, no collision: loads now
    assert swap_a == StartSwap(swap_id=1, target="a", victims=())
    assert swap_b == StartSwap(swap_id=2, target="b", victims=())
    assert scheduler.on_request(3, "c", 0) == []  # c evicts a and b, both loading: waits
    assert scheduler.on_swap_done(2, None, 1) == [Grant(request_id=2, model="b")]
    assert scheduler.on_swap_done(1, None, 1) == [Grant(request_id=1, model="a")]
    assert scheduler.queued("c") == 1


async def test_coexisting_models_load_at_the_same_time_and_serve_concurrently() -> None:
    config = make_config(
        responder_model("a", "--load-delay", "1"),
        responder_model("b", "--load-delay", "1"),
    )
    config = type(config)(
        source=config.source,
        models=config.models,
        log_to_stdout="none",
        routing=RoutingConfig(groups=(GroupConfig(name="pool", swap=False, members=("a", "b")),)),
    )
    with trio.fail_after(60):
        async with running(config) as h:

            async def ask(model: str) -> None:
                response = await h.client.post("/v1/chat/completions", json=chat(model))
                assert response.status_code == 200

            async def overlap_or_one_done() -> dict[str, object] | None:
                """Both loading (the point), or one ready already (they did not overlap)."""
                states = {m: row["state"] for m, row in (await h.models()).items()}
                overlapping = states == {"a": "starting", "b": "starting"}
                return states if overlapping or "ready" in states.values() else None

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "a")
                nursery.start_soon(ask, "b")
                states = await wait_for(overlap_or_one_done, what="the loads of a and b to begin")
            assert states == {"a": "starting", "b": "starting"}, "the two loads did not overlap"
            rows = (await h.client.get("/running")).json()["running"]
            assert {row["model"] for row in rows} == {"a", "b"}
