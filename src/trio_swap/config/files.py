"""The weight files a model's command will read, and how big they are.

Before a model's first load nothing has been measured, so fit by memory
(issue 10) estimates its need from the sizes of the files its ``cmd`` names;
the same list, with the paths a model's ``files:`` adds
(:func:`weight_files`), is what the page-cache read-ahead warms
(docs/faster-swaps.md). Parsing follows llama.cpp's flags (llama-server,
whisper-server and friends share them).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from typing import Final

from trio_swap.config.model import ModelConfig, PrefetchConfig
from trio_swap.config.schema import RawPrefetch
from trio_swap.config.sizes import SizeError, parse_size
from trio_swap.config.yamlsource import Document, KeyPath

__all__ = [
    "MODEL_FILE_FLAGS",
    "check_files",
    "check_prefetch",
    "files_bytes",
    "model_files",
    "weight_files",
]

#: Flags whose value is a file the server loads into memory.
MODEL_FILE_FLAGS: Final = frozenset({"-m", "--model", "--mmproj", "--lora", "--model-draft", "-md"})

# llama.cpp's split GGUF (``gguf-split``): naming the first part loads them all.
_SPLIT: Final = re.compile(r"^(?P<stem>.*)-00001-of-(?P<count>\d{5})\.gguf$")
_PYTHON: Final = re.compile(r"python[\d.]*")


def model_files(cmd: Sequence[str]) -> tuple[str, ...]:
    """The paths after ``-m``, ``--model``, ``--mmproj``, ``--lora``, ``--model-draft``, ``-md``.

    Both ``--model PATH`` and ``--model=PATH`` count; paths come in command-line
    order without duplicates, as written (relative paths are relative to the
    server's working directory). A flag with no value (last in ``cmd``, empty
    after ``=``, or followed by another flag) names nothing. The first part of a
    split GGUF (``x-00001-of-00003.gguf``) brings its other parts, which
    llama.cpp loads with it. In ``python -m MODULE ...`` the ``-m`` is
    Python's, not a model's.
    """
    found: dict[str, None] = {}  # an ordered set
    index = _after_python_module(cmd)
    while index < len(cmd):
        word = cmd[index]
        index += 1
        flag, equals, value = word.partition("=")
        if flag not in MODEL_FILE_FLAGS:
            continue
        if not equals:
            if index == len(cmd) or cmd[index].startswith("-"):
                continue
            value = cmd[index]
            index += 1
        for path in _with_split_parts(value):
            found[path] = None
    return tuple(path for path in found if path)


def _after_python_module(cmd: Sequence[str]) -> int:
    """Where the server's own arguments begin: after ``python [options] -m MODULE``, else 0."""
    if not cmd or _PYTHON.fullmatch(os.path.basename(cmd[0])) is None:
        return 0
    for index, word in enumerate(cmd[1:], start=1):
        if word == "-m":
            return index + 2
        if not word.startswith("-"):
            return 0  # a script: its arguments follow
    return 0


def _with_split_parts(path: str) -> list[str]:
    match = _SPLIT.match(path)
    if match is None:
        return [path]
    stem, count = match["stem"], int(match["count"])
    return [f"{stem}-{part:05d}-of-{count:05d}.gguf" for part in range(1, count + 1)]


def files_bytes(paths: Iterable[str]) -> int:
    """The total size of the regular files among ``paths``; never raises.

    A missing or unreadable path counts 0; one file named twice (or through a
    link) counts once, as it occupies memory once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in paths:
        try:
            info = os.stat(path)
        except (OSError, ValueError):  # ValueError: a NUL in the path
            continue
        if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_size
    return total


def weight_files(model: ModelConfig) -> tuple[str, ...]:
    """Every file ``model`` loads: those its ``cmd`` names, then its ``files:``, once each."""
    return tuple(dict.fromkeys((*model_files(model.cmd), *model.files)))


def check_files(
    model_id: str, raw: Sequence[str], doc: Document
) -> tuple[tuple[str, ...], list[tuple[int, str]]]:
    """``models.<id>.files``: the paths (duplicates dropped) and (line, warning) pairs.

    A path that is not (yet) a regular file is a warning, not an error: disks
    get mounted late, and the read-ahead skips a missing file until it exists.
    """
    paths: dict[str, None] = {}
    warnings: list[tuple[int, str]] = []
    for index, path in enumerate(raw):
        where: KeyPath = ("models", model_id, "files", index)
        if not path.strip():
            raise doc.error(where, "a file path must not be empty")
        if "\0" in path:
            raise doc.error(where, "a file path must not contain a NUL character")
        if path in paths:
            continue
        paths[path] = None
        if not os.path.isfile(path):
            what = "is not a regular file" if os.path.exists(path) else "does not exist (yet)"
            warnings.append(
                doc.warning(where, f"{path!r} {what}; it is not read ahead until it is")
            )
    return tuple(paths), warnings


def check_prefetch(raw: bool | RawPrefetch, doc: Document) -> PrefetchConfig:
    """Top-level ``prefetch:``: ``true`` (the default), ``false``, or ``{budget: SIZE}``."""
    if isinstance(raw, bool):
        return PrefetchConfig(enabled=raw)
    if raw.budget is None:
        return PrefetchConfig()
    try:
        budget = parse_size(raw.budget)
    except SizeError as exc:
        raise doc.error(("prefetch", "budget"), str(exc)) from None
    return PrefetchConfig(budget=budget)
