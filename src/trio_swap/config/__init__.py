"""Configuration: YAML in llama-swap's format, macros, validation with located errors."""

from trio_swap.config.demo import load_demo_config
from trio_swap.config.errors import ConfigError
from trio_swap.config.load import load_config, load_config_text
from trio_swap.config.model import Config, ModelConfig

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "load_config",
    "load_config_text",
    "load_demo_config",
]
