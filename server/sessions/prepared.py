"""Core statements run straight on the DBAPI cursor, for the event fast path.

A Core ``Connection.execute`` costs 120-230 µs of Python on our 2-core machine (execution
context, cache key, parameter processing, result metadata) where the DBAPI call itself is
4-5 µs on SQLite: for a batch of one event the fast path's dozen statements took 2-3 ms.
:class:`Prepared` keeps SQLAlchemy for what it is good at — the dialect's SQL, IN-list
expansion, the column types' conversions (``UTCDateTime``, booleans) — and does it once:
the statement is compiled once per dialect and per IN-list sizes, the bind and result
converters are looked up once, and each execution only orders and converts its
parameters and calls the cursor. It runs on the connection's own DBAPI connection, inside
its transaction; a DBAPI error is raised as the SQLAlchemy exception the same failure
would raise through ``Connection.execute`` (``IntegrityError``, ``OperationalError``, ...).
"""

from __future__ import annotations

import collections
import contextlib
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["Pending", "Prepared", "pipeline"]

Processor = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    sql: str
    names: tuple[str, ...]  # DBAPI parameters in order (positional) or by name
    sources: tuple[tuple[str, int | None], ...]  # each: (given name, index in its list)
    constants: Mapping[str, Any]  # values the statement carries itself
    processors: tuple[Processor | None, ...]
    positional: bool
    getter: Callable[[Mapping[str, Any]], Any] | None = None
    """When every value is a given one by name (no IN-list, no constant): all of them at
    once (``operator.itemgetter``), then only the converting processors run."""
    converting: tuple[tuple[int, Processor], ...] = ()

    def parameters(self, given: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        getter = self.getter
        if getter is not None:
            found = getter(given)
            values: list[Any] = [found] if len(self.names) == 1 else list(found)
            for position, process in self.converting:
                values[position] = process(values[position])
            if self.positional:
                return values
            return dict(zip(self.names, values, strict=True))
        return self._slow_parameters(given)

    def _slow_parameters(self, given: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        values: list[Any] = []
        for name, (source, index), process in zip(
            self.names, self.sources, self.processors, strict=True
        ):
            if source in given:
                value = given[source] if index is None else given[source][index]
            else:
                value = self.constants[name]
            values.append(value if process is None else process(value))
        if self.positional:
            return values
        return dict(zip(self.names, values, strict=True))


def _padded(values: list[Any]) -> list[Any]:
    n = len(values)
    if n < 2 or n & (n - 1) == 0:
        return values
    return values + [values[-1]] * ((1 << n.bit_length()) - n)


def _pipelining(conn: Connection) -> bool:
    """Whether the connection is in libpq's pipeline mode (psycopg; never on SQLite)."""
    pgconn = getattr(conn.connection.dbapi_connection, "pgconn", None)
    return bool(getattr(pgconn, "pipeline_status", 0))


def _raised(
    dialect: Dialect, sql: str, parameters: Any, exc: Exception, *, many: bool = False
) -> Exception:
    """A DBAPI error as the SQLAlchemy exception ``Connection.execute`` would raise."""
    return sa.exc.DBAPIError.instance(
        sql, parameters, exc, dialect.loaded_dbapi.Error, dialect=dialect, ismulti=many
    )


class Pending:
    """A query sent; :meth:`rows` takes its rows (once)."""

    def __init__(
        self, prepared: Prepared, dialect: Dialect, sql: str, parameters: Any, cursor: Any
    ) -> None:
        self._prepared = prepared
        self._dialect = dialect
        self._sql = sql
        self._parameters = parameters
        self._cursor = cursor
        self._rows: list[Any] | None = None

    def rows(self) -> list[Any]:
        if self._rows is None:
            cursor, self._cursor = self._cursor, None
            try:
                fetched = cursor.fetchall()
            except self._dialect.loaded_dbapi.Error as exc:
                raise _raised(self._dialect, self._sql, self._parameters, exc) from exc
            finally:
                cursor.close()
            self._rows = self._prepared._convert(self._dialect, fetched)
        return self._rows


@contextlib.contextmanager
def pipeline(conn: Connection) -> Iterator[None]:
    """On PostgreSQL (psycopg), the statements run inside go out without waiting for each
    other's answers: queries sent with :meth:`Prepared.submit` before the first
    :meth:`Pending.rows` share one round trip, and the writes (``executemany``) that end
    the block share the one it ends with, where each statement took a round trip of its
    own (≈ 20 per batch of the event fast path, most of a small batch's time). An error of
    any of them is raised (as SQLAlchemy's exception) by ``rows`` or at the end of the
    block. Elsewhere it does nothing."""
    dbapi = conn.connection.dbapi_connection
    start = getattr(dbapi, "pipeline", None) if conn.dialect.name == "postgresql" else None
    if start is None:
        yield
        return
    dialect = conn.dialect
    try:
        with start():
            yield
    except dialect.loaded_dbapi.Error as exc:
        raise _raised(dialect, "(pipeline)", (), exc) from exc


class Prepared:
    """One statement; :meth:`all` for a query, :meth:`run` and :meth:`many` for writes."""

    def __init__(self, statement: sa.ClauseElement) -> None:
        self.statement = statement
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._rows: dict[str, tuple[type[Any], tuple[Processor | None, ...]]] = {}

    # -- compiling, once ---------------------------------------------------------------------
    def _plan(self, dialect: Dialect, given: Mapping[str, Any]) -> _Plan:
        # Callers pass their parameters in a fixed order: no sorting on every execution.
        key = (
            dialect.name,
            tuple((k, len(v)) if isinstance(v, list) else k for k, v in given.items()),
        )
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        compiled = self.statement.compile(
            dialect=dialect,
            column_keys=sorted(given) if isinstance(self.statement, sa.Insert) else None,
        )
        assert isinstance(compiled, SQLCompiler)
        state = compiled.construct_expanded_state(dict(given))
        expanded = {
            name: (source, index)
            for source, names in state.parameter_expansion.items()
            for index, name in enumerate(names)
        }
        names = tuple(state.positiontup or state.parameters)
        sources = tuple(expanded.get(name, (name, None)) for name in names)
        missing = [
            name
            for name, (source, _) in zip(names, sources, strict=True)
            if source not in given and name not in state.parameters
        ]
        if missing:  # a column default computed at execution: not for this class
            raise ValueError(f"no value for {missing} in {self.statement}")
        constants = {
            name: state.parameters[name]
            for name, (source, _) in zip(names, sources, strict=True)
            if source not in given
        }
        # The statement's own bind processors, and those of the expanded IN-list values (as
        # SQLAlchemy's execution context merges them). ``state.processors`` alone holds only
        # the expanded ones: the fast path once stored SQLite timestamps in the driver's
        # default form ("... 12:00:00+00:00", even "+08:00") instead of UTC text.
        # (A sequence of processors is for tuple-typed binds, which these statements lack.)
        own = cast("Mapping[str, Processor]", compiled._bind_processors)
        every: dict[str, Processor] = {**own, **state.processors}
        processors = tuple(every.get(name) for name in names)
        direct = bool(names) and not constants and all(index is None for _, index in sources)
        plan = _Plan(
            sql=state.statement,
            names=names,
            sources=sources,
            constants=constants,
            processors=processors,
            positional=state.positiontup is not None,
            getter=operator.itemgetter(*(source for source, _ in sources)) if direct else None,
            converting=tuple(
                (position, process)
                for position, process in enumerate(processors)
                if process is not None
            ),
        )
        self._plans[key] = plan
        return plan

    def _row_type(self, dialect: Dialect) -> tuple[type[Any], tuple[Processor | None, ...]]:
        known = self._rows.get(dialect.name)
        if known is None:
            assert isinstance(self.statement, sa.Select)
            columns = list(self.statement.selected_columns)
            row = collections.namedtuple("Row", [c.key for c in columns])  # type: ignore[misc]
            converters = tuple(
                c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
            )
            known = self._rows[dialect.name] = (row, converters)
        return known

    # -- running -------------------------------------------------------------------------------
    def all(self, conn: Connection, **given: Any) -> list[Any]:
        """The rows of a query, as named tuples converted by the columns' types.

        Each IN-list is padded to a power-of-two length with its last value (``IN (a, b,
        b, b)`` selects what ``IN (a, b)`` does): a statement is then compiled, and
        prepared by the driver, for a few lengths, not for every length a batch brings."""
        return self.submit(conn, **given).rows()

    def submit(self, conn: Connection, **given: Any) -> Pending:
        """Send the query now, take its rows later (:meth:`Pending.rows`): inside
        :func:`pipeline` on PostgreSQL, the queries sent before the first rows are taken
        make one round trip together. Elsewhere the rows are fetched at once."""
        dialect = conn.dialect
        given = {k: _padded(v) if type(v) is list else v for k, v in given.items()}
        plan = self._plan(dialect, given)
        parameters = plan.parameters(given)
        cursor = self._execute(conn, plan, parameters)
        pending = Pending(self, dialect, plan.sql, parameters, cursor)
        if not _pipelining(conn):
            pending.rows()
        return pending

    def _convert(self, dialect: Dialect, fetched: Sequence[Any]) -> list[Any]:
        row, converters = self._row_type(dialect)
        if not any(converters):
            return [row(*r) for r in fetched]
        return [
            row(*(v if f is None else f(v) for v, f in zip(r, converters, strict=True)))
            for r in fetched
        ]

    def run(self, conn: Connection, **given: Any) -> int:
        """Execute once; the number of rows it changed."""
        plan = self._plan(conn.dialect, given)
        cursor = self._execute(conn, plan, plan.parameters(given))
        count = int(cursor.rowcount)
        cursor.close()
        return count

    def many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per row (``executemany``); every row has the same keys."""
        if not rows:
            return
        plan = self._plan(conn.dialect, rows[0])
        self._execute(conn, plan, [plan.parameters(r) for r in rows], many=True).close()

    @staticmethod
    def _execute(conn: Connection, plan: _Plan, parameters: Any, *, many: bool = False) -> Any:
        dialect = conn.dialect
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        try:
            if many:
                cursor.executemany(plan.sql, parameters)
            else:
                cursor.execute(plan.sql, parameters)
        except dialect.loaded_dbapi.Error as exc:
            cursor.close()
            raise _raised(dialect, plan.sql, parameters, exc, many=many) from exc
        return cursor
