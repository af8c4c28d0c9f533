"""The aware-UTC column type stores on SQLite exactly the text SQLAlchemy's own
processors make, through its one-call fast form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from server import db as database
from server.db import UTCDateTime

_sqlite = sa.create_engine("sqlite://").dialect
_zones = st.sampled_from(
    [UTC, ZoneInfo("UTC"), ZoneInfo("Asia/Shanghai"), ZoneInfo("America/New_York")]
    + [timezone(timedelta(minutes=m)) for m in (-570, -1, 0, 1, 480, 765)]
)


def _slow(value: datetime) -> str:
    """SQLAlchemy's own chain: our process_bind_param, then SQLite DATETIME's processor."""
    column = UTCDateTime()
    impl = column.impl_instance.dialect_impl(_sqlite).bind_processor(_sqlite)
    assert impl is not None
    result = impl(column.process_bind_param(value, _sqlite))
    assert isinstance(result, str)
    return result


_naive_bounds = {  # hypothesis takes naive bounds and adds the zones itself
    "min_value": datetime(2, 1, 1),  # noqa: DTZ001
    "max_value": datetime(9998, 1, 1),  # noqa: DTZ001
}


@given(st.datetimes(timezones=_zones, **_naive_bounds))
def test_the_fast_sqlite_form_is_the_text_sqlalchemy_makes(value: datetime) -> None:
    fast = UTCDateTime().dialect_impl(_sqlite).bind_processor(_sqlite)
    assert fast is not None
    assert fast(value) == _slow(value)


def test_naive_and_none_values_on_sqlite() -> None:
    fast = UTCDateTime().dialect_impl(_sqlite).bind_processor(_sqlite)
    assert fast is not None
    assert fast(None) is None
    with pytest.raises(ValueError, match="naive"):
        fast(datetime(2026, 5, 4, 12))  # noqa: DTZ001


def test_stored_and_read_back_through_a_table(tmp_path: Path) -> None:
    engine = database.make_engine(f"sqlite:///{tmp_path}/t.db")
    table = sa.Table("t", sa.MetaData(), sa.Column("at", UTCDateTime()))
    try:
        with engine.begin() as conn:
            table.create(conn)
            local = datetime(2026, 5, 4, 20, 0, 0, 5, tzinfo=ZoneInfo("Asia/Shanghai"))
            conn.execute(table.insert(), [{"at": local}, {"at": datetime(2026, 5, 4, tzinfo=UTC)}])
            raw = conn.exec_driver_sql("SELECT at FROM t ORDER BY at").scalars().all()
            back = conn.execute(sa.select(table.c.at).order_by(table.c.at)).scalars().all()
        assert raw == ["2026-05-04 00:00:00.000000", "2026-05-04 12:00:00.000005"]
        assert back == [datetime(2026, 5, 4, tzinfo=UTC), local]
        assert all(v.tzinfo is UTC for v in back)
    finally:
        engine.dispose()
