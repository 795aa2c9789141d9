"""Times as typed on the command line."""

from __future__ import annotations

from datetime import datetime
from datetime import timezone

import pytest

from flask_sidelog.times import parse_time

NOW = datetime(2024, 5, 10, 12, 0, 0, tzinfo=timezone.utc)
UTC = timezone.utc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", datetime(2024, 5, 10, 11, 59, 30, tzinfo=UTC)),
        ("15m", datetime(2024, 5, 10, 11, 45, tzinfo=UTC)),
        ("2h", datetime(2024, 5, 10, 10, 0, tzinfo=UTC)),
        (" 7d ", datetime(2024, 5, 3, 12, 0, tzinfo=UTC)),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T12:30:00", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
        ("2024-05-01 12:30", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
        ("2024-05-01T12:30:00Z", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
        ("2024-05-01T14:30:00+02:00", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
    ],
)
def test_accepted(text: str, expected: datetime) -> None:
    parsed = parse_time(text, now=NOW)
    assert parsed == expected
    assert parsed.utcoffset() is not None and not parsed.utcoffset()


@pytest.mark.parametrize(
    "text", ["", "yesterday", "7 d", "-2h", "2w", "1.5h", "2024-02-30", "12:30"]
)
def test_refused_naming_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="such as 30s, 15m, 2h, 7d; got"):
        parse_time(text, now=NOW)
