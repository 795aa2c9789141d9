"""Building an entry: validation, redaction and making any value storable.

Every value that reaches the log goes through :func:`make_entry`, so whatever a
caller or a client sends, what is stored is valid JSON and valid text on every
database, and anything cut short says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
import typing as t
from datetime import datetime
from datetime import timezone

from werkzeug.datastructures import Headers

from .model import COLUMN_LIMITS
from .model import EVENT_MAX
from .model import FIELDS

#: Appended to a text value that was cut to its column's length.
TRUNCATION_MARK = "...[truncated]"
#: Replaces the value of a redacted key.
REDACTED = "[redacted]"
#: Largest ``data`` payload, in bytes of JSON. Larger ones are replaced by
#: ``{"_truncated": true, "_size": <bytes>, "preview": <first 1000 chars>}``.
MAX_DATA_BYTES = 65536
#: Containers nested deeper than this are stored as ``"[max depth]"``.
MAX_DEPTH = 32

LEVELS = ("info", "warning", "error")
OUTCOMES = ("success", "failure", "error")
MAIN_TX = ("committed", "rolled_back", "none")

_INT_RANGE = 2**63


_canonical_encoder = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), sort_keys=True
)
# JSONEncoder.encode builds json's C encoder on every call, which costs as much
# as encoding a row change's data: build it once, with the same arguments but
# no circular check (markers=None: a cycle is a RecursionError, and
# to_storable never makes one). None where json has no C speed-ups.
_c_make_encoder: t.Any = getattr(json.encoder, "c_make_encoder", None)
_c_encode = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None,
        _canonical_encoder.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        True,
    )
)


def encode_canonical(value: t.Any) -> str:
    """JSON with sorted keys, no whitespace and only ASCII, in one call."""
    if _c_encode is None or type(value) is str:
        return _canonical_encoder.encode(value)
    return "".join(_c_encode(value, 0))


def canonical_json(value: t.Any) -> str:
    """JSON with sorted keys, no whitespace and only ASCII: how the log
    engine stores ``data``, so that :func:`~flask_sidelog.chain.verify` can
    hash the stored text as it is."""
    try:
        return encode_canonical(value)
    except TypeError:  # keys of mixed types sort only once they are JSON's str
        return encode_canonical(json.loads(json.dumps(value)))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _RandomBytes:
    """Random bytes from ``os.urandom``, read 4 KiB at a time. Each read
    lets go of the GIL, and in a worker whose other threads are busy the
    caller then waits for it for up to the switch interval (5 ms): measured
    here, one read in ten did. Every request takes 26 bytes."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            # A lock held by another thread at the fork would stay held.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._used = 0
        self._pid = os.getpid()

    def take(self, count: int) -> bytes:
        with self._lock:
            # A forked worker must not hand out its parent's bytes again, and
            # not every server's fork runs Python's fork hooks (uWSGI's by
            # default does not): the process id tells.
            if self._used + count > len(self._buffer) or self._pid != os.getpid():
                self._buffer = os.urandom(max(4096, count))
                self._used = 0
                self._pid = os.getpid()
            start = self._used
            self._used += count
            return self._buffer[start : self._used]


#: Where request ids and entry uuids get their random part.
random_bytes = _RandomBytes().take


#: Byte maps that set a UUID's version (7) and variant (RFC 9562) bits: one
#: ``translate`` call sets them in every UUID of a batch.
_VERSION_7 = bytes(x & 0x0F | 0x70 for x in range(256))
_VARIANT = bytes(x & 0x3F | 0x80 for x in range(256))


def new_uuid() -> str:
    """A new entry's uuid: see :func:`new_uuids`."""
    return new_uuids(1)[0]


def new_uuids(count: int) -> list[str]:
    """``count`` version 7 UUIDs (RFC 9562) as text, from one read of the
    random source: the time in milliseconds, then 74 random bits.

    Time-ordered, so that new entries go at the end of the unique ``uuid``
    index, as they do in every other index of the table: random (version 4)
    ones land all over it, and each write touches pages of the whole index.
    """
    ms = time.time_ns() // 1_000_000 % 2**48
    when = ms.to_bytes(6, "big").hex()
    when = f"{when[:8]}-{when[8:]}-"
    b = bytearray(random_bytes(10 * count))
    b[0::10] = b[0::10].translate(_VERSION_7)
    b[2::10] = b[2::10].translate(_VARIANT)
    x = b.hex()
    return [
        f"{when}{x[i : i + 4]}-{x[i + 4 : i + 8]}-{x[i + 8 : i + 20]}"
        for i in range(0, 20 * count, 20)
    ]


def clean_text(value: str) -> str:
    """Make a string storable on every backend, changing as little as possible.

    PostgreSQL cannot store NUL in text and no database can store a lone
    surrogate; both are kept visible as backslash escapes. Everything else,
    control characters included, is stored as given.
    """
    if type(value) is not str:
        # A str subclass (a StrEnum member) is stored as its text; its str()
        # may be something else ("Event.LOGIN"), which the chain would hash.
        value = str.__str__(value)
    if value.isascii() and "\x00" not in value:  # the common case, fast
        return value
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def cut(value: str | None, limit: int) -> str | None:
    """Clean ``value`` and cut it to ``limit`` characters with a visible mark."""
    if value is None:
        return None
    value = clean_text(value)
    if len(value) > limit:
        value = value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return value


def normalise_key(key: str) -> str:
    """Lower case without ``-``, ``_`` and spaces: ``X-Api-Key``, ``apiKey``
    and ``api_key`` all read ``xapikey`` or ``apikey``."""
    return key.lower().replace("-", "").replace("_", "").replace(" ", "")


def is_redacted(key: str, redact_keys: frozenset[str]) -> bool:
    """Whether ``key`` contains one of ``redact_keys`` (normalised names)."""
    name = normalise_key(key)
    return any(word in name for word in redact_keys)


def _as_mapping(value: object) -> t.Mapping[t.Any, t.Any] | None:
    """The fields of a mapping-like value, so its keys can be redacted: a
    ``repr()`` would store ``Login(password='...')`` in clear."""
    if isinstance(value, t.Mapping):
        return value
    if isinstance(value, Headers):
        return dict(value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return t.cast("t.Mapping[t.Any, t.Any]", value._asdict())
    return None


def _safe_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not lose the entry
        text = f"<unrepresentable {type(value).__name__}>"
    return t.cast(str, cut(text, 1000))


def to_storable(
    value: object,
    redact_keys: frozenset[str] = frozenset(),
    _depth: int = 0,
    _seen: frozenset[int] = frozenset(),
) -> t.Any:
    """Return ``value`` as plain JSON, with redacted keys replaced.

    Keys are redacted when their name contains any of ``redact_keys`` (both
    compared by :func:`normalise_key`), in nested mappings, lists, dataclasses
    and named tuples too. Keys that are not strings
    are stored as their ``repr()``; a key whose text repeats an earlier one gets
    ``~`` appended, so no value is lost. Values JSON cannot hold are
    kept faithfully as text: ``repr()`` for unknown objects and bytes, ``"NaN"``
    and ``"Infinity"`` for such floats, decimal text for integers beyond 64 bits.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, int):
        if -_INT_RANGE <= value < _INT_RANGE:
            return int(value)
        try:
            return str(value)
        except ValueError:  # beyond Python's int-to-str digit limit
            return f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if _depth >= MAX_DEPTH:
        return "[max depth]"
    try:
        return _container(value, redact_keys, _depth, _seen)
    except Exception as error:
        # The value's own code raised (a __getitem__, an __iter__, a
        # dataclass field never set).
        return unreadable(value, error)


def as_text(value: object) -> str:
    """``str(value)`` as a plain ``str``; if the value's own ``__str__``
    raises, a note saying so (see :func:`unreadable`), so that the entry is
    not lost."""
    try:
        text = str(value)
    except Exception as error:
        return unreadable(value, error)
    # A str subclass's own behaviour (no hash, an odd ==) stays out.
    return text if type(text) is str else str.__str__(text)


def unreadable(value: object, error: Exception) -> str:
    """What is stored of a value whose own code raised ``error`` when it was
    read: its type and the error's, never its repr, which may show what a
    mapping would have redacted."""
    return f"<unreadable {type(value).__name__}: {type(error).__name__}>"


def _container(
    value: object, redact_keys: frozenset[str], depth: int, seen: frozenset[int]
) -> t.Any:
    """:func:`to_storable` of a value that is not a JSON scalar."""
    mapping = _as_mapping(value)
    if mapping is not None or isinstance(value, (list, tuple, set, frozenset)):
        if id(value) in seen:
            return "[recursive]"
        seen = seen | {id(value)}
        if mapping is not None:
            out: dict[str, t.Any] = {}
            for key, item in mapping.items():
                name = clean_text(key) if isinstance(key, str) else _safe_repr(key)
                # 1 and "1", or "a\x00" and "a\\x00", are one JSON key:
                # keep both values under distinct names.
                while name in out:
                    name += "~"
                if is_redacted(name, redact_keys):
                    out[name] = REDACTED
                else:
                    out[name] = to_storable(item, redact_keys, depth + 1, seen)
            return out
        items = t.cast("t.Iterable[t.Any]", value)
        return [to_storable(item, redact_keys, depth + 1, seen) for item in items]
    if isinstance(value, datetime):
        return value.isoformat()
    return _safe_repr(value)


def storable_data(
    data: t.Mapping[str, t.Any] | None, redact_keys: frozenset[str]
) -> dict[str, t.Any] | None:
    """Redact and normalise ``data``; replace it with a marker if it is too big."""
    if data is None:
        return None
    if not isinstance(data, t.Mapping):
        data = {"value": data}
    clean = to_storable(data, redact_keys)
    if not isinstance(clean, dict):  # a mapping that could not be read
        clean = {"value": clean}
    # Measured as stored: ASCII, with escapes (6 bytes for "é", 12 for an emoji).
    size = len(json.dumps(clean, separators=(",", ":")))
    if size <= MAX_DATA_BYTES:
        return t.cast("dict[str, t.Any]", clean)
    preview = json.dumps(clean, ensure_ascii=False, separators=(",", ":"))[:1000]
    return {"_truncated": True, "_size": size, "preview": preview}


def json_size_bound(text: str) -> int:
    """An upper bound of the size of ``text`` in ASCII JSON, quotes left
    out: an escape takes 6 bytes, 12 for a character beyond the BMP."""
    return (6 if text.isascii() else 12) * len(text)


def check_event(event: object) -> str:
    if not isinstance(event, str) or not event.strip():
        raise ValueError(f"An event name must be a non-empty string, got {event!r}.")
    stored = clean_text(event)
    # Measured as stored: NUL and lone surrogates take 4 and 6 characters
    # there, and a longer name would be refused by the column on every try.
    if len(stored) > EVENT_MAX:
        escapes = " once NUL and lone surrogates are escaped" if stored != event else ""
        raise ValueError(
            f"An event name is at most {EVENT_MAX} characters; this one has"
            f" {len(stored)}{escapes}. Put the detail in data=... instead."
        )
    return stored


def check_level(level: object) -> str:
    if not isinstance(level, str) or level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {level!r}.")
    return level


#: An entry with every field empty, in table order: all but the columns the
#: database (``id``) and the chain (``seq``, ``hash``) fill in.
_EMPTY_ENTRY: dict[str, t.Any] = dict.fromkeys(
    name for name in FIELDS if name not in ("id", "seq", "hash")
)


def make_entry(
    event: str,
    *,
    level: str = "info",
    data: t.Mapping[str, t.Any] | None = None,
    redact_keys: frozenset[str] = frozenset(),
    request_fields: t.Mapping[str, t.Any] | None = None,
    **fields: t.Any,
) -> dict[str, t.Any]:
    """Return a complete, storable entry row.

    :param request_fields: the request's fields, storable already (see
        :func:`flask_sidelog.context.read_request`).
    :param fields: any other column (``actor``, ``outcome``, ``path``, ...);
        bounded text columns are cut to their documented lengths.
    """
    entry = _EMPTY_ENTRY.copy()
    entry["uuid"] = new_uuid()
    entry["created_at"] = utcnow()
    entry["event"] = check_event(event)
    entry["level"] = check_level(level)
    if request_fields:
        entry.update(request_fields)
    if data is not None:
        entry["data"] = storable_data(data, redact_keys)
    for name, value in fields.items():
        if name not in entry:
            raise TypeError(f"Unknown entry field {name!r}.")
        if value is not None and name in COLUMN_LIMITS:
            value = cut(as_text(value), COLUMN_LIMITS[name])
        entry[name] = value
    return entry
