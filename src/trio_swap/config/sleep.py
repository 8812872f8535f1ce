"""``sleep:`` (per model) and ``sleepTTL`` (top level), validated.

A model with ``sleep:`` is put to sleep instead of stopped: its process
lives, its GPU memory is released, and a wake costs seconds instead of a cold
start (docs/sleep.md). ``sleep:`` is a preset name or a mapping::

    sleep: vllm                       # level 1: weights to host RAM
    sleep: vllm-2                     # level 2: weights dropped, reloaded on wake
    sleep: sglang
    sleep:
      preset: vllm                    # optional: the calls below override its own
      sleep: POST /sleep?level=1      # "METHOD /path", or {method, path, body}
      wake: [POST /wake_up, {path: /collective_rpc, body: {method: reload_weights}}]
      check: GET /is_sleeping         # or false
      timeout: 60                     # seconds, each call
      test: {path: /v1/chat/completions, body: {...}}   # or false; true: the default

Every call goes to the model's ``proxy``. Each malformed value is a located
:class:`~trio_swap.config.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from trio_swap.config.model import (
    DEFAULT_SLEEP_CALL_TIMEOUT,
    HttpCall,
    ModelConfig,
    SleepConfig,
)
from trio_swap.config.yamlsource import Document, KeyPath, type_name

__all__ = [
    "KEYS",
    "METHODS",
    "PRESETS",
    "check_sleep",
    "check_sleep_ttl",
    "default_test",
    "parse_call",
]

METHODS: Final = ("GET", "POST", "PUT")
#: The keys of the mapping form.
KEYS: Final = ("preset", "sleep", "wake", "check", "timeout", "test")
_CALL_KEYS: Final = ("method", "path", "body")
#: Where the default test request goes.
TEST_PATH: Final = "/v1/chat/completions"


def _post(path: str, body: dict[str, object] | None = None) -> HttpCall:
    return HttpCall(method="POST", path=path, body=body)


#: Preset name -> (sleep, wake calls, check).
PRESETS: Final[Mapping[str, tuple[HttpCall, tuple[HttpCall, ...], HttpCall | None]]] = {
    "vllm": (
        _post("/sleep?level=1"),
        (_post("/wake_up"),),
        HttpCall(method="GET", path="/is_sleeping"),
    ),
    "vllm-2": (
        _post("/sleep?level=2"),
        (
            _post("/wake_up"),
            _post("/collective_rpc", {"method": "reload_weights"}),
            _post("/reset_prefix_cache"),
        ),
        HttpCall(method="GET", path="/is_sleeping"),
    ),
    "sglang": (
        _post("/release_memory_occupation", {}),
        (_post("/resume_memory_occupation", {}),),
        None,
    ),
}


def default_test(model: ModelConfig) -> HttpCall:
    """A one-token chat completion for ``model`` (its ``useModelName``, else its id)."""
    body: dict[str, object] = {
        "model": model.use_model_name or model.id,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 1,
    }
    return _post(TEST_PATH, body)


def check_sleep(model: ModelConfig, value: str | dict[str, object], doc: Document) -> SleepConfig:
    """``models.<id>.sleep``: a preset name or the mapping form, as a :class:`SleepConfig`."""
    path: KeyPath = ("models", model.id, "sleep")
    if isinstance(value, str):
        return _preset(model, value, path, doc)
    for key in value:
        if key not in KEYS:
            raise doc.error((*path, key), f"unknown key (known: {', '.join(KEYS)})")
    preset = value.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise doc.error((*path, "preset"), f"must be a preset name (got {type_name(preset)})")
        base = _preset(model, preset, (*path, "preset"), doc)
    else:
        for key in ("sleep", "wake"):
            if value.get(key) is None:
                raise doc.error((*path, key), "required key is missing (or set 'preset')")
        base = SleepConfig(sleep=_post("/"), wake=(), test=default_test(model))
    sleep = base.sleep
    if value.get("sleep") is not None:
        sleep = parse_call(value["sleep"], (*path, "sleep"), doc)
    wake = base.wake
    if value.get("wake") is not None:
        wake = _wake(value["wake"], (*path, "wake"), doc)
    check = base.check
    if "check" in value:
        check = _optional_call(value["check"], (*path, "check"), doc)
    timeout = base.timeout
    if value.get("timeout") is not None:
        timeout = _timeout(value["timeout"], (*path, "timeout"), doc)
    test = base.test
    if "test" in value:
        test = _test(model, value["test"], (*path, "test"), doc)
    return SleepConfig(
        preset=preset, sleep=sleep, wake=wake, check=check, test=test, timeout=timeout
    )


def check_sleep_ttl(value: float, doc: Document) -> float:
    """Top-level ``sleepTTL``: seconds >= 0; 0 = a sleeping model is never stopped."""
    path: KeyPath = ("sleepTTL",)
    if not math.isfinite(value):
        raise doc.error(path, f"must be a finite number (got {value})")
    if value < 0:
        raise doc.error(path, f"must be >= 0 seconds (got {_show(value)}); 0 = never stop")
    return float(value)


def parse_call(value: object, path: KeyPath, doc: Document, *, method: str = "POST") -> HttpCall:
    """``"METHOD /path"`` or ``{method, path, body}`` (``method`` defaults to ``method``)."""
    if isinstance(value, str):
        parts = value.split()
        if len(parts) != 2:
            raise doc.error(path, f"must be 'METHOD /path', e.g. 'POST /sleep' (got {value!r})")
        return HttpCall(
            method=_method(parts[0], path, doc), path=_path(parts[1], path, doc), body=None
        )
    if not isinstance(value, dict):
        raise doc.error(
            path,
            f"must be 'METHOD /path' or a mapping of {', '.join(_CALL_KEYS)} "
            f"(got {type_name(value)})",
        )
    return _call_mapping(value, path, doc, method=method, body=None)


def _call_mapping(
    value: dict[str, object],
    path: KeyPath,
    doc: Document,
    *,
    method: str,
    body: dict[str, object] | None,
    default_path: str | None = None,
) -> HttpCall:
    for key in value:
        if key not in _CALL_KEYS:
            raise doc.error((*path, key), f"unknown key (known: {', '.join(_CALL_KEYS)})")
    raw_method = value.get("method", method)
    if not isinstance(raw_method, str):
        raise doc.error((*path, "method"), f"must be a string (got {type_name(raw_method)})")
    raw_path = value.get("path", default_path)
    if raw_path is None:
        raise doc.error((*path, "path"), "required key is missing")
    if not isinstance(raw_path, str):
        raise doc.error((*path, "path"), f"must be a string (got {type_name(raw_path)})")
    if "body" in value:
        raw_body = value["body"]
        if raw_body is not None and not isinstance(raw_body, dict):
            shown = type_name(raw_body)
            raise doc.error((*path, "body"), f"must be a JSON object or null (got {shown})")
        body = raw_body
    return HttpCall(
        method=_method(raw_method, (*path, "method"), doc),
        path=_path(raw_path, (*path, "path"), doc),
        body=body,
    )


def _preset(model: ModelConfig, name: str, path: KeyPath, doc: Document) -> SleepConfig:
    calls = PRESETS.get(name.strip())
    if calls is None:
        known = ", ".join(PRESETS)
        raise doc.error(
            path,
            f"unknown preset {name!r} (presets: {known}; or a mapping of {', '.join(KEYS)})",
        )
    sleep, wake, check = calls
    return SleepConfig(
        preset=name.strip(),
        sleep=sleep,
        wake=wake,
        check=check,
        test=default_test(model),
        timeout=DEFAULT_SLEEP_CALL_TIMEOUT,
    )


def _wake(value: object, path: KeyPath, doc: Document) -> tuple[HttpCall, ...]:
    if not isinstance(value, list):
        return (parse_call(value, path, doc),)
    if not value:
        raise doc.error(path, "must list at least one call")
    return tuple(parse_call(item, (*path, index), doc) for index, item in enumerate(value))


def _optional_call(value: object, path: KeyPath, doc: Document) -> HttpCall | None:
    """``check``: a call, or ``false`` / null for none."""
    if value is None or value is False:
        return None
    return parse_call(value, path, doc, method="GET")


def _test(model: ModelConfig, value: object, path: KeyPath, doc: Document) -> HttpCall | None:
    """``test``: false/null (none), true (the default), a call string, or a mapping whose
    ``path`` defaults to the chat completions and ``body`` to the one-token ping."""
    if value is None or value is False:
        return None
    default = default_test(model)
    if value is True:
        return default
    if isinstance(value, dict):
        return _call_mapping(
            value, path, doc, method="POST", body=default.body, default_path=TEST_PATH
        )
    return parse_call(value, path, doc)


def _timeout(value: object, path: KeyPath, doc: Document) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise doc.error(path, f"must be a number of seconds (got {type_name(value)})")
    try:
        seconds = float(value)
    except OverflowError:
        raise doc.error(path, f"number out of range (got {value})") from None
    if not math.isfinite(seconds):
        raise doc.error(path, f"must be a finite number (got {value})")
    if seconds <= 0:
        raise doc.error(path, f"must be > 0 seconds (got {_show(seconds)})")
    return seconds


def _method(text: str, path: KeyPath, doc: Document) -> str:
    method = text.strip().upper()
    if method not in METHODS:
        raise doc.error(path, f"method must be one of {', '.join(METHODS)} (got {text!r})")
    return method


def _path(text: str, path: KeyPath, doc: Document) -> str:
    if not text.startswith("/"):
        raise doc.error(path, f"the path must start with '/' (got {text!r})")
    if any(char.isspace() or not char.isprintable() for char in text):
        raise doc.error(path, f"the path must not contain blanks or control characters ({text!r})")
    return text


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
