"""Signals sent by flask-sidelog, for metrics and alerting.

Receivers run on the writer's thread of control; they must not raise (an
exception in a receiver is logged and ignored so that it cannot break a request).
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Sent after an entry was committed to the log database.
#: Receivers get ``sender`` (the app) and ``entry`` (the stored dict).
entry_written = _signals.signal("entry-written")

#: Sent when an entry could not be committed.
#: Receivers get ``sender`` (the app), ``entry`` (the dict) and ``error``.
entry_failed = _signals.signal("entry-failed")
