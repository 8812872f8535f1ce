"""Go's named time layouts, for ``logTimeFormat``: the timestamp llama-swap puts on log lines.

llama-swap takes a name (``rfc3339``, ``kitchen``, ...; case-insensitive) and
formats with Go's ``time.Format`` and the layout of that name. Python's
``strftime`` cannot say all of it (``_2`` is a space-padded day, ``Z07:00``
is ``Z`` at UTC, ``.999999999`` drops trailing zeros) and its month and day
names follow the locale, so each layout is rendered here token by token, in
English as Go does. One difference: a Python log record's time has
microseconds, so the last three digits of ``stampnano`` are always ``000``
(and ``rfc3339nano`` shows at most six).
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from typing import Final

__all__ = ["LAYOUTS", "format_time", "layout_of"]

#: ``logTimeFormat`` name (lower case) -> Go's layout, as in llama-swap's table.
LAYOUTS: Final[dict[str, str]] = {
    "ansic": "Mon Jan _2 15:04:05 2006",
    "unixdate": "Mon Jan _2 15:04:05 MST 2006",
    "rubydate": "Mon Jan 02 15:04:05 -0700 2006",
    "rfc822": "02 Jan 06 15:04 MST",
    "rfc822z": "02 Jan 06 15:04 -0700",
    "rfc850": "Monday, 02-Jan-06 15:04:05 MST",
    "rfc1123": "Mon, 02 Jan 2006 15:04:05 MST",
    "rfc1123z": "Mon, 02 Jan 2006 15:04:05 -0700",
    "rfc3339": "2006-01-02T15:04:05Z07:00",
    "rfc3339nano": "2006-01-02T15:04:05.999999999Z07:00",
    "kitchen": "3:04PM",
    "stamp": "Jan _2 15:04:05",
    "stampmilli": "Jan _2 15:04:05.000",
    "stampmicro": "Jan _2 15:04:05.000000",
    "stampnano": "Jan _2 15:04:05.000000000",
}

_DAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS: Final = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

_Render = Callable[[datetime.datetime], str]


def _offset(moment: datetime.datetime, *, colon: bool, z: bool) -> str:
    delta = moment.utcoffset() or datetime.timedelta(0)
    minutes = int(delta.total_seconds()) // 60
    if z and minutes == 0:
        return "Z"
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}" if colon else f"{sign}{hours:02d}{minutes:02d}"


def _zone(moment: datetime.datetime) -> str:
    # Go prints the zone's abbreviation, or -0700 when the zone has none.
    return moment.tzname() or _offset(moment, colon=False, z=False)


def _hour12(moment: datetime.datetime) -> str:
    return str(moment.hour % 12 or 12)


def _trimmed_fraction(moment: datetime.datetime) -> str:
    digits = f"{moment.microsecond * 1000:09d}".rstrip("0")
    return f".{digits}" if digits else ""


#: Go's layout elements that these layouts use, longest first where one starts another.
_TOKENS: Final[dict[str, _Render]] = {
    "Monday": lambda m: _DAYS[m.weekday()],
    "Mon": lambda m: _DAYS[m.weekday()][:3],
    "January": lambda m: _MONTHS[m.month - 1],
    "Jan": lambda m: _MONTHS[m.month - 1][:3],
    "2006": lambda m: f"{m.year:04d}",
    "Z07:00": lambda m: _offset(m, colon=True, z=True),
    "-0700": lambda m: _offset(m, colon=False, z=False),
    ".000000000": lambda m: f".{m.microsecond * 1000:09d}",
    ".999999999": _trimmed_fraction,
    ".000000": lambda m: f".{m.microsecond:06d}",
    ".000": lambda m: f".{m.microsecond // 1000:03d}",
    "MST": _zone,
    "PM": lambda m: "PM" if m.hour >= 12 else "AM",
    "_2": lambda m: f"{m.day:2d}",
    "01": lambda m: f"{m.month:02d}",
    "02": lambda m: f"{m.day:02d}",
    "04": lambda m: f"{m.minute:02d}",
    "05": lambda m: f"{m.second:02d}",
    "06": lambda m: f"{m.year % 100:02d}",
    "15": lambda m: f"{m.hour:02d}",
    "3": _hour12,
}


@functools.cache
def _compile(layout: str) -> tuple[str | _Render, ...]:
    """The layout as literal text and renderers, found greedily left to right (as Go does)."""
    parts: list[str | _Render] = []
    index = 0
    while index < len(layout):
        for token, render in _TOKENS.items():
            if layout.startswith(token, index):
                parts.append(render)
                index += len(token)
                break
        else:
            parts.append(layout[index])
            index += 1
    return tuple(parts)


def layout_of(name: str) -> str | None:
    """Go's layout for a ``logTimeFormat`` name (trimmed, any case); None if it names none."""
    return LAYOUTS.get(name.strip().lower())


def format_time(layout: str, when: float | datetime.datetime) -> str:
    """``when`` as Go formats ``layout``: Unix seconds (in local time) or an aware datetime."""
    if isinstance(when, datetime.datetime):
        moment = when
    else:
        moment = datetime.datetime.fromtimestamp(when).astimezone()
    return "".join(part if isinstance(part, str) else part(moment) for part in _compile(layout))
