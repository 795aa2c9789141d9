"""Change capture: every attempted change to a tracked model, with its fate.

Row changes are read from the main session in ``after_flush`` (or, for a flush
that fails, in the ``after_rollback`` it causes, before the session forgets
them) and bulk statements in ``do_orm_execute``. Each change waits in
:attr:`ContextState.changes <flask_sidelog.context.ContextState.changes>`
under the transaction or savepoint that carries it, until that ends:

- a released savepoint hands its changes to the enclosing transaction;
- a committed outermost transaction writes them with ``main_tx="committed"``;
- a savepoint or transaction that ends any other way (rollback, a failed
  flush, the session closed at teardown) writes them with
  ``main_tx="rolled_back"``.

They are written through the extension's normal write path, on the log
engine, after the main transaction has ended: nothing is added to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import importlib
import math
import operator
import typing as t
import uuid
from datetime import date
from datetime import datetime
from datetime import time

import sqlalchemy as sa
import sqlalchemy.orm as sa_orm
from flask import current_app
from flask import has_app_context

from . import context
from .entry import _INT_RANGE
from .entry import check_event
from .entry import clean_text
from .entry import cut
from .entry import is_redacted
from .entry import json_size_bound
from .entry import make_entry
from .entry import MAX_DATA_BYTES
from .entry import new_uuids
from .entry import REDACTED
from .entry import storable_data
from .entry import to_storable
from .entry import utcnow
from .model import COLUMN_LIMITS
from .query import ROW_CHANGES
from .query import row_to_dict
from .writer import spool_on_error

if t.TYPE_CHECKING:
    from .extension import _AppState

_PLAIN = frozenset({type(None), bool, int, float, str})
_NOTHING: t.Mapping[str, t.Any] = {}
_NO_VALUE = sa_orm.base.NO_VALUE
#: The old value of an updated column that the session had not loaded and
#: that could not be read before the flush.
NOT_LOADED = "[not loaded]"
#: The new value of a column the app set to a SQL expression, which the
#: database computed (``Account.balance + 1``).
SQL_EXPRESSION = "[SQL expression]"


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
    """How to record one mapped class: its table, its primary key and the
    columns to keep, as ``(attribute key, column name)`` pairs."""

    table: str
    pk: tuple[tuple[str, str], ...]
    columns: dict[str, str]
    #: The names excluded, and every other name of their columns (attribute
    #: key, column name, column key).
    exclude: frozenset[str]
    #: The event of each row operation: ``{"insert": "<table>.insert", ...}``.
    events: dict[str, str]
    #: An upper bound of the JSON size of a row change's names and
    #: punctuation, or None if some name is not stored as it is.
    names_size: int | None
    #: The keys of ``columns`` that the ORM sets itself in an UPDATE (an
    #: ``onupdate`` default, the version counter): the session's history
    #: does not have them.
    auto_keys: tuple[str, ...] = ()
    #: The keys of ``columns`` that a load of the row reads (all but the
    #: deferred ones).
    loaded_keys: frozenset[str] = frozenset()
    #: How the ORM compares the old and new value of each key of ``columns``.
    equal: dict[str, t.Callable[[t.Any, t.Any], t.Any]] = dataclasses.field(
        default_factory=dict
    )


@dataclasses.dataclass(slots=True)
class Change:
    """One captured change, made into an entry once its fate is known."""

    event: str
    data: dict[str, t.Any]
    actor: str | None
    at: datetime
    #: Set when ``data`` is a row change of this spec's columns whose values
    #: are all stored as they are (see :func:`_stored_as_is`): only
    #: redaction can change it.
    spec: _Spec | None = None


class Tracker:
    """Which models one :class:`~flask_sidelog.SideLog` tracks."""

    def __init__(self) -> None:
        self._models: dict[type, frozenset[str]] = {}
        self._all_except: frozenset[str] | None = None
        self._specs: dict[sa_orm.Mapper[t.Any], _Spec | None] = {}
        self._excluded: frozenset[str] | None = None
        #: Whether exclude_tables was checked against the mapped tables.
        self._checked = False

    def __bool__(self) -> bool:
        return bool(self._models) or self._all_except is not None

    def track(self, model: type, exclude: t.Iterable[str]) -> None:
        mapper: sa_orm.Mapper[t.Any] | None = sa.inspect(model, raiseerr=False)
        if not isinstance(mapper, sa_orm.Mapper):
            raise TypeError(
                f"track() takes a mapped model class such as a db.Model subclass,"
                f" got {model!r}."
            )
        if isinstance(exclude, str):
            raise TypeError(
                f"exclude takes a set of column names, got the string {exclude!r};"
                f" write exclude={{{exclude!r}}}."
            )
        names = frozenset(exclude)
        columns = _columns(mapper)
        known = {key for key, _ in columns} | {column.name for _, column in columns}
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(
                f"{model.__name__} has no column {', '.join(map(repr, unknown))};"
                f" exclude one of: {', '.join(sorted(known))}."
            )
        pk_names = {c.name for c in mapper.primary_key} | {
            key for key, column in columns if column in mapper.primary_key
        }
        if names & pk_names:
            raise ValueError(
                f"The primary key of {model.__name__} cannot be excluded: it is"
                " how each change and 'flask sidelog history' find the row."
            )
        self._models[model] = names
        self._specs.clear()
        self._excluded = None

    def tracks_table(
        self, name: str, mappers: t.Iterable[sa_orm.Mapper[t.Any]] = ()
    ) -> bool:
        """Whether rows of table ``name`` are tracked: of a model tracked by
        class, or of any mapped model :meth:`track_all` covers (those of every
        declarative base, or of the bases of these and of ``mappers``)."""
        candidates = _all_mappers([*map(sa_orm.class_mapper, self._models), *mappers])
        return any(
            getattr(mapper.local_table, "name", None) == name
            and self.spec(mapper) is not None
            for mapper in candidates
        )

    def excluded_names(self) -> frozenset[str]:
        """Every name of every column excluded from a model tracked by
        class: a bulk statement's parameter compared with one is left out,
        even in a subquery of another model's statement."""
        if self._excluded is None:
            specs = [self.spec(sa_orm.class_mapper(model)) for model in self._models]
            self._excluded = frozenset().union(*(s.exclude for s in specs if s))
        return self._excluded

    def track_all(self, exclude_tables: t.Iterable[str]) -> None:
        if isinstance(exclude_tables, str):
            raise TypeError(
                "exclude_tables takes a set of table names, got the string"
                f" {exclude_tables!r}; write exclude_tables={{{exclude_tables!r}}}."
            )
        names = frozenset(exclude_tables)
        not_names = [name for name in names if not isinstance(name, str)]
        if not_names:
            raise TypeError(
                "exclude_tables takes table names as strings, got"
                f" {', '.join(map(repr, not_names))}; write"
                " exclude_tables={'sessions', ...}."
            )
        self._all_except = names
        self._specs.clear()
        self._excluded = None
        self._checked = False

    def spec(self, mapper: sa_orm.Mapper[t.Any]) -> _Spec | None:
        """How to record rows of ``mapper``, or None if it is not tracked."""
        try:
            return self._specs[mapper]
        except KeyError:
            pass
        spec = None
        # A subclass keeps what a tracked base class excludes.
        found = [self._models[c] for c in mapper.class_.__mro__ if c in self._models]
        exclude = frozenset().union(*found) if found else None
        table = mapper.local_table
        name = t.cast(str, getattr(table, "name", str(table)))
        if exclude is None and self._all_except is not None:
            exclude = None if name in self._all_except else frozenset()
            if not self._checked:
                self._check_exclude_tables(mapper)
        if exclude is not None:
            columns = _columns(mapper)
            # By the attribute that maps each key column: a single-table
            # subclass of a joined one lists only the joined table's column
            # of its key, while its primary key is the base table's.
            pk = tuple(
                (key, str(c.name))
                for c in mapper.primary_key
                if (key := _attribute_of(mapper, c)) is not None
            )
            kept = {
                key: str(column.name)
                for key, column in columns
                if key not in exclude and column.name not in exclude
            }
            left_out = {
                name
                for key, column in columns
                if key not in kept
                for name in (key, str(column.name), str(column.key))
            }
            auto_keys = tuple(
                key
                for key, column in columns
                if key in kept
                and (column.onupdate is not None or column is mapper.version_id_col)
            )
            # Plain str, not quoted_name: the entries' short path checks types.
            spec = _Spec(
                str(name),
                pk,
                kept,
                exclude | left_out,
                {op: f"{name}.{op}" for op in ROW_CHANGES},
                _names_size(str(name), [c for _, c in pk], list(kept.values())),
                auto_keys,
                frozenset(
                    key
                    for key in kept
                    if not getattr(mapper.attrs.get(key), "deferred", False)
                ),
                {key: _is_equal(mapper, key) for key in kept},
            )
        self._specs[mapper] = spec
        return spec

    def _check_exclude_tables(self, mapper: sa_orm.Mapper[t.Any]) -> None:
        """Warn once of names in ``exclude_tables`` that no mapped table
        has: a misspelt name leaves its table tracked. Only at a flush are
        the app's models all known; a warning, since a flush must not fail
        for it."""
        self._checked = True
        try:
            # Every declarative base's tables: a name may be of another
            # base's (a second bind).
            known = {
                str(table.name)
                for m in _all_mappers([mapper])
                for table in m.tables
                if hasattr(table, "name")
            }
            unknown = sorted((self._all_except or frozenset()) - known)
            if unknown and has_app_context():
                current_app.logger.warning(
                    "track_all(exclude_tables=...) names %s, which no mapped table"
                    " has: changes to nothing are left out for it. Mapped tables:"
                    " %s.",
                    ", ".join(map(repr, unknown)),
                    ", ".join(sorted(known)),
                )
        except Exception:  # never break the flush it runs in
            current_app.logger.exception(
                "flask-sidelog could not check exclude_tables."
            )


def _all_mappers(
    mappers: t.Iterable[sa_orm.Mapper[t.Any]],
) -> set[sa_orm.Mapper[t.Any]]:
    """The mappers of every declarative base (registry), those of
    ``mappers`` included. No public API lists the registries; without
    SQLAlchemy's private function, only the bases of ``mappers`` are searched."""
    module = importlib.import_module("sqlalchemy.orm.mapper")
    registries = getattr(
        module, "_all_registries", lambda: {m.registry for m in mappers}
    )()
    return {m for registry in registries for m in registry.mappers}


def _columns(mapper: sa_orm.Mapper[t.Any]) -> list[tuple[str, sa.Column[t.Any]]]:
    # mapper.columns is set when the class is mapped, so this works before
    # the other mappers are configured (a decorator runs at class creation).
    return [
        (key, column)
        for key, column in mapper.columns.items()
        if isinstance(column, sa.Column)
    ]


def _attribute_of(mapper: sa_orm.Mapper[t.Any], column: t.Any) -> str | None:
    """The key of the attribute that maps ``column``, if one does."""
    try:
        return mapper.get_property_by_column(column).key
    except sa_orm.exc.UnmappedColumnError:
        return None


def _is_equal(
    mapper: sa_orm.Mapper[t.Any], key: str
) -> t.Callable[[t.Any, t.Any], t.Any]:
    """The ORM's comparison of two values of the attribute ``key``."""
    impl = getattr(mapper.class_manager.get(key), "impl", None)
    is_equal = getattr(impl, "is_equal", operator.eq)
    if getattr(is_equal, "__func__", None) is sa.types.TypeEngine.compare_values:
        return operator.eq  # the same x == y, without a call in Python
    return t.cast("t.Callable[[t.Any, t.Any], t.Any]", is_equal)


def _names_size(table: str, pk: list[str], columns: list[str]) -> int | None:
    """An upper bound of the JSON size of ``{"table": table, "pk": {...},
    "changes": {...}}`` without its values (see :func:`_plain_row_data`),
    or None if a name would not be stored as it is."""
    names = [table, *pk, *columns]
    if any(clean_text(name) != name for name in names):
        return None
    # 8 bytes cover a name's quotes, colon and comma.
    return 40 + sum(json_size_bound(name) + 8 for name in names)


def _value(value: t.Any) -> t.Any:
    """A JSON-friendly copy of a column value, taken when it is captured."""
    if type(value) in _PLAIN:
        return value
    try:
        if isinstance(value, (datetime, date, time)):
            return value.isoformat()
        if isinstance(value, (decimal.Decimal, uuid.UUID)):
            return str(value)
    except Exception:  # a subclass's own code raised: a marker, not the flush
        pass
    return to_storable(value)


def _found(
    session: sa_orm.Session,
) -> tuple[_AppState, Tracker, context.ContextState] | None:
    """This app's tracker and context state, if ``session`` is its main
    session and it tracks anything."""
    if not has_app_context():
        return None
    app_state: _AppState | None = current_app.extensions.get("sidelog")
    if app_state is None or not app_state.extension._tracker:
        return None
    state = context._main_session_state(session)
    if state is None:
        return None
    # Changes may be written at teardown, when the request is gone.
    context.read_request(state)
    return app_state, app_state.extension._tracker, state


def _carrier(transaction: sa_orm.SessionTransaction) -> sa_orm.SessionTransaction:
    """The savepoint or outermost transaction that ``transaction`` is part of."""
    while not transaction.nested and transaction.parent is not None:
        transaction = transaction.parent
    return transaction


def _current_carrier(session: sa_orm.Session) -> sa_orm.SessionTransaction | None:
    transaction = session.get_nested_transaction() or session.get_transaction()
    return None if transaction is None else _carrier(transaction)


def _add(
    app_state: _AppState,
    session: sa_orm.Session,
    state: context.ContextState,
    changes: list[Change],
    mappers: t.Iterable[sa_orm.Mapper[t.Any]],
) -> None:
    """Keep ``changes``, written for ``mappers``, until their fate is known."""
    carrier = _current_carrier(session)
    if changes and carrier is not None:
        state.changes.setdefault(carrier, []).extend(changes)
        transaction = session.get_transaction()
        # Only when the log shares the main database's SQLite file: the
        # default bind is then that file. (Tested active: connection()
        # would begin a transaction otherwise.)
        with contextlib.suppress(Exception):
            if (
                app_state.writer is not None
                and app_state.defer_while_main_writes
                and transaction is not None
                and transaction.is_active
            ):
                _keep_main_connection(app_state, session, state, mappers)


def _keep_main_connection(
    app_state: _AppState,
    session: sa_orm.Session,
    state: context.ContextState,
    mappers: t.Iterable[sa_orm.Mapper[t.Any]],
) -> None:
    """Keep the DBAPI connection through which the changes of ``mappers``
    went to the main database, the log's SQLite file: it is asked whether it
    still holds SQLite's lock once their fate is known, when the session no
    longer says. Changes that went to another bind hold no lock on it: for
    those, ``False``, unless changes of this transaction went to the file or
    the session is bound to a connection of the file (an outer transaction,
    which may have written and commits after the session)."""
    for mapper in mappers:
        bind = session.get_bind(mapper=mapper)
        if getattr(bind, "engine", bind) is app_state.shared_engine:
            connection = session.connection(bind_arguments={"mapper": mapper})
            state.main_connection = connection.connection.dbapi_connection
            return
    if state.main_connection is None:
        outer = _outer_connection(app_state, session, mappers)
        state.main_connection = False if outer is None else outer


def _outer_connection(
    app_state: _AppState,
    session: sa_orm.Session,
    mappers: t.Iterable[sa_orm.Mapper[t.Any]],
) -> t.Any:
    """The DBAPI connection of the log's SQLite file that ``session`` is
    bound to, for itself or for any model of ``mappers``' bases, if any: an
    outer transaction, checked out by the app already, so asking it takes
    nothing. None if the session has no such bind."""
    others = _all_mappers(mappers)
    for mapper in (None, *others):
        try:
            bind = session.get_bind(mapper=mapper)
        except sa.exc.UnboundExecutionError:  # bound per model only
            continue
        if isinstance(bind, sa.Connection) and bind.engine is app_state.shared_engine:
            return bind.connection.dbapi_connection
    return None


def _deleted(
    session: sa_orm.Session, flush: t.Any
) -> list[sa_orm.InstanceState[t.Any]]:
    """The rows that ``flush``, the unit of work of the session's flush,
    deletes: those the session was asked to delete, and those the flush
    found orphaned (``delete-orphan``), which only the unit of work lists.
    Its ``states`` (``{state: (isdelete, listonly)}``) is not public API:
    without it, orphans go unrecorded."""
    instance_state = sa_orm.attributes.instance_state
    deleted = [instance_state(obj) for obj in session.deleted]
    registered = getattr(flush, "states", None)
    if isinstance(registered, dict):
        asked = set(deleted)
        deleted += [
            st
            for st, (isdelete, listonly) in registered.items()
            if isdelete and not listonly and st not in asked
        ]
    return deleted


def _row_changes(
    app_state: _AppState,
    tracker: Tracker,
    session: sa_orm.Session,
    deleted: list[sa_orm.InstanceState[t.Any]],
    old_values: dict[t.Any, dict[str, t.Any]],
    sql_set: dict[t.Any, dict[str, t.Any]],
    mappers: set[sa_orm.Mapper[t.Any]],
) -> list[Change]:
    """One change per tracked row in the session's pending flush, whose
    deleted rows are ``deleted`` (see :func:`_deleted`); ``old_values``
    and ``sql_set`` from :func:`_read_old_values`. Adds the rows' mappers to
    ``mappers``."""
    at: datetime | None = None
    actor: str | None = None
    found: list[Change] = []

    def add(
        spec: _Spec,
        op: str,
        d: dict[str, t.Any],
        st: sa_orm.InstanceState[t.Any],
        changes: dict[str, list[t.Any]],
    ) -> None:
        nonlocal at, actor
        if at is None:
            # Resolved once a flush, while the request context is alive.
            at = utcnow()
            actor = app_state.extension._actor()
        identity = st.key[1] if st.key is not None else None
        pk = {}
        for i, (key, column) in enumerate(spec.pk):
            # A delete goes by the stored key, whatever the row's key was set
            # to since; an insert or update ends with the row's own.
            value = identity[i] if op == "delete" and identity else d.get(key)
            if value is None and identity is not None:
                value = identity[i]
            pk[column] = _value(value)
        data = {"table": spec.table, "pk": pk, "changes": changes}
        plain = _stored_as_is(spec, pk, changes)
        found.append(Change(spec.events[op], data, actor, at, spec if plain else None))
        mappers.add(st.mapper)

    instance_state = sa_orm.attributes.instance_state
    # Deletes first: a row deleted and added again with its key in one
    # flush (which SQLAlchemy sends as an UPDATE) ends as the new row.
    for st in deleted:
        spec = tracker.spec(st.mapper)
        if spec is not None:
            d = st.dict
            committed = st.committed_state
            changes = {}
            for key, column in spec.columns.items():
                old = committed.get(key, _NO_VALUE)
                if old is _NO_VALUE:
                    # Not read for the delete, if never loaded (deferred).
                    old = d.get(key, NOT_LOADED)
                changes[column] = [_value(old), None]
            add(spec, "delete", d, st, changes)
    for obj in session.new:
        st = instance_state(obj)
        spec = tracker.spec(st.mapper)
        if spec is not None:
            d = st.dict
            changes = {
                column: [None, _value(d[key])]
                for key, column in spec.columns.items()
                if key in d
            }
            add(spec, "insert", d, st, changes)
    # An orphan the flush deletes may be among the changed rows too.
    deleting = set(deleted)
    # Most dirty rows of a flush are of one class: its spec, once.
    specs: dict[type, _Spec | None] = {}
    for obj in session.dirty:
        st = instance_state(obj)
        if st.class_ not in specs:
            specs[st.class_] = tracker.spec(st.mapper)
        spec = specs[st.class_]
        if spec is None or (deleting and st in deleting):
            continue
        d = st.dict
        changes = {}
        committed = st.committed_state
        for key, old in committed.items():
            name = spec.columns.get(key)
            if name is None:
                continue
            new = d.get(key)
            if old is _NO_VALUE:
                # Expired when set: as read before the flush, if it was.
                old = old_values.get(st, {}).get(key, NOT_LOADED)
            if old is new or _equal(spec.equal[key], old, new):
                continue
            changes[name] = [_value(old), _value(new)]
        for key, old in (sql_set.get(st, _NOTHING) if sql_set else _NOTHING).items():
            # Run by the flush, which then forgot the value (and the key).
            if old is _NO_VALUE:
                old = old_values.get(st, {}).get(key, NOT_LOADED)
            changes[spec.columns[key]] = [_value(old), SQL_EXPRESSION]
        for key in spec.auto_keys:
            # Compared only with a value from before the flush: a row the
            # flush changes on its own (a foreign key) has none, and one it
            # never reached (it failed first) must show no change.
            old = old_values.get(st, {}).get(key, _NO_VALUE)
            new = d.get(key, _NO_VALUE)
            if key in committed or old is _NO_VALUE or new is _NO_VALUE:
                continue  # set by the app: see above
            if old is not new and not _equal(spec.equal[key], old, new):
                changes[spec.columns[key]] = [_value(old), _value(new)]
        if changes:
            add(spec, "update", d, st, changes)
    return found


def _equal(is_equal: t.Callable[[t.Any, t.Any], t.Any], old: t.Any, new: t.Any) -> bool:
    """Whether the ORM takes ``new`` for ``old`` unchanged: the attribute's
    comparison (the column type's, such as a PickleType's comparator) says
    True, as SQLAlchemy's history asks it. A value that cannot be compared
    so (an array, whose == is elementwise) is a change."""
    try:
        return is_equal(new, old) is True
    except Exception:
        return False


def _stored_as_is(
    spec: _Spec, pk: dict[str, t.Any], changes: dict[str, list[t.Any]]
) -> bool:
    """Whether a row change's values are all stored as they are: JSON
    scalars, and text that :func:`clean_text` leaves alone, adding up to
    well within :data:`MAX_DATA_BYTES` with the names."""
    size = spec.names_size
    if size is None:
        return False
    # 32 bytes cover any scalar and a string's quotes; 6 a character escapes.
    size += 32 * (len(pk) + 2 * len(changes))
    values = [*pk.values()]
    for pair in changes.values():
        values += pair
    for value in values:
        kind = type(value)
        if kind is int:
            if not -_INT_RANGE <= value < _INT_RANGE:
                return False
        elif kind is str:
            if not value.isascii() or "\x00" in value:
                return False
            size += 6 * len(value)
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif value is not None and kind is not bool:
            return False
    return size <= MAX_DATA_BYTES


def _before_flush(
    session: sa_orm.Session, flush_context: t.Any, instances: t.Any
) -> None:
    if context.has_changes(session):
        found = _found(session)
        if found is not None:
            found[2].flush = flush_context
            # Not those of a flush that stopped before it began (a listener
            # raised): they would be taken for this one's.
            found[2].old_values = {}
            found[2].sql_set = {}
            try:
                _read_old_values(session, found[1], found[2])
            except Exception:
                # A session event that raises would break the main flush;
                # the old values it could not read show "[not loaded]".
                current_app.logger.exception(
                    "flask-sidelog could not read the old values of a flush."
                )


#: How many rows one SELECT of old values asks for, at most.
OLD_VALUES_PER_SELECT = 500
#: How many key values it binds, at most: SQLite before 3.32 takes 999.
_OLD_VALUES_PARAMETERS = 999


def _read_old_values(
    session: sa_orm.Session, tracker: Tracker, state: context.ContextState
) -> None:
    """Read the stored values of the tracked columns of each changed row
    that the session has expired (a commit does), before the flush writes
    over them: SQLAlchemy's history has no old value for a column set, or a
    foreign key synced, before it was loaded again. One SELECT per mapper and
    :data:`OLD_VALUES_PER_SELECT` rows (fewer for a key of many columns), so
    that a job changing many rows after a commit does not make a query per
    row. Also notes, in ``state.sql_set``, the columns set to a SQL
    expression, which the flush runs and then forgets."""
    instance_state = sa_orm.attributes.instance_state
    instance_dict = sa_orm.attributes.instance_dict
    # By mapper: its rows whose old values are missing, and which keys.
    expired: dict[
        sa_orm.Mapper[t.Any], tuple[list[sa_orm.InstanceState[t.Any]], set[str]]
    ] = {}
    mapper: sa_orm.Mapper[t.Any] | None = None
    spec: _Spec | None = None
    for obj in session.dirty:
        st = instance_state(obj)
        if st.mapper is not mapper:  # rows of one model tend to come together
            mapper = st.mapper
            spec = tracker.spec(mapper)
        if spec is None:
            continue
        if spec.auto_keys:  # as they are before the flush sets them
            committed, d = st.committed_state, st.dict
            kept = state.old_values[st] = {}
            for key in spec.auto_keys:
                # Set by the app: its old value is in the history, if known.
                old = committed[key] if key in committed else d.get(key, _NO_VALUE)
                if old is not _NO_VALUE:
                    kept[key] = old
        if st.key is None:
            continue
        # Of an expired row, what a load reads (the flush, or a listener of
        # the app's, may set any of them), and a deferred column only if it
        # was set (not a blob nobody touched). Set before it was loaded
        # again: told by identity, as a value's == may have no truth value.
        wanted: set[str] | None = None
        d = instance_dict(obj)
        for key, old in st.committed_state.items():
            new = d.get(key)
            if (old is _NO_VALUE or type(new) not in _PLAIN) and key in spec.columns:
                if old is _NO_VALUE:
                    wanted = wanted or set(spec.loaded_keys)
                    wanted.add(key)
                if type(new) not in _PLAIN and _is_sql(new):
                    state.sql_set.setdefault(st, {})[key] = old
        if wanted is None and st.expired_attributes:
            wanted = set(spec.loaded_keys)
        if wanted:
            states, keys = expired.setdefault(st.mapper, ([], set()))
            states.append(st)
            keys.update(wanted)
    for mapper, (states, keys) in expired.items():
        spec = t.cast(_Spec, tracker.spec(mapper))
        size = min(
            OLD_VALUES_PER_SELECT, _OLD_VALUES_PARAMETERS // len(mapper.primary_key)
        )
        pending = [states[i : i + size] for i in range(0, len(states), size)]
        while pending:
            chunk = pending.pop()
            try:
                found = _select_old_values(session, keys, chunk)
            except Exception as error:
                if isinstance(
                    error, sa.exc.DBAPIError
                ) and "too many SQL variables" not in str(error.orig):
                    # Refused by the database (a column this role may not
                    # read, a lock): asking again would not do.
                    _log_unread(spec)
                    pending.clear()
                    continue
                if len(chunk) == 1:
                    _log_unread(spec)
                    continue
                # A stored value its type cannot read (an enum member since
                # removed) spoils the whole SELECT, and so do more values
                # than an old SQLite binds (the query may bind some of its
                # own): ask in halves, so that only the row at fault is
                # left with unknown old values.
                half = len(chunk) // 2
                pending += [chunk[:half], chunk[half:]]
                continue
            # Row by row if a key read back differs from the session's (CHAR
            # padding): a lookup by the session's key still finds it. A row
            # deleted meanwhile is asked for twice, and not found.
            missing = [st for st in chunk if st not in found] if len(chunk) > 1 else ()
            for st in missing:
                try:
                    found.update(_select_old_values(session, keys, [st]))
                except Exception:
                    _log_unread(spec)
            for st, values in found.items():
                state.old_values.setdefault(st, {}).update(values)


def _is_sql(value: t.Any) -> bool:
    """Whether the app set a column to ``value`` for the database to compute
    (``Account.balance + 1``), as SQLAlchemy tells."""
    return isinstance(value, sa.sql.ClauseElement) or hasattr(
        value, "__clause_element__"
    )


def _select_old_values(
    session: sa_orm.Session,
    wanted: t.Iterable[str],
    states: list[sa_orm.InstanceState[t.Any]],
) -> dict[t.Any, dict[str, t.Any]]:
    """The stored values of the attributes ``wanted`` of ``states``, rows of
    one mapper, by state, read in one SELECT in the main transaction (on
    PostgreSQL within a savepoint: a refused read would abort it)."""
    mapper = states[0].mapper
    keys = sorted(wanted)
    pk_columns = mapper.primary_key
    state_of = {st.key[1]: st for st in states if st.key is not None}
    if len(pk_columns) == 1:
        where = pk_columns[0].in_([identity[0] for identity in state_of])
    else:
        where = sa.tuple_(*pk_columns).in_(list(state_of))
    # Labelled: a select names a column once, and a tracked key column is
    # among the columns too.
    pks = [c.label(f"_sidelog_pk_{i}") for i, c in enumerate(pk_columns)]
    columns = [getattr(mapper.class_, key) for key in keys]
    connection = session.connection(bind_arguments={"mapper": mapper})
    # Not in autocommit mode, where no transaction is there to protect.
    guard = connection.dialect.name == "postgresql" and not getattr(
        connection.connection.driver_connection, "autocommit", False
    )
    with (
        session.no_autoflush,
        connection.begin_nested() if guard else contextlib.nullcontext(),
    ):
        rows = session.execute(sa.select(*pks, *columns).where(where)).all()
    width = len(pk_columns)
    found = {}
    for row in rows:
        # One row asked for by its key is that row, however its key reads.
        st = states[0] if len(states) == 1 else state_of.get(tuple(row[:width]))
        if st is not None:
            found[st] = dict(zip(keys, row[width:], strict=True))
    return found


def _log_unread(spec: _Spec) -> None:
    # The flush goes on, and the old values are unknown ("[not loaded]").
    current_app.logger.exception(
        "flask-sidelog could not read the old values of %s rows.", spec.table
    )


def _after_flush(session: sa_orm.Session, flush_context: t.Any) -> None:
    _capture_flush(session, failed=False)


def _after_rollback(session: sa_orm.Session) -> None:
    # A flush that failed never reaches after_flush; the rollback it causes
    # still sees what the flush tried to write, just before the session
    # restores its snapshot and forgets it.
    _capture_flush(session, failed=True)


def _capture_flush(session: sa_orm.Session, failed: bool) -> None:
    found = _found(session)
    if found is None or (failed and found[2].flush is None):
        return
    app_state, tracker, state = found
    flush, state.flush = state.flush, None
    old_values, state.old_values = state.old_values, {}
    sql_set, state.sql_set = state.sql_set, {}
    if failed and getattr(flush, "transaction", None) is None:
        # It stopped before it began (a later before_flush listener raised,
        # or it had nothing to do): nothing was sent, and what is pending
        # now may be changes made since.
        return
    mappers: set[sa_orm.Mapper[t.Any]] = set()
    try:
        changes = _row_changes(
            app_state,
            tracker,
            session,
            _deleted(session, flush),
            old_values,
            sql_set,
            mappers,
        )
    except Exception:
        # A session event that raises would break the main transaction.
        current_app.logger.exception("flask-sidelog could not capture a flush.")
        return
    _add(app_state, session, state, changes, mappers)


def _do_orm_execute(execute_state: sa_orm.ORMExecuteState) -> t.Any:
    op = (
        "bulk_update"
        if execute_state.is_update
        else "bulk_delete"
        if execute_state.is_delete
        else "bulk_insert"
        if execute_state.is_insert
        else None
    )
    mapper = execute_state.bind_mapper
    if op is None or mapper is None:
        return None
    session = execute_state.session
    found = _found(session)
    if found is None:
        return None
    app_state, tracker, state = found
    spec = tracker.spec(mapper)
    if spec is None:
        return None
    data: dict[str, t.Any] = {"table": spec.table, "where": None}
    where = getattr(execute_state.statement, "whereclause", None)
    if where is not None:
        try:
            excluded = spec.exclude | tracker.excluded_names()
            data.update(_where(where, excluded, app_state.settings.redact_keys))
        except Exception:  # a construct with no generic rendering
            current_app.logger.exception("flask-sidelog could not render a WHERE.")
            data["where"] = "[not rendered]"
    if execute_state.is_executemany:
        data["parameter_sets"] = len(t.cast(list[t.Any], execute_state.parameters))
    data["rowcount"] = None
    change = Change(f"{spec.table}.{op}", data, app_state.extension._actor(), utcnow())
    # SQLAlchemy keeps an INSERT's rowcount only when asked (2.0.28 and
    # later); the driver's may be gone by the time the result is read.
    options = {"preserve_rowcount": True} if execute_state.is_insert else None
    try:
        result = execute_state.invoke_statement(execution_options=options)
    except Exception as error:
        if isinstance(error, sa.orm.exc.StaleDataError) or (
            isinstance(error, sa.exc.DBAPIError) and execute_state.is_executemany
        ):
            # Raised after rows were written (an update by key that missed
            # one; an executemany's rows before the failing one): its fate
            # is the transaction's.
            _add(app_state, session, state, [change], [mapper])
        else:
            # Refused by the database, or never sent: it changed nothing,
            # whatever its transaction does next (a caller may catch it).
            _deliver(state, [change], "rolled_back")
        raise
    rowcount = getattr(result, "rowcount", None)
    if isinstance(rowcount, int) and rowcount >= 0:
        data["rowcount"] = rowcount
    _add(app_state, session, state, [change], [mapper])
    return result


def _where(
    where: sa.ColumnElement[t.Any],
    excluded: frozenset[str],
    redact_keys: frozenset[str],
) -> dict[str, t.Any]:
    # Rendered apart from any dialect, with each value as a named parameter:
    # the text never holds a value. A parameter is kept only if it is
    # compared with a column: hidden if a column of a redacted name, left out
    # if an excluded one (of any tracked model: a subquery may name it) or
    # none at all (text(), a lone function), whatever its own name says.
    # A copy whose parameters are all rendered as parameters, those made
    # literal_execute included (even inside has() and any(), which a
    # replacement_traverse() would not enter).
    where = sa.sql.visitors.cloned_traverse(where, {}, {"bindparam": _as_parameter})
    compiled = where.compile(compile_kwargs={"render_postcompile": True})
    # A SQL compiler's: which name each parameter got.
    bind_names: dict[t.Any, str] = getattr(compiled, "bind_names", {})
    kept, hidden, dropped = _params_of_columns(where, bind_names, excluded, redact_keys)
    params = {}
    for name, value in compiled.params.items():
        if _named(name, dropped):
            continue
        if _named(name, hidden):
            params[name] = REDACTED
        elif _named(name, kept):
            params[name] = _value(value)
    return {"where": str(compiled), "params": params}


#: A parameter's value given by a callable, which is not called for the
#: entry: it may give another value on each call, and the statement calls it.
NOT_EVALUATED = "[callable]"


def _as_parameter(bind: sa.BindParameter[t.Any]) -> None:
    bind.literal_execute = False
    if bind.callable is not None:
        bind.callable = None
        bind.value = [NOT_EVALUATED] if bind.expanding else NOT_EVALUATED


def _params_of_columns(
    where: sa.ColumnElement[t.Any],
    bind_names: dict[t.Any, str],
    excluded: frozenset[str],
    redact_keys: frozenset[str],
) -> tuple[set[str], set[str], set[str]]:
    """The names of the parameters by the innermost binary expression,
    subquery or ``text()`` around each: compared with plain columns only,
    with one of a redacted name, and with an excluded one or none (in
    ``text()``, or in a subquery but in no comparison of its own)."""
    # Each place a parameter appears: one bind object may be used twice.
    found: dict[t.Any, list[list[set[str]] | None]] = {}

    def visit(node: t.Any, around: tuple[list[t.Any], t.Any, bool] | None) -> None:
        if isinstance(node, (sa.BinaryExpression, sa.Select, sa.TextClause)):
            inside = list(sa.sql.visitors.iterate(node))
            columns = None
            json = False
            if isinstance(node, sa.BinaryExpression):
                columns = [
                    {str(part.name), str(part.key)}
                    for part in inside
                    if isinstance(part, sa.ColumnClause)
                ]
                json = any(_is_json(getattr(part, "type", None)) for part in inside)
            around = (inside, columns, json)
        if isinstance(node, sa.BindParameter) and around is not None:
            inside, names, json = around
            if names is not None and json:
                # A JSON document's keys come as values (doc["k"],
                # json_extract(doc, '$.k')): every other text in the
                # comparison names it, as a column's name would.
                others = [p for p in inside if p is not node]
                names = [*names, _texts(others) | _own_names(node)]
            found.setdefault(node, []).append(names)
        for child in node.get_children():
            visit(child, around)

    visit(where, None)
    kept: set[str] = set()
    hidden: set[str] = set()
    dropped: set[str] = set()
    for bind, places in found.items():
        name = bind_names.get(bind)
        if name is None:
            continue
        for columns in places:
            if not columns or any(given & excluded for given in columns):
                dropped.add(name)  # in text(), a subquery, with an excluded column
            elif any(is_redacted(n, redact_keys) for given in columns for n in given):
                hidden.add(name)
            else:
                kept.add(name)
    # A parameter used, or rendered, twice keeps the strictest verdict.
    return kept - hidden - dropped, hidden - dropped, dropped


def _is_json(type_: t.Any) -> bool:
    """Whether a column of ``type_`` holds JSON (a TypeDecorator over it too)."""
    return isinstance(type_, sa.JSON) or isinstance(
        getattr(type_, "impl_instance", None), sa.JSON
    )


def _own_names(bind: sa.BindParameter[t.Any]) -> set[str]:
    """The texts of a parameter compared with JSON that name its own value:
    each item of a list or its rows (an IN may hold a key and a value), a JSON
    document given as text (its keys are in it). A plain text does not name
    itself: ``doc["status"] == "token_expired"`` keeps its value."""
    value = bind.value
    if isinstance(value, (list, tuple)):
        return _value_texts(value)
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        return {value}
    return set()


def _texts(nodes: list[t.Any]) -> set[str]:
    """The text values of the parameters among ``nodes``."""
    texts: set[str] = set()
    for node in nodes:
        if isinstance(node, sa.BindParameter):
            texts |= _value_texts(node.value)
    return texts


def _value_texts(value: t.Any) -> set[str]:
    """The texts in a parameter's value: itself, the items of a list, and
    the items of its rows (a tuple IN's)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    flat = [i for item in items for i in (item if isinstance(item, tuple) else [item])]
    return {text for text in flat if isinstance(text, str)}


def _named(param: str, names: set[str]) -> bool:
    """Whether ``param`` is one of the parameter ``names``, or one an
    expanded IN made of it (``name_1`` gives ``name_1_1``, ``name_1_2``...):
    whether it, or the part of it before any ``_``, is one of them. Looked
    up, not compared with each name: a WHERE can hold thousands."""
    while True:
        if param in names:
            return True
        param, underscore, _ = param.rpartition("_")
        if not underscore:
            return False


def _after_commit(session: sa_orm.Session) -> None:
    if not has_app_context():
        return
    context.after_commit(session)
    state = context._main_session_state(session)
    if state is None or not state.changes:
        return
    transaction = _current_carrier(session)
    changes = state.changes.pop(transaction, None)
    if not changes or transaction is None:
        return
    if transaction.nested and transaction.parent is not None:
        state.changes.setdefault(_carrier(transaction.parent), []).extend(changes)
    else:
        _deliver(state, changes, "committed")


def _after_transaction_end(
    session: sa_orm.Session, transaction: sa_orm.SessionTransaction
) -> None:
    if not transaction.nested and transaction.parent is not None:
        return
    state = context._main_session_state(session) if has_app_context() else None
    if state is None:
        return
    # Still waiting at its end: the transaction did not commit.
    changes = state.changes.pop(transaction, None)
    if changes:
        _deliver(state, changes, "rolled_back")
    if transaction.parent is None:
        state.flush = None
        state.main_connection = None  # may go to another session next


def _deliver(state: context.ContextState, changes: list[Change], main_tx: str) -> None:
    # Called from session events, which must not break the main session: in
    # "raise" mode too, entries that cannot be written are spooled, as at
    # teardown, since raising here would reach no caller that asked for them.
    try:
        app_state: _AppState = current_app.extensions["sidelog"]
        entries = make_change_entries(
            changes,
            app_state.settings.redact_keys,
            main_tx=main_tx,
            request_id=state.request_id,
            **state.request_fields,
        )
        with spool_on_error():
            app_state.extension._deliver(app_state, state, entries)
    except Exception:
        current_app.logger.exception(
            "flask-sidelog could not record %d tracked change(s).", len(changes)
        )


def make_change_entries(
    changes: list[Change], redact_keys: frozenset[str], **fields: t.Any
) -> list[dict[str, t.Any]]:
    """The entries of ``changes``, exactly as :func:`make_entry` makes them.

    A flush can change thousands of rows, so the fields they share go through
    :func:`make_entry` once, and each row's data takes a short path when it
    holds only plain values; anything else takes :func:`storable_data`.
    A row change whose values are already stored as they are, with no name
    to redact, is its own storable data.
    """
    template = make_entry(changes[0].event, redact_keys=redact_keys, **fields)
    events: dict[str, str] = {}
    actors: dict[str | None, str | None] = {}
    redacted: dict[str, bool] = {}
    as_is: dict[_Spec, bool] = {}
    row_keys_plain = not any(
        is_redacted(key, redact_keys) for key in ("table", "pk", "changes")
    )
    entries = []
    for change, entry_uuid in zip(changes, new_uuids(len(changes)), strict=True):
        entry = template.copy()
        entry["uuid"] = entry_uuid
        event = events.get(change.event)
        if event is None:
            event = events[change.event] = check_event(change.event)
        entry["event"] = event
        if change.actor not in actors:
            actors[change.actor] = cut(change.actor, COLUMN_LIMITS["actor"])
        entry["actor"] = actors[change.actor]
        entry["created_at"] = change.at
        data = None
        spec = change.spec
        if spec is not None and row_keys_plain:
            if spec not in as_is:
                names = [*spec.columns.values(), *(c for _, c in spec.pk)]
                as_is[spec] = not any(is_redacted(n, redact_keys) for n in names)
            if as_is[spec]:
                data = change.data
        if data is None and row_keys_plain:
            data = _plain_row_data(change.data, redact_keys, redacted)
        if data is None:
            data = t.cast("dict[str, t.Any]", storable_data(change.data, redact_keys))
            if data.get("_truncated"):
                # Keep what finds the row even when its values were too big.
                data = t.cast(
                    "dict[str, t.Any]",
                    storable_data(
                        {
                            "table": change.data["table"],
                            "pk": change.data.get("pk"),
                            **data,
                        },
                        redact_keys,
                    ),
                )
        entry["data"] = data
        entries.append(entry)
    return entries


def _plain_row_data(
    data: dict[str, t.Any], redact_keys: frozenset[str], redacted: dict[str, bool]
) -> dict[str, t.Any] | None:
    """What :func:`storable_data` makes of a row change holding only plain
    values and well within :data:`MAX_DATA_BYTES`, or None for any other."""
    table, pk, changes = data.get("table"), data.get("pk"), data.get("changes")
    if (
        len(data) != 3
        or type(table) is not str
        or type(pk) is not dict
        or type(changes) is not dict
    ):
        return None
    # An upper bound of the JSON size.
    size = json_size_bound(table) + 40
    out_pk: dict[str, t.Any] = {}
    for key, value in pk.items():
        size += _plain_size(value) + json_size_bound(key) + 8
        if size > MAX_DATA_BYTES or not _plain_key(key, redact_keys, redacted):
            return None
        out_pk[key] = REDACTED if redacted[key] else _clean(value)
    out_changes: dict[str, t.Any] = {}
    for key, pair in changes.items():
        if type(pair) is not list or len(pair) != 2:
            return None
        old, new = pair
        size += _plain_size(old) + _plain_size(new) + json_size_bound(key) + 8
        if size > MAX_DATA_BYTES or not _plain_key(key, redact_keys, redacted):
            return None
        out_changes[key] = REDACTED if redacted[key] else [_clean(old), _clean(new)]
    return {"table": clean_text(table), "pk": out_pk, "changes": out_changes}


def _plain_key(
    key: t.Any, redact_keys: frozenset[str], redacted: dict[str, bool]
) -> bool:
    """Whether ``key`` is a name stored as it is; notes in ``redacted``
    whether its value is hidden."""
    if key in redacted:
        return True
    if type(key) is not str or clean_text(key) != key:
        return False
    redacted[key] = is_redacted(key, redact_keys)
    return True


def _plain_size(value: t.Any) -> int:
    """An upper bound of ``value``'s JSON size, or more than
    :data:`MAX_DATA_BYTES` if it is not a plain JSON value."""
    kind = type(value)
    if kind is str:
        return json_size_bound(value) + 2
    if value is None or kind is bool:
        return 5
    if kind is int and -_INT_RANGE <= value < _INT_RANGE:
        return 20
    if kind is float and math.isfinite(value):
        return 32
    return MAX_DATA_BYTES + 1


def _clean(value: t.Any) -> t.Any:
    # clean_text() encodes the whole string to find lone surrogates, which
    # an ASCII string cannot hold.
    if type(value) is str and ("\x00" in value or not value.isascii()):
        return clean_text(value)
    return value


_listening: set[type[sa_orm.Session]] = set()


def listen(session_class: type[sa_orm.Session]) -> None:
    """Capture tracked changes made by main sessions of ``session_class``.

    Registered after :func:`flask_sidelog.context.track_main_session`, so the
    context's own listeners have updated the transaction's fate first.
    """
    if session_class in _listening:
        return
    _listening.add(session_class)
    sa.event.listen(session_class, "before_flush", _before_flush)
    sa.event.listen(session_class, "after_flush", _after_flush)
    sa.event.listen(session_class, "after_rollback", _after_rollback)
    sa.event.listen(session_class, "do_orm_execute", _do_orm_execute)
    # First, as the context's (which it runs itself, so as to come after it).
    sa.event.listen(session_class, "after_commit", _after_commit, insert=True)
    sa.event.listen(session_class, "after_transaction_end", _after_transaction_end)


FATES = ("committed", "rolled_back")


def parse_pk(pk: t.Any) -> dict[str, str] | str:
    """A primary key as given to :meth:`SideLog.history`: a mapping, a
    ``"k1=v1,k2=v2"`` string (``\\,`` for a comma within a value, ``\\\\``
    for a backslash before a comma), or one value, with every value as text."""
    if isinstance(pk, t.Mapping):
        return {str(k): "" if v is None else str(v) for k, v in pk.items()}
    if not isinstance(pk, str) or "=" not in pk:
        return str(pk)
    parsed: dict[str, str] = {}
    for part in split_pairs(pk):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key or key in parsed:
            raise ValueError(
                f"Cannot read the primary key {pk!r}: give one value such as 7,"
                " or every key column as k1=v1,k2=v2 (each column once; write"
                " a comma within a value as \\,)."
            )
        parsed[key] = value.strip()
    return parsed


def split_pairs(text: str) -> list[str]:
    """``text`` split at its commas but those written ``\\,``. Before a
    comma or at the end, each ``\\\\`` is one backslash (a value ending in
    one, or holding one before a comma: ``a\\\\\\,b``). Any other backslash
    is kept as given (``\\\\srv\\docs``)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            parts.append("".join(current))
            current = []
            i += 1
        elif char == "\\":
            run = len(text[i:]) - len(text[i:].lstrip("\\"))
            i += run
            if text[i : i + 1] not in (",", ""):
                current.append("\\" * run)  # not before a comma: as given
                continue
            current.append("\\" * (run // 2))
            if run % 2:  # the last one escapes the comma (or ends the value)
                current.append("," if text[i : i + 1] == "," else "\\")
                i += 1
        else:
            current.append(char)
            i += 1
    parts.append("".join(current))
    return parts


def _pk_matches(stored: t.Any, wanted: dict[str, str] | str) -> bool:
    if not isinstance(stored, dict):
        return False
    text = {k: "" if v is None else str(v) for k, v in stored.items()}
    if isinstance(wanted, str):
        return len(text) == 1 and next(iter(text.values())) == wanted
    return text == wanted


def row_history(
    app_state: _AppState, table: str, pk: t.Any, only: str | None
) -> list[dict[str, t.Any]]:
    """The body of :meth:`SideLog.history`."""
    if only is not None and only not in FATES:
        raise ValueError(f"only must be 'committed' or 'rolled_back', got {only!r}.")
    wanted = parse_pk(pk)
    writer = app_state.writer
    c = writer.table.c
    # The event index narrows the read to this table's row changes; the
    # primary key is compared here, since JSON paths differ between backends.
    query = (
        sa.select(writer.table)
        .where(c.event.in_([f"{table}.{op}" for op in ROW_CHANGES]))
        .order_by(c.created_at, c.id)
    )
    if only is not None:
        query = query.where(c.main_tx == only)
    with writer.connect() as conn:
        rows = conn.execute(query).mappings().all()
    found = []
    for row in rows:
        data = row["data"]
        if isinstance(data, dict) and any(
            _pk_matches(key, wanted) for key in _keys(row["event"], data)
        ):
            found.append(row_to_dict(row))
    return found


def _keys(event: str, data: dict[str, t.Any]) -> list[t.Any]:
    """The primary keys a row change concerns: its row's, and for an
    update of the key itself, the one the row had before."""
    pk, changes = data.get("pk"), data.get("changes")
    if not event.endswith(".update") or not (
        isinstance(pk, dict) and isinstance(changes, dict)
    ):
        return [pk]
    before = {
        name: pair[0]
        for name, pair in changes.items()
        if name in pk and isinstance(pair, list) and len(pair) == 2
    }
    return [pk, {**pk, **before}] if before else [pk]
