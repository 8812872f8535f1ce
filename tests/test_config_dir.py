"""``--config-dir``: several YAML files merged into one config.

The rules are in docs/configuration.md#several-files.

Pure loads first (the merge rules, every conflict naming both files with
their lines, errors found after merging located in the file that holds the
value), then ``trio-swap check``, then a real ``trio-swap serve --config-dir``
serving through the responder and reloading when a file of the directory is
added, edited or broken.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import chat, free_port, running, wait_for
from tests.test_reload import listed, pids, trio_swap_serve
from trio_swap.cli import main
from trio_swap.config import Config, ConfigError, load_config
from trio_swap.config.sources import ConfigSources, load_sources
from trio_swap.reload import watch_config_file

PYTHON = sys.executable


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_dir(tmp_path: Path, files: dict[str, str], *, base: str | None = None) -> Config:
    """Write ``files`` into ``tmp_path/conf.d`` (and ``base`` as ``--config``) and load them."""
    directory = tmp_path / "conf.d"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write(directory / name, text)
    file = None if base is None else str(write(tmp_path / "base.yaml", base))
    return load_sources(ConfigSources(file, str(directory)))


def fails(tmp_path: Path, files: dict[str, str], *, base: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_dir(tmp_path, files, base=base)
    return info.value


def at(tmp_path: Path, name: str) -> str:
    """How an error names a file of the directory."""
    return str(tmp_path / "conf.d" / name)


def model(model_id: str, extra: str = "") -> str:
    return f"models:\n  {model_id}:\n    cmd: server --port ${{PORT}}\n{extra}"


# --- the merge rules -------------------------------------------------------------------


def test_files_merge_in_file_name_order_after_the_config_file(tmp_path: Path) -> None:
    config = load_dir(
        tmp_path,
        {"b.yaml": model("from-b"), "a.yml": model("from-a"), "10-x.yaml": model("from-10")},
        base=model("from-base"),
    )
    assert list(config.models) == ["from-base", "from-10", "from-a", "from-b"]


def test_maps_merge_lists_concatenate_and_equal_scalars_agree(tmp_path: Path) -> None:
    config = load_dir(
        tmp_path,
        {
            "1.yaml": "apiKeys: [k1, k2]\nhealthCheckTimeout: 40\n"
            "routing:\n  scheduler:\n    settings:\n      maxWait: 5\n",
            "2.yaml": "apiKeys: [k3]\nhealthCheckTimeout: 40\n"
            "routing:\n  scheduler:\n    settings:\n      minResident: 2\n" + model("m"),
        },
    )
    assert config.api_keys == ("k1", "k2", "k3")
    assert config.health_check_timeout == 40
    scheduler = config.routing.scheduler
    assert (scheduler.max_wait, scheduler.min_resident) == (5, 2)


def test_an_empty_value_yields_to_the_other_file(tmp_path: Path) -> None:
    config = load_dir(
        tmp_path,
        {
            "1.yaml": "globalTTL:\nhealthCheckTimeout: 40\n",
            "2.yaml": "globalTTL: 60\nhealthCheckTimeout:\n" + model("m"),
        },
    )
    assert config.models["m"].ttl == 60
    assert config.health_check_timeout == 40


def test_macros_combine_across_files_and_a_later_file_uses_an_earlier_ones(
    tmp_path: Path,
) -> None:
    config = load_dir(
        tmp_path,
        {
            "1.yaml": "macros:\n  bin: /opt/server\n  ctx: 4096\n",
            "2.yaml": "macros:\n  ctx: 4096\n  args: --ctx ${ctx}\n"
            "models:\n  m:\n    cmd: ${bin} ${args} --port ${PORT}\n",
        },
    )
    cmd = config.models["m"].cmd
    assert cmd[:3] == ("/opt/server", "--ctx", "4096")


def test_empty_and_comment_only_files_are_skipped(tmp_path: Path) -> None:
    config = load_dir(tmp_path, {"0.yaml": "", "1.yaml": "# nothing yet\n", "2.yaml": model("m")})
    assert list(config.models) == ["m"]
    empty = load_dir(tmp_path / "all-empty", {"0.yaml": "# only comments\n"})
    assert empty.models == {}


def test_hidden_files_subdirectories_and_other_suffixes_are_not_read(tmp_path: Path) -> None:
    directory = tmp_path / "conf.d"
    write(directory / ".hidden.yaml", "broken: [")
    write(directory / "sub" / "inner.yaml", "broken: [")
    (directory / "dir.yaml").mkdir()
    write(directory / "notes.txt", "broken: [")
    write(directory / "upper.YAML", "broken: [")
    write(directory / "ok.yaml", model("m"))
    config = load_sources(ConfigSources(None, str(directory)))
    assert list(config.models) == ["m"]
    assert config.source == f"{directory}/ (ok.yaml)"


def test_the_source_names_every_file(tmp_path: Path) -> None:
    config = load_dir(tmp_path, {"a.yaml": model("a"), "b.yml": model("b")}, base="")
    assert config.source == f"{tmp_path / 'base.yaml'} + {tmp_path / 'conf.d'}/ (a.yaml, b.yml)"


REPO = Path(__file__).resolve().parent.parent


def _has_list(value: object) -> bool:
    if isinstance(value, list):
        return True
    return isinstance(value, dict) and any(_has_list(item) for item in value.values())


@settings(max_examples=40, derandomize=True)
@given(choices=st.data())
def test_a_config_split_over_files_loads_as_the_whole_file(
    tmp_path_factory: pytest.TempPathFactory, choices: st.DataObject
) -> None:
    """config.example.yaml cut into 1-4 files at random (a model, a top-level key
    without lists in either file or both): the same config as the one file."""
    whole_path = REPO / "config.example.yaml"
    whole = yaml.safe_load(whole_path.read_text())
    count = choices.draw(st.integers(1, 4), label="files")
    parts: list[dict[str, object]] = [{} for _ in range(count)]
    pick = st.integers(0, count - 1)
    for key, value in whole.items():
        if key == "models":
            for model_id, entry in value.items():
                models = parts[choices.draw(pick, label=model_id)].setdefault("models", {})
                assert isinstance(models, dict)
                models[model_id] = entry
            continue
        owners = {choices.draw(pick, label=key)}
        if not _has_list(value) and choices.draw(st.booleans(), label=f"{key} twice"):
            owners.add(choices.draw(pick, label=f"{key} again"))
        for owner in owners:
            parts[owner][key] = value
    directory = tmp_path_factory.mktemp("split")
    for index, part in enumerate(parts):
        write(directory / f"{index:02}.yaml", yaml.safe_dump(part, sort_keys=False))
    merged = load_sources(ConfigSources(None, str(directory)))
    expected = load_config(whole_path)
    strip = {"source": "", "warnings": ()}
    assert msgspec.structs.replace(merged, **strip) == msgspec.structs.replace(expected, **strip)


# --- conflicts name both files and lines ---------------------------------------------------


def test_conflicting_scalars_name_both_files_the_key_path_and_lines(tmp_path: Path) -> None:
    err = fails(
        tmp_path,
        {
            "1.yaml": "logLevel: info\nhealthCheckTimeout: 30\n",
            "2.yaml": "\n\nhealthCheckTimeout: 45\n",
        },
    )
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "2.yaml"), "healthCheckTimeout", 3)
    assert f"45 here, 30 in {at(tmp_path, '1.yaml')}:2" in err.message


def test_a_scalar_conflict_deep_in_a_mapping_names_its_key_path(tmp_path: Path) -> None:
    err = fails(
        tmp_path,
        {
            "1.yaml": "routing:\n  scheduler:\n    settings:\n      maxWait: 5\n",
            "2.yaml": "routing:\n  scheduler:\n    settings:\n      maxWait: 6\n",
        },
    )
    assert (err.key_path, err.line) == ("routing.scheduler.settings.maxWait", 4)
    assert f"in {at(tmp_path, '1.yaml')}:4" in err.message


def test_the_same_number_written_as_text_conflicts(tmp_path: Path) -> None:
    err = fails(tmp_path, {"1.yaml": "startPort: 7000\n", "2.yaml": 'startPort: "7000"\n'})
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "2.yaml"), "startPort", 1)


def test_a_macro_defined_twice_with_different_values_conflicts(tmp_path: Path) -> None:
    err = fails(tmp_path, {"1.yaml": "macros:\n  ctx: 4096\n", "2.yaml": "macros:\n  ctx: 8192\n"})
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "2.yaml"), "macros.ctx", 2)
    assert f"in {at(tmp_path, '1.yaml')}:2" in err.message


def test_a_mapping_against_a_list_names_both_files(tmp_path: Path) -> None:
    err = fails(tmp_path, {"1.yaml": model("m"), "2.yaml": "\nmodels: [m]\n"})
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "2.yaml"), "models", 2)
    assert f"a list here but a mapping in {at(tmp_path, '1.yaml')}:1" in err.message


@pytest.mark.parametrize(
    ("first", "second", "key_path", "what"),
    [
        (model("m"), "\n" + model("m"), "models.m", "model 'm'"),
        (
            "peers:\n  p:\n    proxy: http://h:1\n    models: [a]\n",
            "\npeers:\n  p:\n    proxy: http://h:2\n    models: [b]\n",
            "peers.p",
            "peer 'p'",
        ),
        (
            "groups:\n  g:\n    members: [a]\n",
            "\ngroups:\n  g:\n    members: [b]\n",
            "groups.g",
            "group 'g'",
        ),
        (
            "profiles:\n  day:\n    pins: {}\n",
            "\nprofiles:\n  day:\n    description: x\n",
            "profiles.day",
            "profile 'day'",
        ),
        (
            "selectors:\n  s:\n    use: pin\n",
            "\nselectors:\n  s:\n    targets: [a]\n",
            "selectors.s",
            "selector 's'",
        ),
        (
            "routing:\n  router:\n    settings:\n      groups:\n        g: {members: [a]}\n",
            "\nrouting:\n  router:\n    settings:\n      groups:\n        g: {members: [b]}\n",
            "routing.router.settings.groups.g",
            "group 'g'",
        ),
        (
            "matrix:\n  vars: {a: m}\n",
            "\nmatrix:\n  vars: {b: n}\n",
            "matrix.vars",
            "matrix key 'vars'",
        ),
    ],
)
def test_an_id_defined_in_two_files_names_both(
    tmp_path: Path, first: str, second: str, key_path: str, what: str
) -> None:
    err = fails(tmp_path, {"1.yaml": first, "2.yaml": second})
    line = len(key_path.split(".")) + 1  # the blank first line, then one line per level
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "2.yaml"), key_path, line)
    assert f"{what} is also defined in {at(tmp_path, '1.yaml')}:{line - 1}" in err.message


def test_a_top_level_that_is_not_a_mapping_is_located_in_its_file(tmp_path: Path) -> None:
    err = fails(tmp_path, {"1.yaml": model("m"), "2.yaml": "- a\n- b\n"})
    assert (err.source, err.line) == (at(tmp_path, "2.yaml"), 1)
    assert "top level must be a mapping" in err.message


# --- errors found after merging point at the right file ----------------------------------


def test_a_bad_cmd_in_the_third_file_is_located_there(tmp_path: Path) -> None:
    err = fails(
        tmp_path,
        {
            "1.yaml": model("a"),
            "2.yaml": model("b"),
            "3.yaml": "# third\nmodels:\n  c:\n    cmd: server ${PORT} ${nope}\n",
        },
    )
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "3.yaml"), "models.c.cmd", 4)
    assert "unknown macro '${nope}'" in err.message


def test_a_bad_list_item_after_concatenation_is_located_in_its_file(tmp_path: Path) -> None:
    err = fails(
        tmp_path, {"1.yaml": "apiKeys:\n  - good\n", "2.yaml": "\napiKeys:\n  - 'has space'\n"}
    )
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "2.yaml"), "apiKeys[1]", 3)


def test_a_missing_cmd_points_at_its_model_in_its_file(tmp_path: Path) -> None:
    err = fails(tmp_path, {"1.yaml": model("a"), "2.yaml": "\n\nmodels:\n  b:\n    ttl: 5\n"})
    assert (err.source, err.key_path, err.line) == (at(tmp_path, "2.yaml"), "models.b.cmd", 4)


def test_an_alias_clash_across_files_is_located_at_the_later_model(tmp_path: Path) -> None:
    err = fails(
        tmp_path,
        {
            "1.yaml": model("a", "    aliases: [shared]\n"),
            "2.yaml": "\n" + model("b", "    aliases: [shared]\n"),
        },
    )
    assert err.source == at(tmp_path, "2.yaml")
    assert err.key_path.startswith("models.b.aliases")
    assert err.line == 5


def test_an_unset_env_variable_names_its_file(tmp_path: Path) -> None:
    err = fails(
        tmp_path, {"1.yaml": model("a"), "2.yaml": "\napiKeys: ['${env.TRIO_SWAP_SURELY_UNSET}']\n"}
    )
    assert (err.source, err.line) == (at(tmp_path, "2.yaml"), 2)


def test_warnings_name_their_file_and_come_file_by_file(tmp_path: Path) -> None:
    config = load_dir(
        tmp_path,
        {"1.yaml": "\n\n\n\ntypo1: x\n" + model("a"), "2.yaml": "typo2: x\n" + model("b")},
    )
    warnings = config.warnings
    assert [w.split(": ")[0] for w in warnings] == [
        f"{at(tmp_path, '1.yaml')}:5",
        f"{at(tmp_path, '2.yaml')}:1",
    ]


# --- the directory itself ---------------------------------------------------------------


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_sources(ConfigSources(None, str(tmp_path / "nowhere")))
    assert info.value.source == str(tmp_path / "nowhere")
    assert "cannot read the config directory: No such file or directory" in info.value.message


def test_an_empty_directory_or_one_without_yaml_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write(tmp_path / "other" / "notes.txt", "x")
    write(tmp_path / "other" / ".hidden.yaml", "x: 1")
    for name in ("empty", "other"):
        with pytest.raises(ConfigError) as info:
            load_sources(
                ConfigSources(str(write(tmp_path / "base.yaml", model("m"))), str(tmp_path / name))
            )
        assert info.value.source == str(tmp_path / name)
        assert "holds no *.yaml or *.yml file" in info.value.message


def test_a_file_given_as_the_directory_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", model("m"))
    with pytest.raises(ConfigError, match="--config-dir is not a directory"):
        load_sources(ConfigSources(None, str(path)))


def test_the_config_file_may_not_also_be_in_the_directory(tmp_path: Path) -> None:
    path = write(tmp_path / "conf.d" / "a.yaml", model("m"))
    with pytest.raises(ConfigError) as info:
        load_sources(ConfigSources(str(path), str(tmp_path / "conf.d")))
    assert info.value.source == str(path)
    assert "is also in --config-dir" in info.value.message


# --- trio-swap check ----------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "trio_swap", *args], capture_output=True, text=True, timeout=60
    )


def test_check_with_a_config_dir_exits_2_naming_both_files(tmp_path: Path) -> None:
    write(tmp_path / "conf.d" / "1.yaml", model("m"))
    write(tmp_path / "conf.d" / "2.yaml", "\n" + model("m"))
    result = run("check", "--config-dir", str(tmp_path / "conf.d"))
    assert result.returncode == 2
    first, second = at(tmp_path, "1.yaml"), at(tmp_path, "2.yaml")
    assert result.stderr.startswith(
        f"error: {second}:3: models.m: model 'm' is also defined in {first}:2"
    )
    (tmp_path / "conf.d" / "2.yaml").unlink()
    ok = run(
        "check",
        "--config",
        str(write(tmp_path / "base.yaml", "")),
        "-config-dir",
        str(tmp_path / "conf.d"),
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(
        f"{tmp_path / 'base.yaml'} + {tmp_path / 'conf.d'}/ (1.yaml): ok (1 models"
    )


def test_plan_reads_a_config_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "conf.d" / "1.yaml", model("a"))
    write(tmp_path / "conf.d" / "2.yaml", model("b"))
    args = ["plan", "--config-dir", str(tmp_path / "conf.d"), "--running", "a", "--request", "b"]
    assert main(args) == 0
    assert "It evicts a" in capsys.readouterr().out


def test_check_needs_a_config_or_a_config_dir() -> None:
    result = run("check")
    assert result.returncode == 2
    assert "needs --config FILE or --config-dir DIR" in result.stderr


# --- a running trio-swap ---------------------------------------------------------------------


def responder(model_id: str, flags: str = "") -> str:
    return (
        f"models:\n  {model_id}:\n"
        f"    cmd: {PYTHON} -m trio_swap responder --port ${{PORT}} --model ${{MODEL_ID}} {flags}\n"
    )


async def test_serve_with_a_config_dir_serves_and_reloads_files_added_changed_and_broken(
    tmp_path: Path,
) -> None:
    start = free_port()
    base = write(
        tmp_path / "base.yaml", f"healthCheckTimeout: 30\nstartPort: {start}\nlogLevel: debug\n"
    )
    directory = tmp_path / "conf.d"
    write(directory / "10-alpha.yaml", responder("alpha"))
    args = ("--config", str(base), "--config-dir", str(directory), "--watch-config")
    with trio.fail_after(60):
        async with trio_swap_serve(*args) as (process, client, output):
            assert any(f"from {base} + {directory}/ (10-alpha.yaml)" in line for line in output)
            answer = await client.post("/v1/chat/completions", json=chat("alpha"))
            assert answer.status_code == 200, answer.text
            alpha_pid = (await pids(client))["alpha"]

            # A file added to the directory: the watcher reloads, alpha keeps running.
            write(directory / "20-beta.yml", responder("beta"))
            await wait_for(
                lambda: _listed_is(client, ["alpha", "beta"]), what="beta added by the watcher"
            )
            assert (await pids(client))["alpha"] == alpha_pid
            assert (await client.post("/v1/chat/completions", json=chat("beta"))).is_success

            # A broken file: the reload fails naming that file; the old config serves.
            write(directory / "20-beta.yml", responder("beta") + "  broken: [unclosed\n")

            def failed() -> bool:
                return any(
                    "config reload failed" in line and str(directory / "20-beta.yml") in line
                    for line in output
                )

            await wait_for(failed, what="the failed reload naming 20-beta.yml")
            assert (await client.post("/v1/chat/completions", json=chat("beta"))).is_success
            bad = await client.post("/api/config/reload")
            assert bad.status_code == 422
            assert bad.json()["error"]["source"] == str(directory / "20-beta.yml")

            # Fixed and changed (beta gains an alias): SIGHUP reloads every file.
            write(directory / "20-beta.yml", responder("beta") + "    aliases: [b2]\n")
            process.send_signal(signal.SIGHUP)
            await wait_for(
                lambda: _answers(client, "b2"), what="beta's new alias after the SIGHUP reload"
            )

            # A file removed: its model goes.
            (directory / "20-beta.yml").unlink()
            await wait_for(lambda: _listed_is(client, ["alpha"]), what="beta removed")
            assert (await client.post("/v1/chat/completions", json=chat("alpha"))).is_success


async def _listed_is(client: httpx.AsyncClient, expected: list[str]) -> bool:
    return await listed(client) == expected


async def _answers(client: httpx.AsyncClient, name: str) -> bool:
    response = await client.post("/v1/chat/completions", json=chat(name))
    return response.status_code == 200


async def test_reload_api_reads_a_file_added_to_the_directory(tmp_path: Path) -> None:
    start = free_port()
    directory = tmp_path / "conf.d"
    write(directory / "00-settings.yaml", f"healthCheckTimeout: 30\nstartPort: {start}\n")
    write(directory / "10-alpha.yaml", responder("alpha"))
    sources = ConfigSources(None, str(directory))
    with trio.fail_after(30):
        async with running(load_sources(sources), config_path=sources) as h:
            write(directory / "20-beta.yaml", responder("beta"))
            report = (await h.client.post("/api/config/reload")).json()
            assert report["added"] == ["beta"]
            assert (
                report["source"] == f"{directory}/ (00-settings.yaml, 10-alpha.yaml, 20-beta.yaml)"
            )
            assert (await h.client.post("/v1/chat/completions", json=chat("beta"))).is_success


async def test_the_watcher_sees_files_added_edited_and_removed_but_not_a_touch(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "conf.d"
    write(directory / "a.yaml", "x: 1\n")
    reasons: list[str] = []
    sources = ConfigSources(None, str(directory))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(watch_config_file, sources, reasons.append, interval=0.01))
            write(directory / "b.yaml", "y: 1\n")
            await wait_for(lambda: len(reasons) == 1, what="the added file noticed")
            write(directory / "a.yaml", "x: 2\n")
            await wait_for(lambda: len(reasons) == 2, what="the edited file noticed")
            (directory / "b.yaml").unlink()
            await wait_for(lambda: len(reasons) == 3, what="the removed file noticed")
            # Emptied, then back as it was: nothing to reload (the same content).
            (directory / "a.yaml").unlink()
            write(directory / "a.yaml", "x: 2\n")
            write(directory / "z.yaml", "z: 1\n")
            await wait_for(lambda: len(reasons) == 4, what="the file added after")
            nursery.cancel_scope.cancel()
    assert all(reason == f"{sources.describe()} changed" for reason in reasons)
