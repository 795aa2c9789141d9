"""Writing entries out: a table for people, JSON, JSON lines and CSV for tools.

Every field may hold what a client sent. The table shows control characters
escaped, so an entry cannot move the cursor, recolour or rewrite the terminal;
the machine formats stay exact.
"""

from __future__ import annotations

import csv
import json
import os
import re
import typing as t
import unicodedata
from datetime import datetime

from .model import FIELDS

#: C0 and C1 controls, DEL, line and paragraph separators, and the bidi
#: controls that reorder what follows them on screen.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every character that could steer a terminal escaped."""
    return _UNSAFE.sub(_escape_char, text)


def use_colour(isatty: bool, environ: t.Mapping[str, str] = os.environ) -> bool:
    """Colour only for a terminal, and never when ``NO_COLOR`` is set
    (https://no-color.org)."""
    return isatty and not environ.get("NO_COLOR")


def to_json(value: t.Any) -> t.Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


#: Characters that JSON leaves raw but Python's ``str.splitlines`` and some
#: JavaScript parsers take as line ends.
_LINE_BREAKING = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def to_json_text(value: t.Any) -> str:
    """``value`` as JSON on one line, readable UTF-8 text otherwise."""
    text = json.dumps(value, default=to_json, ensure_ascii=False)
    for char, escaped in _LINE_BREAKING:
        if char in text:  # rare: checking is much cheaper than replacing
            text = text.replace(char, escaped)
    return text


def json_line(entry: dict[str, t.Any]) -> str:
    return to_json_text(entry)


def csv_writer(stream: t.TextIO) -> t.Callable[[dict[str, t.Any]], None]:
    """Write the header row to ``stream`` and return a function writing one
    entry a row; ``data`` is its JSON text, a missing value is empty."""
    writer = csv.writer(stream)
    writer.writerow(FIELDS)

    def write(entry: dict[str, t.Any]) -> None:
        row = []
        for name in FIELDS:
            value = entry.get(name)
            if name == "data" and value is not None:
                value = to_json_text(value)
            elif isinstance(value, datetime):
                value = value.isoformat()
            row.append("" if value is None else value)
        writer.writerow(row)

    return write


_STYLES = {
    "success": "green",
    "failure": "yellow",
    "error": "red",
    "warning": "yellow",
    "rolled_back": "red",
}


class Table:
    """Formats entries as lines that fit ``width`` columns."""

    #: Widths of the columns whose content has a bounded length.
    _TIME, _OUTCOME, _MAIN_TX, _REQUEST_ID = 20, 11, 11, 8
    _BOUNDED = _TIME + _OUTCOME + _MAIN_TX + _REQUEST_ID
    #: Most columns a variable width field takes before the data gets the rest.
    _EVENT, _ACTOR, _WHERE = 28, 16, 28

    def __init__(self, width: int, colour: bool) -> None:
        self.width = width
        self.colour = colour

    def header(self) -> str:
        return self._line(
            {
                "time": "time (UTC)",
                "event": "event",
                "actor": "actor",
                "outcome": "outcome",
                "main_tx": "main_tx",
                "where": "request",
                "rid": "req id",
                "data": "data",
            },
            style=False,
        )

    def row(self, entry: dict[str, t.Any]) -> str:
        status = entry.get("status_code")
        outcome = entry.get("outcome") or entry.get("level") or ""
        if status is not None:
            outcome = f"{outcome} {status}"
        where = " ".join(v for v in (entry.get("method"), entry.get("path")) if v)
        data = entry.get("data")
        if isinstance(data, dict):
            summary = " ".join(
                f"{key}={value if isinstance(value, str) else to_json_text(value)}"
                for key, value in data.items()
            )
        else:  # not stored by flask-sidelog, which stores an object or NULL
            summary = "" if data is None else to_json_text(data)
        if entry.get("error"):
            summary = f"{summary} {entry['error']}".lstrip()
        return self._line(
            {
                "time": entry["created_at"].strftime("%Y-%m-%dT%H:%M:%SZ"),
                "event": entry["event"],
                "actor": entry.get("actor") or "-",
                "outcome": outcome,
                "main_tx": entry.get("main_tx") or "-",
                "where": where or "-",
                "rid": (entry.get("request_id") or "-")[: self._REQUEST_ID],
                "data": summary,
            },
            style=True,
            keys=(entry.get("outcome") or entry.get("level"), entry.get("main_tx")),
        )

    def _line(
        self,
        cells: dict[str, str],
        style: bool,
        keys: tuple[str | None, str | None] = (None, None),
    ) -> str:
        cells = {name: escape(str(value)) for name, value in cells.items()}
        # Seven separators between eight columns; the wide text columns and
        # the data share what the bounded ones leave, in fifths: two for the
        # event, what a reader looks for (at 80 columns "login.f…", not
        # "logi…"), one each for the actor and the request, up to their
        # most, and the rest for the data.
        free = self.width - self._BOUNDED - 7
        share = max(free // 5, 2)
        widths = {
            "time": self._TIME,
            "event": min(self._EVENT, 2 * share),
            "actor": min(self._ACTOR, share),
            "outcome": self._OUTCOME,
            "main_tx": self._MAIN_TX,
            "where": min(self._WHERE, share),
            "rid": self._REQUEST_ID,
        }
        widths["data"] = max(self.width - sum(widths.values()) - 7, 0)
        parts = []
        left = self.width
        for name, width in widths.items():
            # On a terminal too narrow for every column, the last ones are
            # cut or left out.
            width = min(width, left)
            if width <= 0:
                break
            text = _fit(cells[name], width)
            text += " " * (width - columns(text))
            if style and self.colour:
                text = self._style(name, text, keys)
            parts.append(text)
            left -= width + 1
        return " ".join(parts).rstrip()

    def _style(self, name: str, text: str, keys: tuple[str | None, str | None]) -> str:
        import click

        key = keys[0] if name == "outcome" else keys[1] if name == "main_tx" else None
        if key in _STYLES:
            return click.style(text, fg=_STYLES[key])
        if name == "time":
            return click.style(text, dim=True)
        return text


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal columns, marked with "…" if cut."""
    if columns(text) <= width:
        return text
    room = width - 1 if width > 1 else width
    kept = []
    for char, shown in _widths(text):
        room -= shown
        if room < 0:
            break
        kept.append(char)
    return "".join(kept) + ("…" if width > 1 else "")


def columns(text: str) -> int:
    """How many terminal columns ``text`` takes: East Asian wide characters
    take two, combining marks and other zero-width characters none."""
    if text.isascii():
        return len(text)
    return sum(shown for _, shown in _widths(text))


def _widths(text: str) -> t.Iterator[tuple[str, int]]:
    """Each character of ``text`` with the columns it adds on screen."""
    previous = 0
    for char in text:
        if char.isascii():
            shown = 1
        elif char == "\ufe0f":
            # Shows the character before it as an emoji, two columns wide.
            shown = 1 if previous == 1 else 0
        elif char != "\xad" and unicodedata.category(char) in ("Mn", "Me", "Cf"):
            shown = 0  # but the soft hyphen is shown, as a hyphen
        else:
            shown = 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
        previous = shown
        yield char, shown
