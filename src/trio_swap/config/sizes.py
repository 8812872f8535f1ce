"""Memory sizes as users write them (``24GiB``, ``512MiB``, ``24GB``, ``1048576``).

Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (kB, KB,
MB, GB, TB) powers of 1000, as in ``df -H`` and ``df -h``; a bare ``K``/``M``/
``G``/``T`` is binary, as in llama.cpp's and Docker's flags. Case does not
matter; a space before the unit is allowed; fractions are allowed with a unit
(``1.5GiB``), never for plain bytes.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_SIZE", "SizeError", "format_size", "parse_size"]

#: The largest size accepted (a 64-bit count of bytes): anything bigger is a typo.
MAX_SIZE: Final = 2**63 - 1

_UNITS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([a-zA-Z]*)\s*", re.ASCII)


class SizeError(ValueError):
    """Not a size; the message says what is accepted."""


def parse_size(value: object) -> int:
    """Bytes, from an int (bytes) or a string with an optional unit.

    Raises:
        SizeError: anything else (negative, unknown unit, fraction of a byte, too big).
    """
    if isinstance(value, bool):
        raise SizeError(_expected(value))
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"a size cannot be negative (got {value})")
        return _bounded(value, str(value))
    if not isinstance(value, str):
        raise SizeError(_expected(value))
    match = _SIZE.fullmatch(value)
    if match is None:
        raise SizeError(_expected(value))
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise SizeError(
            f"unknown unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
        )
    if "." in number:
        if factor == 1:
            raise SizeError(f"{value!r} is a fraction of a byte; give whole bytes or a unit")
        whole, _, fraction = number.partition(".")
        scaled = int(whole) * factor + int(fraction) * factor // 10 ** len(fraction)
        return _bounded(scaled, value)
    return _bounded(int(number) * factor, value)


def format_size(size: int | float) -> str:
    """A short human form, binary units: ``21.0 GiB``, ``512 MiB``, ``100 B``."""
    size = float(size)
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(size) >= factor:
            scaled = size / factor
            return f"{scaled:.1f} {unit}" if scaled < 100 else f"{scaled:.0f} {unit}"
    return f"{size:.0f} B"


def _bounded(size: int, text: str) -> int:
    if size > MAX_SIZE:
        raise SizeError(f"{text!r} is larger than any machine (over 8 EiB)")
    return size


def _expected(value: object) -> str:
    return f"expected a size such as 24GiB, 512MiB, 24GB or a number of bytes (got {value!r})"
