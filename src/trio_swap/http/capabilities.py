"""A model's ``capabilities:`` as ``/v1/models`` tells clients, in llama-swap's shape.

llama-swap writes the fields that Mistral, OpenRouter and Hugging Face
chat-ui read, and only for a model with a non-empty ``capabilities:``
block::

    "architecture": {"input_modalities": ["text", "image"],
                     "output_modalities": ["text"], "modality": "text+image->text"},
    "capabilities": {"vision": true, "function_calling": true},
    "supported_parameters": ["tools", "tool_choice"],
    "context_length": 32768,
    "meta": {"llamaswap": {...}, "n_ctx": 32768}

``capabilities`` lists only the flags that hold (as llama-swap's examples
show). How each flag follows from ``in``/``out`` is our reading of those
examples (docs/api.md#capabilities): ``vision`` is image in and text out,
``audio_transcriptions`` audio in and text out, ``audio_speech`` audio out,
``image_generation`` image out, ``image_to_image`` image in and out,
``function_calling`` is ``tools`` and ``reranker`` is ``reranker``.
"""

from __future__ import annotations

from typing import Final

from trio_swap.config.model import Capabilities

__all__ = ["RESERVED_METADATA", "capability_fields", "capability_row", "model_meta"]

#: ``metadata`` keys dropped from ``meta.llamaswap`` when ``capabilities:`` is set:
#: the top-level fields say it, and two answers would disagree.
RESERVED_METADATA: Final = (
    "architecture",
    "capabilities",
    "supported_parameters",
    "context_length",
)


def capability_fields(caps: Capabilities) -> dict[str, object]:
    """The top-level ``/v1/models`` fields for ``caps``; none for an empty block."""
    fields: dict[str, object] = {}
    if caps.inputs or caps.outputs:
        fields["architecture"] = {
            "input_modalities": list(caps.inputs),
            "output_modalities": list(caps.outputs),
            "modality": f"{'+'.join(caps.inputs)}->{'+'.join(caps.outputs)}",
        }
    flags = _flags(caps)
    if flags:
        fields["capabilities"] = flags
    if caps.tools:
        fields["supported_parameters"] = ["tools", "tool_choice"]
    if caps.context:
        fields["context_length"] = caps.context
    return fields


def capability_row(caps: Capabilities) -> dict[str, object]:
    """``capabilities`` of an ``/api/models`` row: the block as configured (defaults filled)."""
    return {
        "in": list(caps.inputs),
        "out": list(caps.outputs),
        "tools": caps.tools,
        "reranker": caps.reranker,
        "context": caps.context,
    }


def model_meta(caps: Capabilities, llamaswap: dict[str, object]) -> dict[str, object]:
    """``meta`` of a model entry: ``llamaswap`` (its metadata and type), plus ``n_ctx``."""
    if caps:
        llamaswap = {k: v for k, v in llamaswap.items() if k not in RESERVED_METADATA}
    meta: dict[str, object] = {"llamaswap": llamaswap}
    if caps.context:
        meta["n_ctx"] = caps.context
    return meta


def _flags(caps: Capabilities) -> dict[str, bool]:
    inputs, outputs = set(caps.inputs), set(caps.outputs)
    flags = {
        "vision": "image" in inputs and "text" in outputs,
        "audio_transcriptions": "audio" in inputs and "text" in outputs,
        "audio_speech": "audio" in outputs,
        "image_generation": "image" in outputs,
        "image_to_image": "image" in inputs and "image" in outputs,
        "function_calling": caps.tools,
        "reranker": caps.reranker,
    }
    return {name: True for name, holds in flags.items() if holds}
