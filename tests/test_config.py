"""Tests for the config loader: llama-swap's format, macros, located errors.

Every config is written to ``tmp_path/config.yaml`` and loaded through the
public :func:`load_config`, so the tests exercise the whole pipeline (env
substitution, YAML with lines, macros, conversion, validation). Error tests
assert the file, the exact key path and the exact 1-based line. Config texts
start on the line after the opening quotes, so line 1 is their first line.
"""

from __future__ import annotations

import itertools
import math
import shlex
import signal
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_swap.cli import _check as check_command
from trio_swap.config import (
    Config,
    ConfigError,
    load_config,
    load_config_text,
    load_demo_config,
)
from trio_swap.config.command import split_command
from trio_swap.config.demo import DEMO_CONFIG_TEXT, demo_config_text
from trio_swap.config.macros import go_float
from trio_swap.config.schema import MODEL_KEYS, RawConfig, RawModel, RawPeer, json_schema
from trio_swap.config.validate import _type_info as type_info_checked
from trio_swap.config.validate import convert
from trio_swap.config.yamlsource import Document

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def fails(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    return info.value


def assert_error(err: ConfigError, key_path: str, line: int, *fragments: str) -> None:
    assert (err.key_path, err.line) == (key_path, line), str(err)
    for fragment in fragments:
        assert fragment in err.message, str(err)
    assert str(err).startswith(f"{err.source}:{line}: {key_path}: " if key_path else "")


# --- good configs --------------------------------------------------------------------


def test_every_key(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        healthCheckTimeout: 60
        startPort: 9000
        globalTTL: 300
        unloadTimeout: 20
        logLevel: debug
        logToStdout: both
        macros:
          bin: /opt/llama-server
        models:
          qwen-7b:
            cmd: ${bin} --port ${PORT} -m /m/qwen.gguf
            cmdStop: kill -TERM ${PID}
            proxy: http://127.0.0.1:${PORT}/
            checkEndpoint: /v1/models
            aliases: [gpt-4o-mini, qwen]
            env:
              - CUDA_VISIBLE_DEVICES=0
              - OPTS=a=b c
            ttl: 60
            unloadTimeout: 5
            useModelName: qwen2.5
            name: "  Qwen 7B  "
            description: A model.
            unlisted: true
            metadata: {ctx: 4096, tags: [chat]}
            concurrencyLimit: 3
            macros:
              unused: 1
        """,
    )
    assert config.source == str(tmp_path / "config.yaml")
    assert config.health_check_timeout == 60
    assert config.start_port == 9000
    assert config.log_level == "debug"
    assert config.log_to_stdout == "both"
    assert config.warnings == ()
    model = config.models["qwen-7b"]
    assert model.id == "qwen-7b"
    assert model.cmd == ("/opt/llama-server", "--port", "9000", "-m", "/m/qwen.gguf")
    assert model.cmd_stop == ("kill", "-TERM", "${PID}")
    assert model.proxy == "http://127.0.0.1:9000"
    assert model.check_endpoint == "/v1/models"
    assert model.aliases == ("gpt-4o-mini", "qwen")
    assert model.env == (("CUDA_VISIBLE_DEVICES", "0"), ("OPTS", "a=b c"))
    assert model.ttl == 60
    assert model.unload_timeout == 5
    assert model.use_model_name == "qwen2.5"
    assert model.name == "Qwen 7B"
    assert model.description == "A model."
    assert model.unlisted is True
    assert model.metadata == {"ctx": 4096, "tags": ["chat"]}
    assert model.concurrency_limit == 3
    assert config.resolve("qwen") == "qwen-7b"
    assert config.resolve("qwen-7b") == "qwen-7b"
    assert config.resolve("nope") is None


def test_defaults_and_inheritance(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        globalTTL: 120
        models:
          a:
            cmd: server --port ${PORT}
          b:
            cmd: server --port ${PORT}
            ttl: 0
            unloadTimeout: 0
            concurrencyLimit: 0
          c:
            cmd: server --port ${PORT}
            ttl: -1
            aliases:
            env:
        """,
    )
    assert config.health_check_timeout == 120
    assert config.start_port == 5800
    assert (config.log_level, config.log_to_stdout) == ("info", "proxy")
    a, b, c = config.models["a"], config.models["b"], config.models["c"]
    assert a.proxy == "http://localhost:5800"
    assert a.check_endpoint == "/health"
    assert a.cmd_stop == ()
    assert (a.ttl, b.ttl, c.ttl) == (120, 0, 120)
    assert (a.unload_timeout, b.unload_timeout) == (10, 10)
    assert (a.concurrency_limit, b.concurrency_limit) == (10, 10)
    assert (c.aliases, c.env) == ((), ())
    assert list(config.models) == ["a", "b", "c"]  # file order


def test_global_unload_timeout_zero_means_default(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        unloadTimeout: 0
        models:
          a: {cmd: "s ${PORT}"}
        """,
    )
    assert config.models["a"].unload_timeout == 10


def test_health_check_timeout_below_15_is_kept(tmp_path: Path) -> None:
    # llama-swap silently raises it to 15; trio-swap keeps what was written.
    config = load(tmp_path, "healthCheckTimeout: 2\n")
    assert config.health_check_timeout == 2
    assert config.models == {}


def test_empty_file_has_no_models(tmp_path: Path) -> None:
    config = load(tmp_path, "# nothing here yet\n")
    assert config.models == {}
    assert config.warnings == ()


def test_model_ids_may_contain_slash_colon_dot(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        models:
          author/model:F16:
            cmd: s --port ${PORT} --alias ${MODEL_ID}
          "qwen2.5:7b":
            cmd: s --port ${PORT}
        """,
    )
    assert list(config.models) == ["author/model:F16", "qwen2.5:7b"]
    assert config.models["author/model:F16"].cmd[-1] == "author/model:F16"


def test_macro_in_macro_and_model_override_in_place(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        macros:
          ctx: 4096
          server: "llama-server --port ${PORT} -c ${ctx}"
          full: "${server} --alias ${MODEL_ID}"
        models:
          small:
            cmd: ${full}
          big:
            cmd: ${full} --extra ${extra}
            macros:
              ctx: 32768
              extra: "${ctx}-x"
        """,
    )
    big, small = config.models["big"], config.models["small"]
    # Ports: "big" < "small" in byte order.
    assert big.cmd == (
        "llama-server",
        "--port",
        "5800",
        "-c",
        "32768",
        "--alias",
        "big",
        "--extra",
        "32768-x",
    )
    assert small.cmd == ("llama-server", "--port", "5801", "-c", "4096", "--alias", "small")


def test_model_id_inside_a_global_macro(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        macros:
          container: "docker run --name ${MODEL_ID}-box"
        models:
          vllm:
            cmd: ${container} -p ${PORT}:8000 img
            cmdStop: docker stop ${MODEL_ID}-box
            name: "${MODEL_ID} in a box"
        """,
    )
    model = config.models["vllm"]
    assert model.cmd[:4] == ("docker", "run", "--name", "vllm-box")
    assert model.cmd_stop == ("docker", "stop", "vllm-box")
    assert model.name == "vllm in a box"


def test_model_macros_do_not_leak_into_other_models(tmp_path: Path) -> None:
    err = fails(
        tmp_path,
        """\
        models:
          a:
            cmd: s ${PORT} ${mine}
            macros:
              mine: x
          b:
            cmd: s ${PORT} ${mine}
        """,
    )
    assert_error(err, "models.b.cmd", 7, "unknown macro '${mine}'")


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TS_MODELS", "/srv/my models")
    monkeypatch.setenv("TS_TTL", "45")
    monkeypatch.setenv("TS_QUOTED", 'say "hi" \\ bye')
    monkeypatch.setenv("TS_SINGLE", "it's")
    monkeypatch.delenv("TS_UNSET", raising=False)
    config = load(
        tmp_path,
        """\
        # A comment may mention ${env.TS_UNSET} without it being set.
        macros:
          dir: "${env.TS_MODELS}"   # and so may a trailing one: ${env.TS_UNSET}
        models:
          m:
            cmd: s --port ${PORT} -m "${dir}/a.gguf"
            ttl: ${env.TS_TTL}
            description: "${env.TS_QUOTED}"
            name: '${env.TS_SINGLE}'
            env: ["HOME_DIR=${env.TS_MODELS}"]
        """,
    )
    model = config.models["m"]
    assert model.cmd[-1] == "/srv/my models/a.gguf"
    assert model.ttl == 45
    assert model.description == 'say "hi" \\ bye'
    assert model.name == "it's"
    assert model.env == (("HOME_DIR", "/srv/my models"),)


def test_env_substitution_with_explicit_environ() -> None:
    text = "models:\n  m:\n    cmd: s ${PORT} ${env.FOO}\n"
    config = load_config_text(text, "inline.yaml", environ={"FOO": "bar"})
    assert config.models["m"].cmd == ("s", "5800", "bar")
    assert config.source == "inline.yaml"


def test_env_in_block_scalar_and_block_header_comment(tmp_path: Path) -> None:
    config = load_config_text(
        textwrap.dedent(
            """\
            models:
              m:
                cmd: |  # header comment ${env.NOT_SET_ANYWHERE}
                  s --port ${PORT}
                  --flag ${env.FLAG}
            """
        ),
        "c.yaml",
        environ={"FLAG": "on"},
    )
    assert config.models["m"].cmd == ("s", "--port", "5800", "--flag", "on")


def test_port_assignment_order(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        startPort: 7000
        models:
          b: {cmd: "s ${PORT}"}
          fixed:
            cmd: s --port 9999
            proxy: http://127.0.0.1:9999
          B: {cmd: "s ${PORT}"}
          é: {cmd: "s ${PORT}"}
          a:
            cmd: |
              s
              # --port ${PORT} in a comment does not count
              --port ${PORT}
            metadata:
              port: ${PORT}
              url: "http://host:${PORT}"
        """,
    )
    ports = {mid: m.proxy.rsplit(":", 1)[1] for mid, m in config.models.items()}
    # Byte order: "B" < "a" < "b" < "fixed" (no ${PORT}: no number) < "é".
    assert ports == {"B": "7000", "a": "7001", "b": "7002", "fixed": "9999", "é": "7003"}
    assert config.models["a"].cmd == ("s", "--port", "7001")
    assert config.models["a"].metadata == {"port": 7001, "url": "http://host:7001"}


def test_pid_kept_in_cmd_stop_even_via_macro(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        macros:
          stop: "kill -INT ${PID}"
        models:
          a:
            cmd: s ${PORT}
            cmdStop: |
              # a comment with ${nothing}
              ${stop}
          b:
            cmd: s ${PORT}
            cmdStop: sh -c 'kill ${PID}; sleep 1'
        """,
    )
    assert config.models["a"].cmd_stop == ("kill", "-INT", "${PID}")
    assert config.models["b"].cmd_stop == ("sh", "-c", "kill ${PID}; sleep 1")


def test_typed_substitution(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        macros:
          idle: 300
          temp: 0.7
          big: 1000000.0
          whole: 2.0
          flag: true
          alias_of_idle: "${idle}"
          limit: 4
        globalTTL: ${idle}
        models:
          m:
            cmd: s --port ${PORT} --temp ${temp} --n ${big} --w ${whole} --f ${flag}
            ttl: ${alias_of_idle}
            concurrencyLimit: ${limit}
            unlisted: ${flag}
            metadata:
              temp: ${temp}
              flag: ${flag}
              idle: ${idle}
              text: "idle ${idle}s"
              nested: {list: ["${idle}", "${MODEL_ID}"]}
              "${idle}": keys are never expanded
        """,
    )
    model = config.models["m"]
    assert model.cmd[3:] == ("--temp", "0.7", "--n", "1e+06", "--w", "2", "--f", "true")
    assert model.ttl == 300
    assert model.concurrency_limit == 4
    assert model.unlisted is True
    assert model.metadata == {
        "temp": 0.7,
        "flag": True,
        "idle": 300,
        "text": "idle 300s",
        "nested": {"list": [300, "m"]},
        "${idle}": "keys are never expanded",
    }


def test_start_port_from_macro(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        macros:
          first: 12000
        startPort: ${first}
        models:
          m: {cmd: "s ${PORT}"}
        """,
    )
    assert config.start_port == 12000
    assert config.models["m"].proxy == "http://localhost:12000"


def test_multiline_cmd_with_comments_continuations_and_quotes(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        r"""
        models:
          m:
            cmd: |
              /usr/bin/llama-server \
                --port ${PORT}   \
                # --draft-model /m/draft.gguf
                  # indented comment line
                --model "/models/My Model.gguf" \
                --chat-template 'a "b" c' --grammar "x\"y"
                --hash#not-a-comment
            cmdStop: >-
              docker stop
              ${MODEL_ID}
        """,
    )
    model = config.models["m"]
    assert model.cmd == (
        "/usr/bin/llama-server",
        "--port",
        "5800",
        "--model",
        "/models/My Model.gguf",
        "--chat-template",
        'a "b" c',
        "--grammar",
        'x"y',
        "--hash#not-a-comment",
    )
    assert model.cmd_stop == ("docker", "stop", "m")


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        defs:
          base: &base
            cmd: s --port ${PORT} --alias ${MODEL_ID}
            ttl: 60
            env: [A=1]
          gpu1: &gpu1
            env: [CUDA_VISIBLE_DEVICES=1]
        models:
          one:
            <<: *base
          two:
            <<: [*gpu1, *base]
            ttl: 5
        """,
    )
    one, two = config.models["one"], config.models["two"]
    assert one.cmd == ("s", "--port", "5800", "--alias", "one")
    assert (one.ttl, one.env) == (60, (("A", "1"),))
    assert two.cmd == ("s", "--port", "5801", "--alias", "two")
    assert (two.ttl, two.env) == (5, (("CUDA_VISIBLE_DEVICES", "1"),))
    assert config.warnings == (f"{tmp_path / 'config.yaml'}:1: defs: unknown key; ignored",)


def test_yaml_core_schema_scalars(tmp_path: Path) -> None:
    # YAML 1.2, like llama-swap's Go parser: "no" and "1:30" stay strings.
    config = load(
        tmp_path,
        """\
        models:
          m:
            cmd: s ${PORT}
            useModelName: no
            name: 1:30
            description: 2024-01-01
            unlisted: yes
            metadata: {a: off, b: 0x10, c: .inf, d: ~, e: 1_000}
        """,
    )
    model = config.models["m"]
    assert (model.use_model_name, model.name, model.description) == ("no", "1:30", "2024-01-01")
    assert model.unlisted is True  # llama-swap's Go YAML accepts yes/no for bools
    assert model.metadata == {"a": "off", "b": 16, "c": math.inf, "d": None, "e": "1_000"}


def test_check_endpoint_none_and_proxy_normalised(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        models:
          m:
            cmd: s
            proxy: https://gpu-box.lan:8443/base/
            checkEndpoint: "  none "
        """,
    )
    model = config.models["m"]
    assert model.check_endpoint is None
    assert model.proxy == "https://gpu-box.lan:8443/base"


def test_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xef\xbb\xbfmodels:\r\n  m:\r\n    cmd: s ${PORT}\r\n")
    assert load_config(path).models["m"].cmd == ("s", "5800")


# --- warnings -------------------------------------------------------------------------


def test_warnings_for_unsupported_and_unknown_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        healthCheckTimeout: 30
        profiles:
          p: {pins: {a: qwen}}
        selectors: {}
        captureBuffer: 10
        models:
          qwen:
            cmd: s ${PORT}
            timeouts:
              connect: 5
            tll: 60
            healthCheckTimeout: 5
            cmdstop: x
        logToStdot: none
        """,
    )
    source = str(tmp_path / "config.yaml")
    assert config.warnings == (
        f"{source}:11: models.qwen.tll: unknown key (did you mean 'ttl'?); ignored",
        f"{source}:12: models.qwen.healthCheckTimeout: has no effect, as in llama-swap "
        "(it uses the top-level healthCheckTimeout); set it there",
        f"{source}:13: models.qwen.cmdstop: unknown key (did you mean 'cmdStop'?); ignored",
        f"{source}:14: logToStdot: unknown key (did you mean 'logToStdout'?); ignored",
    )
    assert config.models["qwen"].ttl == 0  # the typo did not set it


def test_filters_api_keys_and_alias_listing_load(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        apiKeys: [sk-one, sk-two]
        includeAliasesInList: true
        models:
          m:
            cmd: s ${PORT}
            aliases: [first]
            filters:
              stripParams: "temperature, model, top_p, temperature"
              setParams: {top_k: 20, model: ignored, min_p: 0.05}
              setParamsByID:
                "${MODEL_ID}:high": {reasoning_effort: high}
                m: {reasoning_effort: low}
        """,
    )
    assert config.api_keys == ("sk-one", "sk-two")
    assert config.include_aliases_in_list
    model = config.models["m"]
    assert model.filters.strip_params == ("temperature", "top_p")  # model never stripped
    assert model.filters.set_params == {"min_p": 0.05, "top_k": 20}
    assert model.filters.set_params_by_id == {
        "m:high": {"reasoning_effort": "high"},
        "m": {"reasoning_effort": "low"},
    }
    assert model.aliases == ("first", "m:high")  # setParamsByID names become aliases
    assert config.resolve("m:high") == "m"


# --- bad configs: each names the file, the key path and the line ------------------------


def test_error_str_format(tmp_path: Path) -> None:
    err = fails(
        tmp_path,
        """\
        models:
          qwen-7b:
            cmd: s ${PORT}
            ttl: -5
        """,
    )
    assert str(err) == f"{tmp_path / 'config.yaml'}:4: models.qwen-7b.ttl: must be >= -1 (got -5)"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.source, err.key_path, err.line) == (str(path), "", None)
    assert "cannot read" in err.message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"models:\n  m:\n    cmd: s \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.key_path) == (3, "")


@pytest.mark.parametrize(
    ("text", "key_path", "line", "fragment"),
    [
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                  bad: indent
            """,
            "",
            4,
            "invalid YAML",
            id="yaml-syntax",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                ttl: 1
                ttl: 2
            """,
            "models.m.ttl",
            5,
            "duplicate key (first defined on line 4)",
            id="duplicate-key",
        ),
        pytest.param("- a\n- b\n", "", 1, "top level must be a mapping", id="top-level-list"),
        pytest.param(
            """\
            startPort: 1
            models:
              - cmd: s
            """,
            "models",
            2,
            "must be a mapping of model IDs",
            id="models-list",
        ),
        pytest.param(
            """\
            models:
              qwen: llama-server --port ${PORT}
            """,
            "models.qwen",
            2,
            "must be a mapping",
            id="model-not-mapping",
        ),
        pytest.param(
            """\
            models:
              qwen:
                proxy: http://127.0.0.1:8080
            """,
            "models.qwen.cmd",
            2,
            "required key is missing",
            id="missing-cmd",
        ),
        pytest.param(
            """\
            models:
              qwen:
                cmd: |
                  # only a comment
                proxy: http://127.0.0.1:8080
            """,
            "models.qwen.cmd",
            3,
            "is empty",
            id="empty-cmd",
        ),
        pytest.param(
            """\
            models:
              qwen:
                cmd: s --port ${PORT} --name "unclosed
            """,
            "models.qwen.cmd",
            3,
            "No closing quotation",
            id="unbalanced-quote",
        ),
        pytest.param(
            """\
            models:
              qwen:
                cmd: s ${PORT}
                ttl: soon
            """,
            "models.qwen.ttl",
            4,
            "expected float, got string 'soon'",
            id="ttl-type",
        ),
        pytest.param(
            """\
            models:
              qwen:
                cmd: s ${PORT}
                ttl: -0.5
            """,
            "models.qwen.ttl",
            4,
            "must be -1 (inherit globalTTL), 0 (never) or > 0",
            id="ttl-between",
        ),
        pytest.param(
            """\
            models:
              qwen:
                cmd: s ${PORT}

                unloadTimeout: -1
            """,
            "models.qwen.unloadTimeout",
            5,
            "must be >= 0 (got -1)",
            id="model-unload-timeout",
        ),
        pytest.param(
            "logLevel: info\nunloadTimeout: -3\n",
            "unloadTimeout",
            2,
            "must be >= 0 (got -3)",
            id="global-unload-timeout",
        ),
        pytest.param("globalTTL: -1\n", "globalTTL", 1, "must be >= 0 (got -1)", id="global-ttl"),
        pytest.param(
            "# ports\nstartPort: 0\n", "startPort", 2, "between 1 and 65535", id="start-port"
        ),
        pytest.param(
            "healthCheckTimeout: 0\n", "healthCheckTimeout", 1, "must be > 0", id="health-timeout"
        ),
        pytest.param(
            "healthCheckTimeout: true\n",
            "healthCheckTimeout",
            1,
            "expected float, got bool",
            id="health-timeout-bool",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                concurrencyLimit: -2
            """,
            "models.m.concurrencyLimit",
            4,
            "must be >= 0 (got -2)",
            id="concurrency-limit",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                concurrencyLimit: 2.5
            """,
            "models.m.concurrencyLimit",
            4,
            "expected int, got float 2.5",
            id="concurrency-limit-float",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                checkEndpoint: health
            """,
            "models.m.checkEndpoint",
            4,
            "must be a path starting with '/' or 'none'",
            id="check-endpoint",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s
                proxy: localhost:8080
            """,
            "models.m.proxy",
            4,
            "must be an http:// or https:// URL",
            id="proxy-no-scheme",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s
                proxy: http://127.0.0.1:99999
            """,
            "models.m.proxy",
            4,
            "a valid port",
            id="proxy-bad-port",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s --port 8080
                proxy: http://127.0.0.1:${PORT}
            """,
            "models.m.proxy",
            4,
            "proxy uses ${PORT} but cmd does not",
            id="proxy-port-without-cmd-port",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: |
                  s
                  # --port ${PORT}
            """,
            "models.m.cmd",
            3,
            "cmd does not use ${PORT}, so set proxy",
            id="default-proxy-needs-port",
        ),
        pytest.param(
            """\
            models:
              a:
                cmd: s ${PORT}
                aliases: [shared]
              b:
                cmd: s ${PORT}
                aliases:
                  - other
                  - shared
            """,
            "models.b.aliases[1]",
            9,
            "alias 'shared' is already used by model 'a'",
            id="duplicate-alias",
        ),
        pytest.param(
            """\
            models:
              a:
                cmd: s ${PORT}
              b:
                cmd: s ${PORT}
                aliases: [a]
            """,
            "models.b.aliases[0]",
            6,
            "alias 'a' is already a model ID",
            id="alias-is-model-id",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                aliases: [x, x]
            """,
            "models.m.aliases[1]",
            4,
            "listed twice",
            id="alias-twice",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                env:
                  - A=1
                  - JUST_A_NAME
            """,
            "models.m.env[1]",
            6,
            "must be NAME=value",
            id="env-entry",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                env:
                  - A=1
                  - 42
            """,
            "models.m.env[1]",
            6,
            "expected string, got int 42",
            id="env-entry-type",
        ),
        pytest.param(
            "logToStdout: stderr\n",
            "logToStdout",
            1,
            "must be one of proxy, upstream, both, none (got 'stderr')",
            id="log-to-stdout",
        ),
        pytest.param(
            "logLevel: verbose\n",
            "logLevel",
            1,
            "must be one of debug, info, warn, error",
            id="log-level",
        ),
        pytest.param(
            """\
            macros:
              ok: 1
              "bad name": 2
            """,
            "macros.bad name",
            3,
            "must match ^[a-zA-Z0-9_-]+$",
            id="macro-name-chars",
        ),
        pytest.param(
            f"macros:\n  {'x' * 64}: 1\n",
            f"macros.{'x' * 64}",
            2,
            "longer than 63 characters",
            id="macro-name-length",
        ),
        pytest.param(
            "macros:\n  PORT: 8080\n",
            "macros.PORT",
            2,
            "macro name 'PORT' is reserved",
            id="macro-reserved-port",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                macros:
                  MODEL_ID: other
            """,
            "models.m.macros.MODEL_ID",
            5,
            "macro name 'MODEL_ID' is reserved",
            id="model-macro-reserved",
        ),
        pytest.param(
            "macros:\n  PID: 1\n", "macros.PID", 2, "'PID' is reserved", id="macro-reserved-pid"
        ),
        pytest.param(
            "macros:\n  flags: [-ngl, 99]\n",
            "macros.flags",
            2,
            "must be a string, number or bool (got list)",
            id="macro-list-value",
        ),
        pytest.param(
            "macros:\n  empty:\n",
            "macros.empty",
            2,
            "(got null)",
            id="macro-null-value",
        ),
        pytest.param(
            "macros:\n  loop: 'a ${loop}'\n",
            "macros.loop",
            2,
            "refers to itself",
            id="macro-self-reference",
        ),
        pytest.param("macros: [a, b]\n", "macros", 1, "must be a mapping", id="macros-not-mapping"),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                macros: nope
            """,
            "models.m.macros",
            4,
            "must be a mapping",
            id="model-macros-not-mapping",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: |
                  s --port ${PORT}
                  --ctx ${ctxx}
            """,
            "models.m.cmd",
            3,
            "unknown macro '${ctxx}'",
            id="unknown-macro",
        ),
        pytest.param(
            """\
            macros:
              a: "${b} x"
              b: "y"
            models:
              m:
                cmd: s ${PORT} ${a}
            """,
            "models.m.cmd",
            6,
            "unknown macro '${b}'",
            id="forward-reference",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT} --pidfile /tmp/${PID}
            """,
            "models.m.cmd",
            3,
            "${PID} is only available in cmdStop",
            id="pid-outside-cmd-stop",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s --port 9000
                proxy: http://127.0.0.1:9000
                metadata:
                  port: ${PORT}
            """,
            "models.m.metadata.port",
            6,
            "${PORT} is only assigned to models whose cmd uses ${PORT}",
            id="port-without-cmd-port",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                metadata:
                  tags:
                    - fine
                    - "${oops}"
            """,
            "models.m.metadata.tags[1]",
            7,
            "unknown macro '${oops}'",
            id="unknown-macro-in-metadata-list",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                name: "${weird.name}"
            """,
            "models.m.name",
            4,
            "unknown macro '${weird.name}'",
            id="malformed-placeholder",
        ),
        pytest.param(
            """\
            macros:
              tag: "${MODEL_ID}"
            logLevel: ${tag}
            """,
            "logLevel",
            3,
            "${MODEL_ID} is only available inside a model",
            id="model-id-at-top-level",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                unlisted: maybe
            """,
            "models.m.unlisted",
            4,
            "expected bool, got string 'maybe'",
            id="unlisted-type",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: [s, "${PORT}"]
            """,
            "models.m.cmd",
            3,
            "must be a string (got list)",
            id="cmd-list",
        ),
        pytest.param(
            """\
            startPort: 65535
            models:
              a: {cmd: "s ${PORT}"}
              b: {cmd: "s ${PORT}"}
            """,
            "models.b.cmd",
            4,
            "${PORT} would be 65536",
            id="port-overflow",
        ),
        pytest.param(
            """\
            models:
              "":
                cmd: s ${PORT}
            """,
            'models.""',
            2,
            "model ID must not be empty",
            id="empty-model-id",
        ),
        pytest.param(
            """\
            models:
              m:
                <<: not-a-mapping
                cmd: s
            """,
            "models.m",
            3,
            "merge key '<<' needs a mapping",
            id="bad-merge",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                name: !!binary aGVsbG8=
            """,
            "models.m.name",
            4,
            "unsupported YAML tag",
            id="unsupported-tag",
        ),
        pytest.param(
            """\
            models:
              m: &m
                cmd: s ${PORT}
                metadata:
                  self: *m
            """,
            "models.m.metadata.self",
            5,
            "recursive YAML alias",
            id="recursive-alias",
        ),
        pytest.param(
            """\
            models:
              m:
                cmd: s ${PORT}
                metadata: [a, b]
            """,
            "models.m.metadata",
            4,
            "expected mapping, got list",
            id="metadata-list",
        ),
    ],
)
def test_bad_config(tmp_path: Path, text: str, key_path: str, line: int, fragment: str) -> None:
    assert_error(fails(tmp_path, text), key_path, line, fragment)


def test_unset_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TS_NOT_SET", raising=False)
    err = fails(
        tmp_path,
        """\
        # ${env.TS_NOT_SET} in a comment is fine
        macros:
          unused: "/models/${env.TS_NOT_SET}"
        """,
    )
    assert_error(err, "macros.unused", 3, "environment variable 'TS_NOT_SET' is not set")


def test_unset_env_var_line_inside_block_scalar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TS_NOT_SET", raising=False)
    err = fails(
        tmp_path,
        """\
        models:
          m:
            cmd: |
              s --port ${PORT}
              --model ${env.TS_NOT_SET}
        """,
    )
    assert_error(err, "models.m.cmd", 5, "'TS_NOT_SET' is not set")


def test_env_var_with_newline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TS_MULTILINE", "a\nb")
    err = fails(
        tmp_path,
        """\
        models:
          m:
            cmd: s ${PORT}
            name: ${env.TS_MULTILINE}
        """,
    )
    assert_error(err, "models.m.name", 4, "contains a line break")


def test_env_var_in_broken_yaml_still_reports_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a flow list the placeholder itself breaks YAML; the missing variable
    # is still the clearer message, and a comment is still skipped.
    monkeypatch.delenv("TS_NOT_SET", raising=False)
    err = fails(
        tmp_path,
        """\
        models:  # ${env.ALSO_NOT_SET}
          m:
            aliases: [${env.TS_NOT_SET}]
        """,
    )
    assert_error(err, "", 3, "'TS_NOT_SET' is not set")


# --- hostile input: each a bug tests/test_config_fuzz.py found (issue 9) ----------------


class Hang(Exception):
    """A load ran past its hang guard."""


@contextmanager
def hang_guard(seconds: float = 20.0) -> Iterator[None]:
    """Fail (rather than wait for faulthandler) when a load hangs; generous, not a timing test."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fails_in_time(tmp_path: Path, text: str | bytes) -> ConfigError:
    path = tmp_path / "config.yaml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    with hang_guard(), pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:")
    return info.value


def check_output(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``trio-swap check`` in-process: (exit code, stderr)."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    code = check_command(str(path))
    return code, capsys.readouterr().err


MODEL = "models:\n  m:\n    cmd: s ${PORT}\n"


def test_proxy_with_a_broken_ipv6_literal_is_a_located_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # urlsplit raises ValueError on it: `check` printed a traceback, a reload killed the server.
    code, err = check_output(
        tmp_path, 'models:\n  m:\n    cmd: s\n    proxy: "http://[::1"\n', capsys
    )
    assert code == 2
    assert err.startswith(f"error: {tmp_path / 'config.yaml'}:4: models.m.proxy: must be an http")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("proxy", "fragment"),
    [
        ("http://[::1]:x", "a valid port"),
        ("http://a b:80", "must not contain blanks or control characters"),
        ('"http://h\\x07:80"', "must not contain blanks or control characters"),
        ("http://h:0", "a valid port"),
        # a host name the resolver cannot encode: it passed check, then the first
        # readiness probe raised UnicodeError and took the server down (review of issue 9)
        ("http://a..b:8080", "a valid host"),
        ("http://" + "x" * 64 + ".example:80", "a valid host"),
    ],
)
def test_proxy_that_could_never_be_reached_is_refused(
    tmp_path: Path, proxy: str, fragment: str
) -> None:
    err = fails_in_time(tmp_path, f"models:\n  m:\n    cmd: s\n    proxy: {proxy}\n")
    assert_error(err, "models.m.proxy", 4, fragment)


def test_nul_character_is_a_located_error(tmp_path: Path) -> None:
    # PyYAML's reader raised ReaderError before parsing began: a traceback.
    err = fails_in_time(tmp_path, MODEL + "    name: a\x00b\n")
    assert_error(err, "", 4, "unacceptable character #x0000")


def test_ten_thousand_open_brackets_are_refused_quickly(tmp_path: Path) -> None:
    # PyYAML composes recursively (RecursionError) and its scanner slows with depth.
    err = fails_in_time(tmp_path, "models: " + "[" * 10_000)
    assert_error(err, "", 1, "nested more than 100 levels deep")


def test_deep_block_nesting_is_refused(tmp_path: Path) -> None:
    text = MODEL + "    metadata:\n" + "".join("  " * (i + 3) + "a:\n" for i in range(150))
    assert_error(fails_in_time(tmp_path, text), "", 101, "nested more than 100 levels deep")


def test_nesting_through_aliases_is_refused(tmp_path: Path) -> None:
    # b holds a: 97 levels at the top (allowed), 101 once metadata.x holds b.
    deep = "[" * 50 + "x" + "]" * 50
    text = f"a: &a {deep}\nb: &b {'[' * 47}*a{']' * 47}\n" + MODEL + "    metadata: {x: *b}\n"
    err = fails_in_time(tmp_path, text)
    assert err.key_path.startswith("models.m.metadata.x[0]")
    assert "nested more than 100 levels deep (after expanding YAML aliases)" in err.message


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = MODEL + "    metadata:\n" + "".join(f"      {line}\n" for line in lines)
    err = fails_in_time(tmp_path, text)
    assert err.key_path.startswith("models.m.metadata.l")
    assert "more than 200000 values after expanding YAML aliases" in err.message


def test_aliases_repeating_a_long_string_are_refused(tmp_path: Path) -> None:
    # 10,000 copies of 100 KB: few nodes, but every later stage reads 1 GB.
    text = "a: &a '" + "x" * 100_000 + "'\nb: &b [" + ", ".join(["*a"] * 100) + "]\n"
    text += MODEL + "    metadata: {c: [" + ", ".join(["*b"] * 100) + "]}\n"
    err = fails_in_time(tmp_path, text)
    assert err.key_path.startswith("models.m.metadata.c[")
    assert "more than 16 MiB of text after expanding YAML aliases" in err.message


def test_merge_keys_chained_many_times_load_in_time(tmp_path: Path) -> None:
    # Each level merges the previous one 30 times: 30**6 merges, worked out afresh each
    # time, hung the loader. Merged once per mapping, it is instant and still correct.
    lines, previous = ["k0: &k0 {ttl: 7, name: first}"], "k0"
    for level in range(1, 7):
        lines.append(f"k{level}: &k{level} {{<<: [{', '.join([f'*{previous}'] * 30)}]}}")
        previous = f"k{level}"
    text = "defs:\n" + "".join(f"  {line}\n" for line in lines)
    text += "models:\n  m:\n    <<: *k6\n    cmd: s ${PORT}\n"
    with hang_guard():
        model = load_config_text(text, "c.yaml").models["m"]
    assert (model.ttl, model.name) == (7, "first")


def test_macros_growing_tenfold_per_level_are_refused(tmp_path: Path) -> None:
    # b is ten a's, c ten b's, ...: 10**10 characters from a 300-byte file (ran out of memory).
    names = "abcdefghij"
    text = "macros:\n  a: xxxxxxxxxx\n"
    text += "".join(f"  {n}: '{('${' + p + '}') * 10}'\n" for p, n in itertools.pairwise(names))
    text += MODEL
    err = fails_in_time(tmp_path, text)
    assert_error(err, "macros.g", 8, "macro expansion makes this value longer than 1024 KiB")


def test_a_macro_used_many_times_is_refused_by_the_load_budget(tmp_path: Path) -> None:
    text = "macros:\n  big: '" + "x" * 100_000 + "'\n" + "a: &a ['${big}']\n"
    text += MODEL + "    metadata: {x: &b [" + ", ".join(["*a"] * 300) + "], y: ["
    text += ", ".join(["*b"] * 300) + "]}\n"
    err = fails_in_time(tmp_path, text)
    assert err.key_path.startswith("models.m.metadata.")
    assert "macros expand to more than 16 MiB of text in all" in err.message


def test_unfinished_and_recursive_macros_stay_text_or_are_reported(tmp_path: Path) -> None:
    config = load(tmp_path, MODEL + "    name: '${'\n    description: '${a'\n")
    assert (config.models["m"].name, config.models["m"].description) == ("${", "${a")
    text = "macros:\n  a: '${b}'\n  b: '${a}'\n" + MODEL + "    name: ${b}\n"
    assert_error(fails_in_time(tmp_path, text), "models.m.name", 7, "unknown macro '${b}'")


@pytest.mark.parametrize(
    ("text", "key_path", "line"),
    [
        ("metricsMaxInMemory: 1180591620717411303424\n" + MODEL, "metricsMaxInMemory", 1),
        ("store: {path: a.db, maxRows: 1180591620717411303424}\n" + MODEL, "store.maxRows", 1),
        (MODEL + "    concurrencyLimit: 1180591620717411303424\n", "models.m.concurrencyLimit", 4),
        ("startPort: -9223372036854775809\n" + MODEL, "startPort", 1),
    ],
)
def test_integers_beyond_64_bits_are_refused(
    tmp_path: Path, text: str, key_path: str, line: int
) -> None:
    # Python ints are unbounded; SQLite raised OverflowError trimming the activity log.
    assert_error(fails_in_time(tmp_path, text), key_path, line, "must fit in 64 bits")


@pytest.mark.parametrize(
    ("text", "key_path", "what"),
    [
        ('models:\n  "m\\x1b[2J":\n    cmd: s ${PORT}\n', "models.m\\x1b[2J", "a model ID"),
        ('models:\n  "a\\nb":\n    cmd: s ${PORT}\n', "models.a\\nb", "a model ID"),
        (MODEL + '    aliases: ["x\\ty"]\n', "models.m.aliases[0]", "an alias"),
        ('peers:\n  "p\\r":\n    proxy: http://h\n    models: [a]\n', 'peers."p\\r"', "a peer ID"),
    ],
)
def test_names_with_control_characters_are_refused(
    tmp_path: Path, text: str, key_path: str, what: str
) -> None:
    err = fails_in_time(tmp_path, text)
    assert err.key_path == key_path  # escaped, so the message stays one line
    assert f"{what} must not contain control characters" in err.message


def test_errors_and_warnings_are_one_bounded_line(tmp_path: Path) -> None:
    key = "k\x1b]0;title\x07" + "y" * 900  # a YAML simple key is at most 1024 characters
    config = load_config_text(MODEL + f'    "{key.encode("unicode_escape").decode()}": 1\n', "c")
    (warning,) = config.warnings
    assert warning.isprintable() and len(warning) < 1000
    err = fails_in_time(tmp_path, 'logLevel: "' + "\\x1b" * 5000 + '"\n')  # 5000 ESC
    assert err.message.startswith("must be one of debug, info, warn, error (got ")
    assert str(err).isprintable() and len(str(err)) < 1000


def test_a_file_larger_than_16_mib_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(MODEL.encode() + b"# " + b"x" * (16 << 20) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: is larger than 16 MiB; a config file is a few KiB"


def test_a_blank_key_is_visible_in_the_key_path() -> None:
    config = load_config_text(MODEL + "' ': 1\n'': 2\n", "c.yaml")
    assert config.warnings == (
        'c.yaml:4: " ": unknown key; ignored',
        'c.yaml:5: "": unknown key; ignored',
    )


def test_every_raw_struct_uses_only_types_the_checker_knows() -> None:
    # convert() checks types from msgspec.inspect, not from msgspec's error wording; a
    # type or constraint it cannot check must fail loudly, at the first load that uses it.
    for kind in (RawConfig, RawModel, RawPeer):
        type_info_checked(kind)

    class Constrained(msgspec.Struct, forbid_unknown_fields=True):
        port: Annotated[int, msgspec.Meta(ge=1)] = 1

    class WithSet(msgspec.Struct, forbid_unknown_fields=True):
        names: set[str] = msgspec.field(default_factory=set)

    with pytest.raises(TypeError, match="ignores the constraints"):
        type_info_checked(Constrained)
    with pytest.raises(TypeError, match="cannot check"):
        type_info_checked(WithSet)


_YAML_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_MODEL_KEYS = sorted(MODEL_KEYS)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # parallel CI runs
@given(st.dictionaries(st.sampled_from(_MODEL_KEYS), _YAML_VALUES, max_size=4))
def test_type_check_accepts_exactly_what_msgspec_accepts(fields: dict[str, object]) -> None:
    value = {"cmd": "s", **fields}
    doc = Document("c.yaml", value, {(): 1})
    try:
        msgspec.convert(value, RawModel, strict=True)
    except msgspec.ValidationError:
        with pytest.raises(ConfigError) as info:
            convert(value, RawModel, ("models", "m"), doc)
        assert not info.value.message.startswith("invalid value:")  # our words, not msgspec's
    else:
        convert(value, RawModel, ("models", "m"), doc)


# --- the shipped configs --------------------------------------------------------------


def test_example_config_loads_without_env_vars() -> None:
    path = REPO / "config.example.yaml"
    config = load_config(path)
    assert config.warnings == ()
    same = load_config_text(path.read_text(encoding="utf-8"), str(path), environ={})
    assert same == config
    assert len(config.models) >= 5
    docker = [m for m in config.models.values() if m.cmd_stop]
    assert docker and docker[0].cmd[0] == "docker"
    assert any(m.check_endpoint is None for m in config.models.values())
    assert any(("CUDA_VISIBLE_DEVICES", "0") in m.env for m in config.models.values())


def test_demo_config() -> None:
    config = load_demo_config()
    assert config.source == "<demo>"
    assert config.warnings == ()
    assert config.health_check_timeout == 30
    assert list(config.models) == ["demo-chat", "demo-coder", "demo-embed"]
    assert config.resolve("gpt-4o-mini") == "demo-chat"
    ports = sorted(int(m.proxy.rsplit(":", 1)[1]) for m in config.models.values())
    assert ports == [18800, 18801, 18802]
    for model in config.models.values():
        assert model.cmd[:4] == (sys.executable, "-m", "trio_swap", "responder")
        assert model.cmd[model.cmd.index("--model") + 1] == model.id
        port = model.cmd[model.cmd.index("--port") + 1]
        assert model.proxy == f"http://127.0.0.1:{port}"
    assert "${PORT}" in DEMO_CONFIG_TEXT


def test_demo_config_quotes_an_awkward_interpreter_path() -> None:
    python = "/opt/my \"odd\" 'py' \\dir/bin/python"
    config = load_config_text(demo_config_text(python), "<demo>", environ={})
    assert config.models["demo-embed"].cmd[0] == python
    assert shlex.split(shlex.quote(python)) == [python]


# --- units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "argv"),
    [
        ("a b  c", ("a", "b", "c")),
        ("  # all comment\n\n", ()),
        ("a \\\n  b \\   \n  c", ("a", "b", "c")),
        ("a\n  # b\n c # d", ("a", "c", "#", "d")),
        ('a \'b c\' "d \\"e\\""', ("a", "b c", 'd "e"')),
        ("a 'multi\nline'", ("a", "multi\nline")),
        ("a $HOME ${X} | grep > f", ("a", "$HOME", "${X}", "|", "grep", ">", "f")),
    ],
)
def test_split_command(text: str, argv: tuple[str, ...]) -> None:
    assert split_command(text) == argv


#: Text YAML keeps verbatim inside quotes: no control characters or line breaks.
_PRINTABLE = st.characters(whitelist_categories=("L", "N", "P", "S", "Zs"))


@given(st.lists(st.text(_PRINTABLE, min_size=1), min_size=1, max_size=6))
def test_split_command_inverts_shlex_join(argv: list[str]) -> None:
    assert split_command(shlex.join(argv)) == tuple(argv)


@given(st.text(_PRINTABLE).filter(lambda value: "${" not in value))
def test_env_values_arrive_verbatim_in_quoted_scalars(value: str) -> None:
    text = textwrap.dedent(
        """\
        models:
          m:
            cmd: s ${PORT}
            name: "${env.V}"
            description: '${env.V}'
        """
    )
    model = load_config_text(text, "c.yaml", environ={"V": value}).models["m"]
    assert (model.name, model.description) == (value.strip(), value.strip())


def test_split_command_unbalanced() -> None:
    with pytest.raises(ValueError, match="No closing quotation"):
        split_command("a 'b")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.7, "0.7"),
        (1.0, "1"),
        (-2.5, "-2.5"),
        (100000.0, "100000"),
        (1000000.0, "1e+06"),
        (1234567.0, "1.234567e+06"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (0.0, "0"),
        (math.inf, "+Inf"),
    ],
)
def test_go_float(value: float, text: str) -> None:
    assert go_float(value) == text


def test_json_schema_names_llama_swap_keys() -> None:
    schema = json_schema()
    text = repr(schema)
    for key in ("healthCheckTimeout", "globalTTL", "cmdStop", "checkEndpoint", "concurrencyLimit"):
        assert key in text


def test_config_error_repr_and_fields() -> None:
    err = ConfigError("must be >= 0 (got -1)", source="c.yaml", key_path="globalTTL", line=3)
    assert str(err) == "c.yaml:3: globalTTL: must be >= 0 (got -1)"
    assert "key_path='globalTTL'" in repr(err)
    bare = ConfigError("cannot read", source="c.yaml")
    assert str(bare) == "c.yaml: cannot read"
