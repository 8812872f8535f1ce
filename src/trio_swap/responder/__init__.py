"""The built-in responder: a fast, fake OpenAI-compatible upstream.

trio-swap's demo config, tests and benchmarks need an upstream that starts in
milliseconds, streams at any pace up to >100k SSE events/s, and can stage the
failures a supervisor must survive (slow start, loading, crash mid-stream,
ignored SIGTERM). It records every request it received so tests can assert what
actually reached the upstream, byte for byte (GET /debug/requests).

Modules: `options` (the command line), `payloads` (OpenAI bodies, pure), the
other API families' bodies (`anthropic`, `llama` for llama-server's native API,
`media` for audio, images and multipart uploads), `slots` (llama-server's
slots), `sleep` (vLLM's and SGLang's sleep mode), `memory` (--hold-memory's
block), `app` (the raw ASGI 3 app, routing), `server` (hypercorn, signals,
process-level flags).
Run it as `trio-swap responder --port 0` or `python -m trio_swap.responder --port 0`.
"""

from trio_swap.responder.app import RequestRecord, ResponderApp
from trio_swap.responder.options import ResponderOptions, build_parser, parse_options
from trio_swap.responder.server import main, serve

__all__ = [
    "RequestRecord",
    "ResponderApp",
    "ResponderOptions",
    "build_parser",
    "main",
    "parse_options",
    "serve",
]
