"""Engine and session plumbing. Nothing connects at import time: engines are built from Settings on demand."""

from __future__ import annotations

import json
import logging
import weakref
import zlib
from collections import namedtuple
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Boolean, Engine, String, TypeDecorator, bindparam, create_engine, event, or_, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, InvalidatePoolError, MultipleResultsFound, NoResultFound, StatementError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, StaticPool
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ClauseElement, ColumnElement
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.sql.visitors import InternalTraversal

from fractal.config import Settings

SessionFactory = sessionmaker[Session]
T = TypeVar("T")


def create_db_engine(settings: Settings, **overrides: object) -> Engine:
    """Build the engine for ``settings.database_url`` (psycopg2 for Postgres, WAL-mode file for SQLite)."""
    url = settings.database_url
    if url.startswith("sqlite"):
        ensure_sqlite_directory(url)
        kwargs: dict[str, object] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if url == "sqlite:///:memory:":
            kwargs["poolclass"] = StaticPool
        kwargs.update(overrides)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        # Usually unneeded: the transaction bounds sent on every checkout (below) already find a connection that
        # died with the server and replace it, at no extra cost.
        "pool_pre_ping": settings.db_pool_pre_ping,
        "pool_timeout": settings.db_pool_timeout_s,
        # A dead server must fail fast (503 DATABASE_UNAVAILABLE), not hang a worker.
        "connect_args": {"connect_timeout": 3, "application_name": "fractal"},
    }
    kwargs.update(overrides)
    engine = create_engine(url, **kwargs)
    install_transaction_bounds(engine, settings)
    return engine


# Set on a pooled connection's info while the transaction opened at checkout (bounds already set) is unused.
_BOUNDED_AT_CHECKOUT = "fractal_bounded_at_checkout"


def transaction_bounds_sql(settings: Settings) -> str:
    """The statement that bounds one transaction's lock waits, statements and idle time (one round trip)."""
    return (
        f"SET LOCAL lock_timeout = {int(settings.db_lock_timeout_ms)};"
        f" SET LOCAL statement_timeout = {int(settings.db_statement_timeout_ms)};"
        f" SET LOCAL idle_in_transaction_session_timeout = {int(settings.db_idle_in_transaction_timeout_ms)}"
    )


def install_transaction_bounds(engine: Engine, settings: Settings) -> None:
    """Bound every transaction on ``engine`` with ``SET LOCAL``, and replace dead pooled connections on checkout.

    Why ``SET LOCAL`` per transaction rather than libpq ``options`` or a session ``SET``: behind PgBouncer in
    transaction-pooling mode a session setting sticks to whichever server connection ran it (and ``options`` is
    refused), while a ``SET LOCAL`` travels with its transaction. The statement runs at pool checkout, where it
    also opens the transaction the caller's first statement would have opened anyway, so it costs one round trip
    per checkout and doubles as a liveness check: when it finds the connection dead (the database restarted),
    the pool is invalidated and the checkout retried on a fresh connection, so the request that found the dead
    connection still succeeds (SQLAlchemy's pre-ping would cost a round trip of its own). A second transaction
    on the same checked-out connection is bounded when it begins. ``run_in_own_transaction`` (the hot routes)
    sends the bounds in the same query string as its statement instead, and retries a dead connection itself.
    """
    bounds = transaction_bounds_sql(settings)
    _BOUNDS[engine] = bounds
    dialect = engine.dialect

    @event.listens_for(engine, "checkout")
    def _bound_at_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        if _BOUNDS_SENT_BY_CALLER.get():
            return  # run_in_own_transaction sends the bounds with its statement
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(bounds)  # psycopg2 opens the transaction (BEGIN) before it
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, cursor):
                raise InvalidatePoolError(str(error)) from error
            raise
        finally:
            cursor.close()
        record.info[_BOUNDED_AT_CHECKOUT] = True

    @event.listens_for(engine, "begin")
    def _bound_later_transactions(connection: Connection) -> None:
        if connection.connection.info.pop(_BOUNDED_AT_CHECKOUT, False):
            return  # the checkout's transaction is the one beginning: already bounded
        connection.exec_driver_sql(bounds)

    @event.listens_for(engine, "checkin")
    def _forget(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info.pop(_BOUNDED_AT_CHECKOUT, None)


Row = tuple[Any, ...]

# The transaction bounds of each engine they were installed on, for run_in_own_transaction's own transactions.
_BOUNDS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
# Set while run_in_own_transaction checks a connection out: it sends the bounds with its statement instead.
_BOUNDS_SENT_BY_CALLER: ContextVar[bool] = ContextVar("fractal_bounds_sent_by_caller", default=False)


_SERVER_IDLE = 0  # psycopg2.extensions.TRANSACTION_STATUS_IDLE (libpq's own view, no round trip)


class _LostBeforeCommit(Exception):
    """The connection was found dead before anything could have been committed: safe to send once more."""

    def __init__(self, error: StatementError) -> None:
        super().__init__(str(error))
        self.error = error


def run_in_own_transaction(
    engine: Engine,
    statement: str,
    parameters: Mapping[str, Any],
    *,
    commit_if: Callable[[Row | None], bool] | None = None,
    set_local: Mapping[str, str] | None = None,
) -> Row | None:
    """Run one statement on a pooled DBAPI connection in a bounded transaction of its own; return its first row.

    For the hot routes (assign, heartbeat): the ORM session's and Core's execution layers cost more worker CPU than
    the rest of their database work, and the round trips cost more wall time than the statement. The transaction
    bounds (``transaction_bounds_sql``) and any ``set_local`` settings (``SET LOCAL``, so PgBouncer-safe) travel in
    the same query string as the statement, with the connection in autocommit so psycopg2 sends no BEGIN of its
    own; the checkout sends nothing:

    - ``commit_if`` None: one round trip. Postgres runs a query string of several statements as one implicit
      transaction, committed when the last one ends and rolled back when one fails; so the statement must write
      nothing it should not keep whatever it returns, and be safe to run twice (see the retry below).
    - ``commit_if`` given: two round trips. ``BEGIN``, the bounds and the statement, then ``COMMIT`` when
      ``commit_if(row)`` holds, else ``ROLLBACK``.

    A connection found dead when the statement is sent (the database restarted) is invalidated with the rest of
    the pool and the statement sent once more on a fresh connection, so the request that found it still succeeds
    (as the checkout's bounds do for the other routes): with ``commit_if`` nothing can have been committed; without,
    the statement may have been (the connection died after the commit, before the answer), hence run twice. Driver
    errors are raised as SQLAlchemy's (a lost connection invalidated), so they get the same answers as on any route
    (503 DATABASE_BUSY / DATABASE_UNAVAILABLE). ``statement`` is in the driver's parameter style.
    """
    bounds = [_BOUNDS.get(engine, "")]
    bounds += [f"SET LOCAL {name} = {value}" for name, value in (set_local or {}).items()]
    prefix = "; ".join(part for part in bounds if part)
    if commit_if is not None:
        prefix = f"BEGIN; {prefix}" if prefix else "BEGIN"
    query = f"{prefix};\n{statement}" if prefix else statement
    try:
        return _run_once(engine, query, parameters, commit_if, retry=True)
    except _LostBeforeCommit:
        return _run_once(engine, query, parameters, commit_if, retry=False)


def _run_once(
    engine: Engine,
    query: str,
    parameters: Mapping[str, Any],
    commit_if: Callable[[Row | None], bool] | None,
    *,
    retry: bool,
) -> Row | None:
    dialect = engine.dialect
    driver_error = dialect.loaded_dbapi.Error
    marker = _BOUNDS_SENT_BY_CALLER.set(True)
    try:
        connection = engine.raw_connection()
    except driver_error as error:
        raise DBAPIError.instance(
            None, None, error, driver_error, connection_invalidated=dialect.is_disconnect(error, None, None)
        ) from error
    finally:
        _BOUNDS_SENT_BY_CALLER.reset(marker)
    dbapi_connection: Any = connection.dbapi_connection
    answered = False
    try:
        dbapi_connection.autocommit = True  # the query string carries the transaction: no BEGIN of psycopg2's
        cursor = connection.cursor()
        try:
            cursor.execute(query, parameters)
            fetched = cursor.fetchone()
            answered = True
            row = None if fetched is None else tuple(fetched)
            if commit_if is not None:
                cursor.execute("COMMIT" if commit_if(row) else "ROLLBACK")
        finally:
            cursor.close()
        return row
    except driver_error as error:
        lost = dialect.is_disconnect(error, dbapi_connection, None)
        if lost:
            # As SQLAlchemy does on a disconnect: the pool's other connections died with the server too.
            engine.pool._invalidate(connection, error)
        elif commit_if is not None:
            with suppress(driver_error):  # the explicit block is aborted: end it before the pool takes it back
                dbapi_connection.cursor().execute("ROLLBACK")
        translated = DBAPIError.instance(
            query, dict(parameters), error, driver_error, connection_invalidated=lost, dialect=dialect
        )
        if lost and retry and not answered:
            raise _LostBeforeCommit(translated) from error
        raise translated from error
    finally:
        if connection.is_valid:
            if dbapi_connection.info.transaction_status != _SERVER_IDLE:
                connection.invalidate()  # a block left open (an error that is not the driver's): never pooled
            else:
                dbapi_connection.autocommit = False  # as the pool's other users expect it
        connection.close()  # back to the pool (no transaction open: its reset sends nothing)


def ensure_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not its folder (the embedded default lives in instance/)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_session_factory(bind: Engine | Connection) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit (views serialize after the service commits)."""
    return sessionmaker(bind=bind, expire_on_commit=False)


@contextmanager
def session_scope(factory: SessionFactory) -> Iterator[Session]:
    """A session for work outside a request (scaler, CLI); rolled back on error, always closed."""
    session = factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for a Postgres advisory lock named ``name``."""
    value = zlib.crc32(name.encode()) | (zlib.crc32(name[::-1].encode()) << 32)
    return value - (1 << 64) if value >= (1 << 63) else value


def is_postgres(bind: Session | Connection | Engine) -> bool:
    return (
        bind.get_bind().dialect.name == "postgresql"
        if isinstance(bind, Session)
        else (bind.dialect.name == "postgresql")
    )


def try_advisory_xact_lock(session: Session, name: str) -> bool:
    """Take a transaction-scoped advisory lock without waiting; True when acquired (always on SQLite)."""
    if not is_postgres(session):
        return True
    got = session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": advisory_key(name)}).scalar()
    return bool(got)


def advisory_xact_lock(session: Session, name: str) -> None:
    """Wait for a transaction-scoped advisory lock (no-op on SQLite, which serialises writers anyway)."""
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key(name)})


class ReusableStatements(Generic[T]):
    """Statements built from callers' objects (a condition, a mapping of values) and kept by those objects' identity:
    a hot caller that passes module-level objects, their values as bind parameters, pays for building a statement
    once instead of every call (building one costs more CPU than running it; SQLAlchemy caches only the compiled
    form). An entry holds its objects, so their ids are not reused while it is kept. Bounded: a caller that builds
    its objects per call gets statements built per call."""

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[tuple[tuple[int, ...], Hashable], tuple[tuple[object, ...], T]] = {}
        self._max_entries = max_entries

    def get(self, objects: tuple[object, ...], shape: Hashable, build: Callable[[], T]) -> T:
        """The statement built from ``objects`` for ``shape`` (what else decides it), built now if not kept."""
        key = (tuple(id(item) for item in objects), shape)
        found = self._entries.get(key)
        if found is not None and all(kept is item for kept, item in zip(found[0], objects, strict=True)):
            return found[1]
        statement = build()
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[key] = (objects, statement)
        return statement


@dataclass(frozen=True, slots=True)
class DriverResult:
    """What a ``DriverStatement`` gave: its rows (tuples that also name their columns, like SQLAlchemy's rows) and
    the driver's row count."""

    rows: Sequence[Any]
    rowcount: int

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def all(self) -> Sequence[Any]:
        return self.rows

    def first(self) -> Any | None:
        return self.rows[0] if self.rows else None

    def scalar_one(self) -> Any:
        """The one row's first column; SQLAlchemy's NoResultFound or MultipleResultsFound otherwise."""
        return self.one()[0]

    def scalar(self) -> Any:
        """The first row's first column, None when there is no row."""
        return self.rows[0][0] if self.rows else None

    def one(self) -> Any:
        """The one row; SQLAlchemy's NoResultFound or MultipleResultsFound when there is not exactly one."""
        if len(self.rows) != 1:
            raise (NoResultFound if not self.rows else MultipleResultsFound)("expected one row")
        return self.rows[0]


_CALLER: Any = object()  # a parameter whose value the caller gives


def _processed(process: Callable[[Any], Any] | None, value: Any) -> Any:
    return value if process is None else process(value)


class _DriverForm:
    """A statement compiled for one dialect: its SQL, how the caller's values become the driver's parameters (the
    types' own bind processors, in the dialect's parameter style), and, once the first answer names its columns,
    how the driver's values become the columns' types (their result processors)."""

    __slots__ = ("binds", "columns", "converts", "names", "positional", "processors", "row_class", "sql")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = cast(ClauseElement, statement).compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {statement!r}")
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise ValueError("a DriverStatement cannot run Python-side column defaults: give every value")
        late = compiled.literal_execute_params | compiled.post_compile_params
        if any(bind.required for bind in late):
            raise ValueError("a DriverStatement cannot expand parameters (IN lists) per call")
        if any(bind.callable is not None for bind in compiled.binds.values()):
            raise ValueError("a DriverStatement cannot evaluate callable bind values")
        caller = {name for name, bind in compiled.binds.items() if bind.required}
        types = {name: bind.type for name, bind in compiled.binds.items()}
        if late:
            # IN lists of constants (``status IN ('ACTIVE', 'DRAINING')``): rendered once, here, with their values,
            # as SQLAlchemy renders them at every execution. The caller's values are not needed for that.
            expanded = compiled.construct_expanded_state(dict.fromkeys(caller))
            self.sql = expanded.statement
            names = list(expanded.positiontup or ()) if dialect.positional else list(expanded.parameters)
            constants = {name: value for name, value in expanded.parameters.items() if name not in caller}
            for bind in late:  # an expanded value is named after its list: <list's name>_<n>
                base = compiled.bind_names[bind]
                types.update({name: bind.type for name in constants if name.rpartition("_")[0] == base})
        else:
            self.sql = compiled.string
            names = list(compiled.positiontup or ()) if dialect.positional else list(compiled.binds)
            constants = {name: bind.value for name, bind in compiled.binds.items() if name not in caller}
        self.positional = dialect.positional
        processors = {name: types[name].dialect_impl(dialect).bind_processor(dialect) for name in names}
        # Each parameter: its name, its type's processor, and its value when the statement holds it (processed
        # once, here); _CALLER when the caller gives it.
        self.binds = tuple(
            (name, processors[name], _CALLER if name in caller else _processed(processors[name], constants[name]))
            for name in names
        )
        self.names = tuple(names)
        self.columns = _result_columns(statement)
        self.row_class: Any = None
        self.processors: tuple[Callable[[Any], Any] | None, ...] = ()
        self.converts = False  # whether any column has a processor (else a row is the driver's values as they are)

    def parameters(self, values: Mapping[str, Any]) -> Any:
        # The statement's own value unless the caller gives one, as SQLAlchemy's execution does. One comprehension,
        # no helper call per value: this runs for every statement of every hot path.
        converted = [
            constant
            if constant is not _CALLER and name not in values
            else (values[name] if process is None else process(values[name]))
            for name, process, constant in self.binds
        ]
        if self.positional:
            return tuple(converted)
        return dict(zip(self.names, converted, strict=True))

    def describe(self, description: Sequence[Any], dialect: Dialect) -> None:
        """Name the rows' columns and choose their processors from the first answer's ``cursor.description``.

        ``row_class`` is set last: it is what tells a concurrent caller (a threaded worker) that the form is
        described, so it must never see the row class without the processors."""
        names = [column[0] for column in description]
        if len(self.columns) == len(names):
            self.processors = tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, entry[1])
                for column, entry in zip(self.columns, description, strict=True)
            )
        else:  # SQL text without declared columns, or an INSERT's implicit RETURNING: the driver's values as they are
            self.processors = (None,) * len(names)
        self.converts = any(process is not None for process in self.processors)
        self.row_class = namedtuple("DriverRow", names, rename=True)  # type: ignore[misc]


def _result_columns(statement: object) -> tuple[Any, ...]:
    """The columns a statement declares it returns (a SELECT's, a DML's RETURNING), in order; none for plain SQL."""
    for attribute in ("selected_columns", "exported_columns"):
        columns = getattr(statement, attribute, None)
        if columns is not None:
            return tuple(columns)
    return ()


class DriverStatement:
    """A Core statement compiled once per dialect and run on the DBAPI cursor of the caller's connection.

    For the statements the hot paths run thousands of times (an assign's take and insert, the audit event, the
    simulator's every tick): SQLAlchemy's execution of a compiled, cached statement still costs several times what
    the driver does (on SQLite ~150-250 µs per statement against ~100 µs in SQLite itself, measured in a simulated
    hour), most of it in building an execution context and a result for every call. The statement is the same Core
    construct and the same SQL, its values pass through the same types' processors, it runs in the caller's
    transaction (the session's connection, begun and bounded as usual), and the driver's errors are raised as
    SQLAlchemy's, a lost connection invalidated, so they get the same answers as on any route.

    What it does not do: expand IN lists, run Python-side column defaults (both refused when compiled), fire the
    engine's cursor events or write SQLAlchemy's SQL log. When anything listens to those events (the tests that
    count or EXPLAIN statements) or the SQL log is on (an operator debugging), the statement runs through
    SQLAlchemy's own path instead, so every statement is still seen and logged.
    """

    __slots__ = ("_forms", "statement", "strict")

    def __init__(self, statement: Executable, *, strict: bool = True) -> None:
        """``strict``: refuse, when first run, a statement the driver's path cannot run; when False, such a statement
        (a caller's condition with an IN list, say) runs through SQLAlchemy's own path instead."""
        self.statement = statement
        self.strict = strict
        # By dialect object, which is each engine's own: how a statement compiles may depend on more than the
        # dialect's name (the simulator's virtual clock, a server's version).
        self._forms: weakref.WeakKeyDictionary[Dialect, _DriverForm | None] = weakref.WeakKeyDictionary()

    def compiled_for(self, dialect: Dialect) -> _DriverForm | None:
        """The statement's form for ``dialect``; None when it runs through SQLAlchemy's path (``strict`` False)."""
        try:
            return self._forms[dialect]
        except KeyError:
            pass
        try:
            form: _DriverForm | None = _DriverForm(self.statement, dialect)
        except ValueError:
            if self.strict:
                raise
            form = None
        self._forms[dialect] = form
        return form

    def execute(self, bind: Session | Connection, values: Mapping[str, Any] | None = None) -> DriverResult:
        """Run the statement with ``values`` (by bind parameter name) in ``bind``'s transaction; a session's pending
        changes are flushed first when it autoflushes, as its ``execute`` would."""
        if isinstance(bind, Session):
            if bind.autoflush:
                bind.flush()  # nothing to write (the common case) returns at once
            connection = bind.connection()
        else:
            connection = bind
        values = values or {}
        dialect = connection.dialect
        form = self.compiled_for(dialect)
        if form is None or _seen_by_sqlalchemy(connection):
            result = connection.execute(self.statement, values)
            return DriverResult(result.all() if result.returns_rows else (), result.rowcount)
        parameters = form.parameters(values)
        cursor = _driver_connection(connection).cursor()
        try:
            cursor.execute(form.sql, parameters)
            description = cursor.description
            if description is None:
                return DriverResult((), cursor.rowcount)
            fetched = cursor.fetchall()
            if form.row_class is None:
                form.describe(description, dialect)
            make = form.row_class._make
            if not form.converts:  # no column needs converting: the driver's tuples, named
                return DriverResult([make(row) for row in fetched], cursor.rowcount)
            processors = form.processors
            rows = [
                make(
                    [
                        value if process is None else process(value)
                        for process, value in zip(processors, row, strict=True)
                    ]
                )
                for row in fetched
            ]
            return DriverResult(rows, cursor.rowcount)
        except dialect.loaded_dbapi.Error as error:
            raise _driver_error(connection, form.sql, parameters, error, cursor) from error
        finally:
            cursor.close()

    def executemany(self, bind: Session | Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per mapping of ``rows``: on SQLite one prepared statement for all (the driver's
        ``executemany``); elsewhere SQLAlchemy's own (on psycopg2 it batches many rows per round trip, where the
        driver's ``executemany`` would send one per row)."""
        if not rows:
            return
        connection = bind.connection() if isinstance(bind, Session) else bind
        dialect = connection.dialect
        form = self.compiled_for(dialect) if dialect.name == "sqlite" else None
        if form is None or _seen_by_sqlalchemy(connection):
            connection.execute(self.statement, list(rows))
            return
        parameters = [form.parameters(row) for row in rows]
        cursor = _driver_connection(connection).cursor()
        try:
            cursor.executemany(form.sql, parameters)
        except dialect.loaded_dbapi.Error as error:
            raise _driver_error(connection, form.sql, parameters, error, cursor) from error
        finally:
            cursor.close()


def _driver_connection(connection: Connection) -> Any:
    """The DBAPI connection under ``connection`` (the pool's proxy would only forward ``cursor()`` to it)."""
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None  # as the proxy's own cursor() asserts
    return dbapi_connection


def _seen_by_sqlalchemy(connection: Connection) -> bool:
    """Whether something watches this connection's statements through SQLAlchemy: a listener of its cursor events,
    or its SQL log (``sqlalchemy.engine`` at INFO, or ``echo``). Then a DriverStatement takes SQLAlchemy's path, so
    that what they watch still sees (and logs, with its parameters) every statement.

    The listeners are looked up only when the connection or its engine has any connection event listener at all:
    SQLAlchemy's own flag for that (``_has_events``, which its execution checks before every event it could
    fire) costs an attribute read, the lookup through the joined dispatchers a microsecond per statement."""
    engine = connection.engine
    if getattr(connection, "_has_events", True) or getattr(engine, "_has_events", True):
        dispatch = connection.dispatch
        if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            return True
    return engine.logger.isEnabledFor(logging.INFO)


def _driver_error(connection: Connection, sql: str, parameters: Any, error: Exception, cursor: Any) -> StatementError:
    """The driver's ``error`` as SQLAlchemy would raise it, the connection invalidated when it was lost."""
    dialect = connection.dialect
    lost = bool(dialect.is_disconnect(cast(Any, error), connection.connection.dbapi_connection, cursor))
    if lost:
        connection.invalidate(error)
    return DBAPIError.instance(
        sql, parameters, error, dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=dialect
    )


class _ValueList(TypeDecorator[list[Any]]):
    """A list of values of one type as ONE bind parameter (``in_values``): an array on Postgres, a JSON array of the
    element type's stored form on SQLite (read there with ``json_each``)."""

    impl = String
    cache_ok = True

    def __init__(self, element: TypeEngine[Any]) -> None:
        super().__init__()
        self.element = element

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(self.element))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: list[Any] | None, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value  # the array type converts each element
        process = self.element.dialect_impl(dialect).bind_processor(dialect)
        return json.dumps([item if process is None else process(item) for item in value])


class _InValues(ColumnElement[bool]):
    """``column`` is one of the list bound to ``bind`` (``in_values``)."""

    __visit_name__ = "fractal_in_values"
    inherit_cache = True
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("bind", InternalTraversal.dp_clauseelement),
    ]
    type = Boolean()
    _is_implicitly_boolean = True  # a comparison: no "= 1" after it where booleans are integers (SQLite)

    def __init__(self, column: ColumnElement[Any], bind: BindParameter[Any]) -> None:
        self.column = column
        self.bind = bind


def one_of(column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """``column`` equals one of the constant ``values``, written as equalities (in sorted order): an IN list of
    constants is rendered anew by SQLAlchemy at every execution and cannot run as a ``DriverStatement``; both
    backends plan the two forms alike."""
    return or_(*(column == value for value in sorted(values)))


def in_values(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """``column IN (the list passed as parameter name)``, written so that the statement's text does not depend on
    the list's length: ``= ANY(:name::type[])`` on Postgres, ``IN (SELECT value FROM json_each(:name))`` on
    SQLite. An expanding IN renders (and SQLite prepares) the statement anew for every length, and cannot run as a
    ``DriverStatement``; this can. Both forms use the column's index."""
    return _InValues(column, bindparam(name, type_=_ValueList(column.type)))


@compiles(_InValues, "postgresql")
def _in_values_postgres(element: _InValues, compiler: SQLCompiler, **kw: Any) -> str:
    # The bind is typed as an array of the column's type, which psycopg2's dialect renders with its cast.
    return f"{compiler.process(element.column, **kw)} = ANY({compiler.process(element.bind, **kw)})"


@compiles(_InValues)
def _in_values_json(element: _InValues, compiler: SQLCompiler, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.bind, **kw)
    return f"{column} IN (SELECT value FROM json_each({values}))"  # noqa: S608 (compiled SQL, no values)


class _SqliteUnindexed(ColumnElement[T]):
    """``column``, which SQLite's planner may not serve from an index (``sqlite_unindexed``)."""

    __visit_name__ = "fractal_sqlite_unindexed"
    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[T]) -> None:
        self.column = column
        self.type = column.type


def sqlite_unindexed(column: ColumnElement[T]) -> ColumnElement[T]:
    """``column``, written ``+column`` on SQLite: the same value and comparisons (unary plus changes no value), but
    a term no index can serve; as is on other backends.

    SQLite has no statistics on these databases, so it takes any index a term allows, even one that walks a large
    part of a table: a term that only re-checks a row found otherwise (a mover's allowed statuses beside the rows'
    names) or that a narrower range serves better (an id range rather than a time window) is written this way.
    Postgres plans by its statistics and gets the plain column."""
    return _SqliteUnindexed(column)


@compiles(_SqliteUnindexed, "sqlite")
def _sqlite_unindexed_sqlite(element: _SqliteUnindexed[Any], compiler: SQLCompiler, **kw: Any) -> str:
    return f"+{compiler.process(element.column, **kw)}"


@compiles(_SqliteUnindexed)
def _sqlite_unindexed_plain(element: _SqliteUnindexed[Any], compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)
