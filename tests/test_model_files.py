"""Tests for `trio_swap.config.files`: which weight files a command names, and their size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trio_swap.config.files import files_bytes, model_files

SERVER = "llama-server"


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        pytest.param([SERVER, "-m", "a.gguf", "--port", "9"], ("a.gguf",), id="short"),
        pytest.param([SERVER, "--model", "a.gguf"], ("a.gguf",), id="long"),
        pytest.param([SERVER, "--model=a.gguf", "-c", "4096"], ("a.gguf",), id="equals"),
        pytest.param(
            [
                SERVER,
                "-m",
                "/m/main.gguf",
                "--mmproj=/m/proj.gguf",
                "--lora",
                "/m/style.gguf",
                "--model-draft",
                "/m/draft.gguf",
            ],
            ("/m/main.gguf", "/m/proj.gguf", "/m/style.gguf", "/m/draft.gguf"),
            id="every-kind-in-order",
        ),
        pytest.param(
            [SERVER, "-md=d.gguf", "--lora", "x.gguf", "--lora=y.gguf"],
            ("d.gguf", "x.gguf", "y.gguf"),
            id="short-draft-and-repeated-lora",
        ),
        pytest.param(
            [SERVER, "-m", "a.gguf", "--model=a.gguf", "-md", "a.gguf"], ("a.gguf",), id="dupes"
        ),
        pytest.param([SERVER, "--port", "9", "-ngl", "99"], (), id="no-model-flags"),
        pytest.param([SERVER, "-c", "4096", "--model"], (), id="flag-last-without-value"),
        pytest.param([SERVER, "--model="], (), id="empty-after-equals"),
        pytest.param(
            [SERVER, "-m", "--mmproj", "p.gguf"], ("p.gguf",), id="flag-followed-by-a-flag"
        ),
        pytest.param(
            [SERVER, "--alias", "m", "--models-dir", "/m", "--lora-scaled", "l.gguf", "1"],
            (),
            id="similar-flags-are-not-model-files",
        ),
        pytest.param([], (), id="empty"),
    ],
)
def test_model_files(cmd: list[str], expected: tuple[str, ...]) -> None:
    assert model_files(cmd) == expected


def test_model_files_first_split_part_brings_the_others() -> None:
    cmd = [SERVER, "-m", "/m/q-00001-of-00003.gguf", "--mmproj", "/m/q-00002-of-00003.gguf"]
    assert model_files(cmd) == (
        "/m/q-00001-of-00003.gguf",
        "/m/q-00002-of-00003.gguf",
        "/m/q-00003-of-00003.gguf",
    )


def test_files_bytes_sums_existing_files_once(tmp_path: Path) -> None:
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"x" * 1000)
    projector = tmp_path / "p.gguf"
    projector.write_bytes(b"y" * 24)
    link = tmp_path / "link.gguf"
    link.symlink_to(weights)
    paths = [str(weights), str(projector), str(tmp_path / "missing.gguf"), str(link)]
    assert files_bytes(paths) == 1024  # the link is the same file: counted once
    assert files_bytes([str(tmp_path)]) == 0  # a directory is not a weight file
    assert files_bytes(["with\0nul", ""]) == 0
    assert files_bytes([]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through any permission")
def test_files_bytes_unreadable_directory_counts_zero(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "w.gguf").write_bytes(b"x" * 10)
    locked.chmod(0)
    try:
        assert files_bytes([str(locked / "w.gguf")]) == 0
    finally:
        locked.chmod(0o700)


def test_files_bytes_of_model_files(tmp_path: Path) -> None:
    """The two together, as the first-load estimate uses them."""
    main = tmp_path / "main.gguf"
    main.write_bytes(b"m" * 300)
    cmd = [SERVER, "--model", str(main), f"--mmproj={tmp_path / 'absent.gguf'}", "--port", "9"]
    assert files_bytes(model_files(cmd)) == 300
