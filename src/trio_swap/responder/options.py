"""The responder's command line: one flag per upstream behaviour a test needs to stage."""

from __future__ import annotations

import argparse
from typing import Literal

import msgspec

__all__ = ["ResponderOptions", "build_parser", "parse_options"]


class ResponderOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Parsed command line; the app and the server read only this."""

    host: str = "127.0.0.1"
    port: int
    model: str = "responder"
    startup_delay: float = 0.0
    load_delay: float = 0.0
    never_healthy: bool = False
    fail_start: bool = False
    fail_start_message: str | None = None
    hold_memory: int = 0
    token_delay: float = 0.0
    tokens: int = 16
    crash_after_tokens: int | None = None
    ignore_sigterm: bool = False
    exit_after: float | None = None
    parallel: int = 1
    slot_save_path: str | None = None
    slot_save_delay: float = 0.0
    slot_save_fails: bool = False
    slot_restore_delay: float = 0.0
    slot_restore_fails: bool = False
    slot_restore_noop: bool = False
    sleep_api: Literal["vllm", "sglang"] | None = None
    sleep_delay: float = 0.0
    wake_delay: float = 0.0
    broken_after_wake: bool = False
    asleep_memory: int = 0


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


#: Binary units only: the responder's own small parser (it shares no code with the proxy).
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
_SIZE_UNITS |= {"g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def _size(text: str) -> int:
    """``64MiB``, ``1.5G``, ``4096``: bytes."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number) if number.replace(".", "", 1).isdigit() else -1.0
    except ValueError:
        value = -1.0
    if value < 0 or unit not in _SIZE_UNITS or len(number) > 20:
        raise argparse.ArgumentTypeError(f"expected a size such as 64MiB or 1GiB, got {text!r}")
    return int(value * _SIZE_UNITS[unit])


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `trio-swap responder` argument parser (also `python -m trio_swap.responder`)."""
    parser = argparse.ArgumentParser(
        prog="trio-swap responder",
        description=(
            "A fast, fake OpenAI-compatible inference server for trio-swap's demo, tests "
            "and benchmarks. Flags stage upstream behaviours: slow starts, loading, "
            "crashes, ignored signals."
        ),
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=_port, required=True, help="port to listen on; 0 picks a free one")
    add("--model", default="responder", help="model name in /v1/models (default: %(default)s)")
    add(
        "--startup-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="sleep S seconds before binding the socket (a slow process start)",
    )
    add(
        "--load-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="bind at once, but answer 503 'loading' for S seconds (like llama-server)",
    )
    add("--never-healthy", action="store_true", help="/health always answers 503")
    add(
        "--fail-start",
        action="store_true",
        help="print a model-load error to stderr and exit 1 instead of listening",
    )
    add(
        "--fail-start-message",
        default=None,
        metavar="TEXT",
        help=(
            "with --fail-start, first print TEXT to stderr, as a server's own words "
            "(e.g. 'CUDA error: out of memory')"
        ),
    )
    add(
        "--hold-memory",
        type=_size,
        default=0,
        metavar="SIZE",
        help=(
            "allocate SIZE of RAM (24GiB, 512MiB, bytes) and touch every page before "
            "listening, and hold it until exit (a model's weights)"
        ),
    )
    add(
        "--token-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="pause S seconds before each token (default: %(default)s, bulk speed)",
    )
    add(
        "--tokens",
        type=_count,
        default=16,
        metavar="N",
        help="tokens per completion unless the request sets max_tokens (default: %(default)s)",
    )
    add(
        "--crash-after-tokens",
        type=_count,
        default=None,
        metavar="N",
        help="after streaming N tokens, print 'fatal: simulated crash' and exit 3",
    )
    add("--ignore-sigterm", action="store_true", help="survive SIGTERM (SIGINT still exits)")
    add(
        "--exit-after",
        type=_seconds,
        default=None,
        metavar="S",
        help="exit with status 0 S seconds after the process starts (a crash while idle)",
    )
    _add_slot_options(parser)
    _add_sleep_options(parser)
    return parser


def _add_slot_options(parser: argparse.ArgumentParser) -> None:
    """llama-server's slots and their save/restore API (``responder/slots.py``)."""
    add = parser.add_argument
    add(
        "-np",
        "--parallel",
        type=_count,
        default=1,
        metavar="N",
        help="number of slots in GET /slots (default: %(default)s)",
    )
    add(
        "--slot-save-path",
        default=None,
        metavar="DIR",
        help=(
            "as llama-server: POST /slots/{id}?action=save|restore|erase use files in DIR; "
            "completions run in slots and report timings.cache_n (prompt tokens reused)"
        ),
    )
    add(
        "--slot-save-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="a save answers after S seconds (a hanging save)",
    )
    add("--slot-save-fails", action="store_true", help="a save answers 500")
    add(
        "--slot-restore-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="a restore answers after S seconds",
    )
    add("--slot-restore-fails", action="store_true", help="a restore answers 400, slot left empty")
    add(
        "--slot-restore-noop",
        action="store_true",
        help="a restore answers success but restores nothing (llama.cpp's silent no-op)",
    )


def _add_sleep_options(parser: argparse.ArgumentParser) -> None:
    """vLLM's and SGLang's sleep mode (``responder/sleep.py``)."""
    add = parser.add_argument
    add(
        "--sleep-api",
        choices=("vllm", "sglang"),
        default=None,
        help=(
            "serve vLLM's sleep endpoints (/sleep, /wake_up, /is_sleeping, /collective_rpc, "
            "/reset_prefix_cache) or SGLang's (/release_memory_occupation, "
            "/resume_memory_occupation); a sleep releases --hold-memory, a wake holds it again"
        ),
    )
    add(
        "--sleep-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="a sleep call answers after S seconds",
    )
    add(
        "--wake-delay",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="a wake call answers after S seconds",
    )
    add(
        "--broken-after-wake",
        action="store_true",
        help="after a wake, every completion answers 500 (a wake that left the server broken)",
    )
    add(
        "--asleep-memory",
        type=_size,
        default=0,
        metavar="SIZE",
        help=(
            "hold SIZE of RAM while asleep, released by the wake (vLLM's level 1 moves the "
            "weights to host memory)"
        ),
    )


def parse_options(argv: list[str] | None = None) -> ResponderOptions:
    """Parse `argv` (default `sys.argv[1:]`); argparse exits 2 on bad input."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if namespace.fail_start_message is not None and not namespace.fail_start:
        parser.error("--fail-start-message needs --fail-start")
    if namespace.sleep_api is None:
        for flag in ("sleep_delay", "wake_delay", "broken_after_wake", "asleep_memory"):
            if getattr(namespace, flag):
                parser.error(f"--{flag.replace('_', '-')} needs --sleep-api")
    return msgspec.convert(vars(namespace), ResponderOptions)
