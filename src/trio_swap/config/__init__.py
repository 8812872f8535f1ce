"""Configuration: YAML in llama-swap's format, macros, validation with located errors."""

from trio_swap.config.model import Config, ModelConfig

__all__ = ["Config", "ModelConfig"]
