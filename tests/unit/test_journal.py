"""The conductor's request journal on SQLite and on PostgreSQL."""

import uuid

import pytest
import sqlalchemy

from tsukimi.conductor.journal import RequestJournal

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_or_skip() -> str:
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return f"sqlite:///{tmp_path}/journal.db" if request.param == "sqlite" else _postgres_or_skip()


def test_records_decisions_and_survives_reopen(url):
    journal = RequestJournal(url)
    before_placed, before_refused = journal.count("placed"), journal.count("refused")
    rid = uuid.uuid4().hex
    journal.record(rid, "demo", 12, "placed", 1.0, prefill_id="p0", decode_id="d0")
    journal.record(uuid.uuid4().hex, "demo", 3, "refused", 2.0, error_code="no_capacity")
    journal.close()
    reopened = RequestJournal(url)
    assert reopened.count("placed") == before_placed + 1
    assert reopened.count("refused") == before_refused + 1
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        reopened.record(rid, "demo", 12, "placed", 1.0)
    reopened.close()
