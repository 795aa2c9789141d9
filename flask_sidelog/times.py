"""Times as people type them on the command line: ISO 8601 or relative."""

from __future__ import annotations

import re
from datetime import date
from datetime import datetime
from datetime import timedelta
from datetime import timezone

from .query import as_utc

#: What :func:`parse_time` accepts, for error messages.
ACCEPTED = (
    "an ISO 8601 date or date-time (2024-05-01, 2024-05-01T12:30:00,"
    " 2024-05-01T12:30:00+02:00; UTC unless it has an offset) or a time ago"
    " such as 30s, 15m, 2h, 7d"
)

_RELATIVE = re.compile(r"(\d{1,9})([smhd])")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """Parse ``text`` into an aware UTC time.

    :param now: what relative times count back from; default: now.
    :raise ValueError: naming what is accepted.
    """
    value = text.strip()
    match = _RELATIVE.fullmatch(value)
    if match is not None:
        amount, unit = match.groups()
        start = now if now is not None else datetime.now(timezone.utc)
        try:
            return as_utc(start) - timedelta(**{_UNIT[unit]: int(amount)})
        except OverflowError:
            raise _out_of_range(text) from None
    if value[-1:] in ("z", "Z"):  # fromisoformat reads "Z" only from Python 3.11
        value = value[:-1] + "+00:00"
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expected {ACCEPTED}; got {text!r}.") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    try:  # not as_utc, which clamps what the database holds
        return parsed.astimezone(timezone.utc)
    except OverflowError:  # its offset takes it past year 1 or 9999
        raise _out_of_range(text) from None


def _out_of_range(text: str) -> ValueError:
    return ValueError(
        f"{text!r} is out of range (years 1 to 9999 in UTC); expected {ACCEPTED}."
    )
