"""``sleep:`` per model and ``sleepTTL`` at the top (config/sleep.py, issue 12).

Configs are loaded through the public loader, so every error is checked with
its key path and its 1-based line (line 1 is the text's first line).
"""

from __future__ import annotations

import textwrap

import pytest

from trio_swap.config import Config, ConfigError, load_config_text
from trio_swap.config.diff import diff_configs
from trio_swap.config.model import (
    DEFAULT_SLEEP_CALL_TIMEOUT,
    DEFAULT_SLEEP_TTL,
    HttpCall,
    SleepConfig,
)

HEAD = """\
models:
  m:
    cmd: server --port ${PORT}
"""
PING = {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
DEFAULT_TEST = HttpCall(method="POST", path="/v1/chat/completions", body=PING)


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "c.yaml", environ={})


def sleep_of(text: str) -> SleepConfig:
    """``HEAD`` plus ``text`` (the rest of model m), m's sleep config."""
    sleep = load(HEAD + textwrap.indent(textwrap.dedent(text), "    ")).models["m"].sleep
    assert sleep is not None
    return sleep


def fails(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(HEAD + textwrap.indent(textwrap.dedent(text), "    "))
    return info.value


def post(path: str, body: dict[str, object] | None = None) -> HttpCall:
    return HttpCall(method="POST", path=path, body=body)


IS_SLEEPING = HttpCall(method="GET", path="/is_sleeping")


# --- presets --------------------------------------------------------------------------


def test_no_sleep_key_means_none_and_sleep_ttl_default() -> None:
    config = load(HEAD)
    assert config.models["m"].sleep is None
    assert config.sleep_ttl == DEFAULT_SLEEP_TTL == 3600


def test_preset_vllm() -> None:
    assert sleep_of("sleep: vllm") == SleepConfig(
        preset="vllm",
        sleep=post("/sleep?level=1"),
        wake=(post("/wake_up"),),
        check=IS_SLEEPING,
        test=DEFAULT_TEST,
        timeout=DEFAULT_SLEEP_CALL_TIMEOUT,
    )


def test_preset_vllm_2_reloads_weights_and_resets_the_prefix_cache() -> None:
    assert sleep_of("sleep: vllm-2") == SleepConfig(
        preset="vllm-2",
        sleep=post("/sleep?level=2"),
        wake=(
            post("/wake_up"),
            post("/collective_rpc", {"method": "reload_weights"}),
            post("/reset_prefix_cache"),
        ),
        check=IS_SLEEPING,
        test=DEFAULT_TEST,
        timeout=DEFAULT_SLEEP_CALL_TIMEOUT,
    )


def test_preset_sglang_has_no_check() -> None:
    assert sleep_of("sleep: sglang") == SleepConfig(
        preset="sglang",
        sleep=post("/release_memory_occupation", {}),
        wake=(post("/resume_memory_occupation", {}),),
        check=None,
        test=DEFAULT_TEST,
        timeout=DEFAULT_SLEEP_CALL_TIMEOUT,
    )


def test_the_test_request_names_use_model_name() -> None:
    sleep = sleep_of("useModelName: Qwen/Qwen3-8B\nsleep: vllm\n")
    assert sleep.test is not None and sleep.test.body is not None
    assert sleep.test.body["model"] == "Qwen/Qwen3-8B"


# --- the explicit form ----------------------------------------------------------------


def test_explicit_form() -> None:
    sleep = sleep_of(
        """\
        sleep:
          sleep: post /sleep?level=1
          wake:
            - POST /wake_up?tags=weights
            - {path: /collective_rpc, body: {method: reload_weights}}
            - method: PUT
              path: /reset
          check: GET /is_sleeping
          timeout: 60
          test: {path: /v1/completions, body: {prompt: hi, max_tokens: 1}}
        """
    )
    assert sleep == SleepConfig(
        preset=None,
        sleep=post("/sleep?level=1"),
        wake=(
            post("/wake_up?tags=weights"),
            post("/collective_rpc", {"method": "reload_weights"}),
            HttpCall(method="PUT", path="/reset"),
        ),
        check=IS_SLEEPING,
        test=post("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        timeout=60.0,
    )


def test_explicit_minimal_form_has_no_check_and_the_default_test() -> None:
    sleep = sleep_of("sleep: {sleep: POST /a, wake: POST /b}")
    assert (sleep.preset, sleep.wake, sleep.check) == (None, (post("/b"),), None)
    assert (sleep.test, sleep.timeout) == (DEFAULT_TEST, DEFAULT_SLEEP_CALL_TIMEOUT)


def test_a_preset_with_overrides() -> None:
    sleep = sleep_of("sleep: {preset: vllm, timeout: 5, test: false, check: false}")
    assert (sleep.preset, sleep.sleep, sleep.wake) == (
        "vllm",
        post("/sleep?level=1"),
        (post("/wake_up"),),
    )
    assert (sleep.check, sleep.test, sleep.timeout) == (None, None, 5.0)


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        ("true", DEFAULT_TEST),
        ("false", None),
        ("GET /v1/models", HttpCall(method="GET", path="/v1/models")),
        ("{path: /chat}", post("/chat", PING)),  # the body defaults to the ping
        ("{body: null}", post("/v1/chat/completions")),
    ],
)
def test_test_request_forms(test: str, expected: HttpCall | None) -> None:
    assert sleep_of(f"sleep: {{preset: vllm, test: {test}}}").test == expected


def test_sleep_ttl() -> None:
    assert load("sleepTTL: 0\n").sleep_ttl == 0
    assert load("sleepTTL: 90.5\n").sleep_ttl == 90.5


def test_changing_sleep_or_sleep_ttl_applies_in_place() -> None:
    before = load(HEAD + "    sleep: vllm\n")
    after = load("sleepTTL: 60\n" + HEAD + "    sleep: vllm-2\n")
    diff = diff_configs(before, after)
    assert (diff.changed, diff.restart, diff.settings) == (("m",), (), ("sleepTTL",))


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key_path", "line", "fragment"),
    [
        (
            "sleep: vllm3",
            "models.m.sleep",
            4,
            "unknown preset 'vllm3' (presets: vllm, vllm-2, sglang",
        ),
        ("sleep: {preset: nope}", "models.m.sleep.preset", 4, "unknown preset 'nope'"),
        ("sleep: {preset: 1}", "models.m.sleep.preset", 4, "must be a preset name"),
        ("sleep: 5", "models.m.sleep", 4, "expected string | mapping | null, got int"),
        ("sleep: [vllm]", "models.m.sleep", 4, "got list"),
        (
            "sleep:\n  preset: vllm\n  wakeup: POST /x\n",
            "models.m.sleep.wakeup",
            6,
            "unknown key (known: preset, sleep, wake, check, timeout, test)",
        ),
        ("sleep: {wake: POST /w}", "models.m.sleep.sleep", 4, "required key is missing"),
        ("sleep: {sleep: POST /s}", "models.m.sleep.wake", 4, "required key is missing"),
        (
            "sleep:\n  sleep: DELETE /s\n  wake: POST /w\n",
            "models.m.sleep.sleep",
            5,
            "method must be one of GET, POST, PUT (got 'DELETE')",
        ),
        (
            "sleep:\n  sleep: POST sleep\n  wake: POST /w\n",
            "models.m.sleep.sleep",
            5,
            "the path must start with '/'",
        ),
        ("sleep:\n  sleep: /s\n  wake: POST /w\n", "models.m.sleep.sleep", 5, "'METHOD /path'"),
        (
            "sleep:\n  sleep: POST /s\n  wake:\n    - POST /w\n    - PATCH /x\n",
            "models.m.sleep.wake[1]",
            8,
            "got 'PATCH'",
        ),
        ("sleep:\n  sleep: POST /s\n  wake: []\n", "models.m.sleep.wake", 6, "at least one"),
        (
            "sleep:\n  preset: vllm\n  wake: {method: POST, path: w}\n",
            "models.m.sleep.wake.path",
            6,
            "must start with '/'",
        ),
        (
            "sleep:\n  preset: vllm\n  wake: {path: /w, body: [1]}\n",
            "models.m.sleep.wake.body",
            6,
            "must be a JSON object or null (got list)",
        ),
        (
            "sleep:\n  preset: vllm\n  wake: {pth: /w}\n",
            "models.m.sleep.wake.pth",
            6,
            "unknown key (known: method, path, body)",
        ),
        (
            "sleep:\n  preset: vllm\n  wake: {method: POST}\n",
            "models.m.sleep.wake.path",
            6,
            "missing",
        ),
        ("sleep:\n  preset: vllm\n  check: 3\n", "models.m.sleep.check", 6, "got int"),
        (
            "sleep:\n  preset: vllm\n  timeout: -1\n",
            "models.m.sleep.timeout",
            6,
            "must be > 0 seconds (got -1)",
        ),
        ("sleep:\n  preset: vllm\n  timeout: 0\n", "models.m.sleep.timeout", 6, "must be > 0"),
        ("sleep:\n  preset: vllm\n  timeout: .inf\n", "models.m.sleep.timeout", 6, "finite"),
        (
            "sleep:\n  preset: vllm\n  timeout: soon\n",
            "models.m.sleep.timeout",
            6,
            "number of seconds",
        ),
        (
            "sleep:\n  preset: vllm\n  timeout: true\n",
            "models.m.sleep.timeout",
            6,
            "number of seconds",
        ),
        (
            "sleep:\n  preset: vllm\n  test:\n    path: /v1/x\n    method: HEAD\n",
            "models.m.sleep.test.method",
            8,
            "got 'HEAD'",
        ),
        (
            "sleep:\n  preset: vllm\n  test: {path: '/a b'}\n",
            "models.m.sleep.test.path",
            6,
            "blanks",
        ),
        ("sleep:\n  preset: vllm\n  test: 1\n", "models.m.sleep.test", 6, "got int"),
    ],
)
def test_errors_are_located(text: str, key_path: str, line: int, fragment: str) -> None:
    error = fails(text)
    assert (error.source, error.key_path, error.line) == ("c.yaml", key_path, line), str(error)
    assert fragment in error.message, str(error)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("-1", "must be >= 0 seconds (got -1)"), (".nan", "finite"), ("x", "got str")],
)
def test_sleep_ttl_errors(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(f"models: {{}}\nsleepTTL: {value}\n")
    assert (info.value.key_path, info.value.line) == ("sleepTTL", 2)
    assert fragment in info.value.message


def test_sleep_beside_fit_by_memory_is_accepted_without_a_warning() -> None:
    text = """
        models:
          a:
            cmd: server --port ${PORT}
            sleep: vllm
          b:
            cmd: server --port ${PORT}
        """
    config = load("resources: {ram: 1GiB}\n" + textwrap.dedent(text))
    assert not config.warnings
    assert config.models["a"].sleep is not None
