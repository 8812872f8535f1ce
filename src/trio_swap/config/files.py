"""The weight files a model's command will read, and how big they are.

Before a model's first load nothing has been measured, so fit by memory
(issue 10) estimates its need from the sizes of the files its ``cmd`` names;
the same list is what a page-cache read-ahead would warm. Parsing follows
llama.cpp's flags (llama-server, whisper-server and friends share them).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = ["MODEL_FILE_FLAGS", "files_bytes", "model_files"]

#: Flags whose value is a file the server loads into memory.
MODEL_FILE_FLAGS: Final = frozenset({"-m", "--model", "--mmproj", "--lora", "--model-draft", "-md"})

# llama.cpp's split GGUF (``gguf-split``): naming the first part loads them all.
_SPLIT: Final = re.compile(r"^(?P<stem>.*)-00001-of-(?P<count>\d{5})\.gguf$")


def model_files(cmd: Sequence[str]) -> tuple[str, ...]:
    """The paths after ``-m``, ``--model``, ``--mmproj``, ``--lora``, ``--model-draft``, ``-md``.

    Both ``--model PATH`` and ``--model=PATH`` count; paths come in command-line
    order without duplicates, as written (relative paths are relative to the
    server's working directory). A flag with no value (last in ``cmd``, empty
    after ``=``, or followed by another flag) names nothing. The first part of a
    split GGUF (``x-00001-of-00003.gguf``) brings its other parts, which
    llama.cpp loads with it.
    """
    found: dict[str, None] = {}  # an ordered set
    index = 0
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
