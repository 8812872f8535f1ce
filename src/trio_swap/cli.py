"""The ``trio-swap`` command: serve, check, responder."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from trio_swap import __version__

if TYPE_CHECKING:
    from trio_swap.config import Config
    from trio_swap.config.sources import ConfigSources

__all__ = ["main", "parse_listen"]

DEFAULT_LISTEN: Final = "127.0.0.1:8080"

_DESCRIPTION = """\
trio-swap runs local inference servers (llama-server, vLLM, whisper.cpp, ...)
on demand behind one OpenAI-compatible endpoint, swapping them as requests ask
for different models.

  trio-swap serve                          serve the built-in demo models
  trio-swap serve --config config.yaml     serve your models (llama-swap's config format)
  trio-swap serve --config-dir conf.d      serve the merged *.yaml files of a directory
  trio-swap check --config config.yaml     validate a config file (exit 2 if invalid)
  trio-swap plan --config config.yaml --running a,b --request c
                                           what a request for c would stop, and why
  trio-swap gateway-config --node http://gpu1:8080 --node http://gpu2:8080
                                           a LiteLLM config in front of several nodes
"""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces, as in llama-swap) or ``[IPv6]:PORT``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-swap",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trio-swap {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy (the built-in demo when no --config is given)",
        description="Serve the configured models behind one OpenAI-compatible endpoint.",
    )
    serve.add_argument(
        "--config", "-config", metavar="FILE", help="config file (llama-swap format)"
    )
    _add_config_dir(serve)
    serve.add_argument(
        "--listen",
        "-listen",
        metavar="HOST:PORT",
        type=parse_listen,
        default=parse_listen(DEFAULT_LISTEN),
        help=f"address to listen on (default {DEFAULT_LISTEN}; ':8080' means all interfaces)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may finish before being cut (default 10)",
    )
    serve.add_argument(
        "--max-body-mib",
        type=_positive_float,
        default=64.0,
        metavar="MIB",
        help="largest request body accepted, uploads included (default 64)",
    )
    serve.add_argument(
        "--activity-db",
        metavar="FILE",
        help="keep the activity log in this SQLite file (overrides store.path; default: memory)",
    )
    serve.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where what trio-swap learns about each model (measured memory, load times) "
        "is kept across restarts (default: $STATE_DIRECTORY under systemd, else "
        "$XDG_STATE_HOME/trio-swap or ~/.local/state/trio-swap)",
    )
    serve.add_argument(
        "--h2c",
        action="store_true",
        help="also serve cleartext HTTP/2 (Upgrade: h2c, prior knowledge); off by default: "
        "clients speak HTTP/1.1 to a local proxy (docs/security.md)",
    )
    serve.add_argument(
        "--watch-config",
        "-watch-config",
        action="store_true",
        help="reload the --config file (and the --config-dir files) when they change (polled "
        "every second; SIGHUP always reloads); models whose settings did not change keep running",
    )

    check = commands.add_parser(
        "check",
        help="validate a config file",
        description="Load and validate a config; exit 0 if valid, 2 if not (error on stderr).",
    )
    check.add_argument("--config", "-config", metavar="FILE")
    _add_config_dir(check)
    check.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="json: print the models and the swap policy (groups, or matrix sets expanded)",
    )

    plan = commands.add_parser(
        "plan",
        help="show what a request would stop, given the models running",
        description=(
            "Ask the config's swap policy what a request for --request would evict "
            "while the --running models are loaded. Nothing is started."
        ),
    )
    plan.add_argument("--config", "-config", metavar="FILE")
    _add_config_dir(plan)
    plan.add_argument(
        "--running", default="", metavar="A,B", help="comma-separated models loaded now"
    )
    plan.add_argument("--request", required=True, metavar="MODEL", help="the requested model")
    plan.add_argument(
        "--asleep",
        default="",
        metavar="A,B",
        help="comma-separated sleep: models asleep now (fit by memory counts their host memory)",
    )
    plan.add_argument(
        "--state-dir",
        metavar="DIR",
        help="read what `serve` learned about the models from here (same default as serve)",
    )
    plan.add_argument("--format", choices=("text", "json"), default="text")

    commands.add_parser(
        "schema",
        help="print the config file's JSON Schema (for editor completion and linting)",
        description="Print a JSON Schema of the config file format to stdout.",
    )

    gateway = commands.add_parser(
        "gateway-config",
        help="print a LiteLLM proxy config for these trio-swap nodes (docs/scaling.md)",
        description=(
            "Read each node's /v1/models and print a LiteLLM proxy config: one deployment "
            "per (model, node), so a model served by several nodes is load-balanced and "
            "failed over. Peer and profile entries are left out."
        ),
    )
    gateway.add_argument(
        "--node",
        action="append",
        required=True,
        metavar="URL",
        help="a trio-swap node's base URL (http://10.0.0.2:8080); repeat for each node",
    )
    gateway.add_argument("--format", choices=("litellm",), default="litellm")
    key = gateway.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key", metavar="KEY", help="the nodes' API key (written into the config as is)"
    )
    key.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="read the nodes' API key from $NAME and write os.environ/NAME into the config, "
        "so the key stays out of the file",
    )

    commands.add_parser(
        "responder",
        help="run the built-in OpenAI-compatible test upstream (see `trio-swap responder -h`)",
        add_help=False,
    )
    return parser


def _add_config_dir(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config-dir",
        "-config-dir",
        metavar="DIR",
        help="also read the top-level *.yaml/*.yml files of DIR, merged in file-name order "
        "after --config (docs/configuration.md#several-files)",
    )


def _sources(args: argparse.Namespace) -> ConfigSources | None:
    """``--config`` and ``--config-dir`` as one value; None when neither is given."""
    from trio_swap.config.sources import ConfigSources

    if args.config is None and args.config_dir is None:
        return None
    return ConfigSources(args.config, args.config_dir)


def _load(sources: ConfigSources) -> Config:
    from trio_swap.config.sources import load_sources

    return load_sources(sources)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["responder"]:
        from trio_swap.responder import main as responder_main

        return responder_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "serve":
        return _serve(args)
    if args.command in ("check", "plan") and _sources(args) is None:
        parser.error(f"{args.command} needs --config FILE or --config-dir DIR (or both)")
    if args.command == "check":
        sources = _sources(args)
        assert sources is not None
        return _check(sources, args.format)
    if args.command == "plan":
        return _plan(args)
    if args.command == "gateway-config":
        from trio_swap.gateway import main as gateway_main

        return gateway_main(args.node, args.api_key, args.api_key_env)
    if args.command == "schema":
        import msgspec

        from trio_swap.config.schema import json_schema

        print(msgspec.json.format(msgspec.json.encode(json_schema())).decode())
        return 0
    parser.print_help()
    return 2


def _check(sources: ConfigSources | str, output: str = "text") -> int:
    from trio_swap.config import ConfigError
    from trio_swap.config.sources import ConfigSources

    try:
        config = _load(ConfigSources(sources) if isinstance(sources, str) else sources)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if output == "json":
        import msgspec

        from trio_swap.config.matrix_dsl import MatrixError
        from trio_swap.explain import describe

        try:
            document = describe(config)
        except MatrixError as exc:  # valid, but a set is too big to list
            print(f"error: cannot list the matrix: {exc}", file=sys.stderr)
            return 1
        print(msgspec.json.encode(document).decode())
    else:
        print(f"{config.source}: ok ({len(config.models)} models, {config.routing.router} router)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec

    from trio_swap.config import ConfigError
    from trio_swap.explain import plan
    from trio_swap.fit.state import STATE_FILE, default_state_dir, estimates, read_learned

    sources = _sources(args)
    assert sources is not None
    try:
        config = _load(sources)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    running = [name.strip() for name in args.running.split(",") if name.strip()]
    asleep = [name.strip() for name in args.asleep.split(",") if name.strip()]
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    learned = read_learned(state / STATE_FILE) if config.resources or config.routing.matrix else {}
    try:
        result, sentence = plan(
            config,
            running,
            args.request,
            learned=learned,
            estimates=estimates(config),
            asleep=asleep,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(msgspec.json.encode(result).decode())
    else:
        print(sentence)
    return 0


def _setup_logging(level: str, log_to_stdout: str, time_format: str = "") -> None:
    from trio_swap.upstream.proxy_log import LayoutFormatter

    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}
    levels["error"] = logging.ERROR
    stream = sys.stdout if log_to_stdout in ("proxy", "both") else sys.stderr
    handler = logging.StreamHandler(stream)
    # logTimeFormat: a Go layout for the timestamp; else the time of day.
    handler.setFormatter(LayoutFormatter(time_format, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(levels.get(level, logging.INFO) if log_to_stdout != "none" else logging.WARNING)
    for noisy in ("httpx", "httpcore", "hpack"):  # one line per proxied request is too much
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _serve(args: argparse.Namespace) -> int:
    from trio_swap.config import ConfigError, load_demo_config
    from trio_swap.fit.state import default_state_dir
    from trio_swap.server import RunningServer, serve

    sources = _sources(args)
    if args.watch_config and sources is None:
        print("error: --watch-config needs --config FILE or --config-dir DIR", file=sys.stderr)
        return 2
    try:
        config = _load(sources) if sources is not None else load_demo_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _setup_logging(config.log_level, config.log_to_stdout, config.log_time_format)
    host, port = args.listen

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server: RunningServer = await nursery.start(
                partial(
                    serve,
                    config,
                    host=host,
                    port=port,
                    shutdown_timeout=args.shutdown_timeout,
                    max_body_bytes=int(args.max_body_mib * 1024 * 1024),
                    activity_db=args.activity_db,
                    # A reload reads the same files again (all of --config-dir's).
                    config_path=sources if args.config_dir is not None else args.config,
                    watch_config=args.watch_config,
                    h2c=args.h2c,
                    state_dir=args.state_dir or default_state_dir(),
                )
            )
            _print_banner(server, config.source, list(config.models))

    failures: list[OSError] = []
    try:
        trio.run(run)
    except* OSError as group:  # binding failed (address in use, permission denied, ...)
        failures.extend(_leaves(group, OSError))
    if failures:
        error = failures[0]
        if error.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            reason = error.strerror or str(error)
            print(f"error: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        else:
            print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup[OSError], kind: type[OSError]) -> list[OSError]:
    """The exceptions at the bottom of nested nursery groups."""
    found: list[OSError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc, kind))
        elif isinstance(exc, kind):
            found.append(exc)
    return found


def _print_banner(server: object, source: str, models: list[str]) -> None:
    from trio_swap.server import RunningServer

    assert isinstance(server, RunningServer)
    url = server.url
    first = models[0] if models else "MODEL"
    print(
        f"trio-swap {__version__} serving {len(models)} models from {source} on {url}\n"
        f"  models: {', '.join(models)}\n"
        f"  web UI: {url}/ui/\n"
        f"  try:    curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model":"{first}","messages":[{{"role":"user","content":"hello"}}]}}'\n"""
        f"  stop:   Ctrl-C",
        flush=True,
    )
