"""Write a random-weight llama GGUF of several hundred MB, fast, for the read-ahead lane.

The tiny models load in milliseconds, so they cannot show what reading weights
costs. This one is a real llama (the tokenizer of the tiny ones, 2048 wide)
whose layer count is chosen to reach the size asked for. Its weights are one
block of normal random numbers repeated, so writing 800 MB takes seconds, not
a minute of random number generation; llama-server neither knows nor cares.

As a script::

    python tests/real/big_gguf.py OUT.gguf [--mib 800]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

if __package__ in (None, ""):  # run as a script: make the sibling modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_gguf

N_EMBD = 2048
N_HEAD = 16
N_FF = 5632
#: The random block every tensor is cut from (8 Mi float16 values, 16 MiB).
_POOL_VALUES = 8 << 20


def layer_bytes() -> int:
    """Bytes of one transformer block in float16 (attention, feed-forward, two norms)."""
    return (4 * N_EMBD * N_EMBD + 3 * N_EMBD * N_FF) * 2 + 2 * N_EMBD * 4


def write_big_model(path: Path | str, *, mib: int = 800, vocab_gguf: Path | None = None) -> Path:
    """Write a llama of about ``mib`` MiB to ``path`` (fsynced) and return the path."""
    import gguf
    import numpy as np

    path = Path(path)
    vocab = vocab_gguf if vocab_gguf is not None else tiny_gguf.find_vocab_gguf()
    fields = tiny_gguf._tokenizer_fields(vocab.resolve())
    tokens = next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    embeddings = 2 * n_vocab * N_EMBD * 2  # token_embd and output
    n_layer = max(1, round(((mib << 20) - embeddings) / layer_bytes()))
    pool = (np.random.default_rng(7).standard_normal(_POOL_VALUES) * 0.02).astype(np.float16)

    def mat(rows: int, cols: int) -> np.ndarray[Any, np.dtype[np.float16]]:
        return np.resize(pool, rows * cols).reshape(rows, cols)

    def norm() -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ones(N_EMBD, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"trio-swap-big-{mib}")
    writer.add_context_length(tiny_gguf.N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    if not any(key == "tokenizer.chat_template" for key, *_ in fields):
        writer.add_chat_template(tiny_gguf.CHATML_TEMPLATE)
    writer.add_tensor("token_embd.weight", mat(n_vocab, N_EMBD))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", mat(N_EMBD, N_EMBD))
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
    with path.open("rb+") as file:  # clean pages: POSIX_FADV_DONTNEED can drop them
        os.fsync(file.fileno())
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: write one big model and print its path and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mib", type=int, default=800)
    args = parser.parse_args(argv)
    path = write_big_model(args.out, mib=args.mib)
    print(path, path.stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
