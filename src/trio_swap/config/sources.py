"""Where a config comes from: ``--config FILE``, ``--config-dir DIR``, or both.

With a directory, the sources are the file (if any), then the directory's
top-level ``*.yml``/``*.yaml`` files in file-name order; each is read and
``${env.NAME}``-substituted on its own, parsed, and the documents are merged
(:mod:`.merge`) before the one load pipeline runs on the result. Hidden files
(``.name.yaml``) and subdirectories are not read: editors and Kubernetes
(``..data``) keep their own things there.

A reload (SIGHUP, ``--watch-config``, ``POST /api/config/reload``) reads all of
them again, so :class:`ConfigSources` is what the server keeps instead of a
path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final, final

from trio_swap.config.errors import ConfigError
from trio_swap.config.load import load_config, load_document, read_config_file
from trio_swap.config.macros import substitute_env
from trio_swap.config.merge import merge_documents
from trio_swap.config.model import Config
from trio_swap.config.yamlsource import parse_document

__all__ = ["YAML_SUFFIXES", "ConfigSources", "load_sources"]

#: The files of a config directory that are read (case matters, as in llama-swap).
YAML_SUFFIXES: Final = (".yaml", ".yml")


@final
class ConfigSources(os.PathLike[str]):
    """``--config FILE`` and/or ``--config-dir DIR``: what a load or reload reads.

    It is :class:`os.PathLike` so that code which only passes "where the
    config came from" along (``serve(config_path=...)``) carries it unchanged;
    its path is the file, or the directory when there is no file. Readers that
    load (the :class:`~trio_swap.reload.Reloader`, the file watcher) check for
    this class first.
    """

    def __init__(self, file: str | None = None, directory: str | None = None) -> None:
        if file is None and directory is None:
            raise ValueError("ConfigSources needs a file, a directory, or both")
        self.file = file
        self.directory = directory

    def __fspath__(self) -> str:
        path = self.file if self.file is not None else self.directory
        assert path is not None
        return path

    def __repr__(self) -> str:
        return f"ConfigSources(file={self.file!r}, directory={self.directory!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigSources):
            return NotImplemented
        return (self.file, self.directory) == (other.file, other.directory)

    def __hash__(self) -> int:
        return hash((self.file, self.directory))

    def files(self) -> list[str]:
        """Every file read, in merge order: the file, then the directory's.

        Raises:
            ConfigError: the directory is missing, unreadable, holds no YAML
                file, or holds the ``--config`` file itself.
        """
        paths = [] if self.file is None else [self.file]
        if self.directory is not None:
            listed = yaml_files(self.directory)
            if self.file is not None:
                _refuse_twice(self.file, listed, self.directory)
            paths.extend(listed)
        return paths

    def describe(self, files: list[str] | None = None) -> str:
        """``base.yaml + conf.d/ (a.yaml, b.yaml)``: for logs, banners, reload reports."""
        if self.directory is None:
            assert self.file is not None
            return self.file
        names = [os.path.basename(path) for path in (files or []) if path != self.file]
        listed = f"{self.directory.rstrip('/')}/ ({', '.join(names)})" if names else self.directory
        return listed if self.file is None else f"{self.file} + {listed}"


def yaml_files(directory: str) -> list[str]:
    """The top-level ``*.yaml``/``*.yml`` files of ``directory``, by file name.

    Subdirectories and hidden names are skipped. A symlink counts as a file
    (Kubernetes mounts ConfigMaps as links into ``..data``); one that leads
    nowhere is kept, so it fails to read with its name instead of vanishing
    from the config.

    Raises:
        ConfigError: the directory is missing or unreadable, or holds no YAML file.
    """
    try:
        with os.scandir(directory) as entries:
            names = sorted(
                entry.name
                for entry in entries
                if entry.name.endswith(YAML_SUFFIXES)
                and not entry.name.startswith(".")
                and not entry.is_dir()
            )
    except NotADirectoryError as exc:
        raise ConfigError("--config-dir is not a directory", source=directory) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot read the config directory: {reason}", source=directory) from exc
    if not names:
        message = (
            "the config directory holds no *.yaml or *.yml file "
            "(subdirectories and hidden files are not read)"
        )
        raise ConfigError(message, source=directory)
    return [os.path.join(directory, name) for name in names]


def _refuse_twice(file: str, listed: list[str], directory: str) -> None:
    """llama-swap refuses a ``--config`` file that also sits in ``--config-dir``."""
    real = os.path.realpath(file)
    for path in listed:
        if os.path.realpath(path) == real:
            message = (
                f"is also in --config-dir {directory}; it would be merged with itself "
                "(move it out of the directory, or drop --config)"
            )
            raise ConfigError(message, source=file)


def load_sources(
    sources: ConfigSources,
    *,
    environ: Mapping[str, str] | None = None,
    previous: Config | None = None,
    ports_in_use: Mapping[int, str] | None = None,
) -> Config:
    """Read, merge and load every file of ``sources``.

    A lone ``--config`` file loads exactly as :func:`~.load.load_config` does.
    ``previous`` and ``ports_in_use`` are a reload's, as for ``load_config``.

    Raises:
        ConfigError: located at the file (and key path, and line) at fault; a
            merge conflict at the later file, naming the earlier one.
    """
    if sources.directory is None:
        assert sources.file is not None
        if environ is None:
            return load_config(sources.file, previous=previous, ports_in_use=ports_in_use)
    files = sources.files()
    docs = []
    for path in files:
        text = substitute_env(read_config_file(path).removeprefix("\ufeff"), path, environ)
        docs.append(parse_document(text, path))
    merged = merge_documents(docs, sources.describe(files))
    return load_document(merged, previous=previous, ports_in_use=ports_in_use)
