"""trio-swap: hot-swap local inference servers behind one OpenAI-compatible endpoint."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trio-swap")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
