"""The built-in demo: three models served by trio-swap's own responder.

``trio-swap serve --demo`` needs no GPU, no model files and no config file:
each "model" is ``python -m trio_swap responder``, a small OpenAI-compatible
server that streams canned tokens at an LLM-like pace. The demo goes through
the same loader as a user's file, so it also shows the config format (a macro
shared by every model, ``${PORT}``, ``${MODEL_ID}``, aliases, ttl).
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Final

from trio_swap.config.load import load_config_text
from trio_swap.config.model import Config

DEMO_SOURCE: Final = "<demo>"


def demo_config_text(python: str | None = None) -> str:
    """The demo config's YAML, running the responder with ``python``.

    Args:
        python: Interpreter path; ``sys.executable`` (the one running
            trio-swap, so it can import it) when None.
    """
    # Quote the path for the argv split (it may hold spaces or quotes), then
    # JSON-quote the whole macro value, which YAML reads as a double-quoted string.
    interpreter = shlex.quote(python or sys.executable or "python3")
    prefix = (
        f"{interpreter} -m trio_swap responder"
        " --host 127.0.0.1 --port ${PORT} --model ${MODEL_ID}"
    )
    return f"""\
# trio-swap built-in demo: three fake models, no GPU needed.
# Ports start at 18800 (not llama-swap's 5800) to stay clear of other servers.
healthCheckTimeout: 30
startPort: 18800
logLevel: info

macros:
  responder: {json.dumps(prefix)}

models:
  demo-chat:
    name: Demo chat
    description: A chatty fake LLM (trio-swap's built-in responder).
    cmd: ${{responder}} --startup-delay 0.5 --token-delay 0.02 --tokens 48
    proxy: http://127.0.0.1:${{PORT}}
    aliases:
      - gpt-4o-mini
    ttl: 300

  demo-coder:
    name: Demo coder
    description: A slower-loading fake code model.
    cmd: ${{responder}} --startup-delay 1.0 --load-delay 0.2 --token-delay 0.01 --tokens 96
    proxy: http://127.0.0.1:${{PORT}}
    ttl: 300

  demo-embed:
    name: Demo embeddings
    description: A fake embedding model that starts fast.
    cmd: ${{responder}} --startup-delay 0.2
    proxy: http://127.0.0.1:${{PORT}}
    ttl: 600
"""


DEMO_CONFIG_TEXT: Final = demo_config_text()


def load_demo_config() -> Config:
    """The demo as a loaded :class:`Config` (source ``<demo>``, no warnings)."""
    return load_config_text(DEMO_CONFIG_TEXT, DEMO_SOURCE, environ={})
