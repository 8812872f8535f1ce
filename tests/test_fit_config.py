"""``resources:`` and ``needs:`` in a config file, and what ``check`` and ``plan`` print.

Every bad size is a located error (file, key path, line), never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trio_swap.config import ConfigError, load_config
from trio_swap.config.sizes import SizeError, format_size, parse_size
from trio_swap.explain import plan

GiB = 1 << 30
MiB = 1 << 20

GOOD = """\
resources:
  ram: 1GiB
  vram0: 24GB
  slots: 3
models:
  a:
    cmd: server --port ${PORT}
    needs: {ram: 300MiB, slots: 1}
  b:
    cmd: server --port ${PORT} -m /nowhere/b.gguf
    needs:
      ram: 500MiB
  c:
    cmd: server --port ${PORT}
"""


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("24GiB", 24 * GiB),
        ("24 gib", 24 * GiB),
        ("512MiB", 512 * MiB),
        ("24GB", 24 * 10**9),
        ("1.5GiB", 3 * GiB // 2),
        ("8G", 8 * GiB),
        ("100", 100),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "",
        "GiB",
        "1.5",
        "-1",
        "1 parsec",
        "1e9",
        "1,5GiB",
        True,
        1.5,
        None,
        [],
        "\u0661\u0662GiB",
        "9" * 40,
    ],
)
def test_bad_sizes(text: object) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(21 * GiB) == "21.0 GiB"
    assert format_size(512 * MiB) == "512 MiB"
    assert format_size(100) == "100 B"


def test_resources_and_needs_load_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "fit.yaml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.resources == {"ram": GiB, "vram0": 24 * 10**9, "slots": 3}
    assert config.models["a"].needs == {"ram": 300 * MiB, "slots": 1}
    assert config.models["b"].needs == {"ram": 500 * MiB}
    assert config.models["c"].needs == {}


@pytest.mark.parametrize(
    ("change", "key_path", "line", "words"),
    [
        (("ram: 1GiB", "ram: 1 parsec"), "resources.ram", 2, "unknown unit"),
        (("ram: 1GiB", "ram: 0"), "resources.ram", 2, "more than 0"),
        (("ram: 1GiB", "ram: -5"), "resources.ram", 2, "cannot be negative"),
        (("slots: 1}", "gpus: 1}"), "models.a.needs.gpus", 8, "unknown resource 'gpus'"),
        (("ram: 500MiB", "ram: 2GiB"), "models.b.needs.ram", 12, "more than the whole ram"),
        (("ram: 500MiB", "ram: [1]"), "models.b.needs.ram", 12, ""),
    ],
)
def test_bad_fit_config_is_a_located_error(
    tmp_path: Path, change: tuple[str, str], key_path: str, line: int, words: str
) -> None:
    path = tmp_path / "fit.yaml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.key_path == key_path
    assert info.value.line == line
    assert words in info.value.message


def test_needs_without_resources_says_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "fit.yaml"
    path.write_text("models:\n  a:\n    cmd: server --port ${PORT}\n    needs: {ram: 1GiB}\n")
    with pytest.raises(ConfigError, match="needs a top-level 'resources:'"):
        load_config(path)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_swap", *args], capture_output=True, text=True, timeout=30
    )


def test_check_and_plan_report_the_fit_numbers(tmp_path: Path) -> None:
    path = tmp_path / "fit.yaml"
    path.write_text(GOOD)
    checked = run("check", "--config", str(path), "--format", "json")
    assert checked.returncode == 0, checked.stderr
    fit = json.loads(checked.stdout)["fit"]
    assert fit["resources"] == {"ram": GiB, "vram0": 24 * 10**9, "slots": 3}
    assert fit["needs"]["a"] == {"ram": 300 * MiB, "slots": 1}
    state = tmp_path / "state"  # nothing learned yet: c's ram need is the whole resource
    planned = run(
        "plan", "--config", str(path), "--running", "a,b", "--request", "c",
        "--format", "json", "--state-dir", str(state),
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["evict"] == ["a", "b"]
    assert plan["fit"]["need"]["ram"] == GiB
    assert plan["fit"]["models"]["c"]["basis"]["ram"] == "unknown"
    assert plan["fit"]["models"]["c"]["basis"]["slots"] == "undeclared"
    assert plan["fit"]["free_before"]["ram"] == GiB - 800 * MiB
    # Each model's vram0 is unknown (no measurement, no model file): the whole GPU.
    text = run(
        "plan", "--config", str(path), "--running", "a", "--request", "b", "--state-dir", str(state)
    )
    assert text.returncode == 0
    assert "Fit by memory evicts a (stops): b needs vram0 22.4 GiB with 0 B free" in text.stdout
    path.write_text(GOOD.replace("  vram0: 24GB\n", ""))
    text = run(
        "plan", "--config", str(path), "--running", "a", "--request", "b", "--state-dir", str(state)
    )
    assert "b needs ram 500 MiB, slots 0 and fits beside the rest" in text.stdout


SLEEPY = """\
resources: {ram: 700MiB, vram0: 400MiB}
models:
  a:
    cmd: server --port ${PORT}
    sleep: vllm
    needs: {ram: 100MiB, vram0: 300MiB}
  b:
    cmd: server --port ${PORT}
    needs: {ram: 100MiB, vram0: 300MiB}
  c:
    cmd: server --port ${PORT}
    needs: {ram: 690MiB, vram0: 0}
"""


def test_plan_says_which_victims_sleep_and_which_sleepers_stop(tmp_path: Path) -> None:
    path = tmp_path / "sleepy.yaml"
    path.write_text(SLEEPY)
    state = str(tmp_path / "state")
    common = ("--config", str(path), "--state-dir", state, "--format", "json")
    # b needs the GPU: a sleeps (asleep it is assumed to hold 100 + 300 MiB of ram: fits).
    planned = run("plan", *common, "--running", "a", "--request", "b")
    assert planned.returncode == 0, planned.stderr
    fit = json.loads(planned.stdout)["fit"]
    assert (fit["evicts"], fit["sleeps"], fit["stops_asleep"]) == (["a"], ["a"], [])
    # c needs most of the ram: b stops, and a, asleep, is stopped too.
    planned = run("plan", *common, "--running", "b", "--asleep", "a", "--request", "c")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["evict"] == ["b"]
    assert (plan["fit"]["sleeps"], plan["fit"]["stops_asleep"]) == ([], ["a"])
    assert plan["fit"]["free_before"]["ram"] == 700 * MiB - 100 * MiB - 400 * MiB
    text = run("plan", "--config", str(path), "--state-dir", state, "--running", "b",
               "--asleep", "a", "--request", "c")  # fmt: skip
    assert "evicts b (stops), a (stops asleep)" in text.stdout
    wrong = run("plan", *common, "--asleep", "b", "--request", "c")
    assert wrong.returncode != 0
    assert "is not a model with sleep:" in wrong.stderr


GROUPED = """\
resources: {{ram: {ram}, vram0: 100}}
groups:
  solo: {{swap: true, exclusive: true, members: [a, b]}}
models:
  a:
    cmd: server a --port ${{PORT}}
    needs: {{ram: 50, vram0: 60}}
    sleep: vllm
  b:
    cmd: server b --port ${{PORT}}
    needs: {{ram: 40, vram0: 60}}
"""


@pytest.mark.parametrize(
    ("ram", "way"), [(200, "a sleeps"), (100, "a stops (it would not fit asleep)")]
)
def test_plan_names_the_way_of_the_groups_victims_with_sleep(
    tmp_path: Path, ram: int, way: str
) -> None:
    """Asleep a holds 50 + 60 of ram: beside b's 40 that fits in 200, not in 100; the
    answer said only that b fits, as if the group's victim always slept."""
    path = tmp_path / "grouped.yaml"
    path.write_text(GROUPED.format(ram=ram))
    result, sentence = plan(load_config(path), ["a"], "b")
    assert result.evict == ["a"]
    assert f"By memory, {way}. b needs" in sentence
