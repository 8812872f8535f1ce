"""Selectors and profiles (issue 13): virtual model names, checked at load and chosen per request.

Config rules are checked with located errors (file, key path, line) as
llama-swap's reference states them; the choices are checked with real
responders: ``warm`` picks the ready target, ``pin`` always the first,
``spillover`` moves to the next target past N requests in flight and comes
back when the load drops; profiles are switched over HTTP.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from tests.conftest import Harness, chat, free_port, running, wait_for
from trio_swap.config.errors import ConfigError
from trio_swap.config.load import load_config, load_config_text
from trio_swap.config.model import Config

RESPONDER = f"{sys.executable} -m trio_swap responder --port ${{PORT}}"

BASE = f"""\
models:
  a:
    cmd: {RESPONDER} --model a
    aliases: [a-alias]
  b:
    cmd: {RESPONDER} --model b
  c:
    cmd: {RESPONDER} --model c
peers:
  far:
    proxy: http://127.0.0.1:9
    models: [remote]
groups:
  together:
    swap: false
    members: [a, b]
"""


def located(tmp_path: Path, extra: str) -> ConfigError:
    path = tmp_path / "config.yaml"
    path.write_text(BASE + textwrap.dedent(extra))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    return info.value


@pytest.mark.parametrize(
    ("extra", "key_path", "line", "words"),
    [
        ("selectors:\n  a: {strategy: pin, targets: [b]}\n", "selectors.a", 18, "already a model"),
        (
            "selectors:\n  a-alias: {strategy: pin, targets: [b]}\n",
            "selectors.a-alias",
            18,
            "already a model",
        ),
        ("selectors:\n  ' ': {strategy: pin, targets: [b]}\n", 'selectors." "', 18, "blank"),
        ("selectors:\n  s: {targets: [b]}\n", "selectors.s.strategy", 18, "required"),
        ("selectors:\n  s: {strategy: best, targets: [b]}\n", "selectors.s.strategy", 18, "one of"),
        ("selectors:\n  s: {strategy: pin}\n", "selectors.s.targets", 18, "required"),
        ("selectors:\n  s: {strategy: pin, targets: []}\n", "selectors.s.targets", 18, "non-empty"),
        (
            "selectors:\n  s: {strategy: pin, targets: [nope]}\n",
            "selectors.s.targets[0]",
            18,
            "unknown model 'nope'",
        ),
        (
            "selectors:\n  s: {strategy: pin, targets: [t]}\n  t: {strategy: pin, targets: [a]}\n",
            "selectors.s.targets[0]",
            18,
            "cannot target a selector",
        ),
        (
            "selectors:\n  s: {strategy: warm, targets: [a, far/remote]}\n",
            "selectors.s.targets[1]",
            18,
            "warm selector picks local models",
        ),
        (
            "selectors:\n  s: {strategy: spillover, targets: [a, a-alias]}\n",
            "selectors.s.targets[1]",
            18,
            "same model as targets[0]",
        ),
        (
            "selectors:\n  s: {strategy: spillover, targets: [far/remote, remote]}\n",
            "selectors.s.targets[1]",
            18,
            "same model as targets[0]",
        ),
        (
            "selectors:\n  s: {strategy: spillover, targets: [a, c]}\n",
            "selectors.s.targets",
            18,
            "cannot run together",
        ),
        (
            "selectors:\n  s:\n    strategy: spillover\n    targets: [a, b]\n"
            "    settings: {spillover: 0}\n",
            "selectors.s.settings.spillover",
            21,
            ">= 1",
        ),
        ("profiles:\n  p: [a, b]\n", "profiles.p", 18, "list form"),
        ("profiles:\n  p: {description: x}\n", "profiles.p.pins", 18, "required"),
        ("profiles:\n  p: {pins: {}}\n", "profiles.p.pins", 18, "non-empty"),
        ("profiles:\n  p: {pins: {' ': a}}\n", 'profiles.p.pins." "', 18, "blank"),
        ("profiles:\n  p: {pins: {x: nope}}\n", "profiles.p.pins.x", 18, "unknown model 'nope'"),
        # Pins do not chain: y's target is only another pin's name.
        ("profiles:\n  p: {pins: {x: a, y: x}}\n", "profiles.p.pins.y", 18, "unknown model 'x'"),
    ],
)
def test_each_selector_and_profile_rule_is_a_located_error(
    tmp_path: Path, extra: str, key_path: str, line: int, words: str
) -> None:
    error = located(tmp_path, extra)
    assert error.key_path == key_path
    assert error.line == line
    assert words in error.message


def test_check_exits_2_naming_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BASE + "selectors:\n  s: {strategy: pin, targets: [nope]}\n")
    done = subprocess.run(
        [sys.executable, "-m", "trio_swap", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"{path}:18" in done.stderr
    assert "selectors.s.targets[0]" in done.stderr


def test_a_good_config_loads_with_no_warning(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        BASE
        + textwrap.dedent(
            """\
            selectors:
              fast: {strategy: spillover, targets: [a, b, far/remote], settings: {spillover: 2}}
              warmest: {strategy: warm, targets: [b, a-alias], unlisted: true}
            profiles:
              work: {description: day, pins: {chat: fast, c: "", gpt-4o: far/remote}}
            """
        )
    )
    config = load_config(path)
    assert not config.warnings
    assert config.selectors["fast"].spillover == 2
    assert config.profiles["work"].pins == {"chat": "fast", "c": "", "gpt-4o": "far/remote"}


# --- at run time, with responders --------------------------------------------------------


def runtime_text(selectors: str, profiles: str = "") -> str:
    text = f"startPort: {free_port()}\nlogToStdout: none\n" + BASE.split("peers:")[0]
    text += "groups:\n  together:\n    swap: false\n    members: [a, b, c]\n"
    return text + selectors + profiles


def runtime_config(selectors: str, profiles: str = "") -> Config:
    return load_config_text(runtime_text(selectors, profiles), "<test>")


async def model_of(harness: Harness, name: str) -> str:
    """Which target answered: the responder echoes the model name it was sent."""
    response = await harness.client.post("/v1/chat/completions", json=chat(name, max_tokens=1))
    assert response.status_code == 200, response.text
    return str(response.json()["model"])


async def test_pin_takes_the_first_target_and_warm_the_ready_one() -> None:
    config = runtime_config(
        "selectors:\n"
        "  pinned: {strategy: pin, targets: [b, a]}\n"
        "  warm: {strategy: warm, targets: [a, c]}\n"
    )
    with trio.fail_after(60):
        async with running(config) as harness:
            assert await model_of(harness, "pinned") == "b"
            assert await model_of(harness, "warm") == "a"  # nothing ready: the first
            await harness.client.post("/api/models/unload/a")
            assert await model_of(harness, "c") == "c"
            assert await model_of(harness, "warm") == "c"  # c is ready, a is not
            assert await model_of(harness, "pinned") == "b"  # always the first
            rows = (await harness.client.get("/api/activity")).json()["data"]
            assert (rows[0]["model"], rows[0]["selector"]) == ("b", "pinned")  # newest first
            # c answered the client that named it, then the warm selector's request.
            assert [row["selector"] for row in rows if row["model"] == "c"] == ["warm", None]
            models = (await harness.client.get("/v1/models")).json()["data"]
            entry = {m["id"]: m for m in models}["warm"]
            assert entry["meta"]["llamaswap"]["type"] == "selector"
            assert entry["meta"]["llamaswap"]["targets"] == ["a", "c"]
            assert entry["status"]["value"] == "loaded"


async def test_spillover_moves_on_past_n_in_flight_and_comes_back_when_the_load_drops() -> None:
    slow = "--token-delay 0.05 --tokens 2000"
    text = f"startPort: {free_port()}\nlogToStdout: none\nmodels:\n"
    for model in ("a", "b"):
        text += f"  {model}:\n    cmd: {RESPONDER} --model {model} {slow}\n"
    text += "groups:\n  g:\n    swap: false\n    members: [a, b]\n"
    text += "selectors:\n  spill: {strategy: spillover, targets: [a, b]}\n"
    with trio.fail_after(60):
        async with running(load_config_text(text, "<test>")) as harness:
            selection = harness.server.selection
            assert selection is not None
            body = chat("spill", stream=True)
            async with harness.client.stream("POST", "/v1/chat/completions", json=body) as first:
                line = await anext(first.aiter_lines())
                assert '"model":"a"' in line.replace(" ", "")  # nothing active: the first
                # a has one request in flight (spillover 1): the next goes to b.
                async with harness.client.stream(
                    "POST", "/v1/chat/completions", json=body
                ) as second:
                    line = await anext(second.aiter_lines())
                    assert '"model":"b"' in line.replace(" ", "")
                    await first.aclose()  # a's load drops...
                    await wait_for(
                        lambda: selection.reservations().get("a") is None,
                        what="a's reservation to end",
                    )
                    assert await model_of(harness, "spill") == "a"  # ...and it comes back
            await wait_for(lambda: not selection.reservations(), what="every reservation to end")


async def test_profiles_pin_names_switch_over_http_and_reset_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"  # a file, so that it can be reloaded
    path.write_text(
        runtime_text(
            "selectors:\n  pinned: {strategy: pin, targets: [b]}\n",
            "profiles:\n"
            "  night: {description: quiet, pins: {chat: pinned, c: ''}}\n"
            "  day: {pins: {chat: a}}\n",
        )
    )
    with trio.fail_after(60):
        async with running(load_config(path), config_path=path) as harness:
            client = harness.client
            listed = (await client.get("/api/profiles")).json()
            assert listed == {
                "active": None,
                "profiles": [
                    {"id": "day", "description": "", "pins": {"chat": "a"}},
                    {"id": "night", "description": "quiet", "pins": {"chat": "pinned", "c": ""}},
                ],
            }
            none_yet = await client.post("/v1/chat/completions", json=chat("chat"))
            assert none_yet.status_code == 404  # no profile: "chat" is no model
            answer = await client.put("/api/profiles/active", json={"name": "night"})
            assert answer.json() == {"active": "night"}
            assert await model_of(harness, "chat") == "b"  # pin -> selector -> b
            turned_off = await client.post("/v1/chat/completions", json=chat("c"))
            assert turned_off.status_code == 404
            ids = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
            assert "chat" in ids  # the active profile's pin is listed
            await client.put("/api/profiles/active", json={"name": "day"})
            assert await model_of(harness, "chat") == "a"
            assert await model_of(harness, "c") == "c"
            for bad, status in (
                (b"not json", 400),
                (b"{}", 400),
                (b'{"name": 3}', 400),
                (b'{"name": "evening"}', 404),
            ):
                refused = await client.put("/api/profiles/active", content=bad)
                assert refused.status_code == status, bad
                assert "error" in refused.json()
            assert (await client.get("/api/profiles")).json()["active"] == "day"  # unchanged
            path.write_text(path.read_text() + "\n")  # the same config, read again
            reloaded = await client.post("/api/config/reload")
            assert reloaded.status_code == 200, reloaded.text
            assert (await client.get("/api/profiles")).json()["active"] is None  # reset
            await client.put("/api/profiles/active", json={"name": "day"})
            off = await client.put("/api/profiles/active", json={"name": None})
            assert off.json() == {"active": None}


async def test_the_event_feed_says_when_the_profile_changes() -> None:
    config = runtime_config("", "profiles:\n  p: {pins: {chat: a}}\n")
    with trio.fail_after(60):
        async with running(config) as harness, harness.client.stream("GET", "/api/events") as feed:
            lines = feed.aiter_lines()
            first = ""
            while not first.startswith("data:"):
                first = await anext(lines)
            assert '"profile":null' in first.replace(" ", "")
            await harness.client.put("/api/profiles/active", json={"name": "p"})
            seen = ""
            while "event: profile" not in seen:
                seen = await anext(lines)
            data = await anext(lines)
            assert data.replace(" ", "") == 'data:{"active":"p"}'


# --- review (issue 13): reservations on failing paths, the other routes, listing --------


async def test_a_body_refused_after_the_choice_leaves_no_reservation() -> None:
    """A body whose ``model`` decodes but whose rewrite fails (a number out of range) is
    a 400 after spillover chose a target: the target must not look busy afterwards."""
    config = runtime_config("selectors:\n  spill: {strategy: spillover, targets: [a, b]}\n")
    with trio.fail_after(60):
        async with running(config) as harness:
            selection = harness.server.selection
            assert selection is not None
            bad = b'{"model": "spill", "x": 1e400}'
            headers = {"content-type": "application/json"}
            refused = await harness.client.post(
                "/v1/chat/completions", content=bad, headers=headers
            )
            assert refused.status_code == 400, refused.text
            # (released once the handler has sent the 400 and returned)
            await wait_for(lambda: not selection.reservations(), what="the reservation to end")
            assert await model_of(harness, "spill") == "a"  # a is not busy with the refused one
            await wait_for(lambda: not selection.reservations(), what="every reservation to end")


async def test_multipart_and_query_routes_send_the_chosen_name() -> None:
    config = runtime_config(
        "selectors:\n  pinned: {strategy: pin, targets: [b]}\n",
        "profiles:\n  p: {pins: {speech: a-alias}}\n",
    )
    with trio.fail_after(60):
        async with running(config) as harness:
            client = harness.client
            await client.put("/api/profiles/active", json={"name": "p"})
            for asked, sent in (("pinned", "b"), ("speech", "a-alias")):
                files = {"file": ("x.wav", b"RIFF")}
                answer = await client.post(
                    "/v1/audio/transcriptions", data={"model": asked}, files=files
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["text"].endswith(f" by {sent}"), answer.text
                props = await client.get("/props", params={"model": asked})
                assert props.status_code == 200, props.text
                assert props.json()["model"] == sent


async def test_a_profile_pin_named_like_a_peer_model_is_listed_once(tmp_path: Path) -> None:
    text = runtime_text("", "profiles:\n  p: {pins: {far/remote: a}}\n")
    text = text.replace("groups:", "peers:\n  far:\n    proxy: http://127.0.0.1:9\n"
                        "    models: [remote]\ngroups:", 1)  # fmt: skip
    with trio.fail_after(60):
        async with running(load_config_text(text, "<test>")) as harness:
            await harness.client.put("/api/profiles/active", json={"name": "p"})
            ids = [m["id"] for m in (await harness.client.get("/v1/models")).json()["data"]]
            assert ids.count("far/remote") == 1, ids
            assert await model_of(harness, "far/remote") == "a"  # the pin goes first


async def test_a_selector_named_like_a_peer_model_warns_and_is_listed_once() -> None:
    """The selector is read first, so the peer model's name reaches the selector: said at
    load, and /v1/models has one entry for the id (the selector's, which is what answers)."""
    text = runtime_text("selectors:\n  far/remote: {strategy: pin, targets: [a]}\n")
    text = text.replace("groups:", "peers:\n  far:\n    proxy: http://127.0.0.1:9\n"
                        "    models: [remote]\ngroups:", 1)  # fmt: skip
    config = load_config_text(text, "<test>")
    assert any("shadows the peer model" in warning for warning in config.warnings), config.warnings
    with trio.fail_after(60):
        async with running(config) as harness:
            models = (await harness.client.get("/v1/models")).json()["data"]
            entries = [m for m in models if m["id"] == "far/remote"]
            assert [m["meta"]["llamaswap"]["type"] for m in entries] == ["selector"]
            assert await model_of(harness, "far/remote") == "a"
