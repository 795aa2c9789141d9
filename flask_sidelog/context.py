"""What flask-sidelog knows about the current app context: its request id,
the audited view, and the fate of the main session's transaction.

The fate comes from the main session's own events, because nothing else tells
it: Flask passes ``exc=None`` to teardowns for ``abort()`` and handled errors,
and Flask-SQLAlchemy's teardown closes the session without a rollback event.
"""

from __future__ import annotations

import dataclasses
import re
import string
import time
import typing as t

import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask.globals import _cv_app
from flask.globals import _cv_request
from werkzeug.exceptions import HTTPException

if t.TYPE_CHECKING:
    from flask import Request
    from flask.ctx import AppContext

from .entry import as_text
from .entry import cut
from .entry import is_redacted
from .entry import random_bytes
from .entry import REDACTED
from .entry import unreadable
from .model import COLUMN_LIMITS

# Text SQL writes if one of its statements starts otherwise than a read or
# a setting does, or is a WITH that holds INSERT, UPDATE, DELETE or MERGE
# ("WITH ... INSERT"). Words in string literals and comments count for
# nothing, and neither does a SELECT's FOR UPDATE.
_READ_ONLY_SQL = (
    "select",
    "show",
    "explain",
    "pragma",
    "values",
    "set",
    "reset",
    "savepoint",
    "release",
)
_LITERAL_OR_COMMENT = re.compile(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/", re.S)
#: What may come before a statement's first word.
_BEFORE_THE_VERB = string.whitespace + "("
_WRITING_VERB = re.compile(r"\b(?:insert|update|delete|merge)\b", re.I)
_FOR_UPDATE = re.compile(r"\bfor\s+(?:no\s+key\s+)?update\b", re.I)
#: What an incoming request id must look like to be used as is.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# The context variable behind Flask's current_app and g. The hooks here run
# several times in every request, and each use of one of those proxies costs
# about twenty times what reading the variable does.
def app_context() -> AppContext | None:
    """The current app context, or None outside one."""
    return _cv_app.get(None)


@dataclasses.dataclass(slots=True)
class ContextState:
    """Per app context state, kept on ``g._sidelog`` and popped at teardown."""

    #: The request the context belongs to; None for a CLI command or a job.
    #: Kept so that its fields can be read after Flask popped it, for
    #: entries made at app context teardown.
    request: Request | None = None
    #: The request's id and fields, read by :func:`read_request` when an
    #: entry first needs them (most requests never log).
    request_id: str | None = None
    request_fields: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    request_read: bool = False
    #: The audited view's event, once ``@audit`` started.
    audit_event: str | None = None
    started: float = 0.0
    annotations: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    actor: str | None = None
    exception: BaseException | None = None
    #: What Flask-SQLAlchemy's teardown raised as it closed the main session
    #: (its connection died): raised again once this context's entries are
    #: written, since Flask skips the teardowns after one that raises.
    teardown_error: Exception | None = None
    status_code: int | None = None
    #: The main session has written in a transaction that has not ended yet.
    pending_write: bool = False
    committed: bool = False
    rolled_back: bool = False
    #: Entries held back until the main session has let go of SQLite's lock.
    deferred: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    #: Tracked row changes waiting for their fate, by the transaction or
    #: savepoint that carries them (see :mod:`flask_sidelog.tracking`).
    changes: dict[t.Any, list[t.Any]] = dataclasses.field(default_factory=dict)
    #: Entries logged while this context holds a SQLite log_session().
    log_session_held: list[dict[str, t.Any]] | None = None
    #: The unit of work of a flush of the main session that started and has
    #: not finished yet: it lists the rows the flush deletes on its own.
    flush: t.Any = None
    #: The DBAPI connection the main session's tracked changes went through;
    #: False if they all went to binds other than the log's SQLite file.
    main_connection: t.Any = None
    #: For that flush: the values before it of tracked columns of changed
    #: rows that the session had expired or that the ORM sets itself, by
    #: instance state (see tracking).
    old_values: dict[t.Any, dict[str, t.Any]] = dataclasses.field(default_factory=dict)
    #: For that flush: the tracked columns of changed rows that the app set
    #: to a SQL expression, with their values before, by instance state (the
    #: flush forgets both).
    sql_set: dict[t.Any, dict[str, t.Any]] = dataclasses.field(default_factory=dict)
    #: When a write of this context failed without an answer from the log
    #: database, and why (see :meth:`~flask_sidelog.writer.Writer.write`).
    write_failed: tuple[float, Exception] | None = None
    #: Popped at teardown: the main session no longer reports to this state.
    ended: bool = False
    #: The write mode's token for a running audited request (see
    #: :meth:`~flask_sidelog.writer.Writer.request_started`).
    running: object = None

    @property
    def main_tx(self) -> str:
        """``rolled_back`` if a transaction of the main session ended with
        writes it did not commit, ``committed`` if its writes were committed,
        ``none`` if it wrote nothing. A savepoint the app rolled back inside a
        committed transaction is the app's choice: ``committed``."""
        if self.rolled_back or self.pending_write:
            return "rolled_back"
        return "committed" if self.committed else "none"

    def outcome(self) -> tuple[str, int, str | None]:
        """The audited view's outcome, status code and error text."""
        exc = self.exception
        status = self.status_code
        unhandled = False
        if status is None:
            # after_request did not run: the exception went past it.
            if isinstance(exc, HTTPException):
                status = exc.code or _response_status(exc) or 500
            else:
                status = 200 if exc is None else 500
            unhandled = exc is not None and not isinstance(exc, HTTPException)
        # An exception an errorhandler turned into a response is judged by
        # that response's status; its text is kept in ``error`` all the same.
        if status >= 500 or unhandled:
            outcome = "error"
        elif status >= 400:
            outcome = "failure"
        else:
            outcome = "success"
            if isinstance(exc, HTTPException) and exc.code is None:
                exc = None  # abort(redirect(...)): a response, not an error
        return outcome, status, describe_error(exc)


def _response_status(exc: HTTPException) -> int | None:
    """The status of the response ``abort(response)`` was given."""
    response = exc.response
    return None if response is None else response.status_code


def describe_error(exc: BaseException | None) -> str | None:
    """``module.Class: message``, without what a database error quotes of
    the data: for an error SQLAlchemy wraps, the driver's message only (its
    text repeats the statement's parameters); from PostgreSQL, the primary
    message and hint only (the DETAIL quotes the values of a key or of the
    failing row, ``Key (ssn)=(...) already exists``, the CONTEXT a statement
    with its values); and SQLAlchemy's own errors that quote another one
    (``PendingRollbackError``) up to its DETAIL or statement."""
    if exc is None:
        return None
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    try:
        message = _error_message(exc)
    except Exception as error:  # the exception's own code raised (a property)
        message = unreadable(exc, error)
    return f"{name}: {message.strip()}" if message else name


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, HTTPException):
        if exc.code is None and exc.response is not None:  # abort(response)
            return exc.response.status
        return f"{exc.code} {exc.name}"
    error: BaseException = exc
    if isinstance(exc, sa.exc.StatementError) and exc.orig is not None:
        error = exc.orig  # the driver's: SQLAlchemy's repeats the parameters
    # psycopg (2 and 3) gives the server's fields apart; a client-side
    # error (a refused connection) has none.
    diag = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if isinstance(primary, str) and primary:
        hint = getattr(diag, "message_hint", None)
        return f"{primary}\nHINT:  {hint}" if hint else primary
    message = as_text(error)
    if isinstance(error, sa.exc.SQLAlchemyError):
        message = _QUOTED_DATA.split(message, maxsplit=1)[0]
    return message


#: Where SQLAlchemy's text of an error starts quoting the data.
_QUOTED_DATA = re.compile(r"\n(?:DETAIL:|\[SQL: |\[parameters: )")


@t.overload
def current_state(
    create: t.Literal[True] = ..., *, with_request: bool = ...
) -> ContextState: ...
@t.overload
def current_state(create: bool, *, with_request: bool = ...) -> ContextState | None: ...
def current_state(
    create: bool = True, *, with_request: bool = False
) -> ContextState | None:
    """The current app context's state, created on first use; with
    ``with_request``, holding the request's id and fields. None outside an
    app context."""
    ctx = _cv_app.get(None)
    if ctx is None:
        return None
    state: ContextState | None = ctx.g.get("_sidelog")
    if state is None:
        if not create:
            return None
        request_ctx = _cv_request.get(None)
        state = ContextState(
            started=time.perf_counter(),
            request=None if request_ctx is None else request_ctx.request,
        )
        ctx.g._sidelog = state
    if with_request and not state.request_read:
        read_request(state)
    return state


def read_request(state: ContextState) -> None:
    """Read the request's id and the fields every entry of the request
    shares into ``state``, once."""
    if state.request_read:
        return
    if state.request is None:
        # A request pushed into an app context that had a state before it
        # (Flask reuses a pushed app context): it is this state's request.
        request_ctx = _cv_request.get(None)
        if request_ctx is None:
            return
        state.request = request_ctx.request
    req = state.request
    state.request_read = True
    settings = _cv_app.get().app.extensions["sidelog"].settings
    state.request_id = _request_id(req, settings.request_id_header)
    # Made storable once here, not again in each entry of the request.
    state.request_fields = {
        "method": cut(req.method, COLUMN_LIMITS["method"]),
        "path": cut(_redacted_path(req, settings.redact_keys), COLUMN_LIMITS["path"]),
        "endpoint": cut(req.endpoint, COLUMN_LIMITS["endpoint"]),
        "remote_addr": cut(req.remote_addr, COLUMN_LIMITS["remote_addr"]),
        "user_agent": cut(
            req.environ.get("HTTP_USER_AGENT") or None, COLUMN_LIMITS["user_agent"]
        ),
    }


def _redacted_path(req: Request, redact_keys: frozenset[str]) -> str:
    """The request's path (never its query string), with the values of URL
    variables named like ``SIDELOG_REDACT_KEYS`` replaced: ``/reset/<token>``
    is stored as ``/reset/[redacted]``."""
    path: str = req.path
    for name, value in (req.view_args or {}).items():
        if not is_redacted(name, redact_keys):
            continue
        try:
            text = str(value)
        except Exception:
            # A converter's value that cannot say what it was read from
            # (its __str__ raises): the route's pattern shows no value.
            return str(req.url_rule)
        if text:
            path = path.replace(text, REDACTED)
    return path


def _request_id(req: Request, header: str | None) -> str:
    """The client's id from ``SIDELOG_REQUEST_ID_HEADER`` if it is set and
    the id is well formed, else a new one: a client cannot store arbitrary text."""
    if header is not None:
        incoming = req.headers.get(header)
        if incoming is not None and REQUEST_ID_RE.fullmatch(incoming):
            return incoming
    # As random as uuid4().hex, without building a UUID.
    return random_bytes(16).hex()


def pop_state() -> ContextState | None:
    ctx = _cv_app.get(None)
    if ctx is None:
        return None
    state = t.cast("ContextState | None", ctx.g.pop("_sidelog", None))
    if state is not None:
        state.ended = True
    return state


def _main_session_state(session: sa_orm.Session) -> ContextState | None:
    """The state to update if ``session`` is this app context's main session."""
    # Each flush and commit sends several events: the first one finds the
    # state and leaves it on the session, the others take it from there.
    state: ContextState | None = session.info.get("_sidelog")
    if state is not None and not state.ended:
        return state
    ctx = _cv_app.get(None)
    if ctx is None:
        return None
    app_state = ctx.app.extensions.get("sidelog")
    if app_state is None:
        return None
    scoped = app_state.main_session
    # registry.has() never creates a session, so this is safe at any time,
    # including after Flask-SQLAlchemy removed the session at teardown.
    if scoped is None or not scoped.registry.has() or scoped.registry() is not session:
        return None
    state = current_state()
    session.info["_sidelog"] = state
    return state


def has_changes(session: sa_orm.Session) -> bool:
    """Whether ``session`` has anything to flush; cheaper than ``dirty``,
    which lists every changed object."""
    return bool(session.new or session.deleted or session.identity_map.check_modified())


def _before_flush(session: sa_orm.Session, *args: t.Any) -> None:
    state = _main_session_state(session)
    if state is not None and not state.pending_write:
        state.pending_write = has_changes(session)


def _text_writes(sql: str) -> bool:
    """Whether SQL text may write (see :data:`_READ_ONLY_SQL`)."""
    code = _LITERAL_OR_COMMENT.sub(
        lambda m: "''" if m.group().startswith("'") else " ", sql
    )
    for statement in code.split(";"):
        verb = statement.lstrip(_BEFORE_THE_VERB).lower()
        if verb.startswith("with"):
            if _WRITING_VERB.search(_FOR_UPDATE.sub(" ", verb)):
                return True
        elif verb and not verb.startswith(_READ_ONLY_SQL):
            return True
    return False


def _do_orm_execute(execute_state: sa_orm.ORMExecuteState) -> None:
    statement: t.Any = execute_state.statement
    writes = (
        execute_state.is_insert or execute_state.is_update or execute_state.is_delete
    )
    if not writes:
        # Text as it is, in text(...).columns(...), or in an ORM select's
        # from_statement(text(...)) (of text(...).columns(...)).
        for _ in range(3):
            if isinstance(statement, sa.TextClause):
                writes = _text_writes(statement.text)
                break
            statement = getattr(statement, "element", None)
    if writes:
        state = _main_session_state(execute_state.session)
        if state is not None:
            state.pending_write = True


def after_commit(session: sa_orm.Session) -> None:
    """Note that the main session committed (a no-op the second time)."""
    state = _main_session_state(session)
    # Releasing a savepoint also sends after_commit; its writes are still
    # pending until the outermost transaction ends.
    if (
        state is not None
        and state.pending_write
        and not session.in_nested_transaction()
    ):
        state.pending_write = False
        state.committed = True


def _after_transaction_end(
    session: sa_orm.Session, transaction: sa_orm.SessionTransaction
) -> None:
    # after_commit has already run for a committed transaction; an outermost
    # transaction that ends with writes still pending was rolled back or closed.
    if transaction.parent is not None:
        return
    state = _main_session_state(session)
    if state is not None and state.pending_write:
        state.pending_write = False
        state.rolled_back = True


_tracked: set[type[sa_orm.Session]] = set()


def track_main_session(session_class: type[sa_orm.Session]) -> None:
    """Follow the transactions of main sessions of ``session_class``.

    Listeners go on the class once; each event finds its own app context.
    """
    if session_class in _tracked:
        return
    _tracked.add(session_class)
    sa.event.listen(session_class, "before_flush", _before_flush)
    sa.event.listen(session_class, "do_orm_execute", _do_orm_execute)
    # First of all: a listener of the app's that raises (a models_committed
    # receiver) would skip the ones after it, and a committed transaction
    # would then be taken for rolled back.
    sa.event.listen(session_class, "after_commit", after_commit, insert=True)
    sa.event.listen(session_class, "after_transaction_end", _after_transaction_end)
